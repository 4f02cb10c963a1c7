"""Recovery: quarantine of a collection that cannot open, the port bound before recovery, bounded replay."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.index.catalog import Catalog
from braid.index.policy import StoragePolicy
from braid.index.records import DocumentWrite
from braid.index.shard import Shard
from braid.service.convert import schema_from_proto
from braid.v1 import braid_pb2 as pb

from .conftest import LISTENING, random_vectors, schema, start_in_process, stop_in_process

DIM = 8


def _docs(n: int, start: int = 0, text: str = "") -> list[dict]:
    vectors = random_vectors(n, DIM, seed=start)
    return [
        {"id": f"d{start + i}", "text": {"body": f"document {start + i} {text}"}, "dense": {"emb": v}}
        for i, v in enumerate(vectors)
    ]


def _damage(collection_dir: Path) -> Path:
    """Make a collection unopenable: garbage over its newest checkpoint's ids.json."""
    victims = sorted(collection_dir.glob("shard-000/segments/*/ids.json"))
    assert victims, "the collection has no checkpoint to damage"
    victims[-1].write_bytes(b"\x00garbage{")
    return victims[-1]


def test_a_collection_that_cannot_open_is_quarantined_and_the_rest_serve(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server, running = start_in_process(data)
    running.client.create_collection("good", schema(dim=DIM))
    running.client.create_collection("bad", schema(dim=DIM))
    running.client.upsert("good", _docs(30))
    running.client.upsert("bad", _docs(30))
    running.client.flush("bad")
    stop_in_process(server, running)
    _damage(data / "collections" / "bad")

    server, running = start_in_process(data)
    try:
        hits = running.client.search("good", bm25="document 7", limit=3)
        assert hits[0].id == "d7"  # the healthy collection serves
        listed = {info.name: info for info in running.client.list_collections()}
        assert set(listed) == {"good", "bad"}
        assert listed["good"].error == "" and listed["good"].documents == 30
        assert "quarantined" in listed["bad"].error and listed["bad"].shards == 1
        for call in (
            lambda: running.client.search("bad", bm25="document", limit=3),
            lambda: running.client.get("bad", ["d1"]),
            lambda: running.client.get_collection("bad"),
            lambda: running.client.upsert("bad", _docs(1)),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION)
            assert "collection 'bad' is quarantined" in info.value.details()
            assert "bad" in info.value.details() and "braid verify" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            running.client.create_collection("bad", schema(dim=DIM))
        assert info.value.code() is grpc.StatusCode.ALREADY_EXISTS
        running.client.delete_collection("bad")  # the operator's way out
        assert [c.name for c in running.client.list_collections()] == ["good"]
        running.client.create_collection("bad", schema(dim=DIM))
        running.client.upsert("bad", _docs(3))
        assert running.client.count("bad") == 3
    finally:
        stop_in_process(server, running)


def test_a_clean_stop_checkpoints_so_the_next_start_replays_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server, running = start_in_process(data)
    running.client.create_collection("c", schema(dim=DIM), shards=2)
    for start in range(0, 200, 50):
        running.client.upsert("c", _docs(50, start))
    stop_in_process(server, running)
    catalog = Catalog(data)
    try:
        assert catalog.recovery.done and catalog.recovery.log_bytes_replayed == 0
        assert catalog.recovery.shards_open == catalog.recovery.shards_total == 2
        assert catalog.get("c").count() == 200
    finally:
        catalog.close()


def test_checkpoints_come_by_log_size_and_by_age(tmp_path: Path) -> None:
    text_only = schema_from_proto(pb.Schema(text_fields=[pb.TextField(name="body")]))

    def write(shard: Shard, i: int) -> None:
        shard.upsert([DocumentWrite(id=f"d{i}", text={"body": "x " * 50})])

    def generation(path: Path) -> int:
        manifest = path / "MANIFEST.json"
        return int(json.loads(manifest.read_text())["generation"]) if manifest.exists() else 0

    by_size = Shard.open(tmp_path / "size", text_only, 0, StoragePolicy(checkpoint_log_bytes=2_000))
    try:
        for i in range(30):
            write(by_size, i)
        _eventually(lambda: generation(tmp_path / "size") >= 1)
    finally:
        by_size.close()

    by_age = Shard.open(tmp_path / "age", text_only, 0, StoragePolicy(checkpoint_interval_s=0.3))
    try:
        write(by_age, 0)
        assert generation(tmp_path / "age") == 0  # young and small: no checkpoint yet
        time.sleep(0.4)
        write(by_age, 1)
        _eventually(lambda: generation(tmp_path / "age") >= 1)
    finally:
        by_age.close()


def _eventually(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.05)


def test_port_answers_during_recovery_with_progress_then_serves(child_server, tmp_path: Path) -> None:
    """A big unchecked-pointed log (kill -9 before any checkpoint): the port answers at once,
    health says NOT_SERVING and calls UNAVAILABLE "recovering: ..." until replay ends."""
    data = tmp_path / "data"
    no_checkpoints = {"BRAID_CHECKPOINT_LOG_BYTES": str(1 << 40), "BRAID_CHECKPOINT_INTERVAL_S": "100000"}
    server = child_server(data, env=no_checkpoints)
    server.client.create_collection("c", schema(dim=DIM), shards=2)
    for start in range(0, 6000, 500):
        server.client.upsert("c", _docs(500, start, text="lorem ipsum " * 40))
    server.kill()

    server = child_server(data, ready=LISTENING)
    health = health_pb2_grpc.HealthStub(server.client.channel)
    seen_recovering = False
    end = time.monotonic() + 120
    while time.monotonic() < end:
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
        if status == health_pb2.HealthCheckResponse.SERVING:
            break
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            server.client.stub.ListCollections(pb.ListCollectionsRequest(), timeout=5)
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.UNAVAILABLE
            assert re.search(r"recovering: \d+ of 2 shards open, \d+% of [\d.]+ MB of log replayed", err.details())
            seen_recovering = True
        time.sleep(0.05)
    assert seen_recovering, "recovery ended before a call could see it"
    assert server.client.count("c") == 6000
    assert server.stop() == 0


def test_replay_after_kill_is_bounded_by_the_checkpoint_policy(child_server, tmp_path: Path) -> None:
    """8 MB of writes with checkpoints every 1 MB of log: a kill -9 leaves about 1 MB to replay, not 8."""
    data = tmp_path / "data"
    policy = {"BRAID_CHECKPOINT_LOG_BYTES": str(1 << 20)}
    server = child_server(data, env=policy)
    server.client.create_collection("c", schema(dim=DIM))
    for start in range(0, 4000, 200):
        server.client.upsert("c", _docs(200, start, text="lorem ipsum " * 80))
    wal = sum(p.stat().st_size for p in data.glob("collections/c/shard-*/wal/*"))
    assert wal > 4 << 20, "too little log written to test the bound"
    server.kill()

    server = child_server(data, env=policy)  # ready once recovery is done, which it logged first
    log = "".join(server.output)
    found = re.search(r"recovery done in [\d.]+ s, ([\d.]+) MB of log replayed", log)
    assert found, log
    # the threshold, plus what was written while the last checkpoint ran, plus one batch
    assert float(found.group(1)) < 3.0, found.group(0)
    server.stop()


def test_one_process_serves_a_data_directory_at_a_time(child_server, tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = child_server(data)
    with pytest.raises(RuntimeError) as second:
        child_server(data)
    assert "server exited with 2" in str(second.value)
    assert "is in use by another Braid process" in str(second.value) and f"pid {first.proc.pid}" in str(second.value)
    verify = subprocess.run(
        [sys.executable, "-m", "braid.service.cli", "verify", str(data)], capture_output=True, text=True, timeout=60
    )
    assert verify.returncode == 2 and "LOCK is held" in verify.stdout + verify.stderr
    assert first.stop() == 0
    again = child_server(data)  # a clean stop (and a kill -9: the flock dies with its holder) frees it
    again.kill()
    child_server(data).stop()
