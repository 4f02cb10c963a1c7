"""Users' snapshots of a cluster through the router (service/cluster/router/snapshots.py), on real
processes (NATS, 2 shard servers, a router: tests/clusterkit.py) with tests/test_snapshots.py's
collection (2 shards, replication factor 2, every search shape).

1. CreateSnapshot, ListSnapshots, RestoreSnapshot (over a name without and with replace),
   DeleteSnapshot through the router: a restored collection answers every search, Count and Get
   as the original did at the snapshot, and takes writes; the admin role is needed.
2. A cluster's export imports into a standalone server and restores there with equal answers,
   and a standalone export imports into the cluster and restores with equal answers.
3. kill -9 of a shard server while it lays a snapshot into a replica: after its restart that
   replica has every document; a byte flipped in a shard object makes a restore DATA_LOSS
   naming the object, and leaves no collection behind; a restored shard takes a snapshot of its
   own at once, so a replica rebuilt after the user's snapshot is deleted comes back from it.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from braid.cluster.v1 import shard_pb2 as spb
from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.service.cluster.snapshot_objects import SnapshotObjects
from tests.clusterkit import cluster_link, damage_object, local_cluster, print_logs  # noqa: F401
from tests.conftest import start_in_process, stop_in_process, wait_for

from .test_cluster_faults import ShardServerView
from .test_snapshots import ADMIN_KEY, WRITE_KEY, _keys_file, answers, change, code, doc, full_schema, load

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
TIMEOUT_S = 120.0  # every call's deadline: a loaded 2-core machine runs 2 shard servers and NATS
SETTLE_S = 60.0


def _scratch(cluster: LocalCluster) -> Path:
    return cluster.directory / cluster.routers[0].name / "snapshot-scratch"


def _replicas(cluster: LocalCluster, server: int, collection: str) -> list[Any]:
    """Shard server ``server``'s replicas of ``collection`` (its Status), [] while it cannot answer."""
    try:
        with ShardServerView(cluster, server) as view:
            status = view.stub.Status(spb.StatusRequest(), timeout=5.0)
    except grpc.RpcError:
        return []
    return [r for r in status.replicas if r.replica.collection == collection]


def test_a_snapshot_round_trips_through_the_router(local_cluster, tmp_path: Path) -> None:  # noqa: F811
    keys = _keys_file(tmp_path / "keys.json")
    cluster = local_cluster(shard_servers=2, routers=1, router_args=["--api-keys", str(keys)])
    client = BraidClient(cluster.router_address, timeout=TIMEOUT_S, api_key=ADMIN_KEY)
    try:
        load(client, "docs")
        before = answers(client, "docs")
        info = client.create_snapshot("docs")
        assert info.collection == "docs" and info.name.startswith("docs-") and info.format == 1
        assert info.documents == 55 and [s.shard for s in info.shards] == [0, 1] and info.size_bytes > 0
        assert all(s.sequence > 0 for s in info.shards)
        change(client, "docs")  # after the snapshot: not in it
        assert answers(client, "docs") != before

        assert [s.name for s in client.list_snapshots()] == [info.name]
        assert [s.name for s in client.list_snapshots("docs")] == [info.name]
        assert client.list_snapshots("other") == []

        restored = client.restore_snapshot(info.name, "back")
        assert (restored.name, restored.documents, restored.shards) == ("back", 55, 2)
        assert answers(client, "back") == before
        change(client, "back")  # it takes writes on its own new log
        assert answers(client, "back") == answers(client, "docs")

        assert code(lambda: client.restore_snapshot(info.name, "docs"))[0] == grpc.StatusCode.ALREADY_EXISTS
        client.restore_snapshot(info.name, "docs", replace=True)
        assert answers(client, "docs") == before
        assert sorted(c.name for c in client.list_collections()) == ["back", "docs"]

        writer = BraidClient(cluster.router_address, timeout=TIMEOUT_S, api_key=WRITE_KEY)
        try:
            assert code(lambda: writer.create_snapshot("docs"))[0] == grpc.StatusCode.PERMISSION_DENIED
            assert code(lambda: writer.list_snapshots())[0] == grpc.StatusCode.PERMISSION_DENIED
        finally:
            writer.close()

        # The restored collection keeps the snapshotted one's replication factor (not the default 2).
        client.create_collection("solo", full_schema(False), shards=1, replication_factor=1)
        client.upsert("solo", [doc(i) for i in range(5)])
        solo = client.create_snapshot("solo")
        again = client.restore_snapshot(solo.name, "solo-back")
        assert (again.replication_factor, again.documents) == (1, 5)
        client.delete_snapshot(solo.name)

        client.delete_snapshot(info.name)
        assert client.list_snapshots() == []
        assert code(lambda: client.delete_snapshot(info.name))[0] == grpc.StatusCode.NOT_FOUND
        assert code(lambda: client.restore_snapshot(info.name, "again"))[0] == grpc.StatusCode.NOT_FOUND
        assert code(lambda: client.create_snapshot("nowhere"))[0] == grpc.StatusCode.NOT_FOUND
        assert code(lambda: client.restore_snapshot("Bad Name", "again"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()


def test_exports_move_between_a_cluster_and_a_standalone_server(local_cluster, tmp_path: Path) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1)
    routed = BraidClient(cluster.router_address, timeout=TIMEOUT_S)
    server, running = start_in_process(tmp_path / "standalone")
    solo = BraidClient(f"127.0.0.1:{running.port}", timeout=TIMEOUT_S)
    try:
        load(routed, "docs")
        before = answers(routed, "docs")
        info = routed.create_snapshot("docs")
        archive = routed.export_snapshot(info.name, tmp_path / "cluster.tar")
        assert list(_scratch(cluster).iterdir()) == []  # the router's copy is gone with the stream
        solo.import_snapshot(archive)
        solo.restore_snapshot(info.name, "docs")
        assert answers(solo, "docs") == before

        load(solo, "solo")
        solo_before = answers(solo, "solo")
        mine = solo.create_snapshot("solo")
        routed.import_snapshot(solo.export_snapshot(mine.name, tmp_path / "standalone.tar"))
        assert [s.name for s in routed.list_snapshots("solo")] == [mine.name]
        assert code(lambda: routed.import_snapshot(tmp_path / "standalone.tar"))[0] == grpc.StatusCode.ALREADY_EXISTS
        routed.restore_snapshot(mine.name, "solo")
        assert answers(routed, "solo") == solo_before
        assert list(_scratch(cluster).iterdir()) == []
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        solo.close()
        routed.close()
        stop_in_process(server, running)


def test_kill_9_mid_restore_and_a_damaged_shard_object(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1)
    client = BraidClient(cluster.router_address, timeout=TIMEOUT_S)
    try:
        load(client, "docs")
        client.upsert("docs", [doc(i) for i in range(100, 400)])
        expected = client.count("docs")
        info = client.create_snapshot("docs")

        # kill -9 shard server 0 once it lays the snapshot into a replica (its scratch directory is there)
        replicas = cluster.directory / cluster.shards[0].name / "replicas"
        outcome: list[Any] = []
        call = threading.Thread(target=lambda: outcome.append(client.restore_snapshot(info.name, "back")))
        call.start()
        deadline = time.monotonic() + SETTLE_S
        while not list(replicas.glob("back-*/.restore-shard-*")):
            assert time.monotonic() < deadline and call.is_alive(), "shard server 0 never began to restore"
            time.sleep(0.001)
        cluster.shards[0].kill()
        assert list(replicas.glob("back-*/.restore-shard-*")), "killed after the restore, not during it"
        call.join(TIMEOUT_S)
        assert outcome and outcome[0].documents == expected  # shard server 1's replicas answered
        cluster.shards[0].restart()
        wait_for(
            lambda: (
                (found := _replicas(cluster, 0, "back"))
                and all(r.caught_up for r in found)
                and sum(r.documents for r in found) == expected
            ),
            SETTLE_S,
        )
        assert not list(replicas.glob("back-*/.restore-shard-*"))
        assert client.count("back") == expected

        with cluster_link(cluster) as link:
            damage_object(link, f"user/{info.name}/shard-001")
        status, details = code(lambda: client.restore_snapshot(info.name, "broken"))
        assert status == grpc.StatusCode.DATA_LOSS, details
        assert f"user/{info.name}/shard-001" in details, details
        assert "broken" not in [c.name for c in client.list_collections()]  # undone, not half there

        # A restored shard takes its first snapshot of its own at once, so a replica rebuilt after
        # the user's snapshot is deleted comes back from it (it would otherwise never open).
        uid = _replicas(cluster, 1, "back")[0].replica.uid
        with cluster_link(cluster) as link:
            objects = SnapshotObjects(link, 1)
            wait_for(lambda: {o.name.split("/")[2] for o in objects.list(f"auto/{uid}/")} == {"000", "001"}, SETTLE_S)
        client.delete_snapshot(info.name)
        cluster.shards[0].kill()
        shutil.rmtree(cluster.directory / cluster.shards[0].name)
        cluster.shards[0].restart()
        wait_for(
            lambda: (
                (found := _replicas(cluster, 0, "back"))
                and all(r.caught_up and not r.problem and r.restored_from.startswith("auto/") for r in found)
                and sum(r.documents for r in found) == expected
            ),
            SETTLE_S,
        )
        assert client.count("back") == expected
    except BaseException:
        print_logs(cluster)
        raise
    finally:
        client.close()
