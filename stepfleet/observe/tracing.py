"""OpenTelemetry spans of one worker process: one per delivery, with its parts as children.

A delivery span is opened when the cycle first needs its trace context (to write it on the
instance row and on the messages the delivery causes), under the trace context the message
or the instance row carried (see cycle/tracing.py), and closed when its batch is done, with
children for its guest run, the batch's transaction and the publish, from the times they
were measured: nothing is timed twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, TraceFlags

from stepfleet.observe.port import Attributes, Child, Observer, Span

DELIVERY_SPAN = "stepfleet.delivery"


class _Open(Span):
    __slots__ = ("otel",)

    def __init__(self, traceparent: str, otel: trace.Span) -> None:
        super().__init__(traceparent)
        self.otel = otel


def _remote(traceparent: str) -> SpanContext:
    """The span context of a traceparent the schemas already checked (version-00 form)."""
    _, trace_id, span_id, flags = traceparent.split("-")
    return SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=TraceFlags(int(flags, 16))
    )


def traceparent_of(context: SpanContext) -> str:
    """A span context as a version-00 traceparent."""
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


class Traces(Observer):
    """Delivery spans through `provider` (its processors export them)."""

    tracing = True

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("stepfleet")

    def open_span(
        self, parent: str | None, link: str | None, start_ns: int, attributes: Attributes
    ) -> Span:
        context = trace.set_span_in_context(NonRecordingSpan(_remote(parent))) if parent else None
        links = [Link(_remote(link))] if link and link != parent else None
        otel = self._tracer.start_span(
            DELIVERY_SPAN,
            context,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
            start_time=start_ns,
        )
        return _Open(traceparent_of(otel.get_span_context()), otel)

    def close_span(
        self, span: Span, end_ns: int, attributes: Attributes, children: Sequence[Child]
    ) -> None:
        assert isinstance(span, _Open)
        otel = span.otel
        if not otel.is_recording():  # not sampled: no attributes, no children
            otel.end(end_time=end_ns)
            return
        otel.set_attributes(attributes)
        context = trace.set_span_in_context(otel)
        for child in children:
            part = self._tracer.start_span(
                child.name, context, attributes=child.attributes, start_time=child.start_ns
            )
            part.end(end_time=child.end_ns)
        otel.end(end_time=end_ns)

    def close(self) -> None:
        self.provider.shutdown()
