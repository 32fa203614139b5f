"""The log context of one message: every event logged while the cycle handles it carries the
tenant, the instance, the module digest and, once known, the position, step and attempt.

Bound with contextvars (structlog's `merge_contextvars` adds them to each event), so lines
logged deeper down, by the egress gateway while it makes a step's call, carry them too. A cycle
handles a whole batch in one task, so the context is bound around each message's part, never
left set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from structlog.contextvars import bind_contextvars, reset_contextvars

from stepfleet.cycle.work import Work


@contextmanager
def message_context(work: Work[Any], **more: object) -> Iterator[None]:
    """Bind `work`'s tenant, instance and module digest (and `more`) while the block runs."""
    # Reset by token: `bound_contextvars` copies the whole context to save what it rebinds,
    # and a busy worker enters this block several times per delivery.
    tokens = bind_contextvars(
        tenant=work.key.tenant,
        instance=work.key.instance_id,
        module_digest=work.record.module if work.record else work.envelope.module,
        **more,
    )
    try:
        yield
    finally:
        reset_contextvars(**tokens)
