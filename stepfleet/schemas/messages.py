"""The wire protocol: routing headers and versioned JSON bodies (see docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from stepfleet.schemas.identifiers import is_digest, is_instance_id, is_tenant
from stepfleet.schemas.reasons import DeadReason

SCHEMA_VERSION: Final = 1
MAX_NAME_BYTES: Final = 256
# Event ids and types are stored and shown to operators: printable text only.
NO_CONTROL_CHARACTERS: Final = r"^[^\x00-\x1f\x7f-\x9f]+$"
# RabbitMQ routes a message to these headers' routing keys too, unchecked by topic permissions.
SENDER_SELECTED: Final = ("CC", "BCC")


class MessageKind(StrEnum):
    """Which handler a message is for; also the last word of its routing key."""

    CREATE = "create"
    STEP = "step"
    WAKE = "wake"
    EVENT = "event"


class Headers:
    """AMQP header names every message carries (values are short strings)."""

    TENANT: Final = "x-tenant"
    INSTANCE: Final = "x-instance-id"
    MODULE: Final = "x-module"
    KIND: Final = "x-kind"
    SCHEMA_VERSION: Final = "x-schema-version"
    TRACEPARENT: Final = "traceparent"
    # Set by stepfleet on dead letters only.
    DEAD_REASON: Final = "x-dead-reason"
    DEAD_DETAIL: Final = "x-dead-detail"


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


class InvalidMessage(Exception):
    """A message that can never be processed; `reason` is a stable code, `detail` says why."""

    def __init__(self, reason: DeadReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated message: who it is for, what it is, and its body."""

    kind: MessageKind
    tenant: str
    instance_id: str
    module: str | None
    body: Body
    traceparent: str | None = None


def _header(headers: Mapping[str, Any], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise InvalidMessage(DeadReason.BAD_HEADER, f"header {name} is not UTF-8") from None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise InvalidMessage(DeadReason.BAD_HEADER, f"header {name} must be a string")


def _required(headers: Mapping[str, Any], name: str) -> str:
    value = _header(headers, name)
    if not value:
        raise InvalidMessage(DeadReason.MISSING_HEADER, f"header {name} is required")
    return value


def parse_envelope(headers: Mapping[str, Any], body: bytes, *, max_body_bytes: int) -> Envelope:
    """Validate a message's headers and body.

    Raises:
        InvalidMessage: the message can never be processed; it belongs in the dead-letter queue.
    """
    for name in SENDER_SELECTED:
        if name in headers:
            raise InvalidMessage(
                DeadReason.BAD_HEADER,
                f"header {name} (sender-selected distribution) is not allowed",
            )
    kind_text = _required(headers, Headers.KIND)
    try:
        kind = MessageKind(kind_text)
    except ValueError:
        raise InvalidMessage(DeadReason.BAD_HEADER, f"unknown message kind {kind_text!r}") from None
    version = _required(headers, Headers.SCHEMA_VERSION)
    if version != str(SCHEMA_VERSION):
        raise InvalidMessage(DeadReason.UNSUPPORTED_VERSION, f"schema version {version!r} is not 1")
    tenant = _required(headers, Headers.TENANT)
    if not is_tenant(tenant):
        raise InvalidMessage(
            DeadReason.BAD_HEADER, f"{Headers.TENANT} {tenant[:80]!r} is not a tenant name"
        )
    instance_id = _required(headers, Headers.INSTANCE)
    if not is_instance_id(instance_id):
        raise InvalidMessage(
            DeadReason.BAD_HEADER, f"{Headers.INSTANCE} {instance_id[:140]!r} is not an instance id"
        )
    module = _header(headers, Headers.MODULE)
    if kind is MessageKind.CREATE and module is None:
        raise InvalidMessage(
            DeadReason.MISSING_HEADER, f"header {Headers.MODULE} is required on create"
        )
    if module is not None and not is_digest(module):
        raise InvalidMessage(
            DeadReason.BAD_HEADER, f"{Headers.MODULE} {module[:80]!r} is not a digest"
        )
    if len(body) > max_body_bytes:
        raise InvalidMessage(
            DeadReason.TOO_LARGE, f"body is {len(body)} bytes, the limit is {max_body_bytes}"
        )
    try:
        parsed = BODY_MODELS[kind].model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise InvalidMessage(DeadReason.BAD_BODY, f"{kind} body: {where}: {first['msg']}") from None
    assert isinstance(parsed, CreateBody | StepBody | WakeBody | EventBody)
    return Envelope(
        kind=kind,
        tenant=tenant,
        instance_id=instance_id,
        module=module,
        body=parsed,
        traceparent=_header(headers, Headers.TRACEPARENT),
    )
