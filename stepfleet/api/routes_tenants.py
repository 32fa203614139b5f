"""/api/v1/tenants: adding tenants, their modules (push, pause, resume, moves) and secrets,
through the same functions of stepfleet.control as the CLI."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Request, Response

from stepfleet.api.auth import Principal
from stepfleet.api.deps import FleetAdmin, FleetDep, Operator, Viewer
from stepfleet.api.errors import ApiError
from stepfleet.api.fleet import Fleet
from stepfleet.api.routes_instances import ERRORS
from stepfleet.api.views import (
    ModuleActionResult,
    ModuleItem,
    MoveItem,
    MoveRequest,
    MoveResult,
    NewTenantView,
    ProducerView,
    PushResult,
    SecretItem,
    SecretRequest,
    SecretResult,
    TenantRequest,
    tenant_summary,
)
from stepfleet.broker.admin import BrokerAdmin
from stepfleet.control import (
    ControlError,
    ModuleCheckFailed,
    ModuleRefused,
    SecretError,
    Verdict,
    add_tenant,
    delete_secret,
    move_module,
    push_module,
    sealing_key,
    set_secret,
    tenant_secrets,
)
from stepfleet.control.secrets import SECRET_NAME_PATTERN
from stepfleet.schemas import DIGEST_PATTERN, TENANT_PATTERN

router = APIRouter(prefix="/api/v1/tenants", tags=["tenants"], responses=ERRORS)

TenantPath = Annotated[str, Path(pattern=TENANT_PATTERN, description="Tenant name.")]
DigestPath = Annotated[str, Path(pattern=DIGEST_PATTERN, description="Module digest.")]
SecretPath = Annotated[str, Path(pattern=SECRET_NAME_PATTERN, description="Secret name.")]

WASM_TYPES = ("application/wasm", "application/octet-stream")
MODULES_PATH = r"^/api/v1/tenants/[^/]+/modules$"
"""Where module pushes are posted: their bodies may be up to STEPFLEET_API_MAX_MODULE_BYTES."""


async def _tenant(fleet: Fleet, principal: Principal, name: str) -> None:
    """404 unless the tenant exists and the token may see it."""
    if not principal.sees(name) or await fleet.store.tenants.get(name) is None:
        raise ApiError(404, f"no tenant {name!r}")


@router.post(
    "",
    response_model=NewTenantView,
    status_code=201,
    responses={200: {"model": NewTenantView, "description": "It existed: password reset."}},
)
async def add(
    principal: FleetAdmin,
    fleet: FleetDep,
    request: Annotated[TenantRequest, Body()],
    response: Response,
) -> NewTenantView:
    """Create a tenant and (unless `producer` is false) its RabbitMQ producer user, as
    `stepfleet tenant add` does; the producer password is in this answer only. For a tenant
    that exists with that user, its password is reset (200)."""
    topology = fleet.topology
    admin = (
        BrokerAdmin(fleet.settings.rabbitmq_admin_url, topology, vhost=fleet.settings.vhost)
        if request.producer
        else None
    )
    try:
        added = await add_tenant(
            fleet.store, admin, topology, request.name, request.limits, actor=principal.name
        )
    except ControlError as exc:
        raise ApiError(409, str(exc)) from None
    tenant = await fleet.store.tenants.get(request.name)
    assert tenant is not None
    if not added.created:
        response.status_code = 200
    credentials = added.credentials
    producer = (
        ProducerView(
            user=credentials.user,
            password=credentials.password,
            vhost=credentials.vhost,
            exchange=topology.ingress_exchange,
            routing_keys=[f"{request.name}.create", f"{request.name}.event"],
        )
        if credentials is not None
        else None
    )
    return NewTenantView(
        **tenant_summary(tenant).model_dump(), created=added.created, producer=producer
    )


@router.get("/{name}/modules", response_model=list[ModuleItem])
async def modules(principal: Viewer, fleet: FleetDep, name: TenantPath) -> list[ModuleItem]:
    """The tenant's modules, newest first."""
    await _tenant(fleet, principal, name)
    return [
        ModuleItem(digest=d, size_bytes=size, pushed_at=at)
        for d, size, at in await fleet.store.tenant_modules(name)
    ]


@router.post(
    "/{name}/modules",
    response_model=PushResult,
    status_code=201,
    responses={
        200: {"model": PushResult, "description": "Pushed before: nothing changed."},
        415: {"description": "Not `application/wasm`."},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/wasm": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def push(
    principal: FleetAdmin, fleet: FleetDep, name: TenantPath, request: Request, response: Response
) -> PushResult:
    """Push a module (the body is its bytes), checked as `stepfleet module push` checks it:
    compiled under the compile limits, the ABI's exports, able to start within the tenant's
    limits. 413 over the tenant's module size limit, 422 for a module that cannot run."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in WASM_TYPES:
        raise ApiError(415, "send the module's bytes as application/wasm")
    await _tenant(fleet, principal, name)
    wasm = await request.body()
    if not wasm:
        raise ApiError(422, "the body is empty: send the module's bytes")
    try:
        pushed = await push_module(
            fleet.store,
            name,
            wasm,
            limits=fleet.settings.sandbox_limits(),
            cache=fleet.module_cache(),
            actor=principal.name,
        )
    except ModuleRefused as exc:
        raise ApiError(413 if exc.too_large else 422, f"module refused: {exc}") from None
    except ModuleCheckFailed as exc:
        raise ApiError(503, f"the module could not be checked, try again: {exc}") from None
    if not pushed.new:
        response.status_code = 200
    return PushResult(
        tenant=name, digest=pushed.digest, size_bytes=pushed.size_bytes, new=pushed.new
    )


async def _module_action(
    fleet: Fleet, principal: Principal, name: str, digest: str, *, resume: bool
) -> ModuleActionResult:
    await _tenant(fleet, principal, name)
    broker = await fleet.broker()
    control = fleet.control(principal, broker)
    work = control.resume_module(name, digest) if resume else control.pause_module(name, digest)
    done = await fleet.act(work, broker=broker)
    keys = done.value or []
    return ModuleActionResult(
        action="resume" if resume else "pause",
        tenant=name,
        module=digest,
        instances=[k.instance_id for k in keys],
        published=done.published,
    )


@router.post("/{name}/modules/{digest}/pause", response_model=ModuleActionResult)
async def pause_module(
    principal: Operator, fleet: FleetDep, name: TenantPath, digest: DigestPath
) -> ModuleActionResult:
    """Pause every live instance of the module (each between steps; each audited)."""
    return await _module_action(fleet, principal, name, digest, resume=False)


@router.post("/{name}/modules/{digest}/resume", response_model=ModuleActionResult)
async def resume_module(
    principal: Operator, fleet: FleetDep, name: TenantPath, digest: DigestPath
) -> ModuleActionResult:
    """Resume every paused instance of the module."""
    return await _module_action(fleet, principal, name, digest, resume=True)


@router.post("/{name}/modules/moves", response_model=MoveResult)
async def move(
    principal: Operator,
    fleet: FleetDep,
    name: TenantPath,
    request: Annotated[MoveRequest, Body()],
) -> MoveResult:
    """Move the tenant's live instances (of `from`) to module `to`, as `stepfleet module move`
    does: each journal is replayed against `to` first, and only the instances that replay
    cleanly move, unless `force`. With `dry_run` it answers the replays and changes nothing.
    409 when `to` was never pushed for the tenant or cannot run here."""
    await _tenant(fleet, principal, name)
    try:
        checks = await move_module(
            fleet.store,
            fleet.settings.sandbox_limits(),
            name,
            request.to,
            from_module=request.from_digest,
            dry_run=request.dry_run,
            force=request.force,
            actor=principal.name,
        )
    except ControlError as exc:
        raise ApiError(409, str(exc)) from None
    return MoveResult(
        tenant=name,
        to=request.to,
        dry_run=request.dry_run,
        checked=len(checks),
        not_compatible=sum(1 for c in checks if c.verdict is not Verdict.COMPATIBLE),
        moved=sum(1 for c in checks if c.moved),
        items=[
            MoveItem(
                id=c.key.instance_id,
                module=c.module,
                verdict=c.verdict.value,
                detail=c.detail,
                moved=c.moved,
            )
            for c in checks
        ],
    )


@router.get("/{name}/secrets", response_model=list[SecretItem])
async def secrets(principal: Viewer, fleet: FleetDep, name: TenantPath) -> list[SecretItem]:
    """The tenant's secrets: name, host and header, never a value."""
    await _tenant(fleet, principal, name)
    return [
        SecretItem(tenant=s.tenant, name=s.name, host=s.host, header=s.header)
        for s in await tenant_secrets(fleet.store.tenants, name)
    ]


@router.put("/{name}/secrets/{secret}", response_model=SecretResult)
async def put_secret(
    principal: FleetAdmin,
    fleet: FleetDep,
    name: TenantPath,
    secret: SecretPath,
    request: Annotated[SecretRequest, Body()],
) -> SecretResult:
    """Store (or replace) a secret the egress gateway sends in `header` on the tenant's calls
    to `host`, as `stepfleet secret set` does; sealed with STEPFLEET_SECRET_KEY before it
    reaches PostgreSQL. The value is never answered, logged or audited."""
    configured = fleet.settings.secret_key
    try:
        key = sealing_key(configured.get_secret_value() if configured else None)
    except SecretError as exc:
        raise ApiError(503, str(exc)) from None
    await _tenant(fleet, principal, name)
    try:
        stored = await set_secret(
            fleet.store,
            key,
            name,
            secret,
            request.host,
            request.header,
            request.value.get_secret_value(),
            actor=principal.name,
        )
    except SecretError as exc:
        raise ApiError(422, str(exc)) from None
    except ControlError as exc:
        raise ApiError(404, str(exc)) from None
    return SecretResult(
        tenant=name,
        name=secret,
        host=stored.host,
        header=request.header,
        host_allowed=stored.allowed,
    )


@router.delete("/{name}/secrets/{secret}", response_model=SecretItem)
async def remove_secret(
    principal: FleetAdmin, fleet: FleetDep, name: TenantPath, secret: SecretPath
) -> SecretItem:
    """Delete a secret; answers what was deleted."""
    found = [s for s in await tenant_secrets(fleet.store.tenants, name) if s.name == secret]
    if not found or not await delete_secret(fleet.store, name, secret, actor=principal.name):
        raise ApiError(404, f"no secret {secret!r} for tenant {name!r}")
    gone = found[0]
    return SecretItem(tenant=gone.tenant, name=gone.name, host=gone.host, header=gone.header)
