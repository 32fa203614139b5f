"""/api/v1/dead-letters: the archive, and replay, purge and export (stepfleet.control's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Body, Path, Query
from fastapi.responses import StreamingResponse

from stepfleet.api.auth import Principal
from stepfleet.api.deps import FleetDep, Operator, Viewer
from stepfleet.api.errors import ApiError
from stepfleet.api.fleet import Fleet
from stepfleet.api.routes_instances import ERRORS
from stepfleet.api.views import (
    MAX_PAGE,
    LetterOutcome,
    LetterPage,
    LetterSelection,
    LetterView,
    id_cursor,
    letter_summary,
    letter_view,
    parse_id_cursor,
)
from stepfleet.schemas import INSTANCE_ID_PATTERN, TENANT_PATTERN
from stepfleet.store import LetterFilter

router = APIRouter(prefix="/api/v1/dead-letters", tags=["dead letters"], responses=ERRORS)

LetterId = Annotated[int, Path(ge=1, le=2**63 - 1, description="Letter id.")]
TenantQuery = Annotated[str | None, Query(pattern=TENANT_PATTERN)]
ReasonQuery = Annotated[str | None, Query(max_length=100)]
InstanceQuery = Annotated[str | None, Query(pattern=INSTANCE_ID_PATTERN)]
SinceQuery = Annotated[datetime | None, Query(description="Archived at or after.")]
UntilQuery = Annotated[datetime | None, Query(description="Archived before.")]
ReplayedQuery = Annotated[bool, Query(description="Include replayed letters.")]


def _filter(
    fleet: Fleet,
    principal: Principal,
    tenant: str | None,
    reason: str | None,
    instance: str | None,
    since: datetime | None,
    until: datetime | None,
    replayed: bool,
    ids: tuple[int, ...] = (),
) -> LetterFilter:
    return LetterFilter(
        ids=ids,
        tenant=fleet.tenant_filter(principal, tenant),
        reason=reason,
        instance_id=instance,
        since=since,
        until=until,
        include_replayed=replayed,
    )


@router.get("", response_model=LetterPage)
async def list_letters(
    principal: Viewer,
    fleet: FleetDep,
    tenant: TenantQuery = None,
    reason: ReasonQuery = None,
    instance: InstanceQuery = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    replayed: ReplayedQuery = False,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> LetterPage:
    """Archived dead letters, newest first (replayed ones only when asked)."""
    selected = _filter(fleet, principal, tenant, reason, instance, since, until, replayed)
    letters = await fleet.store.browse.letters(
        selected, before_id=parse_id_cursor(cursor), limit=limit + 1
    )
    more = len(letters) > limit
    letters = letters[:limit]
    return LetterPage(
        items=[letter_summary(letter) for letter in letters],
        next_cursor=id_cursor(letters[-1].id) if more else None,
    )


@router.get(
    "/export",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-ndjson": {}}}},
)
async def export_letters(
    principal: Viewer,
    fleet: FleetDep,
    tenant: TenantQuery = None,
    reason: ReasonQuery = None,
    instance: InstanceQuery = None,
    since: SinceQuery = None,
    until: UntilQuery = None,
    replayed: ReplayedQuery = False,
) -> StreamingResponse:
    """The selected letters in full (headers, body, context) as JSON lines, oldest first."""
    selected = _filter(fleet, principal, tenant, reason, instance, since, until, replayed)
    letters = await fleet.store.dead_letters.find(selected)

    async def lines() -> AsyncIterator[bytes]:
        for letter in letters:
            yield (letter_view(letter).model_dump_json() + "\n").encode()

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/{letter_id}", response_model=LetterView)
async def show_letter(principal: Viewer, fleet: FleetDep, letter_id: LetterId) -> LetterView:
    """One letter: reason, headers, body, delivery history and the workflow's context."""
    return letter_view(await fleet.letter(principal, letter_id))


async def _selection(fleet: Fleet, principal: Principal, chosen: LetterSelection) -> LetterFilter:
    if not chosen.ids and not any(
        (chosen.tenant, chosen.reason, chosen.instance, chosen.since, chosen.until)
    ):
        raise ApiError(422, "name letter ids or a filter (tenant, reason, instance, since, until)")
    for letter_id in chosen.ids:
        await fleet.letter(principal, letter_id)  # 404 for one the token may not see
    return _filter(
        fleet,
        principal,
        chosen.tenant,
        chosen.reason,
        chosen.instance,
        chosen.since,
        chosen.until,
        chosen.include_replayed or bool(chosen.ids),
        tuple(chosen.ids),
    )


@router.post("/replay", response_model=LetterOutcome)
async def replay_letters(
    principal: Operator, fleet: FleetDep, chosen: Annotated[LetterSelection, Body()]
) -> LetterOutcome:
    """Publish letters again, each at most once, to the exchange they came through (letters
    the producer check refused, or whose sender is unknown, are skipped with the reason)."""
    selected = await _selection(fleet, principal, chosen)
    broker = await fleet.broker()
    done = await fleet.act(fleet.dead_letters(principal, broker).replay(selected), broker=broker)
    outcome = done.value
    if outcome is None:  # published later by the outbox relay
        return LetterOutcome(done=[], skipped={}, published=False)
    return LetterOutcome(done=outcome.done, skipped=outcome.skipped, published=done.published)


@router.post("/{letter_id}/replay", response_model=LetterOutcome)
async def replay_letter(principal: Operator, fleet: FleetDep, letter_id: LetterId) -> LetterOutcome:
    """Publish one letter again (if it was not replayed yet and may be)."""
    return await replay_letters(principal, fleet, LetterSelection(ids=[letter_id]))


@router.post("/purge", response_model=LetterOutcome)
async def purge_letters(
    principal: Operator, fleet: FleetDep, chosen: Annotated[LetterSelection, Body()]
) -> LetterOutcome:
    """Delete the selected letters from the archive for good."""
    selected = await _selection(fleet, principal, chosen)
    done = await fleet.act(fleet.dead_letters(principal, None).purge(selected), broker=None)
    return LetterOutcome(done=done.value.done, skipped={}, published=True)  # nothing to publish
