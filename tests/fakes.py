"""Stand-ins for the services the step cycle talks to, for the fast unit tier: a sandbox that
runs a Python function as the guest, and broker deliveries that record their acks."""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stepfleet.broker import Delivery
from stepfleet.sandbox import GuestRun, InvalidModule
from stepfleet.schemas import AnsweredCall, EntryKind, GuestReport, JournalEntry

Guest = Callable[[Sequence[JournalEntry], int], GuestReport]
"""A guest as a function: the journal it replays and the attempt, to the run's report."""
CallingGuest = Callable[[Sequence[JournalEntry], int, tuple[AnsweredCall, ...]], GuestReport]
"""A guest that also reads the answers of its step's calls so far (`GuestRun.answers`)."""

_U32 = struct.Struct("<I")


def decode_replay_buffer(buffer: bytes) -> tuple[int, list[JournalEntry]]:
    """Read back the attempt and the entries of a replay buffer (sandbox/abi.py's layout)."""
    offset = 0

    def u32() -> int:
        nonlocal offset
        (value,) = _U32.unpack_from(buffer, offset)
        offset += 4
        return int(value)

    def chunk() -> str:
        nonlocal offset
        size = u32()
        offset += size
        return buffer[offset - size : offset].decode()

    u32()  # ABI version
    u32()  # mode
    attempt = u32()
    chunk()  # instance id
    chunk()  # params
    entries: list[JournalEntry] = []
    for seq in range(u32()):
        kind = EntryKind(buffer[offset])
        offset += 1
        name = chunk()
        entries.append(JournalEntry(seq, kind, name, chunk()))
    return attempt, entries


class FunctionSandbox:
    """A sandbox whose modules are Python functions: `modules[digest](entries, attempt)`."""

    def __init__(
        self, modules: Mapping[str, Guest], calling: Mapping[str, CallingGuest] | None = None
    ) -> None:
        self.modules = dict(modules)
        self.calling = dict(calling or {})
        self.runs: list[GuestRun] = []
        self.compiler: Any = None

    def validate(self, wasm: bytes) -> None:
        return None

    def is_loaded(self, digest: str) -> bool:
        return digest in self.modules or digest in self.calling

    def load(self, digest: str, wasm: bytes, artifact: bytes | None = None) -> None:
        if not self.is_loaded(digest):
            raise InvalidModule(f"no function for {digest}")

    def run(self, job: GuestRun) -> GuestReport:
        self.runs.append(job)
        attempt, entries = decode_replay_buffer(job.replay_buffer)
        if job.digest in self.calling:
            return self.calling[job.digest](entries, attempt, job.answers)
        return self.modules[job.digest](entries, attempt)


@dataclass
class Acks:
    """What happened to the fake deliveries."""

    acked: list[Delivery] = field(default_factory=list)
    released: list[Delivery] = field(default_factory=list)


def delivery(
    acks: Acks,
    headers: Mapping[str, Any],
    body: bytes,
    *,
    routing_key: str | None = None,
    exchange: str = "test.ingress",
    user_id: str | None = None,
) -> Delivery:
    """A broker delivery whose ack and release are recorded in `acks`."""
    key = routing_key or f"{headers.get('x-tenant')}.{headers.get('x-kind')}"
    box: list[Delivery] = []

    async def ack() -> None:
        acks.acked.append(box[0])

    async def release() -> None:
        acks.released.append(box[0])

    made = Delivery(body, headers, key, exchange, None, user_id, False, 0, ack, release)
    box.append(made)
    return made
