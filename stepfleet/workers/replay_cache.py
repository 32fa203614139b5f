"""Journals of warm instances kept in the worker, so a step fetches only what is new."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from stepfleet.sandbox import ReplayJournal
from stepfleet.schemas import InstanceKey


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

    def put(self, key: InstanceKey, replay: CachedReplay) -> None:
        """Remember an instance's journal, evicting the least recently used."""
        self._entries[key] = replay
        self._entries.move_to_end(key)
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def drop(self, key: InstanceKey) -> None:
        """Forget an instance (finished, or its cache could not be trusted)."""
        self._entries.pop(key, None)
