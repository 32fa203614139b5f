"""What the API answers and accepts, as pydantic models (they make the OpenAPI document)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from stepfleet.api.errors import ApiError
from stepfleet.schemas import (
    DIGEST_PATTERN,
    INSTANCE_ID_PATTERN,
    TENANT_PATTERN,
    EntryFlags,
    EntryKind,
    TenantLimits,
)
from stepfleet.store import (
    AuditRow,
    DeadLetter,
    InstanceCursor,
    InstanceDetail,
    InstanceRecord,
    StoredEvent,
    TenantRecord,
    TokenRecord,
)

MAX_PAGE = 500
MAX_IDS = 1000


def json_or_text(value: str | None) -> Any:
    """A stored JSON text as its value; anything else (a redacted value) as text."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


class Closed(BaseModel):
    """A request body: unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")


class Error(BaseModel):
    """Every error answer."""

    error: str = Field(description="A short code: unauthorized, forbidden, not-found, ...")
    message: str


class InstanceSummary(BaseModel):
    tenant: str
    id: str
    module: str
    status: str
    position: int
    attempt: int
    generation: int
    compensating: bool
    error: str | None
    created_at: datetime | None
    updated_at: datetime | None
    finished_at: datetime | None


class InstancePage(BaseModel):
    items: list[InstanceSummary]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null: no more."
    )


class JournalItem(BaseModel):
    seq: int
    name: str
    kind: str = Field(
        description="step_succeeded, step_failed, slept, event_received, event_timed_out, "
        "now, random or compensated"
    )
    value: Any
    attempt: int
    started_at: datetime | None
    finished_at: datetime | None
    ms: float | None
    has_rollback: bool
    sensitive: bool


class AttemptItem(BaseModel):
    seq: int
    name: str
    attempt: int
    error: str
    started_at: datetime | None
    finished_at: datetime | None


class EventItem(BaseModel):
    event_id: str
    type: str
    payload: Any
    received_at: datetime
    consumed_seq: int | None = Field(description="The journal position that took it; null: stored.")


class TimerItem(BaseModel):
    kind: str = Field(description="sleep, retry, event (a wait's timeout) or throttle")
    name: str | None
    event_type: str | None
    due_at: datetime | None


class InstanceView(InstanceSummary):
    params: Any
    output: Any
    end_status: str | None
    retain_until: datetime | None
    timer: TimerItem | None
    stored_events: int
    journal: list[JournalItem]
    failed_attempts: list[AttemptItem]
    events: list[EventItem]


class ActionResult(BaseModel):
    action: str
    tenant: str
    id: str
    status: str | None = Field(description="The instance's status after the action.")
    published: bool = Field(
        description="False when RabbitMQ was unreachable after the commit: the outbox relay "
        "publishes what the action queued."
    )


class TerminateRequest(Closed):
    rollback: bool = False


class RestartRequest(Closed):
    from_step: str | None = Field(default=None, max_length=1024)


class RetryFailedRequest(Closed):
    tenant: str = Field(pattern=TENANT_PATTERN)
    module: str | None = Field(default=None, max_length=200)
    error_contains: str | None = Field(default=None, max_length=1000)


class BulkResult(BaseModel):
    done: list[str]
    skipped: dict[str, str]
    published: bool


class LetterSummary(BaseModel):
    id: int
    received_at: datetime
    reason: str
    tenant: str | None
    instance: str | None
    kind: str | None
    module: str | None
    detail: str
    replayed_at: datetime | None
    replayed_by: str | None


class LetterView(LetterSummary):
    routing_key: str
    message_id: str | None
    source: str
    sender: str | None
    first_exchange: str | None
    unreplayable: str | None
    headers: dict[str, Any]
    body: Any
    body_size: int
    body_sha256: str
    body_truncated: bool
    context: dict[str, Any]


class LetterPage(BaseModel):
    items: list[LetterSummary]
    next_cursor: str | None


class LetterSelection(Closed):
    """Letters by id, or by filter (at least one of them)."""

    ids: list[int] = Field(default_factory=list, max_length=MAX_IDS)
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)
    reason: str | None = Field(default=None, max_length=100)
    instance: str | None = Field(default=None, pattern=INSTANCE_ID_PATTERN)
    since: datetime | None = None
    until: datetime | None = None
    include_replayed: bool = False


class LetterOutcome(BaseModel):
    done: list[int]
    skipped: dict[int, str]
    published: bool


class ModuleItem(BaseModel):
    digest: str
    size_bytes: int
    pushed_at: datetime


class TenantSummary(BaseModel):
    name: str
    broker_user: str | None
    limits: dict[str, Any] = Field(description="Only the limits that differ from the fleet's.")
    created_at: datetime | None


class TenantView(TenantSummary):
    hosts: list[str]
    modules: list[ModuleItem]
    instances_by_status: dict[str, int]
    dead_letters_by_reason: dict[str, int]


class HostRequest(Closed):
    host: str = Field(min_length=1, max_length=300)


class PushResult(BaseModel):
    tenant: str
    digest: str
    size_bytes: int
    new: bool = Field(description="False: the tenant had these bytes already (nothing changed).")


class ModuleActionResult(BaseModel):
    action: str
    tenant: str
    module: str
    instances: list[str] = Field(description="Ids of the instances paused or resumed.")
    published: bool


class MoveRequest(Closed):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    to: str = Field(pattern=DIGEST_PATTERN, description="Digest to move the instances to.")
    from_digest: str | None = Field(
        default=None,
        alias="from",
        pattern=DIGEST_PATTERN,
        description="Only instances on this digest (default: every live instance not on `to`).",
    )
    dry_run: bool = Field(
        default=False, description="Replay every journal against `to` and report; change nothing."
    )
    force: bool = Field(default=False, description="Move instances whose replay fails too.")


class MoveItem(BaseModel):
    id: str
    module: str = Field(description="The digest the instance was on.")
    verdict: str = Field(description="compatible, nondeterministic or fails")
    detail: str
    moved: bool


class MoveResult(BaseModel):
    tenant: str
    to: str
    dry_run: bool
    checked: int
    not_compatible: int = Field(description="Instances whose replay does not match or fails.")
    moved: int
    items: list[MoveItem]


class TenantRequest(Closed):
    name: str = Field(pattern=TENANT_PATTERN)
    producer: bool = Field(default=True, description="Create the RabbitMQ producer user.")
    limits: TenantLimits = Field(default_factory=TenantLimits)


class ProducerView(BaseModel):
    user: str
    password: str = Field(description="Shown once: it is stored nowhere but in RabbitMQ.")
    vhost: str
    exchange: str
    routing_keys: list[str]


class NewTenantView(TenantSummary):
    created: bool = Field(description="False: it existed, and its producer password was reset.")
    producer: ProducerView | None


class SecretRequest(Closed):
    host: str = Field(min_length=1, max_length=300)
    header: str = Field(min_length=1, max_length=200)
    value: SecretStr = Field(
        min_length=1, max_length=8192, description="Never answered, logged or audited."
    )


class SecretItem(BaseModel):
    tenant: str
    name: str
    host: str
    header: str


class SecretResult(SecretItem):
    host_allowed: bool = Field(
        description="Whether the host is on the tenant's allow list (unused until it is)."
    )


class TokenView(BaseModel):
    name: str
    role: str
    tenant: str | None
    created_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


class NewToken(TokenView):
    secret: str = Field(description="Shown once: only its SHA-256 is stored.")


class TokenRequest(Closed):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
    role: str = Field(pattern=r"^(viewer|operator|admin)$")
    tenant: str | None = Field(default=None, pattern=TENANT_PATTERN)


class AuditItem(BaseModel):
    id: int
    at: datetime | None
    actor: str
    action: str
    target: str
    filter: dict[str, Any]
    count: int
    detail: str


class AuditPage(BaseModel):
    items: list[AuditItem]
    next_cursor: str | None


class WorkerItem(BaseModel):
    file: str
    healthy: bool
    why: str
    name: str | None
    state: str | None
    steps: int | None
    age_seconds: float | None


class Overview(BaseModel):
    tenant: str | None
    workers: list[WorkerItem]
    queues: dict[str, int] | None = Field(description="Messages ready; null: RabbitMQ unreachable.")
    instances_by_status: dict[str, int]
    dead_letters_by_reason: dict[str, int]
    journal_entries_last_minute: int
    steps_per_second: float


class Health(BaseModel):
    ok: bool
    reason: str | None = None


# -- conversions ---------------------------------------------------------------------------


def instance_summary(record: InstanceRecord) -> InstanceSummary:
    return InstanceSummary(
        tenant=record.key.tenant,
        id=record.key.instance_id,
        module=record.module,
        status=record.status.value,
        position=record.position,
        attempt=record.attempt,
        generation=record.generation,
        compensating=bool(record.mode) and not record.status.is_final,
        error=record.error,
        created_at=record.created_at,
        updated_at=record.updated_at,
        finished_at=record.finished_at,
    )


def _ms(started: datetime | None, finished: datetime | None) -> float | None:
    if started is None or finished is None:
        return None
    return round((finished - started).total_seconds() * 1000, 3)


def instance_view(detail: InstanceDetail, events: list[StoredEvent]) -> InstanceView:
    record = detail.record
    waiting = record.waiting
    return InstanceView(
        **instance_summary(record).model_dump(),
        params=json_or_text(detail.params),
        output=json_or_text(record.output),
        end_status=record.end_status.value if record.end_status else None,
        retain_until=record.retain_until,
        timer=None
        if waiting is None
        else TimerItem(
            kind=waiting.kind.value,
            name=waiting.name,
            event_type=waiting.event_type,
            due_at=waiting.wake_at,
        ),
        stored_events=detail.pending_events,
        journal=[
            JournalItem(
                seq=e.seq,
                name=e.name,
                kind=EntryKind(e.kind).name.lower(),
                value=json_or_text(e.shown_value),
                attempt=e.attempt,
                started_at=e.started_at,
                finished_at=e.finished_at,
                ms=_ms(e.started_at, e.finished_at),
                has_rollback=bool(e.flags & EntryFlags.HAS_ROLLBACK),
                sensitive=bool(e.flags & EntryFlags.SENSITIVE),
            )
            for e in detail.journal
        ],
        failed_attempts=[
            AttemptItem(
                seq=a.seq,
                name=a.name,
                attempt=a.attempt,
                error=a.error,
                started_at=a.started_at,
                finished_at=a.finished_at,
            )
            for a in detail.attempts
        ],
        events=[
            EventItem(
                event_id=e.event_id,
                type=e.type,
                payload=json_or_text(e.payload),
                received_at=e.received_at,
                consumed_seq=e.consumed_seq,
            )
            for e in events
        ],
    )


def letter_summary(letter: DeadLetter) -> LetterSummary:
    return LetterSummary(
        id=letter.id,
        received_at=letter.received_at,
        reason=letter.reason,
        tenant=letter.tenant,
        instance=letter.instance_id,
        kind=letter.kind,
        module=letter.module,
        detail=letter.detail,
        replayed_at=letter.replayed_at,
        replayed_by=letter.replayed_by,
    )


def letter_view(letter: DeadLetter) -> LetterView:
    try:
        body: Any = json.loads(letter.body)
    except ValueError:
        body = letter.body.decode("utf-8", "backslashreplace")
    return LetterView(
        **letter_summary(letter).model_dump(),
        routing_key=letter.routing_key,
        message_id=letter.message_id,
        source=letter.source,
        sender=letter.sender,
        first_exchange=letter.first_exchange,
        unreplayable=letter.unreplayable,
        headers=letter.headers,
        body=body,
        body_size=letter.body_size,
        body_sha256=letter.body_sha256,
        body_truncated=letter.body_truncated,
        context=letter.context,
    )


def tenant_summary(tenant: TenantRecord) -> TenantSummary:
    return TenantSummary(
        name=tenant.name,
        broker_user=tenant.broker_user,
        limits=tenant.limits.model_dump(exclude_none=True),
        created_at=tenant.created_at,
    )


def token_view(token: TokenRecord) -> TokenView:
    return TokenView(
        name=token.name,
        role=token.role,
        tenant=token.tenant,
        created_at=token.created_at,
        revoked_at=token.revoked_at,
        last_used_at=token.last_used_at,
    )


def audit_item(row: AuditRow) -> AuditItem:
    e = row.entry
    return AuditItem(
        id=row.id,
        at=e.at,
        actor=e.actor,
        action=e.action,
        target=e.target,
        filter=dict(e.filter),
        count=e.count,
        detail=e.detail,
    )


# -- cursors -------------------------------------------------------------------------------


def _encode(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


def _decode(cursor: str) -> Any:
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        return json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise ApiError(422, "cursor: not a cursor this API gave out") from None


def instance_cursor(record: InstanceRecord) -> str:
    created = record.created_at.isoformat() if record.created_at else ""
    return _encode([created, record.key.tenant, record.key.instance_id])


def parse_instance_cursor(cursor: str | None) -> InstanceCursor | None:
    if cursor is None:
        return None
    value = _decode(cursor)
    try:
        created, tenant, instance_id = value
        return InstanceCursor(datetime.fromisoformat(created), str(tenant), str(instance_id))
    except (TypeError, ValueError):
        raise ApiError(422, "cursor: not a cursor this API gave out") from None


def id_cursor(last_id: int) -> str:
    return _encode(last_id)


def parse_id_cursor(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    value = _decode(cursor)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApiError(422, "cursor: not a cursor this API gave out")
    return value
