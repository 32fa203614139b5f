"""PostgreSQL through SQLAlchemy 2: instances, journal, outbox and the module store."""

from __future__ import annotations

from stepfleet.store.errors import StoreError, StoreUnavailable
from stepfleet.store.pg import PgStore, StepTransaction
from stepfleet.store.records import (
    InstanceRecord,
    NewInstance,
    OutboxMessage,
    ReplayData,
    StepWrite,
)

__all__ = [
    "InstanceRecord",
    "NewInstance",
    "OutboxMessage",
    "PgStore",
    "ReplayData",
    "StepTransaction",
    "StepWrite",
    "StoreError",
    "StoreUnavailable",
]
