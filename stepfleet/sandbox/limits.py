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
    compiled_cache_entries: int = 256
    max_sleep_ms: int = 365 * 86_400_000
    """Longest sleep, retry delay, step timeout or event timeout."""
    run_timeout_ms: int = 600_000
    """Wall-clock bound on a whole run outside any step (replay is quick; fuel bounds CPU)."""
    host_calls_per_step: int = 10
    """HTTP calls (`http_request`) one step attempt may make; a run's GuestRun may override it."""
