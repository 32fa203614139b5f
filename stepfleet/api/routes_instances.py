"""/api/v1/instances: listing, detail and the operator actions (stepfleet.control's)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query

from stepfleet.api.auth import Principal
from stepfleet.api.deps import FleetDep, Operator, Viewer
from stepfleet.api.errors import ApiError
from stepfleet.api.fleet import Fleet
from stepfleet.api.views import (
    MAX_PAGE,
    ActionResult,
    BulkResult,
    Error,
    InstancePage,
    InstanceView,
    RestartRequest,
    RetryFailedRequest,
    TerminateRequest,
    instance_cursor,
    instance_summary,
    instance_view,
    parse_instance_cursor,
)
from stepfleet.control import Control
from stepfleet.schemas import INSTANCE_ID_PATTERN, TENANT_PATTERN, InstanceKey, InstanceStatus

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": Error} for code in (401, 403, 404, 409, 413, 422, 503)
}
router = APIRouter(prefix="/api/v1/instances", tags=["instances"], responses=ERRORS)

TenantPath = Annotated[str, Path(pattern=TENANT_PATTERN, description="Tenant name.")]
IdPath = Annotated[str, Path(pattern=INSTANCE_ID_PATTERN, description="Instance id.")]


@router.get("", response_model=InstancePage)
async def list_instances(
    principal: Viewer,
    fleet: FleetDep,
    tenant: Annotated[str | None, Query(pattern=TENANT_PATTERN)] = None,
    status: Annotated[list[InstanceStatus] | None, Query()] = None,
    module: Annotated[str | None, Query(max_length=200)] = None,
    since: Annotated[datetime | None, Query(description="Created at or after.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=2000)] = None,
) -> InstancePage:
    """Instances, newest first; a tenant's token sees its tenant's alone."""
    records = await fleet.store.browse.instances(
        tenant=fleet.tenant_filter(principal, tenant),
        statuses=status or (),
        module=module,
        created_since=since,
        after=parse_instance_cursor(cursor),
        limit=limit + 1,
    )
    more = len(records) > limit
    records = records[:limit]
    return InstancePage(
        items=[instance_summary(r) for r in records],
        next_cursor=instance_cursor(records[-1]) if more else None,
    )


@router.post("/retry-failed", response_model=BulkResult)
async def retry_failed(
    principal: Operator, fleet: FleetDep, request: Annotated[RetryFailedRequest, Body()]
) -> BulkResult:
    """Run a tenant's errored instances again from their failed step (optionally those of
    one module, or whose error contains a text)."""
    tenant = fleet.tenant_filter(principal, request.tenant)
    assert tenant is not None
    broker = await fleet.broker()
    control = fleet.control(principal, broker)
    failed = await control.failed_instances(
        tenant, module=request.module, error_contains=request.error_contains
    )
    done: list[str] = []
    skipped: dict[str, str] = {}
    published = True
    for record in failed:
        try:
            outcome = await fleet.act(control.retry(record.key), broker=broker)
        except ApiError as exc:
            skipped[record.key.instance_id] = exc.message
            continue
        published = published and outcome.published
        done.append(record.key.instance_id)
    return BulkResult(done=done, skipped=skipped, published=published)


@router.get("/{tenant}/{instance_id}", response_model=InstanceView)
async def show_instance(
    principal: Viewer, fleet: FleetDep, tenant: TenantPath, instance_id: IdPath
) -> InstanceView:
    """An instance with its journal, failed attempts, events and timer."""
    key = await fleet.instance_key(principal, tenant, instance_id)
    detail = await fleet.store.detail(key)
    if detail is None:
        raise ApiError(404, f"no instance {instance_id!r} for tenant {tenant!r}")
    return instance_view(detail, await fleet.store.browse.events(key))


async def _action(
    fleet: Fleet,
    principal: Principal,
    tenant: str,
    instance_id: str,
    name: str,
    action: Callable[[Control, InstanceKey], Awaitable[Any]],
) -> ActionResult:
    key = await fleet.instance_key(principal, tenant, instance_id)
    broker = await fleet.broker()
    done = await fleet.act(action(fleet.control(principal, broker), key), broker=broker)
    found = await fleet.store.find_instances(instance_id, tenant)
    return ActionResult(
        action=name,
        tenant=tenant,
        id=instance_id,
        status=found[0][0].status.value if found else None,
        published=done.published,
    )


@router.post("/{tenant}/{instance_id}/pause", response_model=ActionResult)
async def pause(
    principal: Operator, fleet: FleetDep, tenant: TenantPath, instance_id: IdPath
) -> ActionResult:
    """Stop the instance between steps; its timers keep their due times."""
    return await _action(fleet, principal, tenant, instance_id, "pause", lambda c, k: c.pause(k))


@router.post("/{tenant}/{instance_id}/resume", response_model=ActionResult)
async def resume(
    principal: Operator, fleet: FleetDep, tenant: TenantPath, instance_id: IdPath
) -> ActionResult:
    """Continue a paused instance where it stopped."""
    return await _action(fleet, principal, tenant, instance_id, "resume", lambda c, k: c.resume(k))


@router.post("/{tenant}/{instance_id}/terminate", response_model=ActionResult)
async def terminate(
    principal: Operator,
    fleet: FleetDep,
    tenant: TenantPath,
    instance_id: IdPath,
    request: Annotated[TerminateRequest | None, Body()] = None,
) -> ActionResult:
    """Stop the instance for good; with `rollback`, run its compensations first."""
    rollback = bool(request and request.rollback)
    return await _action(
        fleet,
        principal,
        tenant,
        instance_id,
        "terminate",
        lambda c, k: c.terminate(k, rollback=rollback),
    )


@router.post("/{tenant}/{instance_id}/restart", response_model=ActionResult)
async def restart(
    principal: Operator,
    fleet: FleetDep,
    tenant: TenantPath,
    instance_id: IdPath,
    request: Annotated[RestartRequest | None, Body()] = None,
) -> ActionResult:
    """Run the instance again on its pinned module, from the start or from a named step."""
    from_step = request.from_step if request else None
    return await _action(
        fleet,
        principal,
        tenant,
        instance_id,
        "restart",
        lambda c, k: c.restart(k, from_step=from_step),
    )


@router.post("/{tenant}/{instance_id}/retry", response_model=ActionResult)
async def retry(
    principal: Operator, fleet: FleetDep, tenant: TenantPath, instance_id: IdPath
) -> ActionResult:
    """Run an errored instance again from the step that failed for good."""
    return await _action(fleet, principal, tenant, instance_id, "retry", lambda c, k: c.retry(k))


@router.delete("/{tenant}/{instance_id}", response_model=ActionResult)
async def delete(
    principal: Operator, fleet: FleetDep, tenant: TenantPath, instance_id: IdPath
) -> ActionResult:
    """Delete a finished instance with its journal and events."""
    return await _action(fleet, principal, tenant, instance_id, "delete", lambda c, k: c.delete(k))
