"""Per-run resource limits of a guest."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Limits applied to every guest run (see docs/guest-abi.md for the published defaults)."""

    fuel_per_run: int = 2_000_000_000
    memory_bytes: int = 64 * 1024 * 1024
    stack_bytes: int = 512 * 1024
    value_bytes: int = 1024 * 1024
    name_bytes: int = 256
    log_lines_per_run: int = 100
    log_line_bytes: int = 4096
    module_bytes: int = 8 * 1024 * 1024
    module_functions: int = 20_000
    """Functions a module may define (checked before compiling, like the next two)."""
    function_body_bytes: int = 256 * 1024
    """Size of one function's code: compile time and memory grow faster than linearly in it."""
    function_locals: int = 2_000
    """Locals one function may declare: they multiply the compiler's work on its body."""
    compile_timeout_seconds: int = 30
    """CPU seconds compiling one module may take, in its own process (sandbox/compiler.py)."""
    compile_memory_bytes: int = 1024**3
    """Address space of that process."""
    compiled_cache_entries: int = 256
    max_sleep_ms: int = 365 * 86_400_000
    """Longest sleep, retry delay, step timeout or event timeout."""
    run_timeout_ms: int = 600_000
    """Wall-clock bound on a whole run outside any step (replay is quick; fuel bounds CPU)."""
    host_calls_per_step: int = 10
    table_elements: int = 100_000
    """Elements all tables of one run may hold (8 bytes each, outside the memory limit)."""
    """HTTP calls (`http_request`) one step attempt may make; a run's GuestRun may override it."""
