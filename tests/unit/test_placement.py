"""Placement: a tenant seen flooding is bound to its home side lane at once, renewed while it
floods, and unbound once quiet; a binding a worker only saw messages of is cleaned up too."""

from __future__ import annotations

from stepfleet.broker import BrokerUnavailable
from stepfleet.workers.placement import (
    QUIET_SECONDS,
    REFRESH_SECONDS,
    Placement,
    home_side_lane,
)


class Bindings:
    def __init__(self) -> None:
        self.bound: set[tuple[str, int]] = set()
        self.calls: list[tuple[str, str, int]] = []
        self.down = False

    async def aside(self, tenant: str, lane: int) -> None:
        self._call("bind", tenant, lane)
        self.bound.add((tenant, lane))

    async def back(self, tenant: str, lane: int) -> None:
        self._call("unbind", tenant, lane)
        self.bound.discard((tenant, lane))

    def _call(self, what: str, tenant: str, lane: int) -> None:
        if self.down:
            raise BrokerUnavailable("away")
        self.calls.append((what, tenant, lane))


def make(bindings: Bindings) -> Placement:
    return Placement(16, bindings.aside, bindings.back)


def test_every_worker_places_a_tenant_in_the_same_side_lane():
    lanes = {home_side_lane(f"tenant{i}", 16) for i in range(200)}
    assert lanes == set(range(16)), "homes spread over every side lane"
    assert home_side_lane("acme", 16) == home_side_lane("acme", 16)
    assert make(Bindings()).home("acme") == home_side_lane("acme", 16)


async def test_a_flooding_tenant_is_bound_once_then_renewed_and_unbound_when_quiet():
    bindings = Bindings()
    placement = make(bindings)
    home = home_side_lane("flood", 16)
    placement.flooding("flood", 100.0)
    placement.flooding("flood", 100.5)
    await placement.settle(100.5)
    assert bindings.calls == [("bind", "flood", home)]
    placement.flooding("flood", 100.0 + REFRESH_SECONDS)
    await placement.settle(100.0 + REFRESH_SECONDS)
    assert bindings.calls[-1] == ("bind", "flood", home)
    assert len(bindings.calls) == 2
    last = 100.0 + REFRESH_SECONDS
    await placement.settle(last + QUIET_SECONDS - 1)
    assert bindings.bound == {("flood", home)}, "not quiet long enough yet"
    await placement.settle(last + QUIET_SECONDS + 1)
    assert bindings.bound == set()
    assert bindings.calls[-1] == ("unbind", "flood", home)


async def test_a_binding_seen_only_through_its_messages_is_removed_once_quiet():
    """A worker that crashed left a binding: whoever receives a message it routed removes it."""
    bindings = Bindings()
    bindings.bound.add(("left", home_side_lane("left", 16)))
    placement = make(bindings)
    placement.seen_placed("left", 10.0)
    await placement.settle(10.0 + QUIET_SECONDS - 1)
    assert bindings.calls == []
    await placement.settle(10.0 + QUIET_SECONDS + 1)
    assert bindings.bound == set()


async def test_stopping_removes_only_the_bindings_this_worker_made():
    bindings = Bindings()
    placement = make(bindings)
    placement.flooding("mine", 50.0)
    await placement.settle(50.0)
    placement.seen_placed("theirs", 50.0)
    await placement.stop()
    assert [call[:2] for call in bindings.calls] == [("bind", "mine"), ("unbind", "mine")]


async def test_a_bind_the_broker_fails_is_tried_again_at_the_next_renewal():
    bindings = Bindings()
    bindings.down = True
    placement = make(bindings)
    placement.flooding("flood", 0.0)
    await placement.settle(0.0)
    assert bindings.bound == set()
    bindings.down = False
    placement.flooding("flood", 1.0)
    await placement.settle(1.0)
    assert bindings.bound == set(), "not before the renewal period"
    placement.flooding("flood", REFRESH_SECONDS)
    await placement.settle(REFRESH_SECONDS)
    assert bindings.bound == {("flood", home_side_lane("flood", 16))}
