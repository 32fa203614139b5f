"""The web console: server-rendered pages (Jinja2) with htmx, no JavaScript build.

A person logs in with a token at /login; the console keeps it in an HttpOnly, SameSite=Strict
cookie. Every form that changes something carries a token derived from the session's secret
(`auth.csrf_token`) and is refused without it, or when the browser says it came from another
origin. Actions go through the same `stepfleet.control` code as the CLI and the JSON API,
under the token's name.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any
from urllib.parse import urlencode, urlsplit

from fastapi import APIRouter, Form, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from stepfleet.api.auth import Principal, Role, csrf_matches, csrf_token
from stepfleet.api.errors import ApiError
from stepfleet.api.fleet import Fleet
from stepfleet.api.views import (
    MAX_PAGE,
    id_cursor,
    instance_cursor,
    instance_view,
    letter_view,
    parse_id_cursor,
    parse_instance_cursor,
    tenant_summary,
)
from stepfleet.schemas import INSTANCE_ID_PATTERN, TENANT_PATTERN, InstanceStatus
from stepfleet.store import LetterFilter

COOKIE = "stepfleet_session"
templates = Jinja2Templates(directory=FilePath(__file__).parent / "templates")
router = APIRouter(include_in_schema=False)

TenantPath = Annotated[str, Path(pattern=TENANT_PATTERN)]
IdPath = Annotated[str, Path(pattern=INSTANCE_ID_PATTERN)]
_ACTIONS = ("pause", "resume", "terminate", "restart", "retry", "delete")


def _is_console(request: Request) -> bool:
    path = request.url.path
    return not (path.startswith(("/api/", "/static/")) or path in ("/healthz", "/readyz"))


def error_page(request: Request, status: int, message: str) -> Response | None:
    """How the console answers a failure (None: not a console page, answer JSON)."""
    if not _is_console(request):
        return None
    if status == 401:
        return RedirectResponse("/login", status_code=303)
    return templates.TemplateResponse(
        request,
        "error.html",
        {"status": status, "message": message, "who": getattr(request.state, "principal", None)},
        status_code=status,
    )


def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


async def _session(request: Request, role: Role = Role.VIEWER) -> tuple[Fleet, Principal]:
    fleet = _fleet(request)
    principal = await fleet.principal(request.cookies.get(COOKIE))
    if principal is None:
        raise ApiError(401, "log in")
    request.state.principal = principal
    if not principal.may(role):
        raise ApiError(403, f"needs the {role.value} role; you are {principal.role.value}")
    return fleet, principal


def _same_origin(request: Request) -> None:
    """Refuse a form a browser says came from another site."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin and origin != "null":
        sent = urlsplit(origin)
        if sent.netloc != request.url.netloc:
            raise ApiError(403, "this form came from another site")


async def _form_session(request: Request, csrf: str, role: Role) -> tuple[Fleet, Principal]:
    _same_origin(request)
    fleet, principal = await _session(request, role)
    if not csrf_matches(request.cookies.get(COOKIE, ""), csrf):
        raise ApiError(403, "the form's token is missing or stale: reload the page")
    return fleet, principal


def _page(request: Request, name: str, principal: Principal | None, **context: Any) -> Response:
    csrf = csrf_token(request.cookies.get(COOKIE, "")) if principal else ""
    return templates.TemplateResponse(
        request,
        name,
        {
            "who": principal,
            "csrf": csrf,
            "may_act": bool(principal and principal.may(Role.OPERATOR)),
            "notice": request.query_params.get("notice"),
            **context,
        },
    )


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


templates.env.filters["pretty"] = _pretty
templates.env.filters["short"] = _short
templates.env.filters["when"] = _when


def _back(url: str, notice: str) -> RedirectResponse:
    joiner = "&" if "?" in url else "?"
    return RedirectResponse(f"{url}{joiner}{urlencode({'notice': notice})}", status_code=303)


# -- login -----------------------------------------------------------------------------------


@router.get("/login", response_class=HTMLResponse)
async def login_page(request: Request) -> Response:
    return _page(request, "login.html", None, failed=False)


@router.post("/login")
async def login(request: Request, token: Annotated[str, Form(max_length=200)]) -> Response:
    _same_origin(request)
    fleet = _fleet(request)
    secret = token.strip()
    if await fleet.principal(secret) is None:
        response = _page(request, "login.html", None, failed=True)
        response.status_code = 401
        return response
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        secret,
        httponly=True,
        samesite="strict",
        secure=fleet.api.secure_cookie,
        path="/",
    )
    return response


@router.post("/logout")
async def logout(request: Request, csrf: Annotated[str, Form(max_length=200)] = "") -> Response:
    await _form_session(request, csrf, Role.VIEWER)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


# -- pages -----------------------------------------------------------------------------------


@router.get("/", response_class=HTMLResponse)
async def overview(request: Request) -> Response:
    fleet, principal = await _session(request)
    return _page(request, "overview.html", principal, view=await fleet.overview(principal))


@router.get("/instances", response_class=HTMLResponse)
async def instances(
    request: Request,
    tenant: Annotated[str | None, Query(max_length=63)] = None,
    status: Annotated[str | None, Query(max_length=20)] = None,
    module: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    fleet, principal = await _session(request)
    tenant, status, module, since = (v or None for v in (tenant, status, module, since))
    statuses = []
    if status:
        try:
            statuses = [InstanceStatus(status)]
        except ValueError:
            raise ApiError(422, f"status: {status!r} is not an instance status") from None
    created_since = None
    if since:
        try:
            created_since = datetime.fromisoformat(since)
        except ValueError:
            raise ApiError(422, f"since: {since!r} is not a date and time") from None
    records = await fleet.store.browse.instances(
        tenant=fleet.tenant_filter(principal, tenant),
        statuses=statuses,
        module=module,
        created_since=created_since,
        after=parse_instance_cursor(cursor),
        limit=limit + 1,
    )
    more = len(records) > limit
    records = records[:limit]
    filters = {"tenant": tenant, "status": status, "module": module, "since": since}
    next_url = None
    if more:
        kept = {k: v for k, v in filters.items() if v}
        next_url = "/instances?" + urlencode({**kept, "cursor": instance_cursor(records[-1])})
    return _page(
        request,
        "instances.html",
        principal,
        records=records,
        filters=filters,
        statuses=[s.value for s in InstanceStatus],
        next_url=next_url,
    )


async def _instance(request: Request, tenant: str, instance_id: str) -> dict[str, Any]:
    fleet, principal = await _session(request)
    key = await fleet.instance_key(principal, tenant, instance_id)
    detail = await fleet.store.detail(key)
    if detail is None:
        raise ApiError(404, f"no instance {instance_id!r} for tenant {tenant!r}")
    view = instance_view(detail, await fleet.store.browse.events(key))
    failures: dict[int, list[Any]] = {}
    for attempt in view.failed_attempts:
        failures.setdefault(attempt.seq, []).append(attempt)
    letters = await fleet.store.browse.letters(
        LetterFilter(tenant=tenant, instance_id=instance_id, include_replayed=True), limit=20
    )
    return {
        "principal": principal,
        "view": view,
        "failures": failures,
        "unrecorded": {s: a for s, a in failures.items() if s >= len(view.journal)},
        "letters": letters,
        "final": detail.record.status.is_final,
        "longest": max((e.ms or 0 for e in view.journal), default=0) or 1,
    }


@router.get("/instances/{tenant}/{instance_id}", response_class=HTMLResponse)
async def instance(request: Request, tenant: TenantPath, instance_id: IdPath) -> Response:
    context = await _instance(request, tenant, instance_id)
    return _page(request, "instance.html", context.pop("principal"), **context)


@router.get("/instances/{tenant}/{instance_id}/timeline", response_class=HTMLResponse)
async def timeline(request: Request, tenant: TenantPath, instance_id: IdPath) -> Response:
    """The instance page's live part, which htmx reloads while the instance runs."""
    context = await _instance(request, tenant, instance_id)
    return _page(request, "timeline.html", context.pop("principal"), **context)


@router.post("/instances/{tenant}/{instance_id}/{action}")
async def act(
    request: Request,
    tenant: TenantPath,
    instance_id: IdPath,
    action: Annotated[str, Path(max_length=20)],
    csrf: Annotated[str, Form(max_length=200)] = "",
    from_step: Annotated[str, Form(max_length=1024)] = "",
    rollback: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    if action not in _ACTIONS:
        raise ApiError(404, f"no action {action!r}")
    fleet, principal = await _form_session(request, csrf, Role.OPERATOR)
    key = await fleet.instance_key(principal, tenant, instance_id)
    broker = await fleet.broker()
    control = fleet.control(principal, broker)
    work: Awaitable[Any] = (
        {
            "pause": control.pause,
            "resume": control.resume,
            "retry": control.retry,
            "delete": control.delete,
        }[action](key)
        if action not in ("terminate", "restart")
        else (
            control.terminate(key, rollback=bool(rollback))
            if action == "terminate"
            else control.restart(key, from_step=from_step or None)
        )
    )
    try:
        done = await fleet.act(work, broker=broker)
    except ApiError as exc:
        return _back(f"/instances/{tenant}/{instance_id}", f"{action} refused: {exc.message}")
    if action == "delete":
        return _back("/instances", f"{instance_id} deleted")
    later = "" if done.published else " (RabbitMQ unreachable: the outbox relay sends its message)"
    return _back(f"/instances/{tenant}/{instance_id}", f"{action}: done{later}")


def _letter_filter(
    fleet: Fleet, principal: Principal, filters: dict[str, str | None], replayed: bool
) -> LetterFilter:
    times: dict[str, datetime | None] = {}
    for name in ("since", "until"):
        raw = filters.get(name)
        try:
            times[name] = datetime.fromisoformat(raw) if raw else None
        except ValueError:
            raise ApiError(422, f"{name}: {raw!r} is not a date and time") from None
    return LetterFilter(
        tenant=fleet.tenant_filter(principal, filters.get("tenant")),
        reason=filters.get("reason"),
        instance_id=filters.get("instance"),
        since=times["since"],
        until=times["until"],
        include_replayed=replayed,
    )


@router.get("/dead-letters", response_class=HTMLResponse)
async def dead_letters(
    request: Request,
    tenant: Annotated[str | None, Query(max_length=63)] = None,
    reason: Annotated[str | None, Query(max_length=100)] = None,
    instance: Annotated[str | None, Query(max_length=128)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    replayed: Annotated[str | None, Query(max_length=10)] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
) -> Response:
    fleet, principal = await _session(request)
    filters = {
        "tenant": tenant or None,
        "reason": reason or None,
        "instance": instance or None,
        "since": since or None,
        "until": until or None,
    }
    selected = _letter_filter(fleet, principal, filters, bool(replayed))
    letters = await fleet.store.browse.letters(
        selected, before_id=parse_id_cursor(cursor), limit=limit + 1
    )
    more = len(letters) > limit
    letters = letters[:limit]
    kept = {k: v for k, v in {**filters, "replayed": replayed or None}.items() if v}
    next_url = (
        "/dead-letters?" + urlencode({**kept, "cursor": id_cursor(letters[-1].id)})
        if more
        else None
    )
    return _page(
        request,
        "dead_letters.html",
        principal,
        letters=letters,
        filters=filters,
        replayed=bool(replayed),
        reasons=await fleet.store.browse.letters_by_reason(principal.tenant),
        next_url=next_url,
        here="/dead-letters?" + urlencode(kept),
    )


@router.get("/dead-letters/{letter_id}", response_class=HTMLResponse)
async def dead_letter(
    request: Request, letter_id: Annotated[int, Path(ge=1, le=2**63 - 1)]
) -> Response:
    fleet, principal = await _session(request)
    letter = letter_view(await fleet.letter(principal, letter_id))
    return _page(request, "dead_letter.html", principal, letter=letter)


@router.post("/dead-letters/replay")
async def replay(
    request: Request,
    csrf: Annotated[str, Form(max_length=200)] = "",
    ids: Annotated[list[int] | None, Form(max_length=1000)] = None,
    back: Annotated[str, Form(max_length=2000)] = "/dead-letters",
) -> Response:
    """Replay the letters ticked on the list (or one, from its page)."""
    fleet, principal = await _form_session(request, csrf, Role.OPERATOR)
    if not back.startswith("/dead-letters"):
        back = "/dead-letters"
    chosen = sorted(set(ids or []))
    if not chosen:
        return _back(back, "tick the letters to replay")
    for letter_id in chosen:
        await fleet.letter(principal, letter_id)
    selected = LetterFilter(ids=tuple(chosen), tenant=principal.tenant, include_replayed=True)
    broker = await fleet.broker()
    done = await fleet.act(fleet.dead_letters(principal, broker).replay(selected), broker=broker)
    if done.value is None:
        return _back(back, "replay committed; the outbox relay publishes it")
    outcome = done.value
    notes = [f"{len(outcome.done)} letter(s) replayed"]
    notes += [f"{i}: not replayed: {why}" for i, why in sorted(outcome.skipped.items())]
    return _back(back, "; ".join(notes))


@router.get("/tenants", response_class=HTMLResponse)
async def tenants(request: Request) -> Response:
    fleet, principal = await _session(request)
    rows = [tenant_summary(t) for t in await fleet.store.tenants.all() if principal.sees(t.name)]
    hosts = await fleet.store.tenants.allowed_hosts()
    modules = {t.name: await fleet.store.tenant_modules(t.name) for t in rows}
    return _page(request, "tenants.html", principal, tenants=rows, hosts=hosts, modules=modules)
