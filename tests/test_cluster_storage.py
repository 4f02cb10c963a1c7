"""Cluster mode, storage faults on one replica, on real processes (the cases owed from the
cluster issue, issue 20): the same guarantees as a standalone server.

1. A replica's disk fills up (a real tmpfs under one shard server's data directory): writes go
   on through the log or fail cleanly, none acknowledged is lost, reads through the router are
   correct, the full replica never answers for a log sequence it has not applied, and once
   space is freed it catches up and holds every acknowledged write. Then it is killed and
   restarted on the full disk: it answers correctly or UNAVAILABLE, never part of its data.
2. A flipped byte in a replica's checkpoint file (one replica's sealed HNSW graph, the other's
   payload column): the replica is quarantined (its directory moved aside) and rebuilt from the
   log; it never serves from the damaged file.

The cluster is tests/test_cluster_faults.py's (2 shards, replication factor 2, 2 shard servers).
"""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import pytest

from braid.cluster.v1 import shard_pb2 as spb
from braid.index.collection import shard_of
from braid.service.client import BraidClient
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster, print_logs  # noqa: F401

from .test_cluster_faults import (
    CATCH_UP_S,
    COLLECTION,
    RPC_TIMEOUT_S,
    SHARDS,
    Ledger,
    ShardServerView,
    _bulk,
    _check_replicas,
    _chunks,
    _code,
    _create,
    _doc,
    _log_ends,
    _router_versions,
    _schema,
    _version,
    _wait_replicas_agree,
)
from .test_disk_full import fill, small_tmpfs

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CLEAN_WRITE_FAILURES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
CLEAN_READ_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _by_shard(ids: list[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for doc_id in ids:
        out.setdefault(shard_of(doc_id, SHARDS), []).append(doc_id)
    return out


def _text_schema() -> pb.Schema:
    """tests/test_cluster_faults.py's schema and a text field: applying a write needs disk (tantivy)."""
    schema = _schema()
    schema.text_fields.add(name="body")
    return schema


def _text_doc(doc_id: str, version: int) -> pb.Document:
    doc = _doc(doc_id, version)
    doc.text["body"] = f"{doc_id.replace('-', '')} common v{version} " + "filler " * 30
    return doc


def _upsert_each(client: BraidClient, ledger: Ledger, ids: list[str], version: int) -> list[grpc.StatusCode]:
    """Unary upserts of 50 documents; every failure must be a clean one (never INTERNAL, never a hang)."""
    failures = []
    for chunk in _chunks(ids, 50):
        ledger.sent(chunk, version)
        request = pb.UpsertRequest(collection=COLLECTION, documents=[_text_doc(i, version) for i in chunk])
        started = time.monotonic()
        try:
            client.stub.Upsert(request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as err:
            assert _code(err) in CLEAN_WRITE_FAILURES, f"{_code(err).name} {err.details()}"
            assert time.monotonic() - started < RPC_TIMEOUT_S + 5, "a write outlived its deadline"
            failures.append(_code(err))
            continue
        ledger.ack(chunk, version)
    return failures


def _check_router_reads(client: BraidClient, ledger: Ledger) -> None:
    """Reads through the router hold every acknowledged write (the router's read-your-writes)."""
    with ledger.lock:
        ids = sorted(ledger.acked)
    ledger.check(_router_versions(client.stub, ids), ids, "router")


def _replica_answers_correctly_or_refuses(view: ShardServerView, uid: str, ledger: Ledger, seq_of: list[int]) -> int:
    """Direct Gets on one shard server's replicas, asking for the log's end (``min_seq``): either
    UNAVAILABLE / DEADLINE_EXCEEDED, or every acknowledged write. Returns how many answered."""
    answered = 0
    with ledger.lock:
        ids = sorted(ledger.acked)
    for n, shard_ids in _by_shard(ids).items():
        ref = spb.ReplicaRef(collection=COLLECTION, uid=uid, shard=n)
        found: dict[str, int] = {}
        try:
            for chunk in _chunks(shard_ids):
                request = spb.ShardGetRequest(replica=ref, ids=chunk, min_seq=seq_of[n])
                for doc in view.stub.Get(request, timeout=5).documents:
                    found[doc.id] = _version(doc)
        except grpc.RpcError as err:
            assert _code(err) in CLEAN_READ_FAILURES, f"{view.name} shard {n}: {_code(err).name} {err.details()}"
            continue
        ledger.check(found, shard_ids, f"{view.name} replica of shard {n} (min_seq {seq_of[n]})")
        answered += 1
    return answered


def test_a_replicas_disk_fills_up(local_cluster, tmp_path: Path) -> None:  # noqa: F811
    root = tmp_path / "cluster"
    root.mkdir()
    with small_tmpfs(root / "shard-1", "48m") as disk:
        cluster = local_cluster(
            shard_servers=2, routers=1, nats_nodes=1, directory=root, env={"BRAID_MIN_FREE_BYTES": "0"}
        )
        client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
        try:
            ledger = Ledger()
            info = client.create_collection(COLLECTION, _text_schema(), shards=SHARDS, replication_factor=2)
            assert info.replication_factor == 2
            ids = [f"doc-{i}" for i in range(3000)]
            assert not _upsert_each(client, ledger, ids[:1000], 0)
            _wait_replicas_agree(cluster)

            fill(disk / "filler")
            failures = _upsert_each(client, ledger, ids[1000:2000], 0)
            failures += _upsert_each(client, ledger, ids[:500], 1)  # replacements: a lost one shows as v0
            try:
                client.flush(COLLECTION)  # the full replica cannot checkpoint: a clean error, nothing lost
            except grpc.RpcError as err:
                assert _code(err) in CLEAN_WRITE_FAILURES, f"{_code(err).name} {err.details()}"
            print(f"\n[full replica] {len(failures)} clean write failures: {sorted({f.name for f in failures})}")
            assert ledger.acknowledged_docs() >= 1000
            _check_router_reads(client, ledger)
            uid, ends = _log_ends(cluster)
            with ShardServerView(cluster, 1) as view:
                statuses = view.status()
                print(f"[full replica] shard-1: {[(n, s.applied_seq, s.problem[:120]) for n, s in statuses.items()]}")
                assert any("disk full" in s.problem for s in statuses.values()), statuses
                _replica_answers_correctly_or_refuses(view, uid, ledger, ends)

            (disk / "filler").unlink()
            _check_replicas(cluster, ledger)  # caught up: both replicas hold every acknowledged write
            _check_router_reads(client, ledger)

            # kill -9, then a restart on a full disk: correct answers or UNAVAILABLE, never part of the data.
            _upsert_each(client, ledger, ids[2000:3000], 0)
            cluster.shards[1].kill()
            fill(disk / "filler")
            cluster.shards[1].restart()
            uid, ends = _log_ends(cluster)
            with ShardServerView(cluster, 1) as view:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    _replica_answers_correctly_or_refuses(view, uid, ledger, [0] * SHARDS)
                    # Status tells the truth too: a replica whose replay the disk stopped is not caught up.
                    for n, status in view.status().items():
                        assert not status.caught_up or status.applied_seq >= ends[n], (
                            f"shard {n}: says caught up at seq {status.applied_seq} of {ends[n]} ({status.problem})"
                        )
                    time.sleep(0.5)
                _replica_answers_correctly_or_refuses(view, uid, ledger, ends)
            _check_router_reads(client, ledger)
            (disk / "filler").unlink()
            _check_replicas(cluster, ledger)
        except BaseException:
            print_logs(cluster)
            raise
        finally:
            client.close()
            cluster.stop()


def _newest_generation(replica: Path) -> Path | None:
    """The replica's newest checkpoint generation (``segments/<gen>/``; a ``.tmp`` one is being written)."""
    generations = [path for path in replica.glob("segments/[0-9]*") if path.name.isdigit()]
    return max(generations, key=lambda path: int(path.name), default=None)


def _checkpoint_file(replica: Path, pattern: str) -> Path | None:
    newest = _newest_generation(replica)
    found = sorted(newest.glob(pattern)) if newest is not None else []
    return found[0] if found else None


def _rebuilt(view: ShardServerView, ends: list[int]) -> bool:
    """Whether the server's replica of every shard is caught up to ``ends`` and serving."""
    try:
        statuses = view.status()
    except grpc.RpcError as err:
        assert _code(err) in CLEAN_READ_FAILURES, f"{view.name}: Status: {_code(err).name} {err.details()}"
        return False
    return set(statuses) == set(range(SHARDS)) and all(
        s.caught_up and not s.problem and s.applied_seq >= ends[n] for n, s in statuses.items()
    )


def test_a_flipped_byte_in_a_replicas_checkpoint_is_quarantined_and_rebuilt(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1)
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    try:
        ledger = Ledger()
        _create(client)
        # 2,000 documents and 300 replaced: over 1,024 rows (HnswStrand's SEAL_ROWS) on each shard,
        # so each replica seals an HNSW graph and its checkpoint holds an emb.g<id>.hnsw file.
        ids = [f"doc-{i}" for i in range(2500)]
        _bulk(client, ledger, ids[:2000])
        _bulk(client, ledger, ids[:300], version=1)
        _wait_replicas_agree(cluster)
        data = cluster.directory / cluster.shards[1].name / "replicas"
        replicas = sorted(data.glob(f"{COLLECTION}-*/shard-*"))
        assert len(replicas) == SHARDS, replicas
        # Every replica checkpoints: its files hold the documents now. The sealer builds the graph in
        # the background: checkpoint again until shard server 1's newest generations hold one.
        deadline = time.monotonic() + CATCH_UP_S
        while True:
            client.flush(COLLECTION)
            if all(_checkpoint_file(replica, "emb.g*.hnsw") is not None for replica in replicas):
                break
            assert time.monotonic() < deadline, f"no sealed HNSW graph in a checkpoint of {replicas}"
            time.sleep(0.2)
        _bulk(client, ledger, ids[2000:], version=0)  # and a tail of the log after the checkpoint
        _, uid, _ = _wait_replicas_agree(cluster)
        assert cluster.shards[1].stop() == 0
        _, ends = _log_ends(cluster)

        flipped = []
        for replica, pattern in zip(replicas, ("emb.g*.hnsw", "payload-tag.codes.npy"), strict=True):
            path = _checkpoint_file(replica, pattern)
            assert path is not None, f"no {pattern} in the newest checkpoint of {replica}"
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0x10
            path.write_bytes(bytes(raw))
            flipped.append(path)

        restarted = len(cluster.shards[1].output)
        cluster.shards[1].restart()
        deadline = time.monotonic() + CATCH_UP_S
        with ShardServerView(cluster, 1) as view:
            while True:  # while it rebuilds: correct or refused, never wrong
                _replica_answers_correctly_or_refuses(view, uid, ledger, [0] * SHARDS)
                if _rebuilt(view, ends):
                    break
                assert time.monotonic() < deadline, f"{view.name} did not rebuild within {CATCH_UP_S:.0f} s"
                time.sleep(0.3)
        _check_replicas(cluster, ledger)  # rebuilt: every acknowledged write, the latest version
        _check_router_reads(client, ledger)
        aside = sorted(p.name for p in data.glob(f"{COLLECTION}-*/shard-*.quarantined-*"))
        assert len(aside) == len(flipped), f"the damaged replicas were not moved aside: {aside}"
        log = "".join(cluster.shards[1].output[restarted:])
        assert all(path.name in log for path in flipped), log
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()
