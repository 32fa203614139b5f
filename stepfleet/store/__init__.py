"""PostgreSQL through SQLAlchemy 2: instances, journal, events, timers, outbox, modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet.store.browse import AuditRow, Browse, InstanceCursor, StoredEvent
from stepfleet.store.control import ControlTransaction
from stepfleet.store.dead_letters import (
    Archived,
    DeadLetter,
    DeadLetterStore,
    LetterFilter,
    NewDeadLetter,
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
    StepWrite,
)
from stepfleet.store.tenants import StoredSecret, TenantRecord, TenantStore
from stepfleet.store.tokens import TokenRecord, TokenStore

__all__ = [
    "Archived",
    "AuditEntry",
    "AuditRow",
    "Browse",
    "ControlTransaction",
    "DeadLetter",
    "DeadLetterStore",
    "DueTimer",
    "InstanceCursor",
    "InstanceDetail",
    "InstanceRecord",
    "LetterFilter",
    "MemoryStore",
    "NewDeadLetter",
    "NewEvent",
    "NewInstance",
    "OutboxMessage",
    "PgStore",
    "StepStore",
    "StepTransaction",
    "StepTx",
    "StepWrite",
    "StoreError",
    "StoreUnavailable",
    "StoredEvent",
    "StoredSecret",
    "TenantRecord",
    "TenantStore",
    "TokenRecord",
    "TokenStore",
]


if TYPE_CHECKING:

    def _both_implement_the_port(memory: MemoryStore, pg: PgStore) -> list[StepStore]:
        return [memory, pg]
