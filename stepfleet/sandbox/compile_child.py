"""The compiler process: compiles one module under resource limits and writes its artifact.

`compiler.py` runs this file as a script (`python -I compile_child.py LIMITS`), the module's
bytes on stdin. It imports only the standard library and wasmtime, so it starts in tens of
milliseconds, and it caps itself before reading anything: its CPU time (the kernel sends
SIGXCPU past it), its address space and core dumps; it also lowers its CPU priority. Exits:

- 0: stdout holds `Module.serialize()` of the compiled module;
- 2 (`EXIT_INVALID`): wasmtime refused the bytes; stdout holds its message;
- 3 (`EXIT_MEMORY`): an allocation failed under the address-space cap.

A failed allocation inside wasmtime aborts the process instead (SIGABRT, "memory allocation of
N bytes failed" on stderr); the parent reads that as exit 3.
"""

from __future__ import annotations

import json
import os
import resource
import sys

EXIT_INVALID = 2
EXIT_MEMORY = 3
NICENESS = 10
_MEMORY_ERRORS = ("out of memory", "os error 12", "memory allocation")


def _limit(which: int, soft: int, hard: int) -> None:
    _, current_hard = resource.getrlimit(which)
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))


def main() -> int:
    """Compile stdin under the limits in argv[1] (JSON); see the module docstring."""
    spec = json.loads(sys.argv[1])
    seconds = int(spec["cpu_seconds"])
    _limit(resource.RLIMIT_CORE, 0, 0)
    # Guests' steps come first: on a busy host the compile waits, not the steps. A compile
    # starved past the parent's wall-clock bound is a failure to retry, not a refusal.
    os.nice(NICENESS)
    # SIGXCPU at the soft limit ends the process; the hard limit (SIGKILL) is a backstop.
    _limit(resource.RLIMIT_CPU, seconds, seconds + 1)
    _limit(resource.RLIMIT_AS, int(spec["memory_bytes"]), int(spec["memory_bytes"]))
    try:
        wasm = sys.stdin.buffer.read()
        import wasmtime

        config = wasmtime.Config()
        for option, value in spec["options"].items():
            setattr(config, option, value)
        # One thread: the CPU limit then bounds the wall time too, and one compile takes one
        # core from the host, not all of them. It does not change the code generated.
        config.parallel_compilation = False
        engine = wasmtime.Engine(config)
        try:
            artifact = wasmtime.Module(engine, wasm).serialize()
        except wasmtime.WasmtimeError as exc:
            message = str(exc).strip()
            if any(marker in message.lower() for marker in _MEMORY_ERRORS):
                return EXIT_MEMORY
            sys.stdout.write(message)
            return EXIT_INVALID
    except MemoryError:
        return EXIT_MEMORY
    sys.stdout.buffer.write(artifact)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
