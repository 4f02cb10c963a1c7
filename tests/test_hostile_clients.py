"""Hostile and careless clients: idle streams, floods, undecodable bodies, SIGTERM at bad moments.

Every test talks to a real server on loopback; the shutdown tests run ``braid serve`` as
a child process and signal it for real.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.index.errors import NotFound
from braid.service.admission import RETRY_PUSHBACK_KEY, Admission, Overloaded, peer_host
from braid.service.client import BraidClient
from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from .conftest import random_vectors, schema, start_in_process, stop_in_process

ADDRESS = "127.0.0.1:{}"


def _docs(n: int, start: int = 0, dim: int = 8) -> list[pb.Document]:
    vectors = random_vectors(n, dim, seed=start)
    return [
        pb.Document(
            id=f"d{start + i}",
            text={"body": f"document {start + i}"},
            dense={"emb": pb.DenseVector(packed=v.tobytes())},
        )
        for i, v in enumerate(vectors)
    ]


class HeldStream:
    """A BulkUpsert stream that sends what the test puts in and otherwise stays silent."""

    def __init__(self, port: int, timeout: float = 30) -> None:
        self.channel = grpc.insecure_channel(ADDRESS.format(port))
        self.outbox: queue.Queue[pb.UpsertRequest | bytes | None] = queue.Queue()
        stub = self.channel.stream_unary(
            "/braid.v1.Braid/BulkUpsert",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.BulkUpsertResponse.FromString,
        )
        self.future = stub.future(self._messages(), timeout=timeout)

    def _messages(self) -> Iterator[pb.UpsertRequest | bytes]:
        while (message := self.outbox.get()) is not None:
            yield message

    def send(self, message: pb.UpsertRequest | bytes) -> None:
        self.outbox.put(message)

    def finish(self) -> None:
        self.outbox.put(None)

    def error(self, timeout: float = 10) -> grpc.RpcError:
        """The status the stream ended with (it must end with an error)."""
        with pytest.raises(grpc.RpcError) as info:
            self.future.result(timeout=timeout)
        return info.value

    def close(self) -> None:
        self.finish()
        self.future.cancel()
        self.channel.close()


def _health(port: int, timeout: float = 2) -> int:
    with grpc.insecure_channel(ADDRESS.format(port)) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout).status


def _wait_for(predicate, timeout: float = 5) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def limited(tmp_path: Path):  # type: ignore[no-untyped-def]
    servers = []

    def start(**config: object):  # type: ignore[no-untyped-def]
        server, running = start_in_process(tmp_path / f"data{len(servers)}", **config)
        servers.append((server, running))
        running.client.create_collection("c", schema())
        running.client.upsert("c", _docs(20))
        return server, running

    yield start
    for server, running in servers:
        stop_in_process(server, running)


def _search(client: BraidClient, timeout: float = 2) -> list:
    vector = random_vectors(1, 8, seed=99)[0]
    request = pb.SearchRequest(collection="c", limit=3)
    request.queries.add(dense=pb.DenseQuery(field="emb", vector=pb.DenseVector(packed=vector.tobytes())))
    return list(client.stub.Search(request, timeout=timeout).hits)


# ------------------------------------------------------------------ streams


def _refused_stream(port: int) -> str:
    """Open one more stream, which must be refused with RESOURCE_EXHAUSTED; returns the message."""
    extra = HeldStream(port)
    try:
        err = extra.error(timeout=5)
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        return err.details()
    finally:
        extra.close()


def test_idle_streams_never_starve_searches_health_or_listing(limited) -> None:  # type: ignore[no-untyped-def]
    server, running = limited(workers=4, max_streams=24, max_streams_per_peer=24)
    streams = [HeldStream(running.port) for _ in range(24)]
    try:
        _wait_for(lambda: sum(server.admission._streams.values()) == 24)
        assert _health(running.port, timeout=1) == health_pb2.HealthCheckResponse.SERVING
        assert len(_search(running.client, timeout=1)) == 3
        assert [c.name for c in running.stub.ListCollections(pb.ListCollectionsRequest(), timeout=1).collections] == [
            "c"
        ]
        assert "max_streams" in _refused_stream(running.port)
    finally:
        for stream in streams:
            stream.close()


def test_streams_per_client_address_are_bounded(limited) -> None:  # type: ignore[no-untyped-def]
    server, running = limited(max_streams_per_peer=3)
    streams = [HeldStream(running.port) for _ in range(3)]
    try:
        _wait_for(lambda: sum(server.admission._streams.values()) == 3)
        details = _refused_stream(running.port)
        assert "max_streams_per_peer" in details and "127.0.0.1" in details
        streams.pop().close()  # a slot frees when a stream ends
        _wait_for(lambda: sum(server.admission._streams.values()) == 2)
        again = HeldStream(running.port)
        again.send(pb.UpsertRequest(collection="c", documents=_docs(2, start=100)))
        again.finish()
        assert again.future.result(timeout=5).upserted == 2
        again.close()
    finally:
        for stream in streams:
            stream.close()


def test_a_silent_stream_is_ended_with_its_applied_count(limited) -> None:  # type: ignore[no-untyped-def]
    server, running = limited(stream_idle_timeout_s=0.5)
    stream = HeldStream(running.port)
    stream.send(pb.UpsertRequest(collection="c", documents=_docs(5, start=200)))
    err = stream.error()
    assert err.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "stream_idle_timeout_s" in err.details()
    assert "1 earlier batches (5 documents) were applied" in err.details()
    trailing = dict(err.trailing_metadata())
    assert trailing["braid-batches-applied"] == "1" and trailing["braid-documents-applied"] == "5"
    assert running.client.count("c") == 25  # the acknowledged batch is there
    stream.close()
    _wait_for(lambda: not server.admission._streams)


def test_garbage_after_a_good_batch_says_what_was_applied(limited) -> None:  # type: ignore[no-untyped-def]
    _, running = limited()
    stream = HeldStream(running.port)
    stream.send(pb.UpsertRequest(collection="c", documents=_docs(3, start=300)))
    stream.send(b"\xff\xff\xff\xff garbage")
    stream.finish()
    err = stream.error()
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "batch 1: request: cannot decode braid.v1.UpsertRequest" in err.details()
    assert "1 earlier batches (3 documents) were applied" in err.details()
    assert dict(err.trailing_metadata())["braid-batches-applied"] == "1"
    assert running.client.count("c") == 23
    stream.close()


def test_a_successful_stream_reports_its_counts_in_trailing_metadata(limited) -> None:  # type: ignore[no-untyped-def]
    _, running = limited()
    batches = [pb.UpsertRequest(collection="c", documents=_docs(4, start=400 + 4 * i)) for i in range(3)]
    response, call = running.stub.BulkUpsert.with_call(iter(batches), timeout=10)
    assert (response.upserted, response.batches) == (12, 3)
    trailing = dict(call.trailing_metadata())
    assert trailing["braid-batches-applied"] == "3" and trailing["braid-documents-applied"] == "12"


# ---------------------------------------------------------------- admission


def test_a_full_queue_is_refused_with_a_retry_hint_and_health_stays_fast(limited) -> None:  # type: ignore[no-untyped-def]
    server, running = limited(workers=2, max_queue=1)
    release = threading.Event()
    blockers = [server.admission._submit(release.wait, None) for _ in range(3)]  # 2 running + 1 queued
    try:
        with pytest.raises(grpc.RpcError) as info:
            _search(running.client, timeout=5)
        err = info.value
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "overloaded" in err.details() and "max_queue 1" in err.details()
        assert int(dict(err.trailing_metadata())[RETRY_PUSHBACK_KEY]) >= 10
        started = time.monotonic()
        assert _health(running.port, timeout=1) == health_pb2.HealthCheckResponse.SERVING
        assert time.monotonic() - started < 1
    finally:
        release.set()
    for blocker in blockers:
        blocker.result(timeout=5)
    assert len(_search(running.client)) == 3  # served again once the workers are free


def test_a_call_whose_deadline_passes_in_the_queue_does_no_work(limited) -> None:  # type: ignore[no-untyped-def]
    server, running = limited(workers=1, max_queue=8)
    release = threading.Event()
    blocker = server.admission._submit(release.wait, None)
    call = running.stub.Upsert.future(pb.UpsertRequest(collection="c", documents=_docs(1, start=500)), timeout=0.3)
    with pytest.raises(grpc.RpcError) as info:
        call.result(timeout=5)
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    release.set()
    blocker.result(timeout=5)
    _wait_for(lambda: server.admission.outstanding == 0)
    assert running.client.get("c", ["d500"]) == []  # the expired write was never applied


def test_admission_unit_bounds_and_peer_parsing() -> None:
    admission = Admission(workers=1, max_queue=1, max_streams=2, max_streams_per_peer=1)
    release = threading.Event()
    first = admission._submit(release.wait, None)
    second = admission._submit(lambda: 7, None)
    with pytest.raises(Overloaded) as info:
        admission._submit(lambda: 8, None)
    assert info.value.retry_after_ms >= 10
    release.set()
    assert first.result(timeout=5) and second.result(timeout=5) == 7

    def open_stream(peer: str) -> None:
        with admission.stream(peer):
            pass

    with (
        admission.stream("ipv4:10.0.0.1:1234"),
        admission.stream("ipv6:[::1]:99"),
        pytest.raises(Exception, match="max_streams"),
    ):
        open_stream("ipv4:10.0.0.2:1")
    with admission.stream("ipv4:10.0.0.1:1"), pytest.raises(Exception, match="max_streams_per_peer"):
        open_stream("ipv4:10.0.0.1:2")
    assert peer_host("ipv6:[::1]:99") == "::1" and peer_host("ipv4:10.0.0.1:5") == "10.0.0.1"
    assert admission.close(timeout=5)


# ------------------------------------------------------------- bad bodies


@pytest.mark.parametrize(
    "method",
    [m.name for m in pb.DESCRIPTOR.services_by_name["Braid"].methods if not m.client_streaming],
)
def test_an_undecodable_body_is_invalid_argument_for_every_rpc(braid, method: str) -> None:  # type: ignore[no-untyped-def]
    call = braid.client.channel.unary_unary(f"/braid.v1.Braid/{method}")
    bodies = [b"\xff\xff\xff\xff\xff"]  # garbage
    first = pb.DESCRIPTOR.services_by_name["Braid"].methods_by_name[method].input_type.fields_by_number.get(1)
    if first is not None and first.type == first.TYPE_STRING:
        bodies.append(b"\x0a\x05\xff\xfe\xfd\xfc\xfb")  # field 1 as a string that is not UTF-8
    for body in bodies:
        with pytest.raises(grpc.RpcError) as info:
            call(body, timeout=5)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (method, body, info.value.details())
        assert "cannot decode braid.v1." in info.value.details()


def test_a_filter_nested_past_protobufs_limit_is_invalid_argument(braid) -> None:  # type: ignore[no-untyped-def]
    braid.client.create_collection("c", schema(payload={"n": pb.INT}))
    # Built on the wire by hand: the Python protobuf runtime refuses to build it.
    must = pb.Filter.DESCRIPTOR.fields_by_name["must"].number
    nested = pb.Condition.DESCRIPTOR.fields_by_name["filter"].number
    body = pb.Filter(must=[pb.Condition(match=pb.Match(field="n", value=pb.Value(int=1)))]).SerializeToString()
    for _ in range(80):
        body = _field(must, _field(nested, body))
    request = pb.CountRequest(collection="c").SerializeToString()
    request += _field(pb.CountRequest.DESCRIPTOR.fields_by_name["filter"].number, body)
    call = braid.client.channel.unary_unary("/braid.v1.Braid/Count")
    with pytest.raises(grpc.RpcError) as info:
        call(request, timeout=5)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "nested" in info.value.details()
    assert _health(braid.port) == health_pb2.HealthCheckResponse.SERVING


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


# ----------------------------------------------------------------- SIGTERM


def _stub(port: int) -> braid_pb2_grpc.BraidStub:
    return braid_pb2_grpc.BraidStub(grpc.insecure_channel(ADDRESS.format(port)))


def test_sigterm_after_an_undecodable_stream_exits_and_releases_the_data_dir(child_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    for round_ in range(3):
        server = child_server(tmp_path / "data", env={"BRAID_SHUTDOWN_GRACE_S": "2"})
        if round_ == 0:
            server.client.create_collection("c", schema())
        stream = HeldStream(server.port)
        stream.send(b"\xff\xfe not a message")
        assert stream.error().code() is grpc.StatusCode.INVALID_ARGUMENT
        stream.close()
        started = time.monotonic()
        assert server.stop() == 0
        assert time.monotonic() - started < 2 + 5
    assert child_server(tmp_path / "data").client.list_collections()[0].name == "c"  # the lock was released


def test_sigterm_ends_an_open_stream_after_the_grace_with_its_count(child_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = child_server(tmp_path / "data", "--shutdown-grace-s", "1")
    server.client.create_collection("c", schema())
    stream = HeldStream(server.port)
    stream.send(pb.UpsertRequest(collection="c", documents=_docs(4)))
    _wait_for(lambda: server.client.count("c") == 4)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    err = stream.error(timeout=15)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert "shutting down" in err.details()
    assert "1 earlier batches (4 documents) were applied" in err.details()
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 1 + 5
    stream.close()
    again = child_server(tmp_path / "data")
    assert again.client.count("c") == 4


def test_a_second_sigterm_skips_the_grace_period(child_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = child_server(tmp_path / "data", "--shutdown-grace-s", "60")
    server.client.create_collection("c", schema())
    stream = HeldStream(server.port, timeout=120)
    stream.send(pb.UpsertRequest(collection="c", documents=_docs(2)))
    _wait_for(lambda: server.client.count("c") == 2)
    started = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.proc.poll() is None  # still in its grace period: the stream is open
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    assert stream.error(timeout=5).code() is grpc.StatusCode.UNAVAILABLE
    stream.close()
    assert child_server(tmp_path / "data").client.count("c") == 2


# --------------------------------------------------------- big responses


def test_responses_over_the_message_limit_are_refused_while_built(limited) -> None:  # type: ignore[no-untyped-def]
    _, running = limited(max_message_bytes=64 * 1024)
    docs = [pb.Document(id=f"big{i}", text={"body": f"word {i} " + "x" * 3000}) for i in range(60)]
    for start in range(0, len(docs), 10):
        running.client.upsert("c", docs[start : start + 10])
    search = pb.SearchRequest(collection="c", limit=60, text_fields=["body"])
    search.queries.add(bm25=pb.Bm25Query(text="word"))
    cases = {
        "Search": lambda: running.stub.Search(search, timeout=5),
        "BatchSearch": lambda: running.stub.BatchSearch(pb.BatchSearchRequest(searches=[search] * 3), timeout=5),
        "Get": lambda: running.stub.Get(pb.GetRequest(collection="c", ids=[d.id for d in docs]), timeout=5),
    }
    for name, call in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, name
        assert "response would exceed 65536 bytes" in info.value.details(), (name, info.value.details())
    search.limit = 5  # a smaller answer to the same question is served
    assert len(running.stub.Search(search, timeout=5).hits) == 5


def test_long_values_echoed_in_errors_keep_their_own_status(braid) -> None:  # type: ignore[no-untyped-def]
    braid.client.create_collection("c", schema())
    for name in ("x" * 17_000, "é" * 9_000, "\U0001f600" * 5_000):
        with pytest.raises(grpc.RpcError) as info:
            braid.client.get_collection(name)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND  # not "metadata size exceeds hard limit"
        assert info.value.details().endswith("more bytes)") and len(info.value.details().encode()) < 2000
    flt = pb.Filter(must=[pb.Condition(match=pb.Match(field="f" * 20_000, value=pb.Value(int=1)))])
    with pytest.raises(grpc.RpcError) as info:
        braid.client.count("c", filter=flt)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_list_collections_racing_a_delete_leaves_the_deleted_out(limited) -> None:  # type: ignore[no-untyped-def]
    """The moment a delete has closed a collection the listing already holds: it is left out, not NOT_FOUND."""
    server, running = limited()
    running.client.create_collection("doomed", schema())
    doomed = server.catalog.get("doomed")
    doomed.close(NotFound("collection 'doomed' does not exist (it was deleted)"))  # the delete's first step
    assert [c.name for c in running.client.list_collections()] == ["c"]


@pytest.mark.parametrize("model", ["a" * 5000, "../../../etc", "x/../y"])
def test_a_model_name_is_never_a_path(braid, model: str) -> None:  # type: ignore[no-untyped-def]
    """Found by the 100,000-request fuzz run: a 64 KB model name reached the file system (INTERNAL)."""
    field = pb.DenseVectorField(name="emb", metric=pb.COSINE, encoder=pb.Encoder(model=model, source_fields=["body"]))
    request = pb.Schema(text_fields=[pb.TextField(name="body")], dense_fields=[field])
    with pytest.raises(grpc.RpcError) as info:
        braid.client.create_collection("c", request)
    assert info.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT), info.value.details()
