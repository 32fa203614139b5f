"""The W3C trace context header (`traceparent`), read from untrusted messages.

A producer may send any bytes in `traceparent`. A worker keeps the value only when it is a
W3C trace context (https://www.w3.org/TR/trace-context/#traceparent-header), and then in its
version-00 form; anything else is treated as absent, so a bad trace context never costs a
message its delivery.
"""

from __future__ import annotations

import re
from typing import Final

TRACEPARENT_PATTERN: Final = r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"
"""The version-00 form workers send (and producers should)."""

_FIELDS: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NO_TRACE: Final = "0" * 32
_NO_PARENT: Final = "0" * 16
MAX_TRACEPARENT_CHARS: Final = 512
"""A longer value is not looked at (a later version may append fields, but not that many)."""


def read_traceparent(value: str) -> str | None:
    """The trace context `value` names, as `00-<trace id>-<parent id>-<flags>`; None when it
    is not a W3C `traceparent`.

    As the recommendation says: the version `ff`, an all-zero trace or parent id, upper-case
    hex and a version-00 value with anything after its four fields are invalid; a later
    version's value is read by its first four fields, followed by nothing or by `-`.
    """
    if len(value) > MAX_TRACEPARENT_CHARS:
        return None
    match = _FIELDS.match(value)
    if match is None:
        return None
    version, trace_id, parent_id, flags = match.groups()
    rest = value[match.end() :]
    if version == "ff" or trace_id == _NO_TRACE or parent_id == _NO_PARENT:
        return None
    if version == "00":
        if rest:
            return None
        return value
    if rest and not rest.startswith("-"):
        return None
    return f"00-{trace_id}-{parent_id}-{flags}"
