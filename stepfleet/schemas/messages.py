"""The wire protocol: routing headers and versioned JSON bodies (see docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
)

from stepfleet.schemas.headers import (
    MAX_NAME_BYTES,
    NO_CONTROL_CHARACTERS,
    SCHEMA_VERSION,
    SENDER_SELECTED,
    Headers,
    InvalidMessage,
    MessageKind,
    refusal,
)
from stepfleet.schemas.reasons import DeadReason

__all__ = [
    "BODY_MODELS",
    "MAX_NAME_BYTES",
    "NO_CONTROL_CHARACTERS",
    "SCHEMA_VERSION",
    "SENDER_SELECTED",
    "Body",
    "CreateBody",
    "Envelope",
    "EventBody",
    "Headers",
    "InvalidMessage",
    "MessageKind",
    "StepBody",
    "WakeBody",
    "parse_envelope",
    "refusal",
]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    version: Literal[1] = SCHEMA_VERSION


class CreateBody(_Body):
    """Start a new instance of the module named in the headers with these params.

    `retention_seconds` keeps the finished instance that long (default: the fleet's setting).
    """

    params: JsonValue = Field(default_factory=dict)
    retention_seconds: Annotated[int, Field(ge=0, le=10 * 365 * 86400)] | None = None


class StepBody(_Body):
    """Run the instance's next step; `position` is the journal length the sender expects.

    `generation` counts restarts, so messages from before a restart are told apart.
    """

    position: Annotated[int, Field(ge=0)]
    generation: Annotated[int, Field(ge=0)] = 0


class WakeBody(_Body):
    """A timer fired for the instance parked at `position`, `attempt` and `generation`.

    `due_us` is the timer's due time (Unix microseconds): it tells this wait's timer from
    an earlier one at the same position, such as a sleep's just before an event wait.
    """

    position: Annotated[int, Field(ge=0)]
    attempt: Annotated[int, Field(ge=1)] = 1
    generation: Annotated[int, Field(ge=0)] = 0
    due_us: Annotated[int, Field(ge=0)] | None = None


class EventBody(_Body):
    """Deliver an event to an instance; `event_id` makes sending idempotent."""

    event_id: Annotated[
        str, Field(min_length=1, max_length=MAX_NAME_BYTES, pattern=NO_CONTROL_CHARACTERS)
    ]
    type: Annotated[
        str, Field(min_length=1, max_length=MAX_NAME_BYTES, pattern=NO_CONTROL_CHARACTERS)
    ]
    payload: JsonValue = None


Body = CreateBody | StepBody | WakeBody | EventBody

BODY_MODELS: Final[dict[MessageKind, type[_Body]]] = {
    MessageKind.CREATE: CreateBody,
    MessageKind.STEP: StepBody,
    MessageKind.WAKE: WakeBody,
    MessageKind.EVENT: EventBody,
}


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated message: who it is for, what it is, and its body."""

    kind: MessageKind
    tenant: str
    instance_id: str
    module: str | None
    body: Body
    traceparent: str | None = None


def parse_envelope(headers: Mapping[str, Any], body: bytes, *, max_body_bytes: int) -> Envelope:
    """Validate a message's headers and body.

    Raises:
        InvalidMessage: the message can never be processed; it belongs in the dead-letter queue.
    """
    fields = Headers.read(headers)
    if len(body) > max_body_bytes:
        raise InvalidMessage(
            DeadReason.TOO_LARGE, f"body is {len(body)} bytes, the limit is {max_body_bytes}"
        )
    kind: MessageKind = fields["kind"]
    try:
        parsed = BODY_MODELS[kind].model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidMessage(DeadReason.BAD_BODY, f"{kind} body: {where}: {first['msg']}") from None
    assert isinstance(parsed, CreateBody | StepBody | WakeBody | EventBody)
    return Envelope(
        kind=kind,
        tenant=fields["tenant"],
        instance_id=fields["instance_id"],
        module=fields["module"],
        body=parsed,
        traceparent=fields["traceparent"],
    )
