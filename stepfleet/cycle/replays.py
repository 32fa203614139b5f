"""Journals of warm instances kept in the worker, so a step fetches only what is new."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stepfleet.sandbox import ReplayJournal
from stepfleet.schemas import InstanceKey
from stepfleet.store.port import StepTx

if TYPE_CHECKING:
    from stepfleet.cycle.work import Work


@dataclass(slots=True)
class CachedReplay:
    """Params and journal of one instance as of `generation`."""

    generation: int
    params: str
    journal: ReplayJournal


class ReplayCache:
    """A bounded LRU of instance journals; entries are checked against the locked row."""

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[InstanceKey, CachedReplay] = OrderedDict()

    def usable(self, key: InstanceKey, generation: int, position: int) -> CachedReplay | None:
        """Return the cached journal if it is a prefix of the instance's current journal."""
        cached = self._entries.get(key)
        if cached is None:
            return None
        if cached.generation != generation or len(cached.journal) > position:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return cached

    def exactly(self, key: InstanceKey, generation: int, position: int) -> CachedReplay | None:
        """Return the cached journal if it is exactly the instance's journal at `position`
        (no more, no less); unlike `usable`, never drops an entry."""
        cached = self._entries.get(key)
        if cached is None or cached.generation != generation:
            return None
        return cached if len(cached.journal) == position else None

    def put(self, key: InstanceKey, replay: CachedReplay) -> None:
        """Remember an instance's journal, evicting the least recently used."""
        self._entries[key] = replay
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def drop(self, key: InstanceKey) -> None:
        """Forget an instance (finished, or its cache could not be trusted)."""
        self._entries.pop(key, None)


async def load_replays(tx: StepTx, cache: ReplayCache, admitted: list[Work[Any]]) -> None:
    """Give each admitted work its params and whole journal, fetching only what the cache
    lacks: a cold instance's params and journal, a warm one's entries recorded elsewhere.

    Raises:
        RuntimeError: the journal disagrees with the instance's position (the cache entry is
            dropped; the batch is retried).
    """
    since: dict[InstanceKey, int] = {}
    cold: list[InstanceKey] = []
    for work in admitted:
        if work.replay is not None:  # created by this very batch: nothing recorded yet
            continue
        assert work.record is not None
        cached = cache.usable(work.key, work.record.generation, work.record.position)
        work.replay = cached
        if cached is None:
            cold.append(work.key)
            since[work.key] = 0
        elif len(cached.journal) < work.record.position:
            since[work.key] = len(cached.journal)  # another worker ran the steps between
    if not since:
        return
    params, entries = await tx.replay_data(since, with_params=cold)
    for work in admitted:
        if work.key not in since:
            continue
        assert work.record is not None
        if work.replay is None:
            work.replay = CachedReplay(work.record.generation, params[work.key], ReplayJournal())
            cache.put(work.key, work.replay)
        # Fetched rows are committed, so the cached journal may grow in place; another
        # pipeline of this process may have appended some of them already.
        journal = work.replay.journal
        journal.extend(e for e in entries[work.key] if e.seq >= len(journal))
        if len(journal) != work.record.position:
            cache.drop(work.key)
            raise RuntimeError(
                f"journal of {work.key} has {len(journal)} entries, "
                f"the instance says {work.record.position}"
            )
