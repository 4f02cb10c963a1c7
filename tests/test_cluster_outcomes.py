"""Cluster mode: what a write's answer says around NATS and replica faults, on real processes.

A write's answer must be true: OK means stored; "not stored" only when Braid knows it was not
(then it is absent afterwards); an outcome Braid cannot know is reported as unknown
(UNAVAILABLE or DEADLINE_EXCEEDED saying the write may have been stored). Waits use the
deadline they were given, and reads keep answering while the shard servers are healthy.

1. SIGSTOP the NATS node leading the collection's stream for 4 s during writes (both ack
   modes, generous deadlines and short ones): no write with a generous deadline is refused, no
   write is called "not stored" when it may have been, and every write's answer agrees with
   what is read back afterwards.
2. kill -9 the NATS node leading both the collection's stream and the braid-nodes bucket, with
   3 shard servers (replication factor 2): reads and WRITE_ACK_APPLIED writes keep answering
   (the router must not call healthy replicas "not live" because NATS elected a leader).
3. A WRITE_ACK_APPLIED write to a shard whose only replica is down, or restarting, waits for
   it within its deadline instead of failing at once.
4. Both replicas of a shard stop heartbeating (their NATS node is paused) but serve reads: the
   router, which calls them "not live", still tries them before failing a read.
5. The router's view of liveness (service/cluster/view.py) on a real NATS: heartbeats that stop
   for everyone (a NATS election) and resume in any order never make a server look dead; a
   server that stops while the others beat drops out, and is still tried last, at its address.

Fixtures and helpers come from tests/clusterkit.py and tests/test_cluster_faults.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
import urllib.request
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.service.cluster.meta import ALIASES_BUCKET, COLLECTIONS_BUCKET, NODE_TTL_S, NODES_BUCKET, NodeInfo
from braid.service.cluster.nats_link import NatsLink
from braid.service.cluster.natsproc import NatsCluster, free_ports
from braid.service.cluster.view import ClusterState
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster, nats1  # noqa: F401
from tests.test_cluster_faults import (
    COLLECTION,
    DIM,
    Ledger,
    _bulk,
    _create,
    _doc,
    _eventually,
    _leader_victim,
    _leaders,
    _router_versions,
    _schema,
    _step_down,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

WRITE_TIMEOUT_S = 30.0  # a deadline that outlasts any pause or election here by far
READ_TIMEOUT_S = 10.0
SHORT_TIMEOUT_S = 1.5  # a deadline a paused NATS node outlasts: such a write's outcome is unknown
# Test 4 pauses a NATS node until the router calls its shard servers not live: past the TTL, with
# any stall of the bucket discounted. That needs the bucket's leader re-elected if the node held
# it (up to about 10 s) and a heartbeat through the new one, so the wait is a deadline, not a time.
NOT_LIVE_DEADLINE_S = 90.0
NOT_LIVE_READS = 100  # reads that must then succeed while the router calls both replicas not live
UNKNOWN = "may have been stored"  # what an answer whose outcome Braid cannot know says


@dataclass
class Outcome:
    ids: list[str]
    ack: int
    began: float
    ended: float
    code: grpc.StatusCode  # OK for success
    details: str

    @property
    def kind(self) -> str:
        """ok (stored), stored (an error saying the log stored it), unknown, or not_stored."""
        if self.code == grpc.StatusCode.OK:
            return "ok"
        if "is stored in the log" in self.details:
            return "stored"
        if UNKNOWN in self.details or self.details == "Deadline Exceeded":  # the client's own deadline
            return "unknown"
        return "not_stored"

    def line(self, since: float) -> str:
        return (
            f"{self.ids[0]} ({'LOGGED' if self.ack == pb.WRITE_ACK_LOGGED else 'APPLIED'}, "
            f"{self.began - since:+.2f} s to {self.ended - since:+.2f} s): {self.code.name} {self.details[:300]}"
        )


class Writers:
    """Threads upserting 3 fresh documents per call (ack modes alternating) until stopped; every
    call's outcome is recorded. A thread's exception is kept and raised by ``finish``."""

    def __init__(self, client: BraidClient, prefix: str, threads: int = 3, timeout: float = WRITE_TIMEOUT_S) -> None:
        self.client, self.prefix, self.timeout = client, prefix, timeout
        self.outcomes: list[Outcome] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(w,), daemon=True) for w in range(threads)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def finish(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 30)
        assert not any(thread.is_alive() for thread in self._threads), "a writer did not end"
        if self.errors:
            raise self.errors[0]

    def _run(self, w: int) -> None:
        try:
            for n in range(100000):
                if self._stop.is_set():
                    return
                ids = [f"{self.prefix}{w}-{n}-{i}" for i in range(3)]
                ack = pb.WRITE_ACK_LOGGED if n % 2 else pb.WRITE_ACK_APPLIED
                request = pb.UpsertRequest(collection=COLLECTION, documents=[_doc(i, 0) for i in ids], ack=ack)
                began = time.monotonic()
                try:
                    self.client.stub.Upsert(request, timeout=self.timeout)
                    code, details = grpc.StatusCode.OK, ""
                except grpc.RpcError as err:
                    code, details = err.code(), err.details() or ""
                with self._lock:
                    self.outcomes.append(Outcome(ids, ack, began, time.monotonic(), code, details))
        except BaseException as err:  # kept: finish() raises it in the test's thread
            self.errors.append(err)


def _check_outcomes(client: BraidClient, outcomes: list[Outcome], since: float) -> dict[str, int]:
    """Every write's answer agrees with what the router reads back once the faults healed: ok and
    stored => present; not_stored => absent; unknown => either. Returns how many of each kind."""
    ids = [doc_id for outcome in outcomes for doc_id in outcome.ids]
    found = _eventually(lambda: _router_versions(client.stub, ids), "reading every write back")
    assert isinstance(found, dict)
    wrong = []
    for outcome in outcomes:
        present = [doc_id in found for doc_id in outcome.ids]
        if outcome.kind in ("ok", "stored") and not all(present):
            wrong.append(f"answered {outcome.kind} but {present.count(False)} of its documents are absent: ")
        elif outcome.kind == "not_stored" and any(present):
            wrong.append(f"answered 'not stored' but {present.count(True)} of its documents are present: ")
        else:
            continue
        wrong[-1] += outcome.line(since)
    assert not wrong, f"{len(wrong)} of {len(outcomes)} writes answered wrong:\n  " + "\n  ".join(wrong[:10])
    kinds: dict[str, int] = {}
    for outcome in outcomes:
        kinds[outcome.kind] = kinds.get(outcome.kind, 0) + 1
    return kinds


def _failures(outcomes: list[Outcome], since: float) -> str:
    failed = [outcome for outcome in outcomes if outcome.code != grpc.StatusCode.OK]
    return "".join(f"\n  {outcome.line(since)}" for outcome in failed[:10])


# ------------------------------------------------------------------ 1. a paused stream leader


def test_writes_through_a_paused_stream_leader_answer_truly(local_cluster) -> None:  # noqa: F811
    """SIGSTOP the NATS node leading the collection's stream (not the router's node) for 4 s while 3
    writers upsert with 30 s deadlines and one with 1.5 s deadlines: none of the first is refused,
    none of the second is called "not stored" (the pause outlasts them: their outcome is unknown),
    and each answer agrees with the data read back."""
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=3)
    assert cluster.nats is not None
    client = BraidClient(cluster.router_address, timeout=READ_TIMEOUT_S)
    _create(client)
    index, router_node = _leader_victim(cluster, "BRAID_")
    if os.environ.get("PAUSE_ROUTER"):
        index = [n.name for n in cluster.nats.nodes].index(router_node)
    victim = cluster.nats.nodes[index]
    assert victim.pid is not None
    writers = Writers(client, "p")
    hasty = Writers(client, "q", threads=1, timeout=SHORT_TIMEOUT_S)  # deadlines the pause outlasts
    began = time.monotonic()
    writers.start()
    hasty.start()
    time.sleep(1.5)
    paused_at = time.monotonic()
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        time.sleep(float(os.environ.get("PAUSE_S", "4.0")))
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    time.sleep(max(0.0, began + 9.0 - time.monotonic()))
    writers.finish()
    hasty.finish()
    outcomes = writers.outcomes
    kinds = _check_outcomes(client, outcomes, paused_at)
    hasty_kinds = _check_outcomes(client, hasty.outcomes, paused_at)
    print(
        f"\n[paused stream leader] SIGSTOP {victim.name} (router on {router_node}) for {resumed_at - paused_at:.1f} s: "
        f"{len(outcomes)} writes, {kinds}; longest write {max(o.ended - o.began for o in outcomes):.2f} s; "
        f"with {SHORT_TIMEOUT_S} s deadlines: {len(hasty.outcomes)} writes, {hasty_kinds}"
        + _failures(outcomes + hasty.outcomes, paused_at)
    )
    client.close()
    assert sum(1 for o in outcomes if o.ended > resumed_at and o.code == grpc.StatusCode.OK) >= 3, (
        "too few writes succeeded after the pause to test anything"
    )
    assert kinds.get("ok") == len(outcomes), (
        f"writes with a {WRITE_TIMEOUT_S:.0f} s deadline failed through the pause:" + _failures(outcomes, paused_at)
    )
    refused = [o for o in hasty.outcomes if o.kind == "not_stored"]
    assert not refused, "writes the pause cut short were called not stored:" + _failures(refused, paused_at)


# ------------------------------------------------------------------ 2. the stream and nodes-bucket leader killed


def _lead_both(cluster: LocalCluster) -> tuple[int, str]:
    """Step leaders down until one NATS node, not the router's, leads both the collection's stream and
    the braid-nodes bucket; (its index, the router's node name)."""
    assert cluster.nats is not None
    names = [node.name for node in cluster.nats.nodes]
    leaders: dict[str, str] = {}
    for _ in range(20):
        index, router_node = _leader_victim(cluster, "BRAID_")
        leaders = _leaders(cluster)
        if leaders.get("KV_braid-nodes") == names[index]:
            return index, router_node
        _step_down(cluster.nats.urls, "KV_braid-nodes")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _leaders(cluster).get("KV_braid-nodes") in (
            None,
            leaders["KV_braid-nodes"],
        ):
            time.sleep(0.1)
    raise AssertionError(f"could not make one node lead both the stream and the nodes bucket: {leaders}")


def test_reads_and_applied_writes_go_on_when_the_stream_leader_dies(local_cluster) -> None:  # noqa: F811
    """kill -9 the NATS node leading the collection's stream and the braid-nodes bucket (3 shard servers,
    replication factor 2, all healthy): no read and no WRITE_ACK_APPLIED write may fail."""
    cluster = local_cluster(shard_servers=3, routers=1, nats_nodes=3)
    assert cluster.nats is not None
    client = BraidClient(cluster.router_address, timeout=READ_TIMEOUT_S)
    _create(client)
    seeded = [f"seed-{i}" for i in range(300)]
    _bulk(client, Ledger(), seeded)
    index, router_node = _lead_both(cluster)
    victim = cluster.nats.nodes[index]

    stop = threading.Event()
    reads_ok = [0]
    read_failures: list[tuple[float, str, str]] = []
    errors: list[BaseException] = []

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                vector = rng.standard_normal(DIM).astype(np.float32)
                dense = pb.DenseQuery(field="emb", vector=pb.DenseVector(packed=vector.tobytes()))
                try:
                    if seed % 2:
                        client.stub.Search(
                            pb.SearchRequest(collection=COLLECTION, queries=[pb.SubQuery(dense=dense)], limit=5),
                            timeout=READ_TIMEOUT_S,
                        )
                    else:
                        ids = [seeded[j] for j in rng.choice(len(seeded), 8, replace=False)]
                        got = client.stub.Get(pb.GetRequest(collection=COLLECTION, ids=ids), timeout=READ_TIMEOUT_S)
                        assert len(got.documents) == len(ids), f"Get found {len(got.documents)} of {len(ids)}"
                    reads_ok[0] += 1
                except grpc.RpcError as err:
                    read_failures.append((time.monotonic(), err.code().name, err.details() or ""))
                    time.sleep(0.05)
        except BaseException as err:  # raised in the test's thread below
            errors.append(err)

    readers = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(4)]
    writers = Writers(client, "k", threads=2)
    for thread in readers:
        thread.start()
    writers.start()
    time.sleep(1.5)
    killed_at = time.monotonic()
    victim.kill()
    time.sleep(10.0)
    stop.set()
    for thread in readers:
        thread.join(timeout=READ_TIMEOUT_S + 10)
    writers.finish()
    assert not any(thread.is_alive() for thread in readers), "a reader did not end"
    if errors:
        raise errors[0]
    victim.restart()
    outcomes = writers.outcomes
    kinds = _check_outcomes(client, outcomes, killed_at)
    print(
        f"\n[stream+nodes leader] killed {victim.name} (router on {router_node}): {reads_ok[0]} reads ok, "
        f"{len(read_failures)} failed; {len(outcomes)} writes {kinds}"
        + "".join(f"\n  read {t - killed_at:+.2f} s: {c} {d[:300]}" for t, c, d in read_failures[:10])
        + _failures(outcomes, killed_at)
    )
    client.close()
    assert reads_ok[0] >= 20, "the readers made too little progress to test anything"
    assert not read_failures, f"{len(read_failures)} reads failed while every shard server was up"
    assert kinds.get("ok") == len(outcomes), "writes failed while every shard server was up"


# ------------------------------------------------------------------ 3. an applied write waits through a restart


def _applied_write(client: BraidClient, ids: list[str], result: list) -> threading.Thread:
    def run() -> None:
        began = time.monotonic()
        request = pb.UpsertRequest(collection=COLLECTION, documents=[_doc(i, 0) for i in ids], ack=pb.WRITE_ACK_APPLIED)
        try:
            client.stub.Upsert(request, timeout=WRITE_TIMEOUT_S)
            result.append(("OK", "", time.monotonic() - began))
        except grpc.RpcError as err:
            result.append((err.code().name, err.details() or "", time.monotonic() - began))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_applied_write_waits_through_a_replica_restart(local_cluster) -> None:  # noqa: F811
    """The only replica of the collection (one shard server, replication factor 1) is killed, then
    restarted: a WRITE_ACK_APPLIED write sent while it is down, and one sent the moment it is started
    again, both wait for it (30 s deadlines) and answer OK."""
    cluster = local_cluster(shard_servers=1, routers=1, nats_nodes=1)
    client = BraidClient(cluster.router_address, timeout=READ_TIMEOUT_S)
    info = client.create_collection(COLLECTION, _schema(), shards=2, replication_factor=1)
    assert info.replication_factor == 1
    _bulk(client, Ledger(), [f"seed-{i}" for i in range(50)])
    server = cluster.shards[0]

    server.kill()
    down: list = []
    while_down = _applied_write(client, [f"down-{i}" for i in range(4)], down)
    time.sleep(1.5)  # the write is waiting on a dead replica
    server.restart(wait=False)
    starting: list = []
    while_starting = _applied_write(client, [f"starting-{i}" for i in range(4)], starting)
    server.wait_ready()
    while_down.join(WRITE_TIMEOUT_S + 10)
    while_starting.join(WRITE_TIMEOUT_S + 10)
    print(f"\n[replica restart] while down: {down}; while starting: {starting}")
    assert down and down[0][0] == "OK", f"the write sent while the replica was down: {down}"
    assert starting and starting[0][0] == "OK", f"the write sent as the replica started: {starting}"
    ids = [f"down-{i}" for i in range(4)] + [f"starting-{i}" for i in range(4)]
    assert set(_router_versions(client.stub, ids)) == set(ids)
    client.close()


# ------------------------------------------------------------------ 4. reads from replicas not heard from lately


def test_reads_try_replicas_whose_heartbeats_stopped(local_cluster) -> None:  # noqa: F811
    """Shard servers 0 and 1 (the two replicas of the collection's one shard) talk to NATS node 0 only,
    server 2 and the router to node 1. Node 0 is paused: 0 and 1 stop heartbeating while 2
    beats on, so the router calls them "not live"; they still serve reads (DEFAULT consistency needs
    no NATS), and no read may fail."""
    cluster = local_cluster(shard_servers=3, routers=1, nats_nodes=3)
    assert cluster.nats is not None
    urls = [node.url for node in cluster.nats.nodes]
    # every shard server and the router on a NATS node of our choice: each is restarted with one url
    for child, url in ((cluster.shards[0], urls[0]), (cluster.shards[1], urls[0]), (cluster.shards[2], urls[1])):
        child.command[child.command.index("--nats") + 1] = url
        child.restart()
    router = cluster.routers[0]
    router.command[router.command.index("--nats") + 1] = urls[1]
    metrics_port = free_ports(1)[0]
    router.command += ["--metrics-port", str(metrics_port)]
    router.restart()
    client = BraidClient(cluster.router_address, timeout=READ_TIMEOUT_S)
    info = client.create_collection(COLLECTION, _schema(), shards=1, replication_factor=2)
    assert info.replication_factor == 2
    seeded = [f"seed-{i}" for i in range(200)]
    _bulk(client, Ledger(), seeded)
    victim = cluster.nats.nodes[0]
    assert victim.pid is not None

    ok = [0]
    failures: list[tuple[float, str, str]] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            ids = [seeded[j] for j in rng.choice(len(seeded), 8, replace=False)]
            try:
                got = client.stub.Get(pb.GetRequest(collection=COLLECTION, ids=ids), timeout=READ_TIMEOUT_S)
                assert len(got.documents) == len(ids), f"Get found {len(got.documents)} of {len(ids)}"
                ok[0] += 1
            except grpc.RpcError as err:
                failures.append((time.monotonic(), err.code().name, err.details() or ""))
            time.sleep(0.02)

    threads = [threading.Thread(target=reader, args=(s,), daemon=True) for s in range(2)]
    for thread in threads:
        thread.start()
    paused_at = time.monotonic()
    live_counts: list[float | None] = []
    reads_not_live: int | None = None  # ok[0] when the router first called the replicas not live
    os.kill(victim.pid, signal.SIGSTOP)
    try:
        while time.monotonic() < paused_at + NOT_LIVE_DEADLINE_S:
            live_counts.append(_gauge(metrics_port, "braid_router_shard_servers_live"))
            if reads_not_live is None and live_counts[-1] == 1:
                reads_not_live = ok[0]
            if reads_not_live is not None and ok[0] >= reads_not_live + NOT_LIVE_READS:
                break
            time.sleep(0.5)
    finally:
        os.kill(victim.pid, signal.SIGCONT)
    paused_s = time.monotonic() - paused_at
    stop.set()
    for thread in threads:
        thread.join(timeout=READ_TIMEOUT_S + 5)
    assert not any(thread.is_alive() for thread in threads), "a reader did not end"
    print(
        f"\n[heartbeats stopped] paused {victim.name} for {paused_s:.0f} s: {ok[0]} reads ok, {len(failures)} failed; "
        f"the router's count of live shard servers every 0.5 s: {live_counts}"
        + "".join(f"\n  {t - paused_at:+.2f} s: {c} {d[:300]}" for t, c, d in failures[:10])
    )
    client.close()
    assert ok[0] >= 20, "the readers made too little progress to test anything"
    assert not failures, f"{len(failures)} reads failed while both replicas could answer"
    assert reads_not_live is not None, f"the router never called the two replicas not live: {live_counts}"
    assert ok[0] >= reads_not_live + NOT_LIVE_READS, "too few reads while the replicas were not live"


def _gauge(port: int, name: str) -> float | None:
    """One unlabelled metric's value from a /metrics page (None when absent or unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


# ------------------------------------------------------------------ 5. liveness through a heartbeat stall


def _wait(condition, what: str, timeout: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_liveness_survives_a_heartbeat_stall(nats1: NatsCluster) -> None:  # noqa: F811
    """Three shard servers' heartbeats (written here, as shard servers write them) stop for 10 s, as
    while NATS elects the bucket's leader (their entries expire; the router's watch restarts), then
    only c's resumes: a and b are still live (a stall says nothing about them). Once c alone has beaten
    for longer than the TTL, a and b are not live, and are still offered last, at their address."""
    link = NatsLink(nats1.urls, "braid-router-test")
    try:
        assert link.wait_connected(10)
        for bucket, ttl in ((COLLECTIONS_BUCKET, None), (NODES_BUCKET, NODE_TTL_S), (ALIASES_BUCKET, None)):
            link.ensure_bucket(bucket, 1, ttl=ttl)
        addresses = {node: f"127.0.0.1:{7000 + i}" for i, node in enumerate("abc")}

        def beat(*nodes: str) -> None:
            for node in nodes:
                link.kv_put(NODES_BUCKET, node, NodeInfo(node, addresses[node], 0.0).to_json())

        beat("a", "b", "c")
        state = ClusterState(link)
        state.start()
        assert state.synced.wait(20)
        _wait(lambda: set(state.live_nodes()) == {"a", "b", "c"}, "the three nodes to be live")
        stall_ends = time.monotonic() + 10.0
        while time.monotonic() < stall_ends:  # nobody beats: the bucket is stalled
            assert set(state.live_nodes()) == {"a", "b", "c"}, "a stall made a node look dead"
            time.sleep(0.2)
        seen_c = state.nodes.get("c", (None, 0.0))[1]
        beat("c")
        _wait(lambda: state.nodes.get("c", (None, 0.0))[1] > seen_c, "c's heartbeat to reach the view")
        assert set(state.live_nodes()) == {"a", "b", "c"}, (
            f"healthy nodes look dead once heartbeats resume after a stall: live {sorted(state.live_nodes())}"
        )
        resumed = time.monotonic()
        while time.monotonic() < resumed + NODE_TTL_S + 2.0:  # c beats, a and b have stopped
            beat("c")
            time.sleep(0.5)
        assert set(state.live_nodes()) == {"c"}, f"stopped nodes still look live: {sorted(state.live_nodes())}"
        order = state.order(("a", "b", "c"), 0)
        assert order[0] == ("c", addresses["c"], True), order
        assert sorted(order[1:]) == [("a", addresses["a"], False), ("b", addresses["b"], False)], order
    finally:
        link.close()
