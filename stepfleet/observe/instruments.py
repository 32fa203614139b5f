"""A worker's instruments, built from its settings: metrics, traces, both or neither."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from stepfleet.observe.port import NO_OBSERVER, Attributes, BatchCounts, Child, Observer, Span

if TYPE_CHECKING:
    from stepfleet.observe.metrics import Metrics

OTLP_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
"""Setting either turns traces on (exported over OTLP/HTTP with protobuf)."""


class Instruments(Observer):
    """Hands every hook to the metrics and the traces that are on."""

    def __init__(self, metrics: Observer | None = None, traces: Observer | None = None) -> None:
        self._metrics = metrics or NO_OBSERVER
        self._traces = traces or NO_OBSERVER
        self.counting = self._metrics.counting
        self.tracing = self._traces.tracing

    def tenant(self, tenant: str) -> str:
        return self._metrics.tenant(tenant)

    def phase(self, phase: str, seconds: float) -> None:
        self._metrics.phase(phase, seconds)

    def batch(self, counts: BatchCounts) -> None:
        self._metrics.batch(counts)

    def call(self, tenant: str, seconds: float) -> None:
        self._metrics.call(tenant, seconds)

    def modules(self, hits: int, misses: int) -> None:
        self._metrics.modules(hits, misses)

    def module_loaded(self, seconds: float) -> None:
        self._metrics.module_loaded(seconds)

    def archived(self, reasons: Mapping[tuple[str, str], int]) -> None:
        self._metrics.archived(reasons)

    def timers_fired(self, lateness_seconds: Sequence[float]) -> None:
        self._metrics.timers_fired(lateness_seconds)

    def backlog(self, *, timers_due: int, outbox_waiting: int) -> None:
        self._metrics.backlog(timers_due=timers_due, outbox_waiting=outbox_waiting)

    def open_span(
        self, parent: str | None, link: str | None, start_ns: int, attributes: Attributes
    ) -> Span | None:
        return self._traces.open_span(parent, link, start_ns, attributes)

    def close_span(
        self, span: Span, end_ns: int, attributes: Attributes, children: Sequence[Child]
    ) -> None:
        self._traces.close_span(span, end_ns, attributes, children)

    def close(self) -> None:
        self._metrics.close()
        self._traces.close()


def metrics(tenants: Iterable[str]) -> Metrics:
    """Prometheus metrics (not served yet: see `Metrics.serve`)."""
    from stepfleet.observe.metrics import Metrics

    return Metrics(tenants)


def otlp_traces(environ: Mapping[str, str] | None = None) -> Observer | None:
    """Traces exported over OTLP when the standard OpenTelemetry variables ask for it
    (`OTEL_EXPORTER_OTLP_ENDPOINT` or `..._TRACES_ENDPOINT`, and neither
    `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`); None otherwise, and then
    nothing of OpenTelemetry is even imported."""
    env = os.environ if environ is None else environ
    if not any(env.get(name) for name in OTLP_ENDPOINTS):
        return None
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from stepfleet.observe.tracing import Traces

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", "stepfleet-worker")})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return Traces(provider)
