"""Frames between a worker and its guest processes: a 4-byte big-endian length, then a pickle."""

from __future__ import annotations

import struct
from typing import BinaryIO

FRAME = struct.Struct(">I")
MAX_FRAME = 1 << 30
"""No request or answer comes near this (artifacts are a few MB, reports a few MB at most)."""


def read_frame(source: BinaryIO) -> bytes | None:
    """The next frame's payload, or None at a clean end of the stream."""
    head = source.read(FRAME.size)
    if not head:
        return None
    if len(head) < FRAME.size:
        raise EOFError("the stream ended inside a frame's length")
    (size,) = FRAME.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is past the limit")
    payload = source.read(size)
    if len(payload) < size:
        raise EOFError("the stream ended inside a frame")
    return payload


def frame(payload: bytes) -> bytes:
    """`payload` with its length before it."""
    return FRAME.pack(len(payload)) + payload
