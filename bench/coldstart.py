"""Module cold start: compile vs. the on-disk compiled-module cache vs. the in-memory cache.

For each guest/examples/*/*.wasm, the median over --repeat runs, in milliseconds, of:

- cold_ms: `WasmSandbox.load` with no cache (compile, in the capped compiler process, then
  deserialize, import/export checks, ABI check);
- warm_disk_ms: `load` in a new sandbox over a cache directory that holds the artifact
  (read, HMAC check, deserialize, the same checks);
- warm_memory_ms: what a run pays for a module already loaded: `is_loaded`, then a new store,
  its `InstancePre` instantiated and one trivial export called (`sf_abi_version`).

No services needed. Prints JSON.

    python bench/coldstart.py [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from stepfleet.sandbox import CompiledModuleCache, WasmSandbox
from stepfleet.sandbox.module_cache import wasmtime_version
from stepfleet.schemas import digest_of

EXAMPLES = Path(__file__).resolve().parents[1] / "guest" / "examples"


def median_ms(repeat: int, once: Callable[[], float]) -> float:
    return round(statistics.median(once() for _ in range(repeat)) * 1000, 3)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def measure(wasm: bytes, repeat: int, directory: Path) -> dict[str, object]:
    digest = digest_of(wasm)

    plain = WasmSandbox()
    cold = median_ms(repeat, lambda: timed(lambda: plain.load(digest, wasm)))

    def in_memory() -> float:
        def instantiate() -> None:
            assert plain.is_loaded(digest)
            # A new store, the InstancePre instantiated, one export called: the run's set-up.
            plain._check_abi_version(plain._compiled[digest])

        return timed(instantiate)

    warm_memory = median_ms(repeat, in_memory)
    plain.close()

    writer = WasmSandbox(module_cache=CompiledModuleCache(directory))
    writer.load(digest, wasm)
    writer.close()
    artifact = max(p.stat().st_size for p in directory.glob("*.cwasm"))

    def from_disk() -> float:
        cache = CompiledModuleCache(directory)
        sandbox = WasmSandbox(module_cache=cache)
        try:
            elapsed = timed(lambda: sandbox.load(digest, wasm))
        finally:
            sandbox.close()
        assert cache.stats.hits == 1, cache.stats
        return elapsed

    warm_disk = median_ms(repeat, from_disk)
    return {
        "wasm_bytes": len(wasm),
        "entry_bytes": artifact,
        "cold_ms": cold,
        "warm_disk_ms": warm_disk,
        "warm_memory_ms": warm_memory,
        "speedup_disk": round(cold / warm_disk, 1) if warm_disk else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    results: dict[str, object] = {}
    for path in sorted(EXAMPLES.glob("*/*.wasm")):
        with tempfile.TemporaryDirectory() as tmp:
            results[path.parent.name] = measure(
                path.read_bytes(), args.repeat, Path(tmp) / "modules"
            )
    print(
        json.dumps(
            {"wasmtime": wasmtime_version(), "repeat": args.repeat, "modules": results}, indent=2
        )
    )


if __name__ == "__main__":
    main()
