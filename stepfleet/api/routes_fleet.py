"""/api/v1: the overview, tenants (limits, hosts, modules), tokens and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from stepfleet.api.deps import FleetAdmin, FleetDep, FleetViewer, Viewer
from stepfleet.api.errors import ApiError
from stepfleet.api.routes_instances import ERRORS
from stepfleet.api.tokens import TokenError, issue_token, revoke_token
from stepfleet.api.views import (
    MAX_PAGE,
    AuditPage,
    HostRequest,
    ModuleItem,
    NewToken,
    Overview,
    TenantSummary,
    TenantView,
    TokenRequest,
    TokenView,
    audit_item,
    id_cursor,
    parse_id_cursor,
    tenant_summary,
    token_view,
)
from stepfleet.egress.hosts import HostError, normalize_host_entry
from stepfleet.schemas import TENANT_PATTERN, TenantLimits
from stepfleet.store import AuditEntry

router = APIRouter(prefix="/api/v1", responses=ERRORS)

TenantPath = Annotated[str, Path(pattern=TENANT_PATTERN, description="Tenant name.")]


@router.get("/overview", response_model=Overview, tags=["fleet"])
async def overview(principal: Viewer, fleet: FleetDep) -> Overview:
    """Workers (from their health files), queue depths, instances by status, dead letters by
    reason and steps per second; a tenant's token gets its tenant's figures only."""
    return Overview.model_validate(await fleet.overview(principal))


@router.get("/tenants", response_model=list[TenantSummary], tags=["tenants"])
async def list_tenants(principal: Viewer, fleet: FleetDep) -> list[TenantSummary]:
    """Tenants with their own limits; a tenant's token sees its own."""
    return [tenant_summary(t) for t in await fleet.store.tenants.all() if principal.sees(t.name)]


@router.get("/tenants/{name}", response_model=TenantView, tags=["tenants"])
async def show_tenant(principal: Viewer, fleet: FleetDep, name: TenantPath) -> TenantView:
    """A tenant: limits, egress allow list, modules, instances and dead letters."""
    tenant = await fleet.store.tenants.get(name) if principal.sees(name) else None
    if tenant is None:
        raise ApiError(404, f"no tenant {name!r}")
    hosts = (await fleet.store.tenants.allowed_hosts()).get(name, set())
    return TenantView(
        **tenant_summary(tenant).model_dump(),
        hosts=sorted(hosts),
        modules=[
            ModuleItem(digest=d, size_bytes=size, pushed_at=at)
            for d, size, at in await fleet.store.tenant_modules(name)
        ],
        instances_by_status=await fleet.store.browse.status_counts(name),
        dead_letters_by_reason=await fleet.store.browse.letters_by_reason(name),
    )


async def _audit(fleet: FleetDep, entry: AuditEntry) -> None:
    async with fleet.store.control() as tx:
        await tx.audit(entry)


@router.put("/tenants/{name}/limits", response_model=TenantSummary, tags=["tenants"])
async def set_limits(
    principal: FleetAdmin,
    fleet: FleetDep,
    name: TenantPath,
    limits: Annotated[TenantLimits, Body()],
) -> TenantSummary:
    """Replace a tenant's limits (workers use them within 10 seconds); {} restores the
    fleet's."""
    if not await fleet.store.tenants.set_limits(name, limits):
        raise ApiError(404, f"no tenant {name!r}")
    await _audit(
        fleet,
        AuditEntry(
            principal.name, "tenant-limits", name, detail=limits.model_dump_json(exclude_none=True)
        ),
    )
    tenant = await fleet.store.tenants.get(name)
    assert tenant is not None
    return tenant_summary(tenant)


def _host(entry: str) -> str:
    try:
        return normalize_host_entry(entry)
    except HostError as exc:
        raise ApiError(422, str(exc)) from None


@router.post("/tenants/{name}/hosts", response_model=list[str], tags=["tenants"])
async def allow_host(
    principal: FleetAdmin,
    fleet: FleetDep,
    name: TenantPath,
    request: Annotated[HostRequest, Body()],
) -> list[str]:
    """Let the tenant's guests call a host through the egress gateway; answers the list."""
    entry = _host(request.host)
    if await fleet.store.tenants.get(name) is None:
        raise ApiError(404, f"no tenant {name!r}")
    await fleet.store.tenants.allow_host(name, entry)
    await _audit(fleet, AuditEntry(principal.name, "tenant-allow-host", name, detail=entry))
    return sorted((await fleet.store.tenants.allowed_hosts()).get(name, set()))


@router.delete("/tenants/{name}/hosts/{host}", response_model=list[str], tags=["tenants"])
async def deny_host(
    principal: FleetAdmin,
    fleet: FleetDep,
    name: TenantPath,
    host: Annotated[str, Path(max_length=300)],
) -> list[str]:
    """Take a host off the tenant's allow list; answers the list."""
    entry = _host(host)
    if entry not in (await fleet.store.tenants.allowed_hosts()).get(name, set()):
        raise ApiError(404, f"tenant {name!r} may not call {entry!r}")
    await fleet.store.tenants.deny_host(name, entry)
    await _audit(fleet, AuditEntry(principal.name, "tenant-deny-host", name, detail=entry))
    return sorted((await fleet.store.tenants.allowed_hosts()).get(name, set()))


@router.get("/tokens", response_model=list[TokenView], tags=["tokens"])
async def list_tokens(principal: FleetAdmin, fleet: FleetDep) -> list[TokenView]:
    """Every token (never a secret), revoked ones too."""
    return [token_view(t) for t in await fleet.store.tokens.all()]


@router.post("/tokens", response_model=NewToken, status_code=201, tags=["tokens"])
async def add_token(
    principal: FleetAdmin, fleet: FleetDep, request: Annotated[TokenRequest, Body()]
) -> NewToken:
    """Make a token; its secret is in this answer and nowhere else."""
    try:
        token, secret = await issue_token(
            fleet.store, request.name, request.role, request.tenant, actor=principal.name
        )
    except TokenError as exc:
        raise ApiError(409, str(exc)) from None
    return NewToken(**token_view(token).model_dump(), secret=secret)


@router.delete("/tokens/{name}", response_model=TokenView, tags=["tokens"])
async def delete_token(
    principal: FleetAdmin, fleet: FleetDep, name: Annotated[str, Path(max_length=100)]
) -> TokenView:
    """Revoke a token: its next request is refused."""
    try:
        await revoke_token(fleet.store, name, actor=principal.name)
    except TokenError as exc:
        raise ApiError(404, str(exc)) from None
    [token] = [t for t in await fleet.store.tokens.all() if t.name == name]
    return token_view(token)


@router.get("/audit", response_model=AuditPage, tags=["audit"])
async def audit(
    principal: FleetViewer,
    fleet: FleetDep,
    action: Annotated[str | None, Query(max_length=100)] = None,
    actor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> AuditPage:
    """The audit log, newest first (it spans tenants: a token of no tenant reads it)."""
    rows = await fleet.store.browse.audit(
        limit=limit + 1, action=action, actor=actor, before_id=parse_id_cursor(cursor)
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return AuditPage(
        items=[audit_item(r) for r in rows], next_cursor=id_cursor(rows[-1].id) if more else None
    )
