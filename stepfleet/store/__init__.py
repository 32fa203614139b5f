"""PostgreSQL through SQLAlchemy 2: instances, journal, events, timers, outbox, modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet.store.control import ControlTransaction
from stepfleet.store.dead_letters import (
    Archived,
    DeadLetter,
    DeadLetterStore,
    LetterFilter,
    NewDeadLetter,
    Stalled,
)
from stepfleet.store.errors import StoreError, StoreUnavailable
from stepfleet.store.memory import MemoryStore
from stepfleet.store.pg import PgStore, StepTransaction
from stepfleet.store.port import StepStore, StepTx
from stepfleet.store.records import (
    AuditEntry,
    DueTimer,
    InstanceDetail,
    InstanceRecord,
    NewEvent,
    NewInstance,
    OutboxMessage,
    Stall,
    StepWrite,
    Unmoved,
)
from stepfleet.store.tenants import StoredSecret, TenantRecord, TenantStore

__all__ = [
    "Archived",
    "AuditEntry",
    "ControlTransaction",
    "DeadLetter",
    "DeadLetterStore",
    "DueTimer",
    "InstanceDetail",
    "InstanceRecord",
    "LetterFilter",
    "MemoryStore",
    "NewDeadLetter",
    "NewEvent",
    "NewInstance",
    "OutboxMessage",
    "PgStore",
    "Stall",
    "Stalled",
    "StepStore",
    "StepTransaction",
    "StepTx",
    "StepWrite",
    "StoreError",
    "StoreUnavailable",
    "StoredSecret",
    "TenantRecord",
    "TenantStore",
    "Unmoved",
]


if TYPE_CHECKING:

    def _both_implement_the_port(memory: MemoryStore, pg: PgStore) -> list[StepStore]:
        return [memory, pg]
