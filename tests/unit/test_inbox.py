"""The worker's inbox takes tenants' deliveries in turn."""

from __future__ import annotations

from stepfleet.workers.inbox import FairInbox
from tests.fakes import Acks, delivery


def make(tenant: str, n: int):
    return delivery(Acks(), {"x-tenant": tenant, "x-kind": "step", "n": n}, b"{}")


async def test_a_flooding_tenant_does_not_hold_back_the_others():
    inbox = FairInbox()
    for n in range(100):
        inbox.put_nowait(make("flood", n))
    inbox.put_nowait(make("quiet", 0))
    inbox.put_nowait(make("other", 0))
    batch = await inbox.take(4, wait_s=0)
    assert [(d.routing_key, d.headers["n"]) for d in batch] == [
        ("flood.step", 0),
        ("quiet.step", 0),
        ("other.step", 0),
        ("flood.step", 1),
    ]
    assert inbox.qsize() == 98
    rest = await inbox.take(1000, wait_s=0)
    assert [d.headers["n"] for d in rest] == list(range(2, 100))  # each tenant in its order
    assert inbox.empty()


async def test_take_waits_for_a_delivery_and_returns_nothing_when_none_comes():
    inbox = FairInbox()
    assert await inbox.take(10, wait_s=0.01) == []
    inbox.put_nowait(make("a", 1))
    assert [d.headers["n"] for d in await inbox.take(10, wait_s=1)] == [1]
