"""Every error the API answers is JSON: `{"error": <code>, "message": <text>}`, never a trace."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from stepfleet.broker import BrokerError
from stepfleet.store import StoreError

log = structlog.get_logger("stepfleet.api")

_CODES = {
    400: "bad-request",
    401: "unauthorized",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "too-large",
    415: "unsupported-media-type",
    422: "invalid",
    503: "unavailable",
}


class ApiError(Exception):
    """An answer other than success, with a message for the caller."""

    def __init__(self, status: int, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code or _CODES.get(status, "error")


def error_body(status: int, message: str, code: str | None = None, **extra: Any) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(
        {"error": code or _CODES.get(status, "error"), "message": message, **extra},
        status_code=status,
        headers=headers,
    )


def _fields(exc: RequestValidationError) -> list[dict[str, Any]]:
    """Where and why, without echoing the input (it may be large or hostile)."""
    return [
        {"at": ".".join(str(p) for p in error.get("loc", ())), "why": str(error.get("msg", ""))}
        for error in exc.errors()[:20]
    ]


HtmlError = Callable[[Request, int, str], Response | None]


def install_error_handlers(app: FastAPI, *, html: HtmlError) -> None:
    """Answer every failure as JSON, or as the page `html` renders for console paths (it
    answers None for API paths)."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return html(request, exc.status, exc.message) or error_body(
            exc.status, exc.message, exc.code
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        fields = _fields(exc)
        message = "; ".join(f"{f['at']}: {f['why']}" for f in fields) or "invalid request"
        return html(request, 422, message) or error_body(422, message, fields=fields)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = str(exc.detail) or _CODES.get(exc.status_code, "error")
        return html(request, exc.status_code, message) or error_body(exc.status_code, message)

    @app.exception_handler(StoreError)
    async def store_down(request: Request, exc: StoreError) -> Response:
        log.warning("api_store_error", path=request.url.path, error=str(exc))
        return error_body(503, f"PostgreSQL: {exc}")

    @app.exception_handler(BrokerError)
    async def broker_down(request: Request, exc: BrokerError) -> Response:
        log.warning("api_broker_error", path=request.url.path, error=str(exc))
        return error_body(503, f"RabbitMQ: {exc}")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.error("api_unexpected_error", path=request.url.path, error=repr(exc))
        return error_body(500, "internal error (logged by the server)", "internal")
