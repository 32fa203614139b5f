"""PostgreSQL through SQLAlchemy 2: instances, journal, events, timers, outbox, modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from stepfleet._lazy import lazy_exports

if TYPE_CHECKING:
    from stepfleet.store.browse import AuditRow, Browse, InstanceCursor, StoredEvent
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
        CreatesWritten,
        DueTimer,
        EarlyEvent,
        EarlyHolding,
        ExpectedRow,
        GuardedCreate,
        GuardedWrite,
        HeldEvent,
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
    from stepfleet.store.tokens import TokenRecord, TokenStore

__all__ = [
    "Archived",
    "AuditEntry",
    "AuditRow",
    "Browse",
    "ControlTransaction",
    "CreatesWritten",
    "DeadLetter",
    "DeadLetterStore",
    "DueTimer",
    "EarlyEvent",
    "EarlyHolding",
    "ExpectedRow",
    "GuardedCreate",
    "GuardedWrite",
    "HeldEvent",
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
    "Stall",
    "Stalled",
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
    "Unmoved",
]


if TYPE_CHECKING:

    def _both_implement_the_port(memory: MemoryStore, pg: PgStore) -> list[StepStore]:
        return [memory, pg]


__getattr__ = lazy_exports(
    __name__,
    {
        "AuditRow": "stepfleet.store.browse",
        "Browse": "stepfleet.store.browse",
        "InstanceCursor": "stepfleet.store.browse",
        "StoredEvent": "stepfleet.store.browse",
        "ControlTransaction": "stepfleet.store.control",
        "Archived": "stepfleet.store.dead_letters",
        "DeadLetter": "stepfleet.store.dead_letters",
        "DeadLetterStore": "stepfleet.store.dead_letters",
        "LetterFilter": "stepfleet.store.dead_letters",
        "NewDeadLetter": "stepfleet.store.dead_letters",
        "Stalled": "stepfleet.store.dead_letters",
        "StoreError": "stepfleet.store.errors",
        "StoreUnavailable": "stepfleet.store.errors",
        "MemoryStore": "stepfleet.store.memory",
        "PgStore": "stepfleet.store.pg",
        "StepTransaction": "stepfleet.store.pg",
        "StepStore": "stepfleet.store.port",
        "StepTx": "stepfleet.store.port",
        "AuditEntry": "stepfleet.store.records",
        "DueTimer": "stepfleet.store.records",
        "EarlyEvent": "stepfleet.store.records",
        "EarlyHolding": "stepfleet.store.records",
        "HeldEvent": "stepfleet.store.records",
        "InstanceDetail": "stepfleet.store.records",
        "InstanceRecord": "stepfleet.store.records",
        "NewEvent": "stepfleet.store.records",
        "NewInstance": "stepfleet.store.records",
        "OutboxMessage": "stepfleet.store.records",
        "ExpectedRow": "stepfleet.store.records",
        "GuardedWrite": "stepfleet.store.records",
        "GuardedCreate": "stepfleet.store.records",
        "CreatesWritten": "stepfleet.store.records",
        "Stall": "stepfleet.store.records",
        "StepWrite": "stepfleet.store.records",
        "Unmoved": "stepfleet.store.records",
        "StoredSecret": "stepfleet.store.tenants",
        "TenantRecord": "stepfleet.store.tenants",
        "TenantStore": "stepfleet.store.tenants",
        "TokenRecord": "stepfleet.store.tokens",
        "TokenStore": "stepfleet.store.tokens",
    },
)
