"""What a batch tells the worker's observer when it is done: counts for the metrics, and its
deliveries' spans closed with their parts (see stepfleet/observe and cycle/tracing.py).

With neither metrics nor traces on, `batch_done` returns at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from stepfleet.broker import Delivery
from stepfleet.cycle.tracing import open_spans
from stepfleet.cycle.work import CycleResult, Ran, Work
from stepfleet.observe import BatchCounts, Child, Observer, wall_ns
from stepfleet.schemas import Headers, MessageKind, read_traceparent

RAN = "ran"
DUPLICATE = "duplicate"
DEAD_LETTERED = "dead-lettered"
WAITING_ON_CALL = "waiting-on-call"
DEFERRED = "deferred"
THROTTLED = "throttled"
EVENT_STORED = "event-stored"
OUTCOMES = (RAN, DUPLICATE, DEAD_LETTERED, WAITING_ON_CALL, DEFERRED, THROTTLED, EVENT_STORED)
"""The `outcome` label values of stepfleet_deliveries_total (docs/operations.md)."""


def batch_done(
    observer: Observer,
    deliveries: Sequence[Delivery],
    works: Sequence[Work[Delivery]],
    cycle: CycleResult[Delivery],
    deferred: set[int],
    *,
    local_steps: int,
    began: float,
    published: Sequence[float] | None,
    acked: Sequence[float],
) -> None:
    """Count what the batch did and close its deliveries' spans.

    `deferred`: ids of the deliveries handed back for a later batch; `began`, `published`
    and `acked`: when the batch began, its publish ([start, end], None when it published
    nothing) and its acks (monotonic seconds).
    """
    if not observer.counting and not observer.tracing:
        return
    outcomes = _outcomes(works, cycle)
    if observer.counting:
        observer.batch(_counts(observer, deliveries, works, cycle, deferred, outcomes, local_steps))
    if observer.tracing:
        _close_spans(
            observer, deliveries, works, cycle, deferred, outcomes, began, published, acked
        )


def _outcomes(works: Sequence[Work[Delivery]], cycle: CycleResult[Delivery]) -> dict[int, str]:
    """What happened to each work, by id of its delivery (the rest were checked out)."""
    found: dict[int, str] = {}
    for work in cycle.duplicates:
        found[id(work.handle)] = DUPLICATE
    for rejected in cycle.rejected:
        found[id(rejected.work.handle)] = DEAD_LETTERED
    for suspended in cycle.suspended:
        found[id(suspended.work.handle)] = WAITING_ON_CALL
    for item in cycle.ran:
        found[id(item.work.handle)] = RAN
    for work in works:
        if id(work.handle) not in found:
            # Parked by its tenant's quotas, or an event stored for a later wait.
            found[id(work.handle)] = THROTTLED if work.key in cycle.held_keys else EVENT_STORED
    return found


_KINDS = frozenset(kind.value for kind in MessageKind)


def _kind_of(delivery: Delivery) -> str:
    """The kind a delivery's headers name, or `invalid`."""
    kind = delivery.headers.get(Headers.KIND)
    if isinstance(kind, bytes):
        kind = kind.decode(errors="replace")
    return kind if isinstance(kind, str) and kind in _KINDS else "invalid"


def _counts(
    observer: Observer,
    deliveries: Sequence[Delivery],
    works: Sequence[Work[Delivery]],
    cycle: CycleResult[Delivery],
    deferred: set[int],
    outcomes: dict[int, str],
    local_steps: int,
) -> BatchCounts:
    counts = BatchCounts(size=len(deliveries), local_steps=local_steps)
    label = observer.tenant
    by_delivery = {id(w.handle): w for w in works}
    tally = counts.deliveries
    for delivery in deliveries:
        work = by_delivery.get(id(delivery))
        if work is not None:
            key = (label(work.key.tenant), work.envelope.kind.value, outcomes[id(delivery)])
        else:
            tenant = label(delivery.routing_key.rpartition(".")[0])
            outcome = DEFERRED if id(delivery) in deferred else DEAD_LETTERED
            key = (tenant, _kind_of(delivery), outcome)
        tally[key] = tally.get(key, 0) + 1
    for item in cycle.ran:
        decision = item.decision
        if decision is None:
            continue
        tenant = label(item.work.key.tenant)
        for entry in decision.entries:
            journal_key = (tenant, entry.kind.name.lower())
            counts.journal[journal_key] = counts.journal.get(journal_key, 0) + 1
        if decision.failed_attempt is not None:
            counts.failed_attempts[tenant] = counts.failed_attempts.get(tenant, 0) + 1
        if decision.status.is_final:
            final = (tenant, decision.status.value)
            counts.finished[final] = counts.finished.get(final, 0) + 1
        if item.report.fuel_used:
            counts.fuel.append(item.report.fuel_used)
    for held in cycle.held_keys:
        tenant = label(held.tenant)
        counts.throttled[tenant] = counts.throttled.get(tenant, 0) + 1
    return counts


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1e9)


def _close_spans(
    observer: Observer,
    deliveries: Sequence[Delivery],
    works: Sequence[Work[Delivery]],
    cycle: CycleResult[Delivery],
    deferred: set[int],
    outcomes: dict[int, str],
    began: float,
    published: Sequence[float] | None,
    acked: Sequence[float],
) -> None:
    open_spans(observer, works, began)  # those that never reached the transaction
    end = wall_ns(acked[1])
    runs: dict[int, list[Ran[Delivery]]] = {}  # by delivery: its run, then those chained
    for ran in cycle.ran:
        runs.setdefault(id(ran.work.handle), []).append(ran)
    shared: list[Child] = []
    if cycle.transaction is not None:
        start, stop = cycle.transaction
        shared.append(Child("stepfleet.transaction", wall_ns(start), wall_ns(stop)))
    if published is not None:
        shared.append(Child("stepfleet.publish", wall_ns(published[0]), wall_ns(published[1])))
    for work in works:
        span = work.span
        if span is None:
            continue
        work.span = None  # a later pass of the same delivery opens a span of its own
        attributes: dict[str, str | int] = {"stepfleet.outcome": outcomes[id(work.handle)]}
        children = list(shared)
        items = runs.get(id(work.handle), [])
        if items:
            _describe_run(items[0], items[-1], attributes)
        children += [
            Child("stepfleet.guest", _ns(item.started_at), _ns(item.finished_at)) for item in items
        ]
        observer.close_span(span, end, attributes, children)
    handled = {id(w.handle) for w in works}
    start = wall_ns(began)
    for delivery in deliveries:
        if id(delivery) in handled:
            continue
        parent = _traceparent(delivery.headers.get(Headers.TRACEPARENT))
        outcome = DEFERRED if id(delivery) in deferred else DEAD_LETTERED
        span = observer.open_span(parent, None, start, {"stepfleet.kind": _kind_of(delivery)})
        if span is not None:
            observer.close_span(span, end, {"stepfleet.outcome": outcome}, [])


def _describe_run(item: Ran[Any], last: Ran[Any], attributes: dict[str, str | int]) -> None:
    """The step, attempt and position a delivery's run was about, and the status its write
    left (after the steps chained to it, `last` the last of them)."""
    decision = item.decision
    if decision is None or last.decision is None:
        return
    failed = decision.failed_attempt
    entry = decision.step_entry
    if failed is not None:
        attributes["stepfleet.step"] = failed.name
        attributes["stepfleet.attempt"] = failed.attempt
    elif entry is not None:
        attributes["stepfleet.step"] = entry.name
        attributes["stepfleet.attempt"] = entry.attempt
    elif decision.waiting is not None and decision.waiting.name:
        attributes["stepfleet.step"] = decision.waiting.name
        attributes["stepfleet.attempt"] = decision.attempt
    if item.work.state is not None:
        attributes["stepfleet.position"] = item.work.state.position
    attributes["stepfleet.status"] = last.decision.status.value


def _traceparent(value: object) -> str | None:
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    return read_traceparent(value) if isinstance(value, str) else None
