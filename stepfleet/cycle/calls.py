"""Guests' HTTP calls, made between cycles: while a call is in flight no transaction is open,
no row is locked and the guest thread runs other messages.

A run that stops at a call (`CallRequested`) comes back from the cycle as `Suspended`;
`CallScheduler.answer` makes the call through the egress gateway within the step's time left
and the caps on calls in flight (the worker's and the tenant's), then returns the work with the
answer added, for a later cycle to run the attempt again. A crash meanwhile loses nothing: the
message was not acknowledged, so it comes again and the attempt runs again (calls are
at-least-once, docs/guest-abi.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol

import structlog

from stepfleet.cycle.context import message_context
from stepfleet.cycle.work import H, Suspended, Work
from stepfleet.observe import NO_OBSERVER, Observer
from stepfleet.schemas import AnsweredCall, HttpRequest, HttpResponse

log = structlog.get_logger("stepfleet.worker")


class Caller(Protocol):
    """The egress gateway's asynchronous side: it does the network I/O.

    `call` never raises for anything the guest or the network did: refusals, timeouts and
    connection failures come back as `HttpResponse.failed(message)`, and the answer holds
    nothing the guest may not read (the gateway scrubs the secrets it injects).
    """

    @property
    def call_timeout_s(self) -> float:
        """The longest one call may take; the scheduler passes min(this, the step's time left)."""
        ...

    async def call(self, tenant: str, request: HttpRequest, timeout_s: float) -> HttpResponse:
        """Perform one call for `tenant` within `timeout_s` seconds, wall clock."""
        ...


class _Slots:
    """Calls in flight: at most `total` in the process and each tenant's cap."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._busy = 0
        self._by_tenant: dict[str, int] = {}
        self._freed = asyncio.Condition()

    @property
    def busy(self) -> int:
        return self._busy

    def _free_for(self, tenant: str, cap: int) -> bool:
        return self._busy < self._total and self._by_tenant.get(tenant, 0) < cap

    async def take(self, tenant: str, cap: int) -> None:
        async with self._freed:
            await self._freed.wait_for(lambda: self._free_for(tenant, cap))
            self._busy += 1
            self._by_tenant[tenant] = self._by_tenant.get(tenant, 0) + 1

    async def give(self, tenant: str) -> None:
        async with self._freed:
            self._busy -= 1
            left = self._by_tenant[tenant] - 1
            if left:
                self._by_tenant[tenant] = left
            else:
                del self._by_tenant[tenant]
            self._freed.notify_all()


class CallScheduler:
    """Makes suspended steps' calls; one per process.

    `caller` None refuses every call ("egress is not configured"). `tenant_cap(tenant)` is
    how many calls of the tenant may be in flight at once.
    """

    def __init__(
        self,
        caller: Caller | None,
        *,
        max_in_flight: int,
        tenant_cap: Callable[[str], int],
        observer: Observer = NO_OBSERVER,
    ) -> None:
        self._caller = caller
        self._slots = _Slots(max_in_flight)
        self._tenant_cap = tenant_cap
        self._observer = observer

    @property
    def in_flight(self) -> int:
        return self._slots.busy

    async def answer(self, suspended: Suspended[H]) -> Work[H]:
        """Make the call and return the work, ready to run again with the answer."""
        work, call = suspended.work, suspended.call
        tenant = work.key.tenant
        await self._slots.take(tenant, self._tenant_cap(tenant))
        began = time.monotonic()
        try:
            with message_context(work, step=call.name, position=call.seq):
                answer = await self._call(tenant, call.name, call.request, call.deadline)
        finally:
            await self._slots.give(tenant)
        self._observer.call(tenant, time.monotonic() - began)
        work.answers = (*call.answered, AnsweredCall(call.request, answer))
        work.step_deadline = call.deadline
        return work

    async def _call(
        self, tenant: str, name: str, request: HttpRequest, deadline: float
    ) -> HttpResponse:
        if self._caller is None:
            return HttpResponse.failed("egress is not configured")
        left = deadline - time.monotonic()
        if left <= 0:
            return HttpResponse.failed(f"step {name!r} has no time left for an HTTP call")
        try:
            return await self._caller.call(tenant, request, min(self._caller.call_timeout_s, left))
        except Exception as exc:  # a gateway bug must not fail the worker; say nothing more
            log.exception("egress_gateway_failed", tenant=tenant)
            return HttpResponse.failed(f"egress gateway error ({type(exc).__name__})")
