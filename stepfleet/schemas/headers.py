"""The wire protocol's routing headers: one pydantic model, `Headers` (see docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Final, Literal, Protocol, cast

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_core import PydanticCustomError

from stepfleet.schemas.identifiers import (
    DIGEST_PATTERN,
    INSTANCE_ID_PATTERN,
    TENANT_PATTERN,
    is_digest,
    is_instance_id,
    is_tenant,
)
from stepfleet.schemas.reasons import DeadReason
from stepfleet.schemas.trace_context import TRACEPARENT_PATTERN, read_traceparent

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


class _Earlier(Protocol):
    """What a header's validator sees of the headers validated before it (a ValidationInfo
    under model_validate, a `_Read` under Headers.read)."""

    @property
    def data(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class _Read:
    """The headers Headers.read has validated so far, by field name."""

    data: dict[str, Any]


def _refuse(reason: DeadReason, detail: str) -> PydanticCustomError:
    """A header refusal: the error's type is the dead-letter reason, its context the detail."""
    return PydanticCustomError(reason.value, "{detail}", {"detail": detail})


def _text(value: Any, name: str) -> str | None:
    """A header value as text: UTF-8 bytes are decoded, an integer is its decimal text."""
    if value is None or type(value) is str:
        return value
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise _refuse(DeadReason.BAD_HEADER, f"header {name} is not UTF-8") from None
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    raise _refuse(DeadReason.BAD_HEADER, f"header {name} must be a string")


def _required(value: Any, name: str) -> str:
    text = _text(value, name)
    if not text:
        raise _refuse(DeadReason.MISSING_HEADER, f"header {name} is required")
    return text


def _identifier(
    name: str, is_valid: Callable[[str], bool], shown: int, noun: str
) -> BeforeValidator:
    """A required header that must match its pattern; refusals quote `shown` characters."""

    def check(value: Any, _: _Earlier) -> str:
        text = _required(value, name)
        if not is_valid(text):
            raise _refuse(DeadReason.BAD_HEADER, f"{name} {text[:shown]!r} is not {noun}")
        return text

    return BeforeValidator(check)


def _kind(value: Any, _: _Earlier) -> MessageKind:
    text = _required(value, Headers.KIND)
    try:
        return MessageKind(text)
    except ValueError:
        raise _refuse(DeadReason.BAD_HEADER, f"unknown message kind {text!r}") from None


def _version(value: Any, _: _Earlier) -> str:
    text = _required(value, Headers.SCHEMA_VERSION)
    if text != str(SCHEMA_VERSION):
        raise _refuse(DeadReason.UNSUPPORTED_VERSION, f"schema version {text!r} is not 1")
    return text


def _module(value: Any, earlier: _Earlier) -> str | None:
    text = _text(value, Headers.MODULE)
    if not text:  # an empty string counts as missing, as for every header
        text = None
    if text is None:
        if earlier.data.get("kind") is MessageKind.CREATE:
            raise _refuse(
                DeadReason.MISSING_HEADER, f"header {Headers.MODULE} is required on create"
            )
        return None
    if not is_digest(text):
        raise _refuse(DeadReason.BAD_HEADER, f"{Headers.MODULE} {text[:80]!r} is not a digest")
    return text


def _traceparent(value: Any, _: _Earlier) -> str | None:
    """A W3C trace context in its version-00 form, or None: a value that is none (not text,
    not UTF-8, not the W3C format) is dropped, never refused (schemas/trace_context.py)."""
    if type(value) is bytes:
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    if type(value) is not str:
        return None
    return read_traceparent(value)


def _no_sender_selected(headers: Any) -> Any:
    for name in SENDER_SELECTED:
        if name in headers:
            raise _refuse(
                DeadReason.BAD_HEADER,
                f"header {name} (sender-selected distribution) is not allowed",
            )
    return headers


class Headers(BaseModel):
    """The AMQP headers every message carries: their names, types and rules, in one place.

    It validates a header table (keys are the header names, `x-tenant`, ...), field by field
    in the order a worker checks them; a refusal's error type is its dead-letter reason and
    its context holds the detail (see `refusal`). Any other header is ignored. `table()` builds
    the headers of a message to send. `schemas/headers.v1.schema.json` is generated from this model.
    """

    TENANT: ClassVar[str] = "x-tenant"
    INSTANCE: ClassVar[str] = "x-instance-id"
    MODULE: ClassVar[str] = "x-module"
    KIND: ClassVar[str] = "x-kind"
    SCHEMA_VERSION: ClassVar[str] = "x-schema-version"
    TRACEPARENT: ClassVar[str] = "traceparent"
    # Set by stepfleet on dead letters only.
    DEAD_REASON: ClassVar[str] = "x-dead-reason"
    DEAD_DETAIL: ClassVar[str] = "x-dead-detail"

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        json_schema_extra={
            # What the module field's validator enforces: x-module is required on create.
            "if": {
                "properties": {KIND: {"const": MessageKind.CREATE.value}},
                "required": [KIND],
            },
            "then": {"required": [MODULE]},
            "additionalProperties": True,
        },
    )

    kind: Annotated[
        MessageKind,
        Field(
            alias=KIND,
            description="Which message this is; also the last word of the routing key. "
            "Producers send create and event; step and wake are internal.",
        ),
        BeforeValidator(_kind),
    ]
    schema_version: Annotated[
        Literal["1"],
        Field(alias=SCHEMA_VERSION, description="Version of the body schema."),
        BeforeValidator(_version),
    ]
    tenant: Annotated[
        str,
        Field(
            alias=TENANT,
            description="The tenant the instance belongs to; "
            "also the first word of the routing key.",
            json_schema_extra={"pattern": TENANT_PATTERN},
        ),
        _identifier(TENANT, is_tenant, 80, "a tenant name"),
    ]
    instance_id: Annotated[
        str,
        Field(
            alias=INSTANCE,
            description="The instance id, unique within the tenant and chosen by the producer.",
            json_schema_extra={"pattern": INSTANCE_ID_PATTERN},
        ),
        _identifier(INSTANCE, is_instance_id, 140, "an instance id"),
    ]
    module: Annotated[
        str | None,
        Field(
            alias=MODULE,
            description="Digest of the module to run: `sha256:` and 64 lower-case hex digits. "
            "Required on create; optional on other kinds, checked when present.",
            json_schema_extra={"pattern": DIGEST_PATTERN},
            validate_default=True,
        ),
        BeforeValidator(_module),
    ] = None
    traceparent: Annotated[
        str | None,
        Field(
            alias=TRACEPARENT,
            description="Optional W3C trace context (version 00 is what workers send). "
            "Workers continue the trace on every message the instance causes; a value that "
            "is not a W3C traceparent is ignored, never refused.",
            json_schema_extra={"pattern": TRACEPARENT_PATTERN},
        ),
        BeforeValidator(_traceparent),
    ] = None

    @model_validator(mode="before")
    @classmethod
    def _sender_selected(cls, headers: Any) -> Any:
        return _no_sender_selected(headers)

    @classmethod
    def read(cls, headers: Mapping[str, Any]) -> dict[str, Any]:
        """Validate a received header table the fast way, for parse_envelope: the fields' own
        validators, called in field order as `model_validate` calls them, without the cost of
        building a model (a test checks that the two agree). Returns the values by field name.

        Raises:
            InvalidMessage: the first rule the other headers break.
        """
        try:
            _no_sender_selected(headers)
        except PydanticCustomError as error:
            raise _invalid(error) from None
        fields: dict[str, Any] = {}
        earlier = _Read(fields)
        for name, alias, check in _CHECKS:
            try:
                fields[name] = check(headers.get(alias), earlier)
            except PydanticCustomError as error:
                raise _invalid(error) from None
        return fields

    @classmethod
    def table(
        cls,
        kind: MessageKind,
        tenant: str,
        instance_id: str,
        module: str | None = None,
        traceparent: str | None = None,
        *,
        check: bool = True,
    ) -> dict[str, str]:
        """The header table of a message to send, in the order it is published; an absent
        module and an empty traceparent are left out. `check=False` skips validation, for
        values the fleet read back from its own store (they arrived validated); with it, a
        traceparent that is not a W3C trace context is refused too (a worker would drop it).

        Raises:
            ValueError: a value breaks a rule; the text is the detail a worker would give the
                message's dead letter.
        """
        headers = {cls.TENANT: tenant, cls.INSTANCE: instance_id}
        if module is not None:
            headers[cls.MODULE] = module
        headers[cls.KIND] = kind.value
        headers[cls.SCHEMA_VERSION] = str(SCHEMA_VERSION)
        if traceparent:
            headers[cls.TRACEPARENT] = traceparent
        if check:
            if traceparent and read_traceparent(traceparent) != traceparent:
                raise ValueError(
                    f"traceparent {traceparent[:80]!r} is not a version-00 W3C trace context"
                )
            try:
                cls.model_validate(headers)
            except ValidationError as exc:
                raise ValueError(refusal(exc).detail) from None
        return headers


_CHECKS: Final = tuple(
    (
        name,
        field.alias or name,
        cast(
            "Callable[[Any, _Earlier], Any]",
            next(rule.func for rule in field.metadata if isinstance(rule, BeforeValidator)),
        ),
    )
    for name, field in Headers.model_fields.items()
)
"""Each header field's name, header name and validator, in the order they are checked."""


class InvalidMessage(Exception):
    """A message that can never be processed; `reason` is a stable code, `detail` says why."""

    def __init__(self, reason: DeadReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def refusal(exc: ValidationError) -> InvalidMessage:
    """The refusal of headers `Headers` did not validate: its first error, as a dead letter's
    reason and detail."""
    first = exc.errors(include_url=False)[0]
    if first["type"] == "missing":
        return InvalidMessage(DeadReason.MISSING_HEADER, f"header {first['loc'][0]} is required")
    if "detail" in first.get("ctx", {}):
        return InvalidMessage(DeadReason(first["type"]), first["ctx"]["detail"])
    where = ".".join(str(part) for part in first["loc"])
    return InvalidMessage(DeadReason.BAD_HEADER, f"{where}: {first['msg']}")


def _invalid(error: PydanticCustomError) -> InvalidMessage:
    return InvalidMessage(DeadReason(error.type), (error.context or {})["detail"])
