"""OpenTelemetry tracing: spans reach a real OTLP/gRPC receiver on 127.0.0.1, with the right parents.

The receiver is a small grpc server implementing opentelemetry.proto's TraceService/Export
that keeps every span it gets. A Braid server (in-process, or a local cluster's children)
exports to it; stopping the server flushes its spans.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from braid.service.cli import SERVE_SETTINGS, build_parser
from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.service.config import load_config
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster  # noqa: F401

from .conftest import schema, start_in_process, stop_in_process, wait_for
from .test_observability import DIM, DOC_TEXT, SECRET_WORDS, N, docs, hybrid

pytestmark = pytest.mark.timeout(180)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP trace receiver: ``spans`` is every (service name, span) exported to it."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend((service, span) for span in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def named(self, name: str, service: str | None = None) -> list[Any]:
        with self._lock:
            return [span for s, span in self.spans if span.name == name and service in (None, s)]


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, str]]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    store = Receiver()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(store, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield store, f"127.0.0.1:{port}"
    server.stop(0)


def attributes(span: Any) -> dict[str, Any]:
    out = {}
    for attribute in span.attributes:
        value = attribute.value
        out[attribute.key] = getattr(value, value.WhichOneof("value"))
    return out


def test_spans_of_a_hybrid_search_and_a_bad_request(receiver, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    store, endpoint = receiver
    server, running = start_in_process(tmp_path / "data", otlp_endpoint=endpoint)
    assert server.tracing is not None
    try:
        client = running.client
        client.create_collection("docs", schema(dim=DIM))
        client.upsert("docs", docs(N))
        client.stub.Search(hybrid(), metadata=(("x-request-id", "trace-me-1"),))
        bad = pb.SearchRequest(collection="docs", queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb"))])
        bad.queries[0].dense.vector.packed = np.zeros(DIM - 1, "<f4").tobytes()  # the wrong dimension
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Search(bad, metadata=(("x-request-id", "trace-me-2"),))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stop_in_process(server, running)  # flushes the spans

    searches = {attributes(span)["braid.request_id"]: span for span in store.named("Search", "braid")}
    good, failed = searches["trace-me-1"], searches["trace-me-2"]
    good_attributes = attributes(good)
    assert good_attributes["rpc.system"] == "grpc"
    assert good_attributes["rpc.service"] == "braid.v1.Braid"
    assert good_attributes["rpc.method"] == "Search"
    assert good_attributes["rpc.grpc.status_code"] == grpc.StatusCode.OK.value[0]
    assert good_attributes["braid.collection"] == "docs"
    assert good.parent_span_id == b""  # no caller's trace: a root span
    assert attributes(failed)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed.status.code == failed.status.STATUS_CODE_ERROR

    def children(name: str) -> list[Any]:
        return [s for s in store.named(name) if s.trace_id == good.trace_id and s.parent_span_id == good.span_id]

    strands = sorted(children("strand"), key=lambda s: attributes(s)["braid.strand"])
    assert [attributes(s)["braid.strand.kind"] for s in strands] == ["bm25", "dense"]
    assert len(children("fusion")) == 1 and len(children("fetch")) == 1
    for span in (*strands, *children("fusion")):
        assert good.start_time_unix_nano <= span.start_time_unix_nano <= span.end_time_unix_nano
        assert span.end_time_unix_nano <= good.end_time_unix_nano
    assert len(store.named("Upsert")) == 1 and len(store.named("CreateCollection")) == 1

    for _, span in store.spans:  # no query text, document text or vectors in any attribute
        for value in attributes(span).values():
            assert SECRET_WORDS not in str(value) and DOC_TEXT not in str(value)


def test_tracing_is_off_by_default(tmp_path: Path) -> None:
    server, running = start_in_process(tmp_path / "data")
    try:
        assert server.tracing is None
        assert server.handlers.observer.tracer is None
        running.client.create_collection("docs", schema(dim=DIM))
        running.client.stub.Search(hybrid())
    finally:
        stop_in_process(server, running)


def test_a_shard_servers_span_joins_the_routers_trace(receiver, local_cluster: Callable[..., LocalCluster]) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    store, endpoint = receiver
    cluster = local_cluster(
        shard_servers=1,
        routers=1,
        shard_args=["--otlp-endpoint", endpoint],
        router_args=["--otlp-endpoint", endpoint],
    )
    with BraidClient(cluster.router_address, timeout=30) as client:
        client.create_collection("docs", schema(dim=DIM), shards=2)
        client.upsert("docs", docs(N))
        client.stub.Search(hybrid(), metadata=(("x-request-id", "routed-1"),))
    cluster.stop()  # flushes both servers' spans

    wait_for(lambda: bool(store.named("Search", "braid-router")), what="the router's Search span")
    routed = next(s for s in store.named("Search", "braid-router") if attributes(s)["braid.request_id"] == "routed-1")
    assert [s for s in store.named("fanout", "braid-router") if s.parent_span_id == routed.span_id]
    # The one shard server holds both shards: it runs the whole search in one call (SearchCollection).
    on_shards = [s for s in store.named("SearchCollection", "braid-shard") if s.trace_id == routed.trace_id]
    assert len(on_shards) == 1  # a child of the router's span
    assert all(s.parent_span_id == routed.span_id for s in on_shards)
    assert all(attributes(s)["braid.request_id"] == "routed-1" for s in on_shards)
    shard_strands = [s for s in store.named("strand", "braid-shard") if s.trace_id == routed.trace_id]
    assert len(shard_strands) == 2, shard_strands  # the search's two strands (each over both shards)


def test_tracing_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BRAID_OTLP_ENDPOINT", "collector:4317")
    monkeypatch.setenv("BRAID_TRACE_SAMPLE_RATIO", "0.25")
    config = load_config()
    assert (config.otlp_endpoint, config.trace_sample_ratio) == ("collector:4317", 0.25)
    args = build_parser().parse_args(["serve", "--otlp-endpoint", "other:4317", "--trace-sample-ratio", "0.5"])
    config = load_config(**{name: getattr(args, name) for name in SERVE_SETTINGS})
    assert (config.otlp_endpoint, config.trace_sample_ratio) == ("other:4317", 0.5)
    with pytest.raises(ValueError, match="trace_sample_ratio"):
        load_config(trace_sample_ratio=1.5)
