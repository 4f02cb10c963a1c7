"""One seeded history run against a local cluster (real ``nats-server`` nodes, shard servers, routers).

The collection has ``shards`` shards with replication factor 2. Writers (both ack modes) and
STRONG readers call the routers at random while faults hit one process at a time: kill -9 and
a restart, or SIGSTOP and SIGCONT, of a shard server, a router or a NATS node (the NATS node
leading the collection's stream is chosen more often, as the issue's run did). The shard
servers snapshot each shard every ``snapshot_log_bytes`` of log (and every
SNAPSHOT_INTERVAL_S), trimming its subject below the older of its two newest snapshots, all
through the run; with ``snapshot_faults`` the menu also holds tests/history/snapshot_faults.py's:
a snapshot and trim on demand, kill -9 in a Snapshot call, a wiped disk (bootstrap from a
snapshot and the log tail), a byte-flipped newest snapshot before a wiped disk. After healing
(every process back, then every replica caught up with the end of its shard's subject as NATS
reports it), every key is read on every replica directly (braid.cluster.v1.Shard Get and Count
with ``min_seq=0``, so a replica that missed a write cannot hide behind the other) and through
every router (a STRONG search, Get and Count); the history and all of it are checked.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import grpc

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.index.collection import shard_of
from braid.service.cluster.local import LocalCluster
from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from ..clusterkit import log_ends
from . import faults as f
from .checker import Fault, Final, Report, check
from .model import ABSENT, Recorder
from .snapshot_faults import SnapshotFaults
from .workload import COLLECTION, Endpoint, Endpoints, Workload, keys_of, read_strong, schema, version_of

HEAL_S = 120.0  # processes back and replicas caught up within this, on a loaded 2-core machine
CALL_S = 10.0
# Small enough that each shard snapshots (and trims) every few seconds of the workload's writes
# (records of one document, ~200 bytes); the interval covers a shard that few writes reach.
SNAPSHOT_LOG_BYTES = 16 * 1024
SNAPSHOT_INTERVAL_S = 10.0


class ClusterRun:
    """The cluster, the workload and the injector of one run."""

    def __init__(
        self,
        directory: Path,
        seed: int,
        faults: int,
        keys: int,
        shard_servers: int,
        routers: int,
        shards: int,
        writers: int,
        readers: int,
        snapshot_faults: bool = True,
        snapshot_log_bytes: int = SNAPSHOT_LOG_BYTES,
    ) -> None:
        self.directory = directory
        self.seed, self.faults, self.keys, self.shards = seed, faults, keys_of(keys), shards
        self.writers, self.readers = writers, readers
        self.recorder = Recorder()
        self.report = Report(seed=seed, mode="cluster")
        self.cluster = LocalCluster(
            directory,
            shard_servers=shard_servers,
            routers=routers,
            nats_nodes=3,
            shard_args=["--checkpoint-interval-s", "2"],
            env={
                "BRAID_SNAPSHOT_LOG_BYTES": str(snapshot_log_bytes),
                "BRAID_SNAPSHOT_INTERVAL_S": str(SNAPSHOT_INTERVAL_S),
            },
        )
        self.snapshots = SnapshotFaults(self.cluster, self._start) if snapshot_faults else None
        try:
            self._setup()
        except BaseException:
            self.cluster.stop()
            raise

    def _setup(self) -> None:
        cluster = self.cluster
        self.endpoints = Endpoints(
            [
                Endpoint(router.name, lambda r=router: cluster.address_of(r) if r.alive and r.port else None)
                for router in cluster.routers
            ]
        )
        self.workload = Workload(
            self.endpoints,
            self.recorder,
            self.keys,
            self.seed,
            cluster=True,
            writers=self.writers,
            readers=self.readers,
        )
        self.injector = f.Injector(self._menu(), self.seed, self.faults, gap_s=(1.0, 3.0))
        self.injector.healers.append(lambda: f.continue_all(self._pids()))

    # ------------------------------------------------------------- faults

    def _menu(self) -> list[tuple[float, f.FaultFn]]:
        kill_hold, pause_hold = (0.5, 3.0), (1.0, 5.0)
        menu: list[tuple[float, f.FaultFn]] = []
        for child in self.cluster.shards + self.cluster.routers:
            weight = 1.0 if child in self.cluster.shards else 0.5
            menu.append((weight, f.kill9(child.name, child.kill, lambda c=child: self._start(c), kill_hold)))
            menu.append((weight / 2, f.pause(child.name, lambda c=child: c.proc.pid if c.alive else None, pause_hold)))
        menu.append((4.0, self._nats_fault("kill -9", kill_hold)))  # the faults behind findings 4 and 5
        menu.append((2.0, self._nats_fault("pause", pause_hold)))
        if self.snapshots is not None:
            menu += self.snapshots.menu(kill_hold)
        return menu

    @staticmethod
    def _start(child) -> None:  # type: ignore[no-untyped-def]
        child.start()
        child.wait_ready(HEAL_S)

    def _nats_fault(self, kind: str, hold_s: tuple[float, float]) -> f.FaultFn:
        """A NATS node, the collection stream's leader two times in three, killed or paused."""
        assert self.cluster.nats is not None
        nodes = self.cluster.nats.nodes

        def run(rng: random.Random) -> Fault:
            leader = _stream_leader(self.cluster)
            names = [node.name for node in nodes]
            if leader in names and rng.random() < 2 / 3:
                node, why = nodes[names.index(leader)], "the stream's leader"
            else:
                node = rng.choice(nodes)
                why = "the stream's leader" if node.name == leader else f"not the leader ({leader})"
            name = f"NATS {node.name}, {why}"
            if kind == "pause":
                return f.pause(name, lambda: node.pid if node.alive else None, hold_s)(rng)
            return f.kill9(name, node.kill, lambda: node.restart(timeout=HEAL_S), hold_s)(rng)

        return run

    def _pids(self) -> list[int | None]:
        assert self.cluster.nats is not None
        nodes = [node.pid for node in self.cluster.nats.nodes if node.alive]
        return nodes + [child.proc.pid for child in self.cluster.children if child.alive and child.proc]

    def heal(self) -> None:
        """Every process running and not stopped."""
        assert self.cluster.nats is not None
        f.continue_all(self._pids())
        for node in self.cluster.nats.nodes:
            if not node.alive:
                node.restart(timeout=HEAL_S)
        for child in self.cluster.children:
            if not child.alive:
                self._start(child)

    # ------------------------------------------------------------- the run

    def run(self, min_run_s: float) -> Report:
        report = self.report

        def setup() -> None:
            with grpc.insecure_channel(self.cluster.router_address) as channel:
                request = pb.CreateCollectionRequest(
                    name=COLLECTION, schema=schema(), shards=self.shards, replication_factor=2
                )
                braid_pb2_grpc.BraidStub(channel).CreateCollection(request, timeout=60)

        f.drive(report, setup, self.workload, self.injector, self.endpoints, 120.0, 120.0, min_run_s)
        finals: list[Final] = []
        replicas: dict[str, list[str]] = {}
        try:
            self.heal()
            waited, ends = self._wait_caught_up()
            report.notes.append(f"healed: every replica reached the log's end {ends} {waited:.1f} s after the run")
            finals += self._read_replicas(replicas)
            finals += self._read_routers()
        except Exception as err:
            report.problems.append(f"healing: {err}")
        self._tally_snapshots()
        report.errors = dict(self.recorder.errors)
        report.notes.append(
            f"reads that failed (not in the history): {self.recorder.failed_reads}; logs in {self.directory / 'logs'}"
        )
        return check(self.recorder.snapshot(), finals, report, replicas)

    def _tally_snapshots(self) -> None:
        """Snapshots, trims and bootstraps of the run into the notes (every run: the schedule
        snapshots without the snapshot faults too); a restored byte-flipped snapshot is a problem."""
        try:
            statuses = self._statuses()
        except Exception as err:  # a server that did not come back: the problems already say so
            self.report.notes.append(f"snapshots: no Status after healing: {err!r}")
            statuses = {}
        tally = self.snapshots or SnapshotFaults(self.cluster, self._start)
        self.report.tally, notes, problems = tally.tally(statuses)
        self.report.notes += notes
        self.report.problems += problems

    def close(self) -> None:
        """Stop everything (paused processes are continued first, so SIGTERM reaches them)."""
        self.injector.stop.set()
        f.continue_all(self._pids())
        self.cluster.stop()
        self.endpoints.close()

    # ------------------------------------------------------------- after healing

    def _statuses(self) -> dict[str, list[spb.ReplicaStatus]]:
        out = {}
        for child in self.cluster.shards:
            with grpc.insecure_channel(self.cluster.address_of(child)) as channel:
                response = shard_pb2_grpc.ShardStub(channel).Status(spb.StatusRequest(), timeout=5)
            out[child.name] = [r for r in response.replicas if r.replica.collection == COLLECTION]
        return out

    def _wait_caught_up(self) -> tuple[float, list[int]]:
        """Until every replica on every shard server is caught up, has no problem and has applied
        its shard's subject to its end in the stream; (seconds waited, the ends)."""
        began = time.monotonic()
        uid, ends = _log_ends(self.cluster, self.shards)
        last: object = None
        while True:
            try:
                statuses = self._statuses()
                last = {
                    name: [(r.replica.shard, r.applied_seq, r.caught_up, r.problem) for r in rs]
                    for name, rs in statuses.items()
                }
                held = [r for rs in statuses.values() for r in rs]
                if len(held) == 2 * self.shards and all(
                    r.caught_up and not r.problem and r.replica.uid == uid and r.applied_seq >= ends[r.replica.shard]
                    for r in held
                ):
                    return time.monotonic() - began, ends
            except grpc.RpcError as err:
                last = f"{err.code().name} {err.details()}"
            if time.monotonic() - began > HEAL_S:
                raise AssertionError(f"the replicas did not reach the log's end {ends} in {HEAL_S:.0f} s: {last}")
            time.sleep(0.2)

    def _read_replicas(self, replicas: dict[str, list[str]]) -> list[Final]:
        by_shard: dict[int, list[str]] = {}
        for key in self.keys:
            by_shard.setdefault(shard_of(key, self.shards), []).append(key)
        finals = []
        for name, held in self._statuses().items():
            child = next(c for c in self.cluster.shards if c.name == name)
            with grpc.insecure_channel(self.cluster.address_of(child)) as channel:
                stub = shard_pb2_grpc.ShardStub(channel)
                for status in held:
                    ref, n = status.replica, status.replica.shard
                    docs = stub.Get(spb.ShardGetRequest(replica=ref, ids=by_shard[n], min_seq=0), timeout=CALL_S)
                    found = {doc.id: version_of(doc.id, doc.payload) for doc in docs.documents}
                    count = stub.Count(spb.ShardCountRequest(replica=ref, min_seq=0), timeout=CALL_S).count
                    where = f"{name}'s replica of shard {n}"
                    finals.append(Final(where, {key: found.get(key, ABSENT) for key in by_shard[n]}, int(count)))
                    replicas.setdefault(f"shard {n}", []).append(where)
        return finals

    def _read_routers(self) -> list[Final]:
        """Every key through every router: a STRONG search, Get and Count. A router may need a
        moment after healing (one that was paused last); how long it took goes into the notes."""
        finals = []
        for router in self.cluster.routers:
            began = time.monotonic()
            last: grpc.RpcError | None = None
            while time.monotonic() - began < HEAL_S:
                try:
                    finals += self._read_router(router)
                    break
                except grpc.RpcError as err:
                    last = err
                    time.sleep(0.5)
            else:
                assert last is not None
                raise AssertionError(
                    f"{router.name} did not answer in {HEAL_S:.0f} s after healing: {last.code().name} {last.details()}"
                )
            if last is not None:
                self.report.notes.append(
                    f"{router.name} answered {time.monotonic() - began:.1f} s after healing; before: "
                    f"{last.code().name} {last.details()}"
                )
        return finals

    def _read_router(self, router) -> list[Final]:  # type: ignore[no-untyped-def]
        with grpc.insecure_channel(self.cluster.address_of(router)) as channel:
            stub = braid_pb2_grpc.BraidStub(channel)
            strong: dict[str, int] = {}
            got: dict[str, int] = {}
            for start in range(0, len(self.keys), 8):
                chunk = self.keys[start : start + 8]
                found = read_strong(stub, chunk, CALL_S, cluster=True)
                strong.update({key: found.get(key, ABSENT) for key in chunk})
                docs = stub.Get(pb.GetRequest(collection=COLLECTION, ids=chunk), timeout=CALL_S).documents
                by_id = {doc.id: version_of(doc.id, doc.payload) for doc in docs}
                got.update({key: by_id.get(key, ABSENT) for key in chunk})
            count = int(stub.Count(pb.CountRequest(collection=COLLECTION), timeout=CALL_S).count)
        return [Final(f"{router.name} (STRONG search)", strong, count), Final(f"{router.name} (Get)", got, count)]


def _stream_leader(cluster: LocalCluster) -> str | None:
    """The NATS server leading the collection's stream, as a live node reports it."""
    assert cluster.nats is not None
    for node in cluster.nats.nodes:
        if not node.alive:
            continue
        with contextlib.suppress(Exception):
            jsz = node.get_json("/jsz?streams=true&accounts=true") or {}
            for account in jsz.get("account_details") or []:
                for stream in account.get("stream_detail") or []:
                    if stream.get("name", "").startswith("BRAID_"):
                        leader = (stream.get("cluster") or {}).get("leader")
                        if leader:
                            return str(leader)
    return None


def _log_ends(cluster: LocalCluster, shards: int) -> tuple[str, list[int]]:
    return log_ends(cluster, COLLECTION, shards, HEAL_S)


def run_cluster(
    directory: Path,
    seed: int,
    faults: int = 5,
    keys: int = 40,
    min_run_s: float = 20.0,
    shard_servers: int = 2,
    routers: int = 2,
    shards: int = 2,
    writers: int = 3,
    readers: int = 2,
    snapshot_faults: bool = True,
    snapshot_log_bytes: int = SNAPSHOT_LOG_BYTES,
) -> Report:
    """Start a cluster, run the workload under ``faults`` seeded faults (at least ``min_run_s``
    seconds), heal, check; the report. The cluster is stopped at the end. ``snapshot_faults``:
    the snapshot and trim faults join the menu (tests/history/snapshot_faults.py)."""
    run = ClusterRun(
        directory,
        seed,
        faults,
        keys,
        shard_servers,
        routers,
        shards,
        writers,
        readers,
        snapshot_faults,
        snapshot_log_bytes,
    )
    try:
        return run.run(min_run_s)
    finally:
        run.close()
