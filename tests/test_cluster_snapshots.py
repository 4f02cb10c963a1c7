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

import numpy as np
import pytest

from braid.cluster.v1 import shard_pb2 as spb
from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.service.cluster.snapshot_objects import SnapshotObjects
from tests.clusterkit import cluster_link, damage_object, local_cluster, print_logs  # noqa: F401

from .test_cluster_faults import (
    COLLECTION,
    RPC_TIMEOUT_S,
    SHARDS,
    Ledger,
    ShardServerView,
    _bulk,
    _check_replicas,
    _create,
    _router_versions,
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
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()
