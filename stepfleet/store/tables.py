"""Every table of stepfleet as SQLAlchemy Core objects; each constraint has a stable name."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    DateTime,
    Float,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)

from stepfleet.schemas import InstanceStatus

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

_STATUSES = ", ".join(f"'{status.value}'" for status in InstanceStatus)


def _now() -> Column[object]:
    return Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now())


tenants = Table(
    "tenants",
    metadata,
    Column("name", Text, nullable=False),
    # The RabbitMQ user whose messages are this tenant's (checked against AMQP user_id).
    Column("broker_user", Text),
    # TenantLimits as JSON: only the limits that differ from the fleet's settings.
    Column("limits", Text, nullable=False, server_default="{}"),
    _now(),
    # Keys the tenant's running-step slots (advisory locks): unique, unlike a name hash.
    Column("slot_key", Integer, Identity(always=False), nullable=False),
    PrimaryKeyConstraint("name"),
    UniqueConstraint("broker_user"),
    UniqueConstraint("slot_key"),
)

tenant_rates = Table(
    "tenant_rates",
    metadata,
    Column("tenant", Text, nullable=False),
    # A token bucket shared by every worker: steps the tenant may start now.
    Column("tokens", Float, nullable=False),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant"),
)

tenant_egress = Table(
    "tenant_egress",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("host", Text, nullable=False),
    _now(),
    PrimaryKeyConstraint("tenant", "host"),
    ForeignKeyConstraint(["tenant"], ["tenants.name"], ondelete="CASCADE"),
)

tenant_secrets = Table(
    "tenant_secrets",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("name", Text, nullable=False),
    # The gateway adds `header: <secret>` to requests for `host`; the guest never sees it.
    Column("host", Text, nullable=False),
    Column("header", Text, nullable=False),
    # Encrypted with the fleet's secret key; never stored or logged in the clear.
    Column("ciphertext", LargeBinary, nullable=False),
    _now(),
    PrimaryKeyConstraint("tenant", "name"),
    ForeignKeyConstraint(["tenant"], ["tenants.name"], ondelete="CASCADE"),
)

modules = Table(
    "modules",
    metadata,
    Column("digest", Text, nullable=False),
    Column("wasm", LargeBinary, nullable=False),
    Column("size_bytes", Integer, nullable=False),
    _now(),
    PrimaryKeyConstraint("digest"),
)

tenant_modules = Table(
    "tenant_modules",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("digest", Text, nullable=False),
    Column("pushed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("tenant", "digest"),
    ForeignKeyConstraint(["digest"], ["modules.digest"]),
)

instances = Table(
    "instances",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("id", Text, nullable=False),
    Column("module", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("position", Integer, nullable=False, server_default="0"),
    # Bumped whenever the journal is rewritten (restart), so cached journals can be told stale.
    Column("generation", Integer, nullable=False, server_default="0"),
    Column("params", Text, nullable=False),
    Column("output", Text),
    Column("error", Text),
    _now(),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The attempt number the next new step runs as (retries bump it).
    Column("attempt", Integer, nullable=False, server_default="1"),
    # A parked instance: what it waits for and when its timer is due (sleep, retry, event).
    Column("wait_kind", Text),
    Column("wait_name", Text),
    Column("wait_event", Text),
    Column("wait_timeout_ms", BigInteger),
    Column("wake_at", DateTime(timezone=True)),
    # When a wake was last published for the timer; a lost wake is sent again after a while.
    Column("wake_sent_at", DateTime(timezone=True)),
    # 0 forward, 1 running compensations; end_status is where compensations end.
    Column("mode", SmallInteger, nullable=False, server_default="0"),
    Column("end_status", Text),
    Column("state_bytes", BigInteger, nullable=False, server_default="0"),
    Column("retention_seconds", Integer),
    Column("finished_at", DateTime(timezone=True)),
    Column("retain_until", DateTime(timezone=True)),
    # Marked by the dead-letter archiver: the letter (dead_letters.id) that left the live
    # instance with nothing to move it, and its reason; cleared by any step the instance
    # takes, by a replay of that letter and by retry, terminate, restart and resume.
    Column("stalled_letter", BigInteger),
    Column("stalled_reason", Text),
    Column("stalled_at", DateTime(timezone=True)),
    # When the stall sweep last republished the instance's step message.
    Column("swept_at", DateTime(timezone=True)),
    # The W3C trace context of the delivery that last wrote the state: a wake or an operator's
    # step message continues the instance's trace with it.
    Column("traceparent", Text),
    PrimaryKeyConstraint("tenant", "id"),
    ForeignKeyConstraint(["module"], ["modules.digest"]),
    CheckConstraint(f"status IN ({_STATUSES})", name="status"),
    CheckConstraint("position >= 0", name="position"),
    CheckConstraint("wait_kind IN ('sleep', 'retry', 'event', 'throttle')", name="wait_kind"),
    Index(None, "tenant", "status"),
    # The API's and console's listings, newest first, paged by cursor (migration 0010).
    Index(None, "tenant", "created_at", "id"),
    Index(None, "created_at", "tenant", "id"),
    Index("ix_instances_wake_at", "wake_at", postgresql_where=text("wake_at IS NOT NULL")),
    Index(
        "ix_instances_retain_until",
        "retain_until",
        postgresql_where=text("retain_until IS NOT NULL"),
    ),
    # The stall sweep's candidates: live instances not parked on a timer. Keyed and filtered
    # by columns a step-to-step write leaves alone (not updated_at), so those writes stay HOT.
    Index(
        "ix_instances_unparked",
        "tenant",
        "id",
        postgresql_where=text("wait_kind IS NULL AND status IN ('queued', 'running')"),
    ),
    Index(
        "ix_instances_stalled_letter",
        "stalled_letter",
        postgresql_where=text("stalled_letter IS NOT NULL"),
    ),
)

journal = Table(
    "journal",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("kind", SmallInteger, nullable=False),
    Column("name", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("attempt", Integer, nullable=False, server_default="1"),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    Column("flags", SmallInteger, nullable=False, server_default="0"),
    # The primary key is what makes "each step exactly once" a database guarantee.
    PrimaryKeyConstraint("tenant", "instance_id", "seq"),
    ForeignKeyConstraint(
        ["tenant", "instance_id"], ["instances.tenant", "instances.id"], ondelete="CASCADE"
    ),
    # Steps per second over the last minute (the console's overview): BRIN, a few pages for
    # the whole journal, since rows arrive in time order.
    Index(None, "finished_at", postgresql_using="brin"),
)

step_attempts = Table(
    "step_attempts",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("seq", Integer, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("name", Text, nullable=False),
    Column("error", Text, nullable=False),
    Column("started_at", DateTime(timezone=True), nullable=False),
    Column("finished_at", DateTime(timezone=True), nullable=False),
    PrimaryKeyConstraint("tenant", "instance_id", "seq", "attempt"),
    ForeignKeyConstraint(
        ["tenant", "instance_id"], ["instances.tenant", "instances.id"], ondelete="CASCADE"
    ),
)

events = Table(
    "events",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The journal position the event was delivered at; NULL while it waits for a wait.
    Column("consumed_seq", Integer),
    # The event id makes sending idempotent.
    PrimaryKeyConstraint("tenant", "instance_id", "event_id"),
    ForeignKeyConstraint(
        ["tenant", "instance_id"], ["instances.tenant", "instances.id"], ondelete="CASCADE"
    ),
    Index(
        "ix_events_waiting",
        "tenant",
        "instance_id",
        "type",
        "received_at",
        postgresql_where=text("consumed_seq IS NULL"),
    ),
)

# Events that arrived before their instance existed (its create not yet committed): held
# until the create takes them, or until expires_at, when their dead letter goes to the outbox.
early_events = Table(
    "early_events",
    metadata,
    Column("tenant", Text, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("event_id", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("payload", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("expires_at", DateTime(timezone=True), nullable=False),
    # The dead letter published if the instance never comes (an outbox row's columns).
    Column("letter_exchange", Text, nullable=False),
    Column("letter_routing_key", Text, nullable=False),
    Column("letter_headers", Text, nullable=False),
    Column("letter_body", LargeBinary, nullable=False),
    PrimaryKeyConstraint("tenant", "instance_id", "event_id"),
    Index(None, "expires_at"),
)

outbox = Table(
    "outbox",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    # NULL: the internal exchange; replayed dead letters name their original exchange.
    Column("exchange", Text),
    Column("routing_key", Text, nullable=False),
    Column("headers", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    _now(),
    Index(None, "created_at"),
)

dead_letters = Table(
    "dead_letters",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    # Identifies the dead letter itself, so a redelivered one is archived once.
    Column("letter_key", Text, nullable=False),
    Column("received_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("reason", Text, nullable=False),
    Column("detail", Text, nullable=False),
    Column("tenant", Text),
    Column("instance_id", Text),
    Column("kind", Text),
    Column("module", Text),
    Column("routing_key", Text, nullable=False),
    Column("message_id", Text),
    Column("headers", Text, nullable=False),
    Column("body", LargeBinary, nullable=False),
    # The instance's state and failed attempts when the letter was archived (JSON).
    Column("context", Text, nullable=False, server_default="{}"),
    Column("replayed_at", DateTime(timezone=True)),
    Column("replayed_by", Text),
    # How the letter reached the archive: worker, rabbitmq, other, or legacy (archived before
    # 0006, when nothing said who sent a letter).
    Column("source", Text, nullable=False, server_default="legacy"),
    # The broker user that published the original message and the exchange it was first
    # published to, as far as RabbitMQ vouches for them; NULL when it does not. A replay
    # trusts these, never a header.
    Column("sender", Text),
    Column("first_exchange", Text),
    # The tenant whose archive bound the letter counts against ('' when none can be told).
    Column("account", Text, nullable=False, server_default=""),
    # The whole body as received (`body` may be a prefix of it, or empty past the bound).
    Column("body_size", BigInteger, nullable=False),
    Column("body_sha256", Text, nullable=False),
    # Bytes of body and headers this row keeps, counted against its account.
    Column("stored_bytes", BigInteger, nullable=False),
    # Why the archive itself will never replay the letter (its body was cut, say).
    Column("unreplayable", Text),
    UniqueConstraint("letter_key"),
    Index(None, "tenant", "received_at"),
    Index(None, "reason"),
)

# What each account's archived letters keep, maintained with every insert and purge so the
# per-tenant bound is checked without summing the archive.
dead_letter_usage = Table(
    "dead_letter_usage",
    metadata,
    Column("account", Text, nullable=False),
    Column("letters", BigInteger, nullable=False, server_default="0"),
    Column("bytes", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("account"),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text, nullable=False),
    # The filter a bulk action used (JSON), and how many items it touched.
    Column("filter", Text, nullable=False, server_default="{}"),
    Column("count", Integer, nullable=False, server_default="1"),
    Column("detail", Text, nullable=False, server_default=""),
    Index(None, "at"),
)

# Tokens of the HTTP API and console (migration 0010): the secret's SHA-256 only.
api_tokens = Table(
    "api_tokens",
    metadata,
    Column("name", Text, nullable=False),
    Column("role", Text, nullable=False),
    Column("tenant", Text),
    Column("secret_sha256", Text, nullable=False),
    _now(),
    Column("revoked_at", DateTime(timezone=True)),
    Column("last_used_at", DateTime(timezone=True)),
    PrimaryKeyConstraint("name"),
    UniqueConstraint("secret_sha256"),
    CheckConstraint("role IN ('viewer', 'operator', 'admin')", name="role"),
)
