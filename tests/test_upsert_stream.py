"""UpsertStream: BulkUpsert with an acknowledgement per batch, and what a careless client does to it.

A real in-process server on loopback; raw gRPC calls where the test must misbehave
(never read acks, send garbage, go silent) and the Python client's ``upsert_stream``
where it behaves.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from braid.service.client import StreamFailed
from braid.service.handlers import BATCHES_APPLIED_KEY
from braid.v1 import braid_pb2 as pb

from .conftest import random_vectors, schema, start_in_process, stop_in_process, wait_for


def _docs(n: int, start: int = 0) -> list[pb.Document]:
    vectors = random_vectors(n, 8, seed=start)
    return [
        pb.Document(
            id=f"d{start + i}", text={"body": f"doc {start + i}"}, dense={"emb": pb.DenseVector(packed=v.tobytes())}
        )
        for i, v in enumerate(vectors)
    ]


def _batches(count: int, size: int) -> list[pb.UpsertRequest]:
    return [pb.UpsertRequest(collection="c", documents=_docs(size, b * size)) for b in range(count)]


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    started = []

    def start(**config: object):  # type: ignore[no-untyped-def]
        srv, running = start_in_process(tmp_path / f"data{len(started)}", **config)
        started.append((srv, running))
        running.client.create_collection("c", schema(payload={"n": pb.INT}))
        return running

    start.started = started  # type: ignore[attr-defined]  # the servers, for a test that looks inside
    yield start
    for srv, running in started:
        stop_in_process(srv, running)


class RawStream:
    """An UpsertStream call whose requests the test feeds and whose acks it may never read."""

    def __init__(self, port: int, timeout: float = 30, window_bytes: int = 0) -> None:
        # ``window_bytes``: how much this client lets the server send ahead of its reads (the
        # HTTP/2 stream window, not grown by BDP probes), so unread acks fill it quickly.
        options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", window_bytes)] if window_bytes else []
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=options)
        self.outbox: queue.Queue[pb.UpsertRequest | bytes | None] = queue.Queue()
        method = self.channel.stream_stream(
            "/braid.v1.Braid/UpsertStream",
            request_serializer=lambda m: m if isinstance(m, bytes) else m.SerializeToString(),
            response_deserializer=pb.UpsertStreamAck.FromString,
        )
        self.call = method(self._messages(), timeout=timeout)

    def _messages(self) -> Iterator[pb.UpsertRequest | bytes]:
        while (message := self.outbox.get()) is not None:
            yield message

    def send(self, message: pb.UpsertRequest | bytes) -> None:
        self.outbox.put(message)

    def close(self) -> None:
        self.outbox.put(None)
        self.call.cancel()
        self.channel.close()


def test_each_batch_is_acknowledged_in_order_once_durable(server) -> None:  # type: ignore[no-untyped-def]
    running = server()
    batches = _batches(6, 25)
    seen = []
    for request, ack in running.client.upsert_stream(iter(batches), window=2):
        seen.append((request, ack.batch, ack.upserted))
        # An ack means applied: the batch's documents are there before the next ack is read.
        assert running.client.get("c", [request.documents[-1].id])
    assert [batch for _, batch, _ in seen] == list(range(6))
    assert [request for request, _, _ in seen] == batches
    assert all(upserted == 25 for _, _, upserted in seen)
    assert running.client.count("c") == 150


def test_invalid_batch_ends_the_stream_after_the_acked_ones(server) -> None:  # type: ignore[no-untyped-def]
    running = server()
    batches = _batches(4, 10)
    bad = batches[2].documents[3]
    bad.payload["n"].keyword = "not an int"
    acked = []
    with pytest.raises(StreamFailed) as failed:
        for request, _ack in running.client.upsert_stream(iter(batches), window=4):
            acked.append(request)
    err = failed.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "documents[3].payload" in err.error.details() and "batch 2" in err.error.details()
    assert acked == batches[:2]
    assert failed.value.unacked[0] == batches[2]  # the failing batch heads the unacked ones
    assert dict(err.error.trailing_metadata())[BATCHES_APPLIED_KEY] == "2"
    assert running.client.count("c") == 20  # nothing of the bad batch, nothing after it


def test_an_exception_in_the_callers_batches_ends_cleanly_after_the_acks(server) -> None:  # type: ignore[no-untyped-def]
    running = server()
    batches = _batches(3, 10)

    def source() -> Iterator[pb.UpsertRequest]:
        yield from batches[:2]
        raise RuntimeError("the corpus broke")

    acked = []
    with pytest.raises(RuntimeError, match="the corpus broke"):
        for request, _ack in running.client.upsert_stream(source()):
            acked.append(request)
    assert acked == batches[:2]
    assert running.client.count("c") == 20


def test_client_that_never_reads_acks_is_ended_and_frees_its_stream(server) -> None:  # type: ignore[no-untyped-def]
    running = server(stream_idle_timeout_s=1.5, max_streams_per_peer=1)
    stream = RawStream(running.port, window_bytes=1024)
    sending = threading.Event()
    sending.set()

    def keep_sending() -> None:
        # Never silent, so only the acks it does not read can end it: empty batches (cheap to
        # apply, one ack each) until the flow-control window is full of unread acks.
        deadline = time.monotonic() + 40
        while sending.is_set() and time.monotonic() < deadline:
            for _ in range(200):
                stream.send(pb.UpsertRequest(collection="c"))
            time.sleep(0.01)

    writer = threading.Thread(target=keep_sending, daemon=True)
    writer.start()
    admission = server.started[-1][0].admission
    wait_for(lambda: admission.open_streams == 1, 10, "the stream that reads no acks holding its slot")
    try:
        # It holds the peer's only stream slot until the server gives up on its acks
        # (stream_idle_timeout_s after the first ack it cannot send); then the slot is free
        # and a well-behaved stream from the same peer gets through, while it still sends.
        deadline = time.monotonic() + 30
        refused = 0
        while True:
            try:
                acks = list(running.client.upsert_stream(iter(_batches(1, 5))))
                break
            except StreamFailed as err:
                assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                assert time.monotonic() < deadline, "a client that reads no acks held its stream slot"
                refused += 1
                time.sleep(0.2)
        assert refused >= 1 and writer.is_alive()  # the slot was held, and freed while it still sent
        assert len(acks) == 1 and running.client.count("c") == 5
    finally:
        sending.clear()
        stream.close()


def test_silent_stream_ends_with_deadline_exceeded_and_counts(server) -> None:  # type: ignore[no-untyped-def]
    running = server(stream_idle_timeout_s=1.0)
    stream = RawStream(running.port)
    try:
        stream.send(_batches(1, 5)[0])
        acks = []
        with pytest.raises(grpc.RpcError) as info:
            for ack in stream.call:
                acks.append(ack)
        assert [a.batch for a in acks] == [0]
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stream_idle_timeout_s" in info.value.details()
        assert dict(info.value.trailing_metadata())[BATCHES_APPLIED_KEY] == "1"
    finally:
        stream.close()


def test_garbage_bytes_get_invalid_argument_and_the_server_serves_on(server) -> None:  # type: ignore[no-untyped-def]
    running = server()
    stream = RawStream(running.port)
    try:
        stream.send(_batches(1, 3)[0])
        stream.send(b"\xff\xfe\x00garbage that is no protobuf\x9f")
        acks = []
        with pytest.raises(grpc.RpcError) as info:
            for ack in stream.call:
                acks.append(ack)
        assert len(acks) == 1
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stream.close()
    assert running.client.count("c") == 3
    assert len(list(running.client.upsert_stream(iter(_batches(2, 3))))) == 2


def test_many_streams_at_once_each_get_all_their_acks(server) -> None:  # type: ignore[no-untyped-def]
    running = server()
    results: dict[int, int] = {}

    def one(k: int) -> None:
        batches = [pb.UpsertRequest(collection="c", documents=_docs(10, 1000 * k + 10 * b)) for b in range(5)]
        results[k] = sum(ack.upserted for _, ack in running.client.upsert_stream(iter(batches)))

    threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert results == {k: 50 for k in range(6)}
    assert running.client.count("c") == 300
