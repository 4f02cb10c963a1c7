"""OpenTelemetry tracing: a span per RPC and per stage, exported over OTLP/gRPC; off by default.

``Tracing(endpoint, service_name, sample_ratio)`` is one server's own TracerProvider (never
the global one, so several servers may trace in one process), with a BatchSpanProcessor and
an ``OTLPSpanExporter(endpoint, insecure=True)``; ``close`` flushes and shuts it down. With
no ``otlp_endpoint`` no Tracing exists, opentelemetry is not even imported, and a call pays
one ``None`` check (service/observe.py).

Spans (docs/operations.md, "Tracing"): the RPC span (name = the method, kind SERVER, with
``rpc.system``, ``rpc.service``, ``rpc.method``, ``rpc.grpc.status_code``,
``braid.collection``, ``braid.request_id``), and for searches child spans made after the call
from the timings index/stats.py ``SearchTrace`` took: ``encode``, ``fanout`` (a router's calls
to its shard servers), ``strand`` (one per strand of each search), ``fusion`` and ``fetch``.
The trace context travels to shard servers in gRPC metadata (W3C ``traceparent``:
``trace_headers``, added by service/logs.py ``forward_metadata``), so a shard server's RPC
span is a child in the router's trace. Never query text, vectors or document text.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from braid.index.stats import SearchTrace

SERVICE_NAMES = {"standalone": "braid", "router": "braid-router", "shard": "braid-shard"}
STAGE_SPANS = {"encode": "encode", "shards": "fanout"}  # SearchTrace stage -> span name
_ON = False  # some server in this process traces: forwarded calls carry traceparent
_propagator: Any = None


class Tracing:
    """One server's tracer provider and OTLP exporter."""

    def __init__(self, endpoint: str, service_name: str, sample_ratio: float = 1.0) -> None:
        global _ON, _propagator
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service_name}),
            sampler=ParentBased(TraceIdRatioBased(sample_ratio)),
        )
        self.exporter = OTLPSpanExporter(endpoint=endpoint, insecure=True)
        self.provider.add_span_processor(BatchSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("braid")
        _propagator = TraceContextTextMapPropagator()
        _ON = True

    def close(self) -> None:
        """Export what is buffered, then stop."""
        self.provider.shutdown()


def make_tracing(config: Any) -> Tracing | None:
    """The server's Tracing when ``config.otlp_endpoint`` is set, else None."""
    if not config.otlp_endpoint:
        return None
    return Tracing(config.otlp_endpoint, SERVICE_NAMES[config.role], config.trace_sample_ratio)


def trace_headers() -> tuple[tuple[str, str], ...]:
    """``traceparent`` (and ``tracestate``) of the current span, for a call made on its behalf."""
    if not _ON:
        return ()
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return tuple(carrier.items())


# ------------------------------------------------------------------- RPC spans


def _name(value: Any) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    return value if len(value) <= 64 and value.isascii() and value.isprintable() else "<invalid name>"


def _collection(request: Any) -> str | None:
    """The collection a request names (a Search, a BatchSearch of one collection, a shard server's call)."""
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", None)
    if fields is None:
        return None
    for field in ("collection", "name"):
        if field in fields:
            return _name(getattr(request, field))
    if "replica" in fields:
        return _name(request.replica.collection)
    if "searches" in fields:
        names = {search.collection for search in request.searches}
        return _name(names.pop()) if len(names) == 1 else None
    return None


def start_rpc_span(
    tracer: Any, service: str, method: str, metadata: Iterable[tuple[str, Any]] | None, request_id: str, request: Any
) -> tuple[Any, Any]:
    """Start the call's span (a child of the caller's ``traceparent``, if any) and make it current:
    (span, token for ``end_rpc_span``)."""
    from opentelemetry import context, trace

    carrier = {key: value for key, value in metadata or () if key in ("traceparent", "tracestate")}
    parent = _propagator.extract(carrier) if carrier else None
    attributes = {
        "rpc.system": "grpc",
        "rpc.service": service,
        "rpc.method": method,
        "braid.request_id": request_id,
    }
    collection = _collection(request)
    if collection is not None:
        attributes["braid.collection"] = collection
    span = tracer.start_span(method, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes)
    return span, context.attach(trace.set_span_in_context(span))


def end_rpc_span(
    tracer: Any, span: Any, token: Any, code: Any, request: Any, search: SearchTrace | None, method: str
) -> None:
    """End the call's span with its status code, after the stage spans ``search`` timed."""
    from opentelemetry import context, trace

    context.detach(token)
    try:
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code.name != "OK":
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            if search is not None:
                _stage_spans(tracer, trace.set_span_in_context(span), search, _plans(request, method))
    finally:
        span.end()


def _plans(request: Any, method: str) -> list[Any]:
    """The SearchRequests of a call, in order (for each strand's kind)."""
    fields = getattr(getattr(request, "DESCRIPTOR", None), "fields_by_name", {})
    if "searches" in fields:
        return list(request.searches)
    if "request" in fields:  # a shard server's ShardSearchRequest
        return [request.request]
    return [request] if "queries" in fields else []


def _span(tracer: Any, parent: Any, name: str, start_ns: int, seconds: float, attributes: dict) -> int:
    end_ns = start_ns + int(seconds * 1e9)
    tracer.start_span(name, context=parent, start_time=start_ns, attributes=attributes).end(end_time=end_ns)
    return end_ns


def _stage_spans(tracer: Any, parent: Any, trace: SearchTrace, plans: list[Any]) -> None:
    """Spans after the fact: named stages, then each search's strands (laid end to end from its
    start, each as long as its time summed over shards), fusion and fetch."""
    for name, seconds in list(trace.stages.items()):
        _span(tracer, parent, STAGE_SPANS.get(name, name), trace.stage_starts.get(name, 0), seconds, {})
    batch = len(trace.searches) > 1
    for number, timing in enumerate(list(trace.searches)):
        plan = plans[number] if number < len(plans) else None
        at = timing.started_ns
        common = {"braid.search": number} if batch else {}
        for i, seconds in enumerate(timing.strands):
            attributes = {**common, "braid.strand": i}
            if plan is not None and i < len(plan.queries):
                attributes["braid.strand.kind"] = plan.queries[i].WhichOneof("query") or "none"
            at = _span(tracer, parent, "strand", at, seconds, attributes)
        if timing.ended_ns:
            fused = timing.ended_ns - int(timing.fetch_s * 1e9)
            _span(tracer, parent, "fusion", fused - int(timing.fusion_s * 1e9), timing.fusion_s, common)
            _span(tracer, parent, "fetch", fused, timing.fetch_s, common)
