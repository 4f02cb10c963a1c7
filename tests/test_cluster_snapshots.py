"""Cluster snapshots in the object store, replica bootstrap from them and log trimming, on real
processes (NATS, shard servers, a router: tests/clusterkit.py), with tests/test_cluster_faults.py's
collection (2 shards, replication factor 2, 2 shard servers).

1. A wiped replica comes back from the newest valid snapshot plus the log tail, with every
   acknowledged write, although the log was trimmed below the snapshots (a replay from
   sequence 1 could not have rebuilt it); a snapshot damaged in the object store is skipped
   for the one before it, with a WARNING naming it.
2. A replica stopped while snapshots and a trim ran past its position bootstraps at restart.
3. Under a steady write load with a small BRAID_SNAPSHOT_LOG_BYTES the stream stays bounded.
4. kill -9 in the middle of a snapshot upload leaves no object a restore would take, and the
   next snapshot works.
"""

from __future__ import annotations

import shutil
import signal
import threading
import zlib

import grpc
import numpy as np
import pytest

from braid.cluster.v1 import shard_pb2 as spb
from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.service.cluster.snapshot_objects import BUCKET, SnapshotObjects
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import cluster_link, damage_object, local_cluster, print_logs  # noqa: F401
from tests.conftest import wait_for

from .test_cluster_faults import (
    CATCH_UP_S,
    COLLECTION,
    RPC_TIMEOUT_S,
    SHARDS,
    Ledger,
    ShardServerView,
    _bulk,
    _check_replicas,
    _create,
    _doc,
    _router_versions,
    _schema,
    _wait_replicas_agree,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
SNAPSHOT_TIMEOUT_S = 60.0


def _ref(uid: str, shard: int) -> spb.ReplicaRef:
    return spb.ReplicaRef(collection=COLLECTION, uid=uid, shard=shard)


def _snapshot(cluster: LocalCluster, server: int, uid: str, shard: int) -> spb.SnapshotResponse:
    with ShardServerView(cluster, server) as view:
        return view.stub.Snapshot(spb.SnapshotRequest(replica=_ref(uid, shard)), timeout=SNAPSHOT_TIMEOUT_S)


def _first_kept(link, uid: str, shard: int) -> int:  # type: ignore[no-untyped-def]
    """The sequence of the first record the shard's subject still holds (0: none)."""
    import nats.js.errors

    async def first() -> int:
        try:
            return int((await link.js.get_msg(f"BRAID_{uid}", seq=1, subject=f"braid.{uid}.{shard}", next=True)).seq)
        except nats.js.errors.NotFoundError:
            return 0

    return link.call(first(), 10.0)


def _same_searches(cluster: LocalCluster, uid: str, queries: np.ndarray) -> None:
    """Both servers' replicas of every shard rank the same documents for each query (a beam as
    wide as the shard: exhaustive), and Count agrees."""
    answers = []
    for server in range(len(cluster.shards)):
        with ShardServerView(cluster, server) as view:
            found = []
            for n in range(SHARDS):
                request = spb.ShardDenseRequest(
                    replica=_ref(uid, n), field="emb", vectors=queries.astype("<f4").tobytes(), k=5, ef=2048
                )
                response = view.stub.SearchDense(request, timeout=RPC_TIMEOUT_S)
                found.append([list(r.ids) for r in response.results])
                count = view.stub.Count(spb.ShardCountRequest(replica=_ref(uid, n)), timeout=RPC_TIMEOUT_S).count
                found.append([[str(count)]])
            answers.append(found)
    assert answers[0] == answers[1], "the rebuilt replicas answer searches or counts differently"


def _wipe_and_restart(cluster: LocalCluster, server: int) -> int:
    """kill -9 a shard server, remove its data directory, start it again; where its new output begins."""
    cluster.shards[server].kill()
    shutil.rmtree(cluster.directory / cluster.shards[server].name)
    began = len(cluster.shards[server].output)
    cluster.shards[server].restart()
    return began


def test_a_wiped_replica_restores_the_newest_valid_snapshot_after_a_trim(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1)
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    try:
        ledger = Ledger()
        _create(client)
        ids = [f"doc-{i}" for i in range(2400)]
        _bulk(client, ledger, ids[:1000])
        _, uid, _ = _wait_replicas_agree(cluster)
        with pytest.raises(grpc.RpcError) as refused:  # no such replica here: UNAVAILABLE naming the shard
            _snapshot(cluster, 0, "feedfacecafe", 1)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "shard 1" in refused.value.details()
        first = [_snapshot(cluster, 0, uid, n) for n in range(SHARDS)]
        _bulk(client, ledger, ids[1000:1800])
        _bulk(client, ledger, ids[:300], version=1)
        _wait_replicas_agree(cluster)
        second = [_snapshot(cluster, 0, uid, n) for n in range(SHARDS)]
        _bulk(client, ledger, ids[1800:])  # the log tail after the newest snapshots
        _bulk(client, ledger, ids[200:400], version=2)
        for old, new in zip(first, second, strict=True):
            assert 0 < old.seq < new.seq and old.object != new.object and new.bytes > 0

        with cluster_link(cluster) as link:
            objects = SnapshotObjects(link, 1)
            for n in range(SHARDS):
                listed = [o.name for o in objects.replica_snapshots(uid, n)]
                assert listed == [first[n].object, second[n].object], listed
                # trimmed below the oldest snapshot kept: replaying from sequence 1 cannot rebuild the shard
                assert _first_kept(link, uid, n) == first[n].seq
                assert objects.trim_point(uid, n) == first[n].seq
            damage_object(link, second[0].object)  # shard 0's newest: only its predecessor is valid

        began = _wipe_and_restart(cluster, 1)
        _check_replicas(cluster, ledger)  # every acknowledged write, latest version, on both replicas
        assert ledger.acknowledged_docs() == len(ids)
        queries = np.random.default_rng(5).standard_normal((8, 16)).astype(np.float32)
        _same_searches(cluster, uid, queries)
        assert _router_versions(client.stub, ids[:50]) == {i: ledger.acked[i] for i in ids[:50]}
        log = "".join(cluster.shards[1].output[began:])
        assert f"snapshot {second[0].object} skipped" in log and "WARNING" in log, log[-3000:]
        assert f"restored snapshot {first[0].object}" in log, log[-3000:]
        assert f"restored snapshot {second[1].object}" in log, log[-3000:]
        with ShardServerView(cluster, 1) as view:
            restored = {n: status.restored_from for n, status in view.status().items()}
        assert restored == {0: first[0].object, 1: second[1].object}, restored
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()


def test_a_replica_stopped_while_the_log_was_trimmed_past_it_bootstraps(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1)
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    try:
        ledger = Ledger()
        _create(client)
        ids = [f"doc-{i}" for i in range(1500)]
        _bulk(client, ledger, ids[:500])
        _, uid, before = _wait_replicas_agree(cluster)
        stopped_at = [before[1][n].applied_seq for n in range(SHARDS)]
        assert cluster.shards[1].stop() == 0  # a checkpoint at its position; it replays after it at restart
        _bulk(client, ledger, ids[500:1000])
        _snapshot(cluster, 0, uid, 0)
        _bulk(client, ledger, ids[1000:], batch=100)
        _bulk(client, ledger, ids[:100], version=1)
        kept = [_snapshot(cluster, 0, uid, n) for n in range(SHARDS)]
        with cluster_link(cluster) as link:
            # shard 0: two snapshots since the stop, trimmed below the older one, past the stopped replica
            assert _first_kept(link, uid, 0) > stopped_at[0] + 1
        began = len(cluster.shards[1].output)
        cluster.shards[1].restart()
        _check_replicas(cluster, ledger)
        log = "".join(cluster.shards[1].output[began:])
        assert "the log was trimmed below sequence" in log, log[-3000:]
        assert f"restored snapshot {kept[0].object}" in log, log[-3000:]

        # No snapshot left and a trimmed log: the wiped replica must not open (a replay from sequence 1
        # would miss the trimmed records); it says why. The other shard's replica is unaffected.
        with cluster_link(cluster) as link:
            objects = SnapshotObjects(link, 1)
            for obj in objects.replica_snapshots(uid, 0):
                objects.delete(obj.name)
        _wipe_and_restart(cluster, 1)
        with ShardServerView(cluster, 1) as view:
            statuses: dict[int, spb.ReplicaStatus] = {}

            def settled() -> bool:
                statuses.update(view.status())
                return "no valid snapshot" in statuses.get(0, spb.ReplicaStatus()).problem and statuses[1].caught_up

            wait_for(settled, CATCH_UP_S, "the replica of shard 0 to refuse to open")
            assert not statuses[0].caught_up and statuses[0].applied_seq == 0, statuses[0]
            ref = _ref(uid, 0)
            with pytest.raises(grpc.RpcError) as refused:
                view.stub.Count(spb.ShardCountRequest(replica=ref), timeout=RPC_TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()


def test_the_log_stays_bounded_under_a_steady_write_load(local_cluster) -> None:  # noqa: F811
    log_bytes = 32 * 1024  # about 9 records of a shard
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1, env={"BRAID_SNAPSHOT_LOG_BYTES": str(log_bytes)})
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    try:
        ledger = Ledger()
        _create(client)
        ids = [f"doc-{i}" for i in range(1000)]
        batches = 400  # two log records each (one per shard), about 3.5 KiB apiece
        samples: list[dict[str, int]] = []
        with cluster_link(cluster) as link:
            objects = SnapshotObjects(link, 1)
            uid = ""
            for number in range(batches):
                chunk = [ids[(number * 50 + i) % len(ids)] for i in range(50)]
                ledger.sent(chunk, number)
                request = pb.UpsertRequest(collection=COLLECTION, documents=[_doc(i, number) for i in chunk])
                client.stub.Upsert(request, timeout=RPC_TIMEOUT_S)
                ledger.ack(chunk, number)
                if number == 0:
                    _, uid, _ = _wait_replicas_agree(cluster)
                if number % 20 == 19:
                    samples.append(objects.stream_state(f"BRAID_{uid}"))
            written = samples[-1]["last_seq"]
            record_bytes = samples[0]["bytes"] / samples[0]["messages"]
            print(f"\n[steady load] {written} records written, ~{record_bytes:.0f} bytes each; stream samples:")
            print("  " + ", ".join(f"{s['messages']} msgs / {s['bytes']} B" for s in samples))
            # Untrimmed, the stream would hold all it was sent. Trimmed, it holds per shard the records
            # since the older of its two snapshots: 2 x log_bytes, and what arrived while the next one
            # was taken (this load writes as fast as the router acknowledges): none of it grows with
            # the records written.
            assert written >= 2 * batches
            late = samples[len(samples) // 2 :]
            assert max(s["messages"] for s in late) <= written / 4, f"the stream kept growing: {late}"
            assert max(s["bytes"] for s in late) <= written * record_bytes / 4, late
            assert late[-1]["first_seq"] > written / 2, f"not trimmed lately: {late[-1]}"
            for n in range(SHARDS):
                # older snapshots are deleted (a third exists while the next one is taken)
                wait_for(lambda n=n: len(objects.replica_snapshots(uid, n)) <= 2, CATCH_UP_S, f"shard {n}: 2 kept")
                assert objects.trim_point(uid, n) > written / 2
        _check_replicas(cluster, ledger)
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()


BIG_DIM = 512


def _big_doc(doc_id: str, version: int) -> pb.Document:
    vector = np.random.default_rng(zlib.crc32(f"{doc_id}@{version}".encode())).standard_normal(BIG_DIM)
    return pb.Document(
        id=doc_id,
        dense={"emb": pb.DenseVector(packed=vector.astype("<f4").tobytes())},
        payload={"tag": pb.Value(keyword=f"{doc_id}@{version}")},
    )


def test_kill9_in_the_middle_of_a_snapshot_upload(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1)
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    try:
        ledger = Ledger()
        schema = _schema()
        schema.dense_fields[0].dim = BIG_DIM
        client.create_collection(COLLECTION, schema, shards=SHARDS, replication_factor=2)
        ids = [f"doc-{i}" for i in range(6000)]  # about 6 MiB of vectors per shard: dozens of object chunks
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            ledger.sent(chunk, 0)
            request = pb.UpsertRequest(collection=COLLECTION, documents=[_big_doc(i, 0) for i in chunk])
            client.stub.Upsert(request, timeout=60)
            ledger.ack(chunk, 0)
        _, uid, _ = _wait_replicas_agree(cluster)
        victim = cluster.shards[0]
        seen = {"chunks": 0, "metas": 0}
        killed = threading.Event()

        with cluster_link(cluster) as link:
            objects = SnapshotObjects(link, 1)
            objects.ensure()

            async def on_chunk(msg) -> None:  # type: ignore[no-untyped-def]
                seen["chunks"] += 1
                if not killed.is_set():
                    killed.set()
                    victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]

            async def on_meta(msg) -> None:  # type: ignore[no-untyped-def]
                if not killed.is_set() or seen["chunks"]:
                    seen["metas"] += 1

            async def subscribe() -> list:  # type: ignore[type-arg]
                return [
                    await link.nc.subscribe(f"$O.{BUCKET}.C.>", cb=on_chunk),
                    await link.nc.subscribe(f"$O.{BUCKET}.M.>", cb=on_meta),
                ]

            subscriptions = link.call(subscribe(), 10.0)
            link.call(link.nc.flush(), 10.0)
            with pytest.raises(grpc.RpcError):  # the server died under the call
                _snapshot(cluster, 0, uid, 0)
            assert killed.wait(10), "the snapshot's upload never began"
            victim.kill()  # reaped
            for sub in subscriptions:
                link.call(sub.unsubscribe(), 5.0)
            print(f"\n[kill -9 mid-upload] {seen['chunks']} chunks seen, {seen['metas']} meta messages")
            assert seen["metas"] == 0, "the upload completed before the kill landed: no half object to test"
            assert objects.replica_snapshots(uid, 0) == [], "a half-uploaded snapshot is listed"
            # its chunks are swept once old enough (a replica sweeps those 10 minutes old: now, here)
            before = objects.stream_state(f"OBJ_{BUCKET}")["messages"]
            assert len(objects.sweep_orphans(older_than_s=0)) == 1
            assert objects.stream_state(f"OBJ_{BUCKET}")["messages"] < before

            victim.restart()
            _wait_replicas_agree(cluster)
            leftovers = list((cluster.directory / victim.name / "replicas").glob("*/.snapshot-*"))
            assert leftovers == [], f"the killed snapshot's scratch directory was left: {leftovers}"
            taken = _snapshot(cluster, 0, uid, 0)  # the next snapshot works
            listed = objects.replica_snapshots(uid, 0)
            assert [o.name for o in listed] == [taken.object]
            began = _wipe_and_restart(cluster, 1)
            _check_replicas(cluster, ledger)
            log = "".join(cluster.shards[1].output[began:])
            assert f"restored snapshot {taken.object}" in log, log[-3000:]
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()
