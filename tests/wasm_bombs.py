"""Guest modules built byte by byte: a tiny guest that completes at once, and compile bombs.

A compile bomb is that guest plus filler functions nobody calls: wasmtime compiles every
function anyway, so many of them, a large one or one declaring many locals costs compile time
and memory far beyond what the module's size suggests. `bench/compile_bomb.py` uses these too.
"""

from __future__ import annotations

import random

NOP_BODY = b"\x00\x0b"
"""A function body with no locals and no code."""


def calls_body(count: int) -> bytes:
    """`count` calls of the first filler (function 4, after the import and the three exports)."""
    return b"\x00" + b"\x10\x04" * count + b"\x0b"


CALLS_BODY = calls_body(8)
"""18 bytes that cost more to compile than a NOP."""


def leb(value: int) -> bytes:
    """Unsigned LEB128."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _vector(items: list[bytes]) -> bytes:
    return leb(len(items)) + b"".join(items)


def _name(text: str) -> bytes:
    return leb(len(text.encode())) + text.encode()


def _section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + leb(len(payload)) + payload


def body_with_locals(count: int) -> bytes:
    """A function body declaring `count` i32 locals and doing nothing."""
    return b"\x01" + leb(count) + b"\x7f\x0b"


def body_of_size(size: int) -> bytes:
    """A function body of `size` bytes of `nop` instructions."""
    return b"\x00" + b"\x01" * (size - 2) + b"\x0b"


def dense_body(size: int, locals_: int, seed: int = 1) -> bytes:
    """About `size` bytes of branchy code over `locals_` i32 locals (adds, loads, stores,
    blocks and loops on random locals): the compiler's work grows with size times locals."""
    rnd = random.Random(seed)
    out = bytearray(b"\x01" + leb(locals_) + b"\x7f")
    while len(out) < size:
        a, b, c = (leb(rnd.randrange(locals_)) for _ in range(3))
        out += rnd.choice(
            [
                b"\x20" + a + b"\x20" + b + b"\x6a\x21" + c,  # c = a + b
                b"\x20" + a + b"\x28\x02\x00\x21" + c,  # c = load(a)
                b"\x20" + a + b"\x20" + b + b"\x36\x02\x00",  # store(a, b)
                b"\x02\x40\x20" + a + b"\x0d\x00\x20" + b + b"\x20" + c + b"\x6c\x21" + a + b"\x0b",
                b"\x03\x40\x20" + a + b"\x41\x01\x6b\x22" + a + b"\x0d\x00\x0b",  # countdown
            ]
        )
    return bytes(out + b"\x0b")


def guest(functions: int = 0, body: bytes = NOP_BODY, *, tag: str = "") -> bytes:
    """A guest-ABI v2 module whose `sf_run` completes the workflow with `{}` at journal position
    0 (a fresh instance's only run), plus `functions` uncalled functions with code `body`.

    `tag` goes into a custom section: the same module under another digest, so that no cache
    of an earlier test run already holds it.
    """
    types = _vector(
        [
            b"\x60\x03\x7f\x7f\x7f\x00",  # 0: complete(seq, ptr, len)
            b"\x60\x00\x01\x7f",  # 1: sf_abi_version() -> i32
            b"\x60\x01\x7f\x01\x7f",  # 2: sf_alloc(len) -> i32
            b"\x60\x02\x7f\x7f\x00",  # 3: sf_run(ptr, len)
            b"\x60\x00\x00",  # 4: the fillers
        ]
    )
    imports = _vector([_name("stepfleet") + _name("complete") + b"\x00\x00"])
    declared = _vector([b"\x01", b"\x02", b"\x03"] + [b"\x04"] * functions)
    memory = _vector([b"\x00\x01"])  # one page, no maximum
    exports = _vector(
        [
            _name("memory") + b"\x02\x00",
            _name("sf_abi_version") + b"\x00\x01",
            _name("sf_alloc") + b"\x00\x02",
            _name("sf_run") + b"\x00\x03",
        ]
    )
    bodies = [
        b"\x00\x41\x02\x0b",  # i32.const 2 (the ABI version)
        b"\x00\x41\x80\x08\x0b",  # i32.const 1024: the replay buffer goes there
        b"\x00\x41\x00\x41\x10\x41\x02\x10\x00\x0b",  # complete(0, 16, 2)
    ] + [body] * functions
    code = _vector([leb(len(b)) + b for b in bodies])
    data = _vector([b"\x00\x41\x10\x0b" + leb(2) + b"{}"])  # "{}" at offset 16
    module = (
        b"\x00asm\x01\x00\x00\x00"
        + _section(1, types)
        + _section(2, imports)
        + _section(3, declared)
        + _section(5, memory)
        + _section(7, exports)
        + _section(10, code)
        + _section(11, data)
    )
    if tag:
        module += _section(0, _name("stepfleet-test") + tag.encode())
    return module
