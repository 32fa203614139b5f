"""Wire messages, identifiers and the shared vocabulary of every room."""

from __future__ import annotations

from stepfleet.schemas.identifiers import (
    DIGEST_PATTERN,
    INSTANCE_ID_PATTERN,
    TENANT_PATTERN,
    InstanceKey,
    digest_of,
    is_digest,
    is_instance_id,
    is_tenant,
)
from stepfleet.schemas.journal import EntryKind, JournalEntry
from stepfleet.schemas.messages import (
    BODY_MODELS,
    SCHEMA_VERSION,
    CreateBody,
    Envelope,
    EventBody,
    Headers,
    InvalidMessage,
    MessageKind,
    StepBody,
    WakeBody,
    parse_envelope,
)
from stepfleet.schemas.outcomes import (
    Completed,
    GuestCrashed,
    GuestOutcome,
    Nondeterministic,
    StepFailed,
    StepSucceeded,
    WorkflowFailed,
)
from stepfleet.schemas.status import InstanceStatus

__all__ = [
    "BODY_MODELS",
    "DIGEST_PATTERN",
    "INSTANCE_ID_PATTERN",
    "SCHEMA_VERSION",
    "TENANT_PATTERN",
    "Completed",
    "CreateBody",
    "EntryKind",
    "Envelope",
    "EventBody",
    "GuestCrashed",
    "GuestOutcome",
    "Headers",
    "InstanceKey",
    "InstanceStatus",
    "InvalidMessage",
    "JournalEntry",
    "MessageKind",
    "Nondeterministic",
    "StepBody",
    "StepFailed",
    "StepSucceeded",
    "WakeBody",
    "WorkflowFailed",
    "digest_of",
    "is_digest",
    "is_instance_id",
    "is_tenant",
    "parse_envelope",
]
