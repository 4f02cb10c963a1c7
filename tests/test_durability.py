"""Acknowledged writes survive restarts, SIGKILL mid-stream and mid-checkpoint, and torn log tails."""

from __future__ import annotations

import json
import threading
import time

import grpc
import numpy as np

from braid.index.collection import shard_of
from braid.index.policy import StoragePolicy
from braid.v1 import braid_pb2 as pb

from .conftest import schema, start_in_process, stop_in_process

DIM = 8
PAYLOAD = {"n": pb.INT, "tag": pb.KEYWORD}


def make_doc(i: int) -> dict:
    return {
        "id": f"doc-{i}",
        "text": {"body": f"word{i} common"},
        "dense": {"emb": np.random.default_rng(i).standard_normal(DIM).astype(np.float32)},
        "sparse": {"splade": {f"t{i}": 1.0}},
        "payload": {"n": i, "tag": f"tag{i % 5}"},
    }


def assert_intact(client, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Every listed document is fully there, in every strand."""
    got = {d.id: d for d in client.get("docs", [f"doc-{i}" for i in ids])}
    missing = [i for i in ids if f"doc-{i}" not in got]
    assert not missing, f"{len(missing)} acknowledged documents lost, e.g. {missing[:5]}"
    for i in ids[:: max(1, len(ids) // 25)]:
        doc = got[f"doc-{i}"]
        assert doc.payload["n"].int == i and doc.text["body"] == f"word{i} common"
        assert [h.id for h in client.search("docs", bm25=f"word{i}")] == [f"doc-{i}"]
        assert [h.id for h in client.search("docs", sparse=("splade", {f"t{i}": 1.0}))] == [f"doc-{i}"]
        vec = make_doc(i)["dense"]["emb"]
        assert client.search("docs", dense=("emb", vec), limit=1)[0].id == f"doc-{i}"


def test_graceful_restart_keeps_everything(tmp_path):
    server, running = start_in_process(tmp_path / "d")
    running.client.create_collection("docs", schema(dim=DIM, payload=PAYLOAD), shards=2)
    running.client.upsert("docs", [make_doc(i) for i in range(100)])
    running.client.flush("docs")
    running.client.upsert("docs", [make_doc(i) for i in range(100, 150)])
    running.client.delete("docs", ids=["doc-3"])
    stop_in_process(server, running)

    server, running = start_in_process(tmp_path / "d")
    try:
        assert running.client.count("docs") == 149
        assert_intact(running.client, [i for i in range(150) if i != 3])
        assert running.client.get("docs", ["doc-3"]) == []
        # Writes after recovery continue normally, and a second checkpoint works.
        running.client.upsert("docs", [make_doc(200)])
        running.client.flush("docs")
        assert running.client.count("docs") == 150
    finally:
        stop_in_process(server, running)


def test_sigkill_without_flush_keeps_acknowledged_writes(child_server, tmp_path):
    server = child_server()
    server.client.create_collection("docs", schema(dim=DIM, payload=PAYLOAD))
    for start in range(0, 300, 50):
        server.client.upsert("docs", [make_doc(i) for i in range(start, start + 50)])
    server.client.upsert("docs", [{**make_doc(7), "payload": {"n": 7, "tag": "replaced"}}])
    server.client.delete("docs", ids=["doc-8"])
    server.kill()

    server = child_server(tmp_path / "data")
    assert server.client.count("docs") == 299
    assert_intact(server.client, [i for i in range(300) if i != 8])
    assert server.client.get("docs", ["doc-7"])[0].payload["tag"].keyword == "replaced"
    server.stop()


def test_sigkill_during_bulk_upsert_and_flush(child_server, tmp_path):
    server = child_server()
    server.client.create_collection("docs", schema(dim=DIM, payload=PAYLOAD), shards=2)
    acked: list[int] = []  # documents whose write was acknowledged
    streams: list[list[list[int]]] = []  # batches of every stream, acknowledged or not
    stop = threading.Event()
    batch_size, per_stream = 50, 4

    def bulk_writer() -> None:
        next_id = 0
        while not stop.is_set():
            batches = [list(range(next_id + b * batch_size, next_id + (b + 1) * batch_size)) for b in range(per_stream)]
            next_id += batch_size * per_stream
            streams.append(batches)
            requests = (pb.UpsertRequest(collection="docs", documents=[_pb_doc(i) for i in batch]) for batch in batches)
            try:
                server.client.stub.BulkUpsert(requests)
            except grpc.RpcError:
                return
            acked.extend(i for batch in batches for i in batch)

    def unary_writer() -> None:
        i = 1_000_000
        while not stop.is_set():
            try:
                server.client.upsert("docs", [make_doc(i)])
            except grpc.RpcError:
                return
            acked.append(i)
            i += 1

    def flusher() -> None:
        while not stop.is_set():
            try:
                server.client.flush("docs")
            except grpc.RpcError:
                return
            time.sleep(0.2)

    threads = [threading.Thread(target=f) for f in (bulk_writer, unary_writer, flusher)]
    for t in threads:
        t.start()
    deadline = time.time() + 30
    while len(acked) < 1500 and time.time() < deadline:
        time.sleep(0.05)
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert len(acked) >= 600, "the writers made too little progress to test anything"

    server = child_server(tmp_path / "data")
    client = server.client
    assert_intact(client, sorted(acked))
    # The stream that was cut off: each shard's part of a batch is all there or not at all.
    # (Across shards a batch is not atomic: a crash before the acknowledgement can leave one
    # shard's part applied; retrying is safe because upsert replaces.)
    present = {d.id for d in client.get("docs", [f"doc-{i}" for batches in streams for b in batches for i in b])}
    for batches in streams:
        for batch in batches:
            for shard in (0, 1):
                part = [i for i in batch if shard_of(f"doc-{i}", 2) == shard]
                found = sum(f"doc-{i}" in present for i in part)
                assert found in (0, len(part)), f"shard {shard}'s part of batch {batch[0]} is half applied ({found})"
    unary_present = client.count("docs") - len(present)
    assert unary_present >= sum(1 for i in acked if i >= 1_000_000)
    server.stop()


def test_torn_wal_tail_is_truncated(tmp_path):
    server, running = start_in_process(tmp_path / "d")
    running.client.create_collection("docs", schema(dim=DIM, payload=PAYLOAD))
    running.client.upsert("docs", [make_doc(i) for i in range(20)])
    stop_in_process(server, running)
    wal_files = sorted((tmp_path / "d" / "collections" / "docs" / "shard-000" / "wal").iterdir())
    with open(wal_files[-1], "ab") as fh:
        fh.write(b"\x40\x00\x00\x00garbage-from-a-torn-write")  # a header promising 64 bytes, then too few

    server, running = start_in_process(tmp_path / "d")
    try:
        assert running.client.count("docs") == 20
        assert_intact(running.client, list(range(20)))
        running.client.upsert("docs", [make_doc(20)])
    finally:
        stop_in_process(server, running)
    server, running = start_in_process(tmp_path / "d")
    try:
        assert running.client.count("docs") == 21
    finally:
        stop_in_process(server, running)


def _pb_doc(i: int) -> pb.Document:
    from braid.service.client import document

    return document(make_doc(i))


def test_shard_checkpoints_by_itself_when_the_log_grows(tmp_path):
    from braid.index.records import DocumentWrite
    from braid.index.schema import DenseFieldSpec, Schema
    from braid.index.shard import Shard

    shard_schema = Schema(dense_fields=(DenseFieldSpec("emb", 4),))
    shard = Shard.open(tmp_path / "s", shard_schema, 0, StoragePolicy(checkpoint_log_bytes=20_000))
    rng = np.random.default_rng(0)
    for batch in range(20):
        shard.upsert(
            [DocumentWrite(id=f"{batch}-{i}", dense={"emb": rng.random(4, dtype=np.float32)}) for i in range(50)]
        )
    deadline = time.time() + 30
    while not (tmp_path / "s" / "MANIFEST.json").exists() and time.time() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "s" / "MANIFEST.json").exists(), "no background checkpoint was written"
    shard.close()
    manifest = json.loads((tmp_path / "s" / "MANIFEST.json").read_text())
    assert manifest["wal_seq"] >= 5, manifest  # checkpoints kept up with the writes
    reopened = Shard.open(tmp_path / "s", shard_schema, 0)
    assert reopened.live_count == 1000
    reopened.close()
