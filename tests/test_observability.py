"""Observability: Prometheus /metrics of real servers, JSON logs with request ids, the slow-query log.

Each test runs a small workload against a real server (in-process, a ``braid serve`` child, or a
local cluster), scrapes ``/metrics`` over HTTP on 127.0.0.1 and checks the numbers moved as the
workload says they must. Every wait is bounded.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.service.cli import build_parser
from braid.service.client import BraidClient, dense_vector
from braid.service.cluster.local import LocalCluster
from braid.service.config import load_config
from braid.service.logs import REQUEST_ID_KEY, JsonFormatter, bind_request_id, unbind_request_id
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster  # noqa: F401

from .conftest import ChildServer, random_vectors, schema, start_in_process, stop_in_process, wait_for

pytestmark = pytest.mark.timeout(180)

DIM = 8
N = 40
SECRET_WORDS = "zebracorn quixotic"  # query text that must never reach a log line
DOC_TEXT = "marmalade telescope"  # document text that must never reach a log line


# ------------------------------------------------------------------ helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics: {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels`` (0 when there are none)."""
    wanted = set(labels.items())
    return sum(v for (n, have), v in samples.items() if n == name and wanted <= set(have))


def docs(n: int, seed: int = 0) -> list[dict]:
    vectors = random_vectors(n, DIM, seed)
    return [
        {"id": f"d{i}", "text": {"title": f"{DOC_TEXT} {i}", "body": "common words"}, "dense": {"emb": vectors[i]}}
        for i in range(n)
    ]


def hybrid(collection: str = "docs", limit: int = 5) -> pb.SearchRequest:
    vector = random_vectors(1, DIM, 99)[0]
    return pb.SearchRequest(
        collection=collection,
        limit=limit,
        queries=[
            pb.SubQuery(bm25=pb.Bm25Query(text=SECRET_WORDS)),
            pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(vector))),
        ],
        filter=pb.Filter(),
        fusion=pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60)),
    )


# ------------------------------------------------------------ standalone


@pytest.fixture
def metered(tmp_path: Path) -> Iterator[tuple[Any, Any, int]]:
    port = free_port()
    server, running = start_in_process(tmp_path / "data", metrics_port=port)
    yield server, running, port
    stop_in_process(server, running)


def test_metrics_move_with_a_workload(metered, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, running, port = metered
    client = running.client
    before = scrape(port)
    assert value(before, "braid_rpc_requests_total") == 0
    assert value(before, "braid_calls_queue_limit") == 256
    assert value(before, "braid_disk_free_bytes") > 0
    assert value(before, "process_resident_memory_bytes") > 0

    client.create_collection("docs", schema(dim=DIM, payload={"lang": pb.KEYWORD}))
    client.upsert("docs", docs(N))
    for _ in range(3):
        client.stub.Search(hybrid())
    bad = pb.SearchRequest(collection="docs", queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb"))])
    bad.queries[0].dense.vector.packed = np.zeros(DIM - 1, "<f4").tobytes()  # the wrong dimension
    with pytest.raises(grpc.RpcError) as info:
        client.stub.Search(bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError):
        client.get_collection("missing")
    client.stub.Flush(pb.FlushRequest(collection="docs"))

    after = scrape(port)
    service = "braid.v1.Braid"
    assert value(after, "braid_rpc_requests_total", service=service, method="Upsert", code="OK") == 1
    assert value(after, "braid_rpc_requests_total", method="Search", code="OK") == 3
    assert value(after, "braid_rpc_requests_total", method="Search", code="INVALID_ARGUMENT") == 1
    assert value(after, "braid_rpc_requests_total", method="GetCollection", code="NOT_FOUND") == 1
    assert value(after, "braid_rpc_duration_seconds_count", method="Search") == 4
    assert value(after, "braid_rpc_duration_seconds_bucket", method="Search", le="+Inf") == 4
    assert value(after, "braid_rpc_duration_seconds_sum", method="Search") > 0

    assert value(after, "braid_collection_documents", collection="docs") == N
    assert value(after, "braid_collection_writes_refused", collection="docs") == 0
    assert value(after, "braid_wal_append_seconds_count", collection="docs") == 1  # one upsert, one record
    assert value(after, "braid_wal_fsync_seconds_count", collection="docs") >= 1
    assert value(after, "braid_wal_appended_bytes_total", collection="docs") > N * DIM * 4
    assert value(after, "braid_documents_written_total", collection="docs", op="upsert") == N
    assert value(after, "braid_documents_written_total", collection="docs", op="delete") == 0
    assert value(after, "braid_checkpoints_total", collection="docs", outcome="ok") >= 1
    assert value(after, "braid_checkpoint_duration_seconds_count", collection="docs") >= 1

    hnsw = {"collection": "docs", "field": "emb", "index": "hnsw"}
    assert value(after, "braid_index_memory_bytes", **hnsw) >= N * DIM * 4
    assert value(after, "braid_index_disk_bytes", **hnsw) >= N * DIM * 4  # the checkpoint wrote emb.hnsw
    assert value(after, "braid_index_disk_bytes", collection="docs", index="bm25") > 0
    assert value(after, "braid_index_disk_bytes", collection="docs", index="wal") > 0
    assert value(after, "braid_index_memory_bytes", collection="docs", field="lang", index="payload") > 0

    # A second server in the same process keeps its own registry.
    other_port = free_port()
    other, other_running = start_in_process(tmp_path / "other", metrics_port=other_port)
    try:
        other_running.client.list_collections()
        theirs = scrape(other_port)
        assert value(theirs, "braid_rpc_requests_total", method="ListCollections") == 1
        assert value(theirs, "braid_rpc_requests_total", method="Upsert") == 0
        assert value(theirs, "braid_collection_documents") == 0
        assert value(scrape(port), "braid_rpc_requests_total", method="ListCollections") == 0
    finally:
        stop_in_process(other, other_running)


def test_request_ids_are_echoed(metered) -> None:  # type: ignore[no-untyped-def]
    _, running, _ = metered
    stub = running.client.stub
    _, call = stub.ListCollections.with_call(pb.ListCollectionsRequest(), metadata=((REQUEST_ID_KEY, "rid-1"),))
    assert dict(call.trailing_metadata())[REQUEST_ID_KEY] == "rid-1"
    _, call = stub.ListCollections.with_call(pb.ListCollectionsRequest())
    made = dict(call.trailing_metadata())[REQUEST_ID_KEY]
    assert made and made != "rid-1"
    with pytest.raises(grpc.RpcError) as info:  # failures echo it too
        stub.GetCollection(pb.GetCollectionRequest(name="missing"), metadata=((REQUEST_ID_KEY, "rid-2"),))
    assert dict(info.value.trailing_metadata())[REQUEST_ID_KEY] == "rid-2"


def test_spann_reads_and_merges_are_counted(metered) -> None:  # type: ignore[no-untyped-def]
    _, running, port = metered
    spann = pb.SpannParams(merge_threshold=200, target_list_size=16)
    running.client.create_collection(
        "s",
        pb.Schema(dense_fields=[pb.DenseVectorField(name="v", dim=DIM, metric=pb.COSINE, index="spann", spann=spann)]),
    )
    vectors = random_vectors(300, DIM, 3)
    running.client.upsert("s", [{"id": f"s{i}", "dense": {"v": v}} for i, v in enumerate(vectors)])
    seal = {"collection": "s", "kind": "seal", "outcome": "ok"}
    wait_for(lambda: value(scrape(port), "braid_merges_total", **seal) >= 1, what="a SPANN seal")
    lists_before = value(scrape(port), "braid_spann_lists_read_total", collection="s", field="v")
    for vector in vectors[:5]:
        running.client.search("s", dense=("v", vector), limit=3)
    samples = scrape(port)
    assert value(samples, "braid_spann_lists_read_total", collection="s", field="v") > lists_before
    assert value(samples, "braid_spann_bytes_read_total", collection="s", field="v") >= DIM * 4
    assert value(samples, "braid_spann_lists_per_query_count", collection="s", field="v") >= 5
    assert value(samples, "braid_merge_duration_seconds_count", collection="s", kind="seal") >= 1
    assert value(samples, "braid_index_disk_bytes", collection="s", field="v", index="spann") > 0
    assert value(samples, "braid_index_memory_bytes", collection="s", field="v", index="spann") > 0


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Only the default dense model, fp32 (a second or two), not every built-in model."""
    from braid.encoders.export import export_builtin

    directory = tmp_path_factory.mktemp("obs-models")
    export_builtin("all-minilm-l6-v2", directory, quantize=False)
    return directory


def test_encoder_metrics(tmp_path: Path, dense_model: Path) -> None:
    port = free_port()
    server, running = start_in_process(tmp_path / "data", metrics_port=port, models_dir=dense_model)
    try:
        encoder = pb.Encoder(model="all-minilm-l6-v2", source_fields=["body"])
        running.client.create_collection(
            "notes",
            pb.Schema(
                text_fields=[pb.TextField(name="body")],
                dense_fields=[pb.DenseVectorField(name="emb", metric=pb.COSINE, encoder=encoder)],
            ),
        )
        running.client.upsert("notes", [{"id": f"n{i}", "text": {"body": f"note number {i}"}} for i in range(5)])
        for text in ("first question", "second question"):
            running.client.search("notes", dense=("emb", text), limit=2)
        samples = scrape(port)
        model = {"model": "all-minilm-l6-v2", "precision": "fp32"}
        assert value(samples, "braid_encoder_batch_size_count", source="document", **model) == 1
        assert value(samples, "braid_encoder_batch_size_sum", source="document", **model) == 5
        assert value(samples, "braid_encoder_batch_size_sum", source="query", **model) == 2
        assert value(samples, "braid_encoder_queue_wait_seconds_count", **model) == 2
        assert value(samples, "braid_encoder_inference_seconds_count", source="query", **model) >= 1
        assert value(samples, "braid_encoder_inference_seconds_sum", source="document", **model) > 0
    finally:
        stop_in_process(server, running)


# ------------------------------------------------------------ logs


def test_json_logs_request_ids_and_slow_queries(child_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    server: ChildServer = child_server(
        tmp_path / "data", "--log-format", "json", "--slow-query-ms", "0.001", "--metrics-port", str(port)
    )
    client = server.client
    client.create_collection("docs", schema(dim=DIM))
    client.upsert("docs", docs(N))
    response, call = client.stub.Search.with_call(hybrid(), metadata=((REQUEST_ID_KEY, "trace-me-42"),))
    assert len(response.hits) == 5
    assert dict(call.trailing_metadata())[REQUEST_ID_KEY] == "trace-me-42"

    def slow_lines() -> list[dict]:
        return [line for line in parsed() if line.get("event") == "slow_query"]

    def parsed() -> list[dict]:
        return [json.loads(line) for line in list(server.output) if line.startswith("{")]

    wait_for(lambda: any(line.get("request_id") == "trace-me-42" for line in slow_lines()), what="the slow query")
    (slow,) = [line for line in slow_lines() if line["request_id"] == "trace-me-42"]
    assert slow["level"] == "WARNING" and slow["logger"] == "braid.slow_query" and slow["time"]
    assert slow["method"] == "Search" and slow["code"] == "OK" and slow["duration_ms"] > 0
    (shape,) = slow["searches"]
    assert shape["collection"] == "docs" and shape["limit"] == 5 and shape["filter"] is True
    assert shape["fusion"] == "rrf"
    assert shape["strands"] == [{"kind": "bm25", "fields": "all"}, {"kind": "dense", "field": "emb", "by": "vector"}]
    assert len(shape["strand_ms"]) == 2 and all(ms >= 0 for ms in shape["strand_ms"])
    assert "slow query" in slow["message"]

    # Every log line is one JSON object (the ready line on stdout is the only plain one), and no
    # line carries query text or document text.
    lines = [line for line in list(server.output) if line.strip()]
    plain = [line for line in lines if not line.startswith("{")]
    assert all(line.startswith("braid: serving") for line in plain), plain
    assert len(parsed()) >= 2  # listening, recovery, the slow queries...
    for line in lines:
        for word in (*SECRET_WORDS.split(), *DOC_TEXT.split()):
            assert word not in line, line
    assert server.stop() == 0


def test_json_formatter_carries_request_id_and_extra_fields() -> None:
    record = logging.LogRecord("braid.test", logging.ERROR, __file__, 1, "shard %d failed", (3,), None)
    record.collection = "docs"  # what extra={"collection": "docs"} does
    token = bind_request_id("req-7")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        unbind_request_id(token)
    assert line["message"] == "shard 3 failed" and line["level"] == "ERROR" and line["logger"] == "braid.test"
    assert line["request_id"] == "req-7" and line["collection"] == "docs"
    assert line["time"].endswith("+00:00")
    no_call = json.loads(JsonFormatter().format(record))
    assert "request_id" not in no_call


def test_settings_come_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(
        ["serve", "--metrics-port", "9100", "--log-format", "json", "--slow-query-ms", "250"]
    )
    config = load_config(metrics_port=args.metrics_port, log_format=args.log_format, slow_query_ms=args.slow_query_ms)
    assert (config.metrics_port, config.log_format, config.slow_query_ms) == (9100, "json", 250.0)
    assert (load_config().metrics_port, load_config().log_format, load_config().slow_query_ms) == (0, "text", 0.0)
    monkeypatch.setenv("BRAID_METRICS_PORT", "9200")
    monkeypatch.setenv("BRAID_LOG_FORMAT", "JSON")
    monkeypatch.setenv("BRAID_SLOW_QUERY_MS", "0.5")
    config = load_config()
    assert (config.metrics_port, config.log_format, config.slow_query_ms) == (9200, "json", 0.5)
    monkeypatch.setenv("BRAID_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        load_config()
    monkeypatch.setenv("BRAID_LOG_FORMAT", "text")
    monkeypatch.setenv("BRAID_METRICS_PORT", "70000")
    with pytest.raises(ValueError, match="metrics_port"):
        load_config()


# ------------------------------------------------------------ cluster


def test_router_failover_and_request_id_forwarding() -> None:
    from braid.service.cluster import router, view

    stats = view.RouterStats()
    live = {"a": "127.0.0.1:1", "b": "127.0.0.1:2"}
    state = SimpleNamespace(order=lambda nodes, turn: [(n, live[n], True) for n in nodes], suspect=lambda node: None)
    catalog = SimpleNamespace(stats=stats, state=state, turn=lambda: 0)
    collection = SimpleNamespace(catalog=catalog, meta=SimpleNamespace(placement=[("a", "b")]), name="c")

    class Failed(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.UNAVAILABLE

        def details(self) -> str:
            return "down"

    tries = router.Tries(collection, 0)  # type: ignore[arg-type]
    attempts = tries.each(time.monotonic() + 10)
    node, _, _ = next(attempts)
    tries.failed(node, Failed())
    next(attempts)
    tries.answered()
    assert stats.retries == {"UNAVAILABLE": 1} and stats.failovers == 1
    first_time = router.Tries(collection, 0)  # type: ignore[arg-type]
    first_time.answered()
    assert stats.failovers == 1

    seen = []

    def continuation(details: Any, request: Any) -> None:
        seen.append(dict(details.metadata or ()))

    details = SimpleNamespace(metadata=None, _replace=lambda **kw: SimpleNamespace(**kw))
    token = bind_request_id("fwd-1")
    try:
        view._ForwardRequestId().intercept_unary_unary(continuation, details, None)
    finally:
        unbind_request_id(token)
    view._ForwardRequestId().intercept_unary_unary(continuation, details, None)  # no call: nothing added
    assert seen == [{REQUEST_ID_KEY: "fwd-1"}, {}]


def test_cluster_metrics(local_cluster: Callable[..., LocalCluster]) -> None:  # noqa: F811
    shard_port, router_port = free_port(), free_port()
    cluster = local_cluster(
        shard_servers=1,
        routers=1,
        shard_args=["--metrics-port", str(shard_port)],
        router_args=["--metrics-port", str(router_port)],
    )
    with BraidClient(cluster.router_address, timeout=30) as client:
        client.create_collection("docs", schema(dim=DIM), shards=2)
        client.upsert("docs", docs(N))
        client.stub.Search(hybrid())

        wait_for(
            lambda: (
                value(scrape(shard_port), "braid_replica_lag_records", collection="docs") == 0
                and value(scrape(shard_port), "braid_replica_caught_up", collection="docs") == 2
            ),
            what="both replicas caught up with lag 0",
        )
        shard = scrape(shard_port)
        assert value(shard, "braid_collection_documents", collection="docs") == N
        assert value(shard, "braid_replica_applied_sequence", collection="docs") >= 2
        # The one shard server holds both shards: the whole search is one call (not a Search per shard).
        assert (
            value(shard, "braid_rpc_requests_total", service="braid.cluster.v1.Shard", method="SearchCollection") == 1
        )
        assert value(shard, "braid_index_memory_bytes", collection="docs", field="emb", index="hnsw") > 0
        assert value(shard, "braid_replica_restores_total", collection="docs") == 0  # nothing was rebuilt
        with grpc.insecure_channel(cluster.address_of(cluster.shards[0])) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            replica = next(r for r in stub.Status(spb.StatusRequest(), timeout=10).replicas if r.replica.shard == 0)
            stub.Snapshot(spb.SnapshotRequest(replica=replica.replica), timeout=60)
        snapped = scrape(shard_port)
        assert value(snapped, "braid_replica_snapshots_total", collection="docs", shard="0") == 1
        assert value(snapped, "braid_replica_snapshots_total", collection="docs", shard="1") == 0

        routed = scrape(router_port)
        assert value(routed, "braid_rpc_requests_total", service="braid.v1.Braid", method="Upsert", code="OK") == 1
        assert value(routed, "braid_rpc_requests_total", method="Search", code="OK") == 1
        assert value(routed, "braid_router_shard_servers_live") == 1
        assert value(routed, "braid_router_failovers_total") == 0

        cluster.shards[0].kill()  # its heartbeat lives on for the TTL: the router tries it, and counts
        with pytest.raises(grpc.RpcError) as info:
            client.stub.Search(hybrid(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # An aborted call's status reaches the client as the handler aborts, before the server's
        # request counter records it (on a loaded machine the scrape can come first): wait for it.
        wait_for(
            lambda: value(scrape(router_port), "braid_rpc_requests_total", method="Search", code="UNAVAILABLE") == 1,
            what="the failed Search counted as UNAVAILABLE",
        )
        routed = scrape(router_port)
        assert value(routed, "braid_router_retries_total", code="UNAVAILABLE") >= 1
        assert value(routed, "braid_rpc_requests_total", method="Search", code="UNAVAILABLE") == 1
