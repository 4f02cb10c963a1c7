"""What every RPC records: its request id, its metrics, and (searches) the slow-query log.

``CallObserver.unary`` / ``.stream`` wrap a grpc.aio handler. The wrapper binds the call's
request id (service/logs.py) for everything the call runs, on the event loop and on worker
threads, and sets it as trailing metadata ``x-request-id`` (an abort without trailing
metadata of its own keeps it; handlers that set their own add it with ``with_request_id``).
When the call ends it counts it by status code and times it (service/metrics.py, when
``--metrics-port`` is on) and, for Search and BatchSearch above ``--slow-query-ms``, logs
the plan's shape and its timings (index/stats.py ``SearchTrace``, filled only then).
With a ``tracer`` (``--otlp-endpoint``, service/tracing.py) each call also gets a span, and
searches child spans for their stages, built from the same ``SearchTrace``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import grpc

from braid.index.stats import SearchTrace, tracing

from .logs import REQUEST_ID_KEY, bind_request_id, request_id_of, slow_query, unbind_request_id
from .metrics import RpcMetrics
from .tracing import end_rpc_span, start_rpc_span

log = logging.getLogger("braid.service")
Handler = Callable[[Any, grpc.aio.ServicerContext], Coroutine[Any, Any, Any]]
TRACED = ("Search", "BatchSearch", "SearchCollection")  # SearchCollection: a shard server runs a whole search


class CallObserver:
    """Wraps one gRPC service's handlers; ``metrics`` None (no --metrics-port) skips counting and timing,
    ``tracer`` None (no --otlp-endpoint) makes no spans."""

    def __init__(
        self, service: str, metrics: RpcMetrics | None = None, slow_query_s: float = 0.0, tracer: Any = None
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.slow_query_s = slow_query_s
        self.tracer = tracer

    def unary(self, method: str, handler: Handler) -> Handler:
        return self._wrap(method, handler)

    def stream(self, method: str, handler: Handler) -> Handler:
        """A client-streaming handler (its first argument is the request iterator)."""
        return self._wrap(method, handler)

    def _wrap(self, method: str, handler: Handler) -> Handler:
        tracer = self.tracer
        traced = (self.slow_query_s > 0 or tracer is not None) and method in TRACED
        metrics, service = self.metrics, self.service

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request_id = request_id_of(context.invocation_metadata())
            token = bind_request_id(request_id)
            context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
            started = time.perf_counter()
            code = "OK"
            trace = SearchTrace() if traced else None
            span = None
            if tracer is not None:
                span, span_token = start_rpc_span(
                    tracer, service, method, context.invocation_metadata(), request_id, request
                )
            try:
                if trace is None:
                    return await handler(request, context)
                with tracing(trace):
                    return await handler(request, context)
            except asyncio.CancelledError:
                code = "CANCELLED"
                raise
            except BaseException:
                status = context.code()
                code = status.name if isinstance(status, grpc.StatusCode) else "UNKNOWN"
                raise
            finally:
                seconds = time.perf_counter() - started
                if metrics is not None:
                    metrics.observe(service, method, code, seconds)
                if span is not None:
                    try:
                        end_rpc_span(tracer, span, span_token, getattr(grpc.StatusCode, code), request, trace, method)
                    except Exception:  # a span never fails the call
                        log.exception("tracing failed")
                if (
                    trace is not None
                    and self.slow_query_s > 0
                    and seconds >= self.slow_query_s
                    and hasattr(request, "DESCRIPTOR")
                ):
                    try:
                        slow_query(method, request, seconds, self.slow_query_s, code, trace)
                    except Exception:  # a log line never fails the call (nor logs an undecodable body)
                        log.exception("slow-query log failed")
                unbind_request_id(token)

        observed.__name__ = method
        return observed
