"""The worker's inbox takes tenants' deliveries in turn."""

from __future__ import annotations

from stepfleet.workers.inbox import FairInbox
from tests.fakes import Acks, delivery


def make(tenant: str, n: int, kind: str = "step"):
    return delivery(Acks(), {"x-tenant": tenant, "x-kind": kind, "n": n}, b"{}")


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


async def test_a_tenants_existing_instances_go_before_its_creates_which_still_get_turns():
    inbox = FairInbox()
    for n in range(10):
        inbox.put_nowait(make("acme", n, "create"))
    for n in range(10, 16):  # a wake, a step and an event, behind ten creates
        inbox.put_nowait(make("acme", n, ("wake", "step", "event")[n % 3]))
    batch = await inbox.take(100, wait_s=0)
    # Three of the instances' deliveries in a row, then a create, each kind in its order.
    assert [d.headers["n"] for d in batch] == [10, 11, 12, 0, 13, 14, 15, 1, *range(2, 10)]
    inbox.put_nowait(make("acme", 20, "create"))
    inbox.put_nowait(make("acme", 21))
    assert [d.headers["n"] for d in await inbox.take(100, wait_s=0)] == [21, 20]


async def test_take_waits_for_a_delivery_and_returns_nothing_when_none_comes():
    inbox = FairInbox()
    assert await inbox.take(10, wait_s=0.01) == []
    inbox.put_nowait(make("a", 1))
    assert [d.headers["n"] for d in await inbox.take(10, wait_s=1)] == [1]


async def test_tenants_share_batches_in_proportion_to_their_weights():
    weights = {"heavy": 3, "light": 1}
    inbox = FairInbox(lambda tenant: weights.get(tenant, 1))
    for n in range(400):
        inbox.put_nowait(make("heavy", n))
        inbox.put_nowait(make("light", n))
    batch = await inbox.take(400, wait_s=0)
    taken = [d.routing_key for d in batch]
    assert taken.count("heavy.step") == 300
    assert taken.count("light.step") == 100


async def test_steps_charged_to_a_tenant_count_against_its_share():
    inbox = FairInbox()
    for n in range(100):
        inbox.put_nowait(make("chains", n))
        inbox.put_nowait(make("single", n))
    await inbox.take(2, wait_s=0)  # one each
    inbox.charge("chains", 3)  # its delivery did four steps
    taken = [d.routing_key for d in await inbox.take(8, wait_s=0)]
    # "single" takes the three turns "chains" used, then they alternate again.
    assert taken == ["single.step"] * 3 + ["chains.step", "single.step"] * 2 + ["chains.step"]


async def test_a_tenant_back_from_a_quiet_spell_brings_no_credit_and_waits_for_no_backlog():
    inbox = FairInbox()
    for n in range(50):
        inbox.put_nowait(make("busy", n))
    assert len(await inbox.take(40, wait_s=0)) == 40  # busy's pass is now far ahead
    inbox.put_nowait(make("back", 0))
    inbox.put_nowait(make("back", 1))
    batch = await inbox.take(4, wait_s=0)
    # Served right away, then in turn with busy, not ahead of it for forty turns.
    assert [d.routing_key for d in batch] == ["back.step", "busy.step", "back.step", "busy.step"]


async def test_take_light_takes_only_from_tenants_with_few_deliveries_waiting():
    inbox = FairInbox(light_limit=2)
    for n in range(10):
        inbox.put_nowait(make("flood", n))
    inbox.put_nowait(make("calm", 0))
    inbox.put_nowait(make("other", 0))
    inbox.put_nowait(make("other", 1))
    batch = await inbox.take_light(10, wait_s=0)
    assert sorted((d.routing_key, d.headers["n"]) for d in batch) == [
        ("calm.step", 0),
        ("other.step", 0),
        ("other.step", 1),
    ]
    assert await inbox.take_light(10, wait_s=0.01) == []
    # What take_light took is gone from the fair turn too; the flood is all that is left.
    rest = await inbox.take(100, wait_s=0)
    assert [d.headers["n"] for d in rest] == list(range(10))
    assert inbox.empty()


async def test_a_tenant_whose_backlog_shrinks_becomes_light():
    inbox = FairInbox(light_limit=2)
    for n in range(4):
        inbox.put_nowait(make("a", n))
    assert await inbox.take_light(10, wait_s=0) == []
    await inbox.take(2, wait_s=0)
    assert [d.headers["n"] for d in await inbox.take_light(10, wait_s=0)] == [2, 3]


async def test_take_leaves_a_few_light_deliveries_to_take_light():
    inbox = FairInbox(light_limit=2)
    for n in range(10):
        inbox.put_nowait(make("flood", n))
    inbox.put_nowait(make("calm", 0))
    batch = await inbox.take(100, wait_s=0, leave_light=4)
    # The flood's tail counts as light once it is that short: it is left too.
    assert [d.headers["n"] for d in batch] == list(range(8))
    assert {d.routing_key for d in batch} == {"flood.step"}
    # Only light deliveries left: take waits (and gives up), take_light gets them.
    assert await inbox.take(100, wait_s=0.01, leave_light=4) == []
    light = await inbox.take_light(4, wait_s=0)
    assert sorted(d.routing_key for d in light) == ["calm.step", "flood.step", "flood.step"]
    # More light deliveries than a light batch: take shares them out as usual.
    for tenant in ("a", "b", "c"):
        inbox.put_nowait(make(tenant, 0))
    assert len(await inbox.take(100, wait_s=0, leave_light=2)) == 3


async def test_take_leaves_nothing_to_take_light_while_a_light_batch_is_served():
    """A light batch that takes long (a module compiling) must not hold up the light
    deliveries that come meanwhile: the other pipelines take them."""
    inbox = FairInbox(light_limit=2)
    inbox.put_nowait(make("first", 0))
    assert len(await inbox.take_light(4, wait_s=0)) == 1
    with inbox.serving_light():
        inbox.put_nowait(make("second", 0))
        batch = await inbox.take(100, wait_s=0, leave_light=4)
    assert [d.routing_key for d in batch] == ["second.step"]
