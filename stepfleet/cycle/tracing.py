"""Which trace a delivery belongs to, and the trace context it hands on.

A delivery continues the trace its message names (`traceparent`, validated by the schemas:
a value that is not a W3C trace context was dropped), else the instance's, kept on its row
by every write; an event continues the instance's trace first (its producer's context, when
it differs, becomes a link), so a workflow is one trace however its events are sent.

When tracing is on, the cycle opens the delivery's span once the instance row is locked,
and everything the delivery writes or sends (the row, next steps, the create's held step)
carries that span's context; with tracing off it carries the context the delivery came with.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stepfleet.cycle.work import Work
from stepfleet.observe import Observer, wall_ns
from stepfleet.schemas import MessageKind


def parent_of(work: Work[Any]) -> tuple[str | None, str | None]:
    """The trace context the delivery continues, and the one it only links to."""
    stored = work.record.traceparent if work.record is not None else None
    sent = work.envelope.traceparent
    if work.envelope.kind is MessageKind.EVENT and stored:
        return stored, sent if sent != stored else None
    return sent or stored, None


def carried(work: Work[Any]) -> str | None:
    """The trace context what the delivery writes and sends carries."""
    span = work.span
    if span is not None:
        return span.traceparent
    return parent_of(work)[0]


def open_spans(observer: Observer, works: Sequence[Work[Any]], began: float) -> None:
    """Open the delivery span of each work that has none yet (`began`: monotonic seconds)."""
    if not observer.tracing:
        return
    start = wall_ns(began)
    for work in works:
        if work.span is None:
            parent, link = parent_of(work)
            work.span = observer.open_span(parent, link, start, span_attributes(work))


def span_attributes(work: Work[Any]) -> dict[str, str | int]:
    """What a delivery span says of its message when it opens."""
    key = work.key
    module = work.record.module if work.record is not None else work.envelope.module
    attributes: dict[str, str | int] = {
        "messaging.system": "rabbitmq",
        "stepfleet.tenant": key.tenant,
        "stepfleet.instance": key.instance_id,
        "stepfleet.kind": work.envelope.kind.value,
    }
    if module is not None:
        attributes["stepfleet.module_digest"] = module
    return attributes
