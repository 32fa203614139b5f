"""PostgreSQL through SQLAlchemy 2: instances, journal, events, timers, outbox, modules."""

from __future__ import annotations

from stepfleet.store.control import ControlTransaction
from stepfleet.store.errors import StoreError, StoreUnavailable
from stepfleet.store.pg import PgStore, StepTransaction
from stepfleet.store.records import (
    DueTimer,
    InstanceDetail,
    InstanceRecord,
    NewEvent,
    NewInstance,
    OutboxMessage,
    StepWrite,
)
from stepfleet.store.tenants import StoredSecret, TenantRecord, TenantStore

__all__ = [
    "ControlTransaction",
    "DueTimer",
    "InstanceDetail",
    "InstanceRecord",
    "NewEvent",
    "NewInstance",
    "OutboxMessage",
    "PgStore",
    "StepTransaction",
    "StepWrite",
    "StoreError",
    "StoreUnavailable",
    "StoredSecret",
    "TenantRecord",
    "TenantStore",
]
