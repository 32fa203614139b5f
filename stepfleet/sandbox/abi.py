"""The guest ABI v2 constants and the replay buffer (see docs/guest-abi.md)."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from typing import Final

from stepfleet.schemas import JournalEntry, RunMode

ABI_VERSION: Final = 2
HOST_MODULE: Final = "stepfleet"
WASI_MODULE: Final = "wasi_snapshot_preview1"

# Import name -> (params, results), all i32 except where noted ("i64").
HOST_IMPORTS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "step_begin": (("i32",) * 5, ("i32",)),
    "step_done": (("i32",) * 6, ()),
    "step_failed": (("i32",) * 6, ()),
    "sleep": (("i32", "i32", "i32", "i64", "i32"), ()),
    "wait_event": (("i32",) * 5 + ("i64",), ()),
    "now": (("i32",), ("i64",)),
    "random": (("i32",) * 3, ()),
    "complete": (("i32",) * 3, ()),
    "fail": (("i32",) * 3, ()),
    "nondeterminism": (("i32",) * 4, ()),
    "log": (("i32",) * 3, ()),
    # Optional: only modules that call the outside world import these (inside steps only).
    "http_request": (("i32", "i32"), ("i32",)),
    "http_response": (("i32", "i32"), ()),
}

# The inert WASI subset C code needs to link against wasi-libc: no files, clock or randomness.
WASI_IMPORTS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "fd_write": (("i32",) * 4, ("i32",)),
    "fd_close": (("i32",), ("i32",)),
    "fd_seek": (("i32", "i64", "i32", "i32"), ("i32",)),
    "fd_fdstat_get": (("i32", "i32"), ("i32",)),
    "environ_sizes_get": (("i32", "i32"), ("i32",)),
    "environ_get": (("i32", "i32"), ("i32",)),
    "args_sizes_get": (("i32", "i32"), ("i32",)),
    "args_get": (("i32", "i32"), ("i32",)),
    "proc_exit": (("i32",), ()),
}

ALLOWED_IMPORTS: Final = {HOST_MODULE: HOST_IMPORTS, WASI_MODULE: WASI_IMPORTS}

# Export name -> (params, results).
REQUIRED_EXPORTS: Final[dict[str, tuple[tuple[str, ...], tuple[str, ...]]]] = {
    "sf_abi_version": ((), ("i32",)),
    "sf_alloc": (("i32",), ("i32",)),
    "sf_run": (("i32", "i32"), ()),
}

_U32 = struct.Struct("<I")


def _chunk(data: bytes) -> bytes:
    return _U32.pack(len(data)) + data


def encode_entry(entry: JournalEntry) -> bytes:
    """Encode one journal entry as the replay buffer lays it out."""
    return bytes((entry.kind,)) + _chunk(entry.name.encode()) + _chunk(entry.value.encode())


class ReplayJournal:
    """A journal kept with its replay-buffer encoding, so appending a step costs one entry.

    Workers keep one per warm instance: replay then costs a memory copy, not a re-encode.
    """

    __slots__ = ("_chunks", "entries")

    def __init__(self, entries: Iterable[JournalEntry] = ()) -> None:
        self.entries: list[JournalEntry] = []
        self._chunks: list[bytes] = []
        self.extend(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def extend(self, entries: Iterable[JournalEntry]) -> None:
        """Append recorded entries, which must continue the journal in order."""
        for entry in entries:
            self.append(entry)

    def append(self, entry: JournalEntry) -> None:
        """Append one recorded entry, which must be the next position."""
        if entry.seq != len(self.entries):
            raise ValueError(f"journal entry {entry.seq} does not follow {len(self.entries)}")
        self.entries.append(entry)
        self._chunks.append(encode_entry(entry))

    def encoded_entries(self) -> bytes:
        """Return the encoded entries, joined once and kept."""
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""


def encode_replay_buffer(
    instance_id: str,
    params: str,
    journal: ReplayJournal,
    *,
    pending: Sequence[JournalEntry] = (),
    mode: RunMode = RunMode.FORWARD,
    attempt: int = 1,
) -> bytes:
    """Build the buffer `sf_run` receives: header, params and the whole journal.

    `pending` entries follow the journal: recorded by this very delivery (an event that
    arrived, a wait that timed out) and not committed yet, so not part of the cached journal.
    """
    return b"".join(
        (
            _U32.pack(ABI_VERSION),
            _U32.pack(mode),
            _U32.pack(attempt),
            _chunk(instance_id.encode()),
            _chunk(params.encode()),
            _U32.pack(len(journal) + len(pending)),
            journal.encoded_entries(),
            *(encode_entry(entry) for entry in pending),
        )
    )
