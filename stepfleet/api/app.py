"""The ASGI application: the JSON API under /api/v1, the console under /, probes."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stepfleet.api import console, routes_fleet, routes_instances, routes_letters, routes_tenants
from stepfleet.api.errors import error_body, install_error_handlers
from stepfleet.api.fleet import Fleet
from stepfleet.api.settings import ApiSettings
from stepfleet.api.views import Health
from stepfleet.store import StoreError
from stepfleet.workers.settings import Settings

STATIC = Path(__file__).parent / "static"
_MODULES = re.compile(routes_tenants.MODULES_PATH)
VERSION = "1"


class TooLarge(HTTPException):
    """A request body over STEPFLEET_API_MAX_BODY_BYTES."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body over {limit} bytes")


class BodyLimit:
    """Refuse request bodies over `limit` bytes (`module_limit` for module pushes): by
    Content-Length before reading, and while reading for a body that does not say its
    length."""

    def __init__(self, app: ASGIApp, limit: int, module_limit: int) -> None:
        self.app = app
        self.limit = limit
        self.module_limit = module_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        push = scope.get("method") == "POST" and _MODULES.match(scope.get("path", ""))
        limit = max(self.limit, self.module_limit) if push else self.limit
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > limit):
                response = error_body(413, f"request body over {limit} bytes")
                await response(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLarge(limit)
            return message

        await self.app(scope, counted, send)


def create_app(settings: Settings, api: ApiSettings | None = None) -> FastAPI:
    """The API and console over the fleet these settings name."""
    api = api or ApiSettings()
    fleet = Fleet(settings, api)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await fleet.close()

    app = FastAPI(
        title="stepfleet API",
        version=VERSION,
        description=(
            "Instances, operator actions, dead letters, tenants, tokens and the audit log of "
            "a stepfleet fleet. Every request but /healthz and /readyz sends "
            "`Authorization: Bearer <token>` (tokens from `stepfleet token add`). Errors are "
            '`{"error": <code>, "message": <text>}`.'
        ),
        lifespan=lifespan,
        redirect_slashes=False,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/api/v1/openapi.json",
    )
    app.state.fleet = fleet
    install_error_handlers(app, html=console.error_page)
    app.add_middleware(BodyLimit, limit=api.max_body_bytes, module_limit=api.max_module_bytes)

    @app.get("/healthz", response_model=Health, tags=["probes"])
    async def healthz() -> Health:
        """Liveness: 200 while the process runs."""
        return Health(ok=True)

    @app.get(
        "/readyz",
        response_model=Health,
        tags=["probes"],
        responses={503: {"model": Health}},
    )
    async def readyz() -> JSONResponse:
        """Readiness: 200 when PostgreSQL answers, else 503 with the reason."""
        try:
            await asyncio.wait_for(fleet.store.browse.ping(), 5)
        except (StoreError, TimeoutError) as exc:
            reason = f"PostgreSQL: {str(exc) or 'no answer in 5 s'}"
            return JSONResponse(Health(ok=False, reason=reason).model_dump(), status_code=503)
        return JSONResponse(Health(ok=True).model_dump())

    app.include_router(routes_instances.router)
    app.include_router(routes_letters.router)
    app.include_router(routes_tenants.router)
    app.include_router(routes_fleet.router)
    app.include_router(console.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def serve(settings: Settings, api: ApiSettings) -> None:
    """Serve the app with uvicorn until SIGTERM or SIGINT."""
    import uvicorn

    uvicorn.run(
        create_app(settings, api),
        host=api.host,
        port=api.port,
        log_level=settings.log_level,
        access_log=False,
        proxy_headers=False,
        server_header=False,
    )
