"""Prometheus metrics of one worker process, served as text at `/metrics`.

Every metric is named `stepfleet_*` and registered in a registry of the worker's own (so
several workers in one process, as in the tests, never share one). Counters that name a
tenant do so only for the tenants in `STEPFLEET_METRICS_TENANTS`; every other tenant is
counted as `other`, which keeps the number of series bounded whatever producers send.

The per-step path feeds it once per batch (`Observer.batch`, `Observer.phase`): counts are
summed in plain dictionaries while the batch runs and added here at its end.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from stepfleet.observe.port import PHASES, BatchCounts, Observer

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LATENESS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000)
_FUEL = (1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10)
_COMPILE = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
OTHER_TENANTS = "other"


class Metrics(Observer):
    """The worker's Prometheus metrics; `serve` starts the `/metrics` endpoint."""

    counting = True

    def __init__(self, tenants: Iterable[str] = ()) -> None:
        self._tenants = frozenset(tenants)
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._server: WSGIServer | None = None
        self.deliveries = Counter(
            "stepfleet_deliveries",
            "Deliveries a worker's batches took, by kind and outcome.",
            ["tenant", "kind", "outcome"],
            registry=registry,
        )
        self.steps = Counter(
            "stepfleet_steps",
            "Journal entries written, by kind (step_succeeded, step_failed, slept, ...).",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.failed_attempts = Counter(
            "stepfleet_failed_attempts",
            "Failed step attempts written (each to be retried or to fail its step).",
            ["tenant"],
            registry=registry,
        )
        self.finished = Counter(
            "stepfleet_instances_finished",
            "Instances that reached a final status.",
            ["tenant", "status"],
            registry=registry,
        )
        self.phases = Histogram(
            "stepfleet_step_phase_seconds",
            "Seconds one batch spent in each phase (inbox: its deliveries' mean wait).",
            ["phase"],
            buckets=_SECONDS,
            registry=registry,
        )
        self._phase = {phase: self.phases.labels(phase) for phase in PHASES}
        self.batch_size = Histogram(
            "stepfleet_batch_size",
            "Deliveries per batch.",
            buckets=_BATCH,
            registry=registry,
        )
        self.fuel = Histogram(
            "stepfleet_guest_fuel_used",
            "Fuel one guest run used (wasmtime fuel units, about one per instruction).",
            buckets=_FUEL,
            registry=registry,
        )
        self.local_steps = Counter(
            "stepfleet_local_steps",
            "Next steps the worker took on itself instead of publishing them.",
            registry=registry,
        )
        self.calls_in_flight = Gauge(
            "stepfleet_http_calls_in_flight",
            "Guests' HTTP calls the worker is making now.",
            registry=registry,
        )
        self.call_seconds = Histogram(
            "stepfleet_http_call_seconds",
            "Seconds from a guest's HTTP call being scheduled to its answer.",
            buckets=_SECONDS,
            registry=registry,
        )
        self.dead_letters = Counter(
            "stepfleet_dead_letters",
            "Dead letters this worker stored in the archive, by reason.",
            ["tenant", "reason"],
            registry=registry,
        )
        self.timers_due = Gauge(
            "stepfleet_timers_due",
            "Timers past their due time whose instance has not taken its wake yet.",
            registry=registry,
        )
        self.timer_lateness = Histogram(
            "stepfleet_timer_lateness_seconds",
            "Seconds past its due time a timer's wake was sent.",
            buckets=_LATENESS,
            registry=registry,
        )
        self.module_cache = Counter(
            "stepfleet_module_cache",
            "Modules a batch needed: hit (loaded already) or miss (compiled or read from disk).",
            ["result"],
            registry=registry,
        )
        self._hits = self.module_cache.labels("hit")
        self._misses = self.module_cache.labels("miss")
        self.compile_seconds = Histogram(
            "stepfleet_module_compile_seconds",
            "Seconds a missed module took to compile (or to read from the disk cache) and load.",
            buckets=_COMPILE,
            registry=registry,
        )
        self.throttled = Counter(
            "stepfleet_tenant_throttled",
            "Deliveries parked because their tenant was over its running-step or rate limit.",
            ["tenant"],
            registry=registry,
        )
        self.outbox_waiting = Gauge(
            "stepfleet_outbox_waiting",
            "Outbox rows not deleted yet (not confirmed, or held by a local next step).",
            registry=registry,
        )
        self.inbox = Gauge(
            "stepfleet_inbox_deliveries",
            "Deliveries waiting in the worker's inbox.",
            registry=registry,
        )

    def watch(self, *, calls_in_flight: Callable[[], float], inbox: Callable[[], float]) -> None:
        """Read the gauges that live in the worker from it, at each scrape."""
        self.calls_in_flight.set_function(calls_in_flight)
        self.inbox.set_function(inbox)

    def serve(self, port: int, host: str) -> int:
        """Serve `/metrics` on `host:port` (0: any free port) from a thread of its own;
        return the port.

        Raises:
            OSError: the address cannot be bound.
        """
        self._server, _ = start_http_server(port, host, self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def tenant(self, tenant: str) -> str:
        return tenant if tenant in self._tenants else OTHER_TENANTS

    def phase(self, phase: str, seconds: float) -> None:
        self._phase[phase].observe(seconds)

    def batch(self, counts: BatchCounts) -> None:
        self.batch_size.observe(counts.size)
        for (tenant, kind, outcome), n in counts.deliveries.items():
            self.deliveries.labels(tenant, kind, outcome).inc(n)
        for (tenant, kind), n in counts.journal.items():
            self.steps.labels(tenant, kind).inc(n)
        for tenant, n in counts.failed_attempts.items():
            self.failed_attempts.labels(tenant).inc(n)
        for (tenant, status), n in counts.finished.items():
            self.finished.labels(tenant, status).inc(n)
        for tenant, n in counts.throttled.items():
            self.throttled.labels(tenant).inc(n)
        for fuel in counts.fuel:
            self.fuel.observe(fuel)
        if counts.local_steps:
            self.local_steps.inc(counts.local_steps)

    def call(self, tenant: str, seconds: float) -> None:
        self.call_seconds.observe(seconds)

    def modules(self, hits: int, misses: int) -> None:
        if hits:
            self._hits.inc(hits)
        if misses:
            self._misses.inc(misses)

    def module_loaded(self, seconds: float) -> None:
        self.compile_seconds.observe(seconds)

    def archived(self, reasons: Mapping[tuple[str, str], int]) -> None:
        for (tenant, reason), n in reasons.items():
            self.dead_letters.labels(tenant, reason).inc(n)

    def timers_fired(self, lateness_seconds: Sequence[float]) -> None:
        for late in lateness_seconds:
            self.timer_lateness.observe(late)

    def backlog(self, *, timers_due: int, outbox_waiting: int) -> None:
        self.timers_due.set(timers_due)
        self.outbox_waiting.set(outbox_waiting)
