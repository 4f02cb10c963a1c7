"""Cluster mode under faults, on real processes: nothing the router acknowledged is lost.

Every test runs a LocalCluster (real ``nats-server`` nodes, shard servers and a router in
child processes; tests/clusterkit.py) with one collection of 2 shards, replication factor 2
on 2 shard servers, a 16-dimensional dense field and a keyword payload that names each
document's version. A ``Ledger`` records what the router acknowledged (an RPC that returned
OK; for a BulkUpsert stream that failed, the batches its trailing metadata counts as
applied) and what it did not; at the end every acknowledged document must be there with
its last acknowledged version and every acknowledged delete must be absent. A write that
was not acknowledged may or may not have landed.

1. kill -9 a shard server under search and write load, restart it: no search fails, the
   restarted replica catches up and both replicas of every shard hold the same documents;
2. kill -9 one of 3 NATS nodes during writes: writes go on (they resume within FAILOVER_S, then go
   on with no gap over STEADY_GAP_S and no failure);
3. a shard server's data directory deleted: it rebuilds its replicas from the log;
4. kill -9 every process, restart NATS, shard servers, router: everything acknowledged is there;
5. SIGTERM the router while a BulkUpsert stream sends: the batches it counts as applied are there.

Three more kill -9 one NATS node of 3, chosen by what it leads or holds (leaders are moved with
JetStream's leader step-down): the node leading the collection's stream (writes wait through the
election), the node leading the braid-nodes bucket, and the node holding the consumer of the
router's watch of that bucket (no healthy shard server may look dead to the router).

Replicas are also read directly over braid.cluster.v1.Shard (``Status`` and ``Get`` with
``min_seq=0``), so a replica that missed writes cannot hide behind the one that has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import re
import shutil
import socket
import threading
import time
import traceback
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import nats
import nats.js.errors
import numpy as np
import pytest

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.index import records
from braid.index.collection import shard_of
from braid.index.errors import Unavailable
from braid.index.policy import StoragePolicy
from braid.index.records import DocumentWrite
from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.service.cluster.log_reader import LogReader
from braid.service.cluster.meta import CollectionMeta
from braid.service.cluster.nats_link import NatsLink
from braid.service.cluster.natsproc import NatsNode
from braid.service.cluster.replica import Replica
from braid.service.convert import schema_from_proto
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster, log_ends, nats1  # noqa: F401
from tests.conftest import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

COLLECTION = "faults"
DIM = 16
SHARDS = 2
DELETED = -1
RPC_TIMEOUT_S = 10.0
# A search's deadline: long enough that a loaded machine never fails one for slowness; that it
# fails over instead of waiting for a dead replica is checked by PROMPT_S, and by phases that
# wait for searches to succeed while the replica is down.
SEARCH_TIMEOUT_S = 30.0
PROMPT_S = SEARCH_TIMEOUT_S / 3
PHASE_SEARCHES = 10  # searches that must succeed in each phase (before, during and after a fault)
STREAM_TIMEOUT_S = 15.0
CATCH_UP_S = 45.0  # bound on any wait for replicas to agree or a restarted cluster to answer
# One of 3 NATS nodes dies under small writes: a write begun after its death succeeds within
# FAILOVER_S of it (the router reconnects; a stream it led elects a leader, in 2-7 s here), and
# from then on, for STEADY_S, writes go on: none fails and none waits as long as a write's whole
# deadline (STEADY_GAP_S) for the next success (replicas that lost their consumer make new ones
# in that time, which waits on a JetStream meta leader: 3 s seen).
FAILOVER_S = 12.0
STEADY_S = 6.0
STEADY_GAP_S = 5.0
EXPECTED_WRITE_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
_VECTORS = np.random.default_rng(20240617).standard_normal((4096, DIM)).astype(np.float32)


def _schema() -> pb.Schema:
    return pb.Schema(
        dense_fields=[
            pb.DenseVectorField(
                name="emb", dim=DIM, metric=pb.COSINE, hnsw=pb.HnswParams(m=8, ef_construction=64, ef_search=32)
            )
        ],
        payload_fields=[pb.PayloadField(name="tag", type=pb.KEYWORD)],
    )


def _doc(doc_id: str, version: int) -> pb.Document:
    vector = _VECTORS[(zlib.crc32(doc_id.encode()) + 7919 * version) % len(_VECTORS)]
    return pb.Document(
        id=doc_id,
        dense={"emb": pb.DenseVector(packed=vector.tobytes())},
        payload={"tag": pb.Value(keyword=f"{doc_id}@{version}")},
    )


def _version(doc: pb.Document) -> int:
    name, _, version = doc.payload["tag"].keyword.rpartition("@")
    assert name == doc.id, f"{doc.id}: payload {doc.payload['tag'].keyword!r} belongs to another document"
    return int(version)


def _code(err: grpc.RpcError) -> grpc.StatusCode:
    return err.code()  # type: ignore[no-any-return]


def _applied_batches(err: grpc.RpcError) -> int | None:
    """The ``braid-batches-applied`` trailing metadata of a failed stream (None when absent)."""
    value = dict(err.trailing_metadata() or ()).get("braid-batches-applied")
    return None if value is None else int(value)


class Ledger:
    """What the router acknowledged, and what it was sent without acknowledging.

    Each id is written by one thread at a time, in order, so a write acknowledged after a
    failed one supersedes it: ``acked[id]`` is the last acknowledged version (DELETED for a
    delete) and ``pending[id]`` the versions sent after it that were not acknowledged.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acked: dict[str, int] = {}
        self.pending: dict[str, set[int]] = {}

    def sent(self, ids: list[str], version: int) -> None:
        with self.lock:
            for doc_id in ids:
                self.pending.setdefault(doc_id, set()).add(version)

    def ack(self, ids: list[str], version: int) -> None:
        with self.lock:
            for doc_id in ids:
                self.pending.pop(doc_id, None)
                self.acked[doc_id] = version

    def allowed(self, doc_id: str) -> set[int]:
        return {self.acked.get(doc_id, DELETED)} | self.pending.get(doc_id, set())

    def acknowledged_docs(self) -> int:
        return sum(1 for version in self.acked.values() if version != DELETED)

    def check(self, found: dict[str, int], ids: list[str], where: str) -> None:
        """``found`` (id -> version present) agrees with what was acknowledged, for ``ids``."""
        with self.lock:
            wrong = {
                doc_id: (found.get(doc_id, DELETED), sorted(self.allowed(doc_id)))
                for doc_id in ids
                if doc_id in self.acked and found.get(doc_id, DELETED) not in self.allowed(doc_id)
            }
        assert not wrong, (
            f"{where}: {len(wrong)} of {len(ids)} acknowledged writes are not there "
            f"(id: (found version, allowed versions; {DELETED} = absent)), e.g. {list(wrong.items())[:8]}"
        )


def _chunks(ids: list[str], size: int = 500) -> Iterator[list[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def _router_versions(stub, ids: list[str]) -> dict[str, int]:  # type: ignore[no-untyped-def]
    found: dict[str, int] = {}
    for chunk in _chunks(ids):
        response = stub.Get(pb.GetRequest(collection=COLLECTION, ids=chunk), timeout=RPC_TIMEOUT_S)
        for doc in response.documents:
            found[doc.id] = _version(doc)
    return found


def _eventually(call: Callable[[], object], what: str, timeout: float = CATCH_UP_S) -> object:
    """``call()`` until it stops raising UNAVAILABLE / DEADLINE_EXCEEDED (a cluster still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if _code(err) not in EXPECTED_WRITE_FAILURES or time.monotonic() > deadline:
                raise AssertionError(f"{what}: {_code(err).name} {err.details()}") from err
        time.sleep(0.2)


def _create(client: BraidClient) -> None:
    info = client.create_collection(COLLECTION, _schema(), shards=SHARDS, replication_factor=2)
    assert info.replication_factor == 2 and info.shards == SHARDS


def _bulk(client: BraidClient, ledger: Ledger, ids: list[str], version: int = 0, batch: int = 200) -> None:
    """Stream ``ids`` (no fault expected): every batch acknowledged."""
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    for chunk in batches:
        ledger.sent(chunk, version)
    requests = (pb.UpsertRequest(collection=COLLECTION, documents=[_doc(i, version) for i in b]) for b in batches)
    response = client.stub.BulkUpsert(requests, timeout=60)
    assert response.batches == len(batches) and response.upserted == len(ids)
    for chunk in batches:
        ledger.ack(chunk, version)


# ------------------------------------------------------------------ shard servers, directly


class ShardServerView:
    """braid.cluster.v1.Shard of one shard server (at its current port)."""

    def __init__(self, cluster: LocalCluster, index: int) -> None:
        self.name = cluster.shards[index].name
        self.channel = grpc.insecure_channel(cluster.address_of(cluster.shards[index]))
        self.stub = shard_pb2_grpc.ShardStub(self.channel)

    def __enter__(self) -> ShardServerView:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def status(self) -> dict[int, spb.ReplicaStatus]:
        """Shard number -> the status of this server's replica of it (our collection only)."""
        response = self.stub.Status(spb.StatusRequest(), timeout=3)
        return {r.replica.shard: r for r in response.replicas if r.replica.collection == COLLECTION}

    def versions(self, uid: str, shard: int, ids: list[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        ref = spb.ReplicaRef(collection=COLLECTION, uid=uid, shard=shard)
        for chunk in _chunks(ids):
            request = spb.ShardGetRequest(replica=ref, ids=chunk, min_seq=0)
            for doc in self.stub.Get(request, timeout=RPC_TIMEOUT_S).documents:
                found[doc.id] = _version(doc)
        return found


def _statuses(cluster: LocalCluster) -> list[dict[int, spb.ReplicaStatus]]:
    out = []
    for index in range(len(cluster.shards)):
        with ShardServerView(cluster, index) as view:
            out.append(view.status())
    return out


def _log_ends(cluster: LocalCluster) -> tuple[str, list[int]]:
    return log_ends(cluster, COLLECTION, SHARDS, CATCH_UP_S)


def _wait_replicas_agree(cluster: LocalCluster, timeout: float = CATCH_UP_S) -> tuple[float, str, list[dict]]:
    """Until every shard's replica on every shard server is caught up, has no problem and has applied
    its subject to the end of the log as NATS reports it (callers write nothing meanwhile). Returns
    (seconds waited, the collection's uid, the statuses)."""
    began = time.monotonic()
    uid, ends = _log_ends(cluster)
    deadline = began + timeout
    last: object = None
    while True:
        try:
            statuses = _statuses(cluster)
            last = statuses
            complete = all(set(s) == set(range(SHARDS)) for s in statuses)
            if complete and all(
                s[n].caught_up and not s[n].problem and s[n].applied_seq >= ends[n] and s[n].replica.uid == uid
                for s in statuses
                for n in range(SHARDS)
            ):
                return time.monotonic() - began, uid, statuses
        except grpc.RpcError as err:
            last = f"{_code(err).name} {err.details()}"
        if time.monotonic() > deadline:
            raise AssertionError(
                f"the replicas did not reach the log's end {ends} (uid {uid}) within {timeout:.0f} s; "
                f"last status: {last}"
            )
        time.sleep(0.2)


def _check_replicas(cluster: LocalCluster, ledger: Ledger) -> tuple[str, list[dict]]:
    """Both replicas of every shard hold every acknowledged write (and no acknowledged delete),
    and the same number of documents."""
    _, uid, statuses = _wait_replicas_agree(cluster)
    for n in range(SHARDS):
        counts = {cluster.shards[i].name: s[n].documents for i, s in enumerate(statuses)}
        assert len(set(counts.values())) == 1, f"shard {n}: the replicas hold different document counts: {counts}"
    with ledger.lock:
        ids = sorted(ledger.acked)
    by_shard: dict[int, list[str]] = {}
    for doc_id in ids:
        by_shard.setdefault(shard_of(doc_id, SHARDS), []).append(doc_id)
    for index in range(len(cluster.shards)):
        with ShardServerView(cluster, index) as view:
            for n, shard_ids in by_shard.items():
                ledger.check(view.versions(uid, n, shard_ids), shard_ids, f"{view.name} replica of shard {n}")
    return uid, statuses


def _failure_kinds(failures: list[tuple[float, grpc.StatusCode, str]], since: float) -> str:
    """One line per kind of failure (code and the start of its message): how many, and when."""
    kinds: dict[str, list[float]] = {}
    for t, code, details in failures:
        kinds.setdefault(f"{code.name} {re.sub(r'[0-9]+', 'N', details)[:110]}", []).append(t - since)
    return "".join(
        f"\n  {len(times)} x from {min(times):.1f} s to {max(times):.1f} s after the kill: {kind}"
        for kind, times in sorted(kinds.items(), key=lambda item: min(item[1]))
    )


def _longest_gap(times: list[float], start: float, end: float) -> float:
    points = [start, *sorted(times), end]
    return max(b - a for a, b in itertools.pairwise(points))


class _ThreadErrors:
    """What went wrong in worker threads, for the main thread to assert on: an assert (or any
    exception) that ends a worker thread is recorded with its traceback, so it fails the test
    (``check``) instead of passing it with a warning."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def wrap(self, target: Callable[..., None]) -> Callable[..., None]:
        def run(*args: object) -> None:
            try:
                target(*args)
            except BaseException:
                with self.lock:
                    self.errors.append(f"{threading.current_thread().name}: {traceback.format_exc()}")

        return run

    def check(self) -> None:
        with self.lock:
            errors = list(self.errors)
        assert not errors, f"{len(errors)} worker thread(s) failed; the first:\n{errors[0]}"


# ------------------------------------------------------------------ 1. kill -9 a shard replica under load


def test_kill9_shard_server_under_search_and_write_load(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1, shard_args=["--checkpoint-interval-s", "1"])
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    ledger = Ledger()
    _create(client)
    _bulk(client, ledger, [f"seed-{i}" for i in range(500)])

    stop = threading.Event()
    search_ok = [0]
    slowest = [0.0]
    search_failures: list[tuple[float, str, str]] = []
    write_failures: list[tuple[float, grpc.StatusCode, str]] = []
    streams_ok = [0]
    lock = threading.Lock()
    began = time.monotonic()

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            vector = rng.standard_normal(DIM).astype(np.float32)
            request = pb.SearchRequest(
                collection=COLLECTION,
                queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=pb.DenseVector(packed=vector.tobytes())))],
                limit=10,
            )
            sent = time.monotonic()
            try:
                hits = client.stub.Search(request, timeout=SEARCH_TIMEOUT_S).hits
                with lock:
                    slowest[0] = max(slowest[0], time.monotonic() - sent)
                    if len(hits) == 10:
                        search_ok[0] += 1
                    else:
                        search_failures.append((time.monotonic() - began, "OK", f"{len(hits)} hits, not 10"))
            except grpc.RpcError as err:
                with lock:
                    search_failures.append((time.monotonic() - began, _code(err).name, err.details() or ""))

    def writer(w: int) -> None:
        for n in range(1000):
            if stop.is_set():
                return
            batches = [[f"w{w}-{n}-{b}-{i}" for i in range(50)] for b in range(4)]
            sent: list[list[str]] = []

            def requests(batches: list[list[str]] = batches, sent: list[list[str]] = sent) -> Iterator:
                for batch in batches:
                    ledger.sent(batch, 0)
                    sent.append(batch)
                    yield pb.UpsertRequest(collection=COLLECTION, documents=[_doc(i, 0) for i in batch])

            try:
                response = client.stub.BulkUpsert(requests(), timeout=STREAM_TIMEOUT_S)
            except grpc.RpcError as err:
                applied = _applied_batches(err)
                with lock:
                    write_failures.append((time.monotonic() - began, _code(err), err.details() or ""))
                for batch in sent[: applied or 0]:
                    ledger.ack(batch, 0)
                continue
            assert response.batches == len(batches) and response.upserted == 50 * len(batches)
            for batch in batches:
                ledger.ack(batch, 0)
            with lock:
                streams_ok[0] += 1

    errors = _ThreadErrors()
    threads = [threading.Thread(target=errors.wrap(searcher), args=(s,), daemon=True) for s in range(4)]
    threads += [threading.Thread(target=errors.wrap(writer), args=(w,), daemon=True) for w in range(2)]
    for thread in threads:
        thread.start()

    def progress(searches: int, streams: int, what: str, at_least_s: float = 0.0) -> None:
        """Wait (on progress, not a clock) for ``searches`` more searches and ``streams`` more
        streams to succeed, and at least ``at_least_s``; a phase that makes none fails."""
        with lock:
            goal = (search_ok[0] + searches, streams_ok[0] + streams)
        since = time.monotonic()
        wait_for(
            lambda: search_ok[0] >= goal[0] and streams_ok[0] >= goal[1] and time.monotonic() - since >= at_least_s,
            timeout=CATCH_UP_S,
            what=f"{searches} searches and {streams} streams to succeed {what}",
        )

    progress(PHASE_SEARCHES, 1, "before the kill")
    killed_at = time.monotonic() - began
    cluster.shards[1].kill()
    progress(PHASE_SEARCHES, 0, "while shard-1 is down", at_least_s=3.0)
    restart_began = time.monotonic()
    cluster.shards[1].restart()
    restart_s = time.monotonic() - restart_began
    progress(PHASE_SEARCHES, 1, "after shard-1 restarted", at_least_s=2.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=STREAM_TIMEOUT_S + 15)
    assert not any(thread.is_alive() for thread in threads), "a load thread did not end"
    errors.check()
    load_s = time.monotonic() - began

    catch_up_s, _, _ = _wait_replicas_agree(cluster)
    print(
        f"\n[kill9 shard] killed shard-1 at {killed_at:.1f} s, restart took {restart_s:.1f} s; load {load_s:.1f} s: "
        f"{search_ok[0]} searches ok (slowest {slowest[0]:.2f} s), {len(search_failures)} failed; "
        f"{streams_ok[0]} streams ok, "
        f"{len(write_failures)} failed; {ledger.acknowledged_docs()} docs acknowledged; replicas agreed "
        f"{catch_up_s:.1f} s after the load"
    )
    assert not search_failures, f"{len(search_failures)} searches failed, e.g. {search_failures[:5]}"
    assert slowest[0] < PROMPT_S, f"a search took {slowest[0]:.1f} s: it waited instead of failing over"
    unexpected = [f for f in write_failures if f[1] not in EXPECTED_WRITE_FAILURES]
    assert not unexpected, f"writes failed with unexpected codes: {unexpected[:5]}"
    assert streams_ok[0] >= 4, "the writers made too little progress to test anything"
    _check_replicas(cluster, ledger)
    ids = sorted(ledger.acked)
    ledger.check(_router_versions(client.stub, ids), ids, "through the router")
    client.close()


# ------------------------------------------------------------------ 2. kill -9 one of 3 NATS nodes


def _router_nats_node(cluster: LocalCluster) -> int:
    """The index of the NATS node the router is connected to (0 when no node says)."""
    assert cluster.nats is not None
    for index, node in enumerate(cluster.nats.nodes):
        connections = (node.get_json("/connz") or {}).get("connections") or []
        if any(connection.get("name") == "braid-router" for connection in connections):
            return index
    return 0


class _SmallWrites:
    """A writer thread upserting 5 fresh documents per call until told to stop, noting when each
    call succeeded or failed (time, code, message), when each call began (``began``: the call's
    start -> its end) and what the router acknowledged (the ledger)."""

    def __init__(self, client: BraidClient, ledger: Ledger, prefix: str, ack: int, timeout: float) -> None:
        self.client, self.ledger, self.prefix, self.ack, self.timeout = client, ledger, prefix, ack, timeout
        self.successes: list[float] = []
        self.failures: list[tuple[float, grpc.StatusCode, str]] = []
        self.began: dict[float, float] = {}
        self._stop = threading.Event()
        self._errors = _ThreadErrors()
        self._thread = threading.Thread(target=self._errors.wrap(self._run), daemon=True)

    def start(self) -> float:
        self._thread.start()
        return time.monotonic()

    def finish(self, join_s: float) -> None:
        self._stop.set()
        self._thread.join(timeout=join_s)
        assert not self._thread.is_alive(), "the writer did not end"
        self._errors.check()

    def _run(self) -> None:
        for n in range(5000):
            if self._stop.is_set():
                return
            ids = [f"{self.prefix}{n}-{i}" for i in range(5)]
            self.ledger.sent(ids, 0)
            documents = [_doc(i, 0) for i in ids]
            request = pb.UpsertRequest(collection=COLLECTION, documents=documents, ack=self.ack)
            call_began = time.monotonic()
            try:
                self.client.stub.Upsert(request, timeout=self.timeout)
            except grpc.RpcError as err:
                ended = time.monotonic()
                self.began[ended] = call_began
                self.failures.append((ended, _code(err), err.details() or ""))
                time.sleep(0.05)
                continue
            self.ledger.ack(ids, 0)
            ended = time.monotonic()
            self.began[ended] = call_began
            self.successes.append(ended)


def test_kill9_one_of_three_nats_nodes_during_writes(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=3)
    assert cluster.nats is not None
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    ledger = Ledger()
    _create(client)

    writes = _SmallWrites(client, ledger, "n", ack=pb.WRITE_ACK_APPLIED, timeout=5.0)

    # The router's NATS node, unless it also serves the router's watch of the braid-nodes bucket (then
    # another one): losing the bucket's leader or that watch is what the two tests below are about.
    names = [node.name for node in cluster.nats.nodes]
    victim = _router_nats_node(cluster)
    for _ in range(3):
        watch_host = _watch_consumer_host(cluster)
        if names[victim] == watch_host:
            victim = next(i for i, name in enumerate(names) if name != watch_host)
        _move_leader_off(cluster, "KV_braid-nodes", names[victim])
        if _watch_consumer_host(cluster) != names[victim]:
            break
    leaders = _leaders(cluster)
    router_node = names[_router_nats_node(cluster)]
    began = writes.start()
    time.sleep(2.0)
    killed_at = time.monotonic()
    cluster.nats.nodes[victim].kill()

    # Writes go on: once a write begun after the kill succeeds (one in flight at the kill may
    # succeed before the failover), the writer goes on for STEADY_S more, and every write begun in
    # that time must succeed, with no gap longer than STEADY_GAP_S.
    def recovered() -> list[float]:
        return [t for t in list(writes.successes) if writes.began[t] > killed_at]

    deadline = killed_at + FAILOVER_S + 5.0
    while not recovered() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(STEADY_S)
    writes.finish(join_s=15)
    successes, failures = writes.successes, writes.failures
    ended = time.monotonic()
    after_kill = recovered()
    before_kill = [t for t in successes if t <= killed_at]
    failover = (after_kill[0] if after_kill else ended) - killed_at
    steady_gap = _longest_gap(after_kill, after_kill[0], ended) if after_kill else ended - killed_at
    late_failures = [f for f in failures if after_kill and writes.began[f[0]] > after_kill[0]]

    restart_began = time.monotonic()
    cluster.nats.nodes[victim].restart()
    nats_restart_s = time.monotonic() - restart_began
    print(
        f"\n[kill9 nats] killed {names[victim]} (the router is on {router_node}; leaders {leaders}) at "
        f"{killed_at - began:.1f} s: "
        f"{len(before_kill)} writes ok before, {len(after_kill)} after, {len(failures)} failed "
        f"({sorted({f[1].name for f in failures})}); the first write begun after the kill succeeded "
        f"{failover:.2f} s after it, "
        f"then the longest gap between successful writes {steady_gap:.2f} s over {STEADY_S:.0f} s; "
        f"node restarted in {nats_restart_s:.1f} s" + _failure_kinds(failures, killed_at)
    )
    unexpected = [f for f in failures if f[1] not in EXPECTED_WRITE_FAILURES]
    assert not unexpected, f"writes failed with unexpected codes: {unexpected[:5]}"
    assert len(before_kill) >= 5, "the writer made too little progress before the kill"
    assert after_kill, f"no write succeeded within {failover:.1f} s of the NATS node's death; failures: {failures[-5:]}"
    assert failover < FAILOVER_S, f"no write succeeded for {failover:.1f} s after one of 3 NATS nodes died"
    assert len(after_kill) >= 5, f"only {len(after_kill)} writes succeeded in the {STEADY_S:.0f} s after the failover"
    assert steady_gap < STEADY_GAP_S, f"after the failover, writes stalled again for {steady_gap:.1f} s"
    assert not late_failures, f"writes failed after the failover: {late_failures[:3]}"

    ids = sorted(ledger.acked)
    found = _eventually(lambda: _router_versions(client.stub, ids), "reading back through the router")
    ledger.check(found, ids, "through the router")  # type: ignore[arg-type]
    _check_replicas(cluster, ledger)
    client.close()


def _leaders(cluster: LocalCluster) -> dict[str, str]:
    """Stream name -> the server name of its leader, as a live NATS node reports them."""
    assert cluster.nats is not None
    for node in cluster.nats.nodes:
        if not node.alive:
            continue
        jsz = node.get_json("/jsz?streams=true&accounts=true") or {}
        leaders = {
            stream["name"]: (stream.get("cluster") or {}).get("leader")
            for account in jsz.get("account_details") or []
            for stream in account.get("stream_detail") or []
        }
        if leaders and all(leaders.values()):
            return leaders  # type: ignore[return-value]
    return {}


def _step_down(urls: list[str], stream: str) -> None:
    """Ask the stream's leader to step down (JetStream elects another)."""

    async def main() -> None:
        async def quiet(err: Exception) -> None:
            pass

        nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=2, error_cb=quiet)
        try:
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=5)
        finally:
            await nc.close()

    asyncio.run(main())


def _leader_victim(cluster: LocalCluster, lead: str, avoid: tuple[str, ...] = ()) -> tuple[int, str]:
    """A NATS node to kill: it leads the stream whose name starts with ``lead``, and neither is the
    router's node nor leads a stream starting with one of ``avoid`` (leaders are stepped down until
    that holds). Returns (its index, the router's node name)."""
    assert cluster.nats is not None
    names = [node.name for node in cluster.nats.nodes]
    router_node = names[_router_nats_node(cluster)]
    leaders: dict[str, str] = {}
    for _ in range(12):
        leaders = _leaders(cluster)
        stream = next((s for s in leaders if s.startswith(lead)), None)
        assert stream is not None, f"no stream {lead}*: {leaders}"
        victim = leaders[stream]
        clash = [s for s in leaders if s.startswith(avoid) and leaders[s] == victim] if avoid else []
        if victim != router_node and not clash:
            return names.index(victim), router_node
        moving = stream if victim == router_node else clash[0]
        _step_down(cluster.nats.urls, moving)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _leaders(cluster).get(moving) in (None, leaders[moving]):
            time.sleep(0.1)
    raise AssertionError(f"could not arrange the stream leaders (router on {router_node}): {leaders}")


def _move_leader_off(cluster: LocalCluster, prefix: str, node_name: str) -> None:
    """Step the leader of the stream named ``prefix``* down until it is not ``node_name`` (bounded)."""
    assert cluster.nats is not None
    for _ in range(12):
        leaders = _leaders(cluster)
        stream = next((s for s in leaders if s.startswith(prefix)), None)
        assert stream is not None, f"no stream {prefix}*: {leaders}"
        if leaders[stream] != node_name:
            return
        _step_down(cluster.nats.urls, stream)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and _leaders(cluster).get(stream) in (None, node_name):
            time.sleep(0.1)
    raise AssertionError(f"the leader of {prefix}* stays on {node_name}")


def test_logged_writes_wait_through_a_stream_leader_election(local_cluster) -> None:  # noqa: F811
    """kill -9 the NATS node leading the collection's stream (not the router's node, nor the leader of the
    nodes bucket): a WRITE_ACK_LOGGED write whose deadline outlasts the election waits for it."""
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=3)
    assert cluster.nats is not None
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    ledger = Ledger()
    _create(client)
    index, router_node = _leader_victim(cluster, "BRAID_", avoid=("KV_braid-nodes",))
    victim = cluster.nats.nodes[index]
    writes = _SmallWrites(client, ledger, "e", ack=pb.WRITE_ACK_LOGGED, timeout=30.0)
    began = writes.start()
    time.sleep(1.5)
    killed_at = time.monotonic()
    victim.kill()
    time.sleep(max(0.0, began + 12.0 - time.monotonic()))
    writes.finish(join_s=45)
    successes, failures = writes.successes, writes.failures
    gap = _longest_gap(successes, began, time.monotonic())
    victim.restart()
    print(
        f"\n[stream leader] killed {victim.name} (the collection stream's leader; the router is on {router_node}) "
        f"at {killed_at - began:.1f} s: {len(successes)} logged writes ok, {len(failures)} refused; longest gap "
        f"{gap:.2f} s; e.g. {[(round(t - killed_at, 2), c.name, d[:200]) for t, c, d in failures[:1]]}"
    )
    assert [t for t in successes if t > killed_at], "no write succeeded after the kill"
    _check_replicas(cluster, ledger)
    client.close()
    assert not failures, (
        f"{len(failures)} writes with a 30 s deadline were refused during the election, the first "
        f"{failures[0][0] - killed_at:.2f} s after the kill: {failures[0][1].name} {failures[0][2]}"
    )


def _watch_consumer_host(cluster: LocalCluster, stream: str = "KV_braid-nodes") -> str | None:
    """The NATS node holding the consumer of the router's watch of ``stream`` (the only consumer of
    braid-nodes: shard servers only write it)."""
    assert cluster.nats is not None
    for node in cluster.nats.nodes:
        if not node.alive:
            continue
        jsz = node.get_json("/jsz?consumers=true&accounts=true") or {}
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                for consumer in detail.get("consumer_detail") or [] if detail.get("name") == stream else []:
                    host = (consumer.get("cluster") or {}).get("leader")
                    if host:
                        return str(host)
    return None


def _search_through_a_nats_kill(cluster: LocalCluster, victim: int, label: str) -> None:
    """Two threads search through the router for 11 s; NATS node ``victim`` is killed at 1 s. Every
    shard server stays up, so no search may fail."""
    assert cluster.nats is not None
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    node = cluster.nats.nodes[victim]
    stop = threading.Event()
    ok = [0]
    slowest = [0.0]
    failures: list[tuple[float, grpc.StatusCode, str]] = []

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            vector = rng.standard_normal(DIM).astype(np.float32)
            dense = pb.DenseQuery(field="emb", vector=pb.DenseVector(packed=vector.tobytes()))
            request = pb.SearchRequest(collection=COLLECTION, queries=[pb.SubQuery(dense=dense)], limit=10)
            sent = time.monotonic()
            try:
                client.stub.Search(request, timeout=SEARCH_TIMEOUT_S)
                slowest[0] = max(slowest[0], time.monotonic() - sent)
                ok[0] += 1
            except grpc.RpcError as err:
                failures.append((time.monotonic(), _code(err), err.details() or ""))
                time.sleep(0.05)

    errors = _ThreadErrors()
    threads = [threading.Thread(target=errors.wrap(searcher), args=(s,), daemon=True) for s in range(2)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    wait_for(lambda: ok[0] >= PHASE_SEARCHES, timeout=CATCH_UP_S, what="searches before the kill")
    killed_at = time.monotonic()
    node.kill()
    after_kill = ok[0]
    # The window covers NATS's failover (an election takes 2-7 s here) and searches after it.
    wait_for(
        lambda: ok[0] >= after_kill + PHASE_SEARCHES and time.monotonic() - killed_at >= 10.0,
        timeout=CATCH_UP_S,
        what="searches after the kill",
    )
    stop.set()
    for thread in threads:
        thread.join(timeout=SEARCH_TIMEOUT_S + 5)
    node.restart()
    assert not any(thread.is_alive() for thread in threads), "a searcher did not end"
    errors.check()
    print(
        f"\n[{label}] killed {node.name} at {killed_at - began:.1f} s: {ok[0]} searches ok, {len(failures)} failed"
        + _failure_kinds(failures, killed_at)
    )
    client.close()
    assert not failures, (
        f"{len(failures)} searches failed while every shard server was up:{_failure_kinds(failures, killed_at)}"
    )
    assert slowest[0] < PROMPT_S, f"a search took {slowest[0]:.1f} s while NATS failed over"


def test_searches_survive_the_loss_of_the_nodes_bucket_leader(local_cluster) -> None:  # noqa: F811
    """kill -9 the NATS node leading the braid-nodes bucket (not the router's node, nor the collection
    stream's leader): the shard servers are all healthy, so no search may fail."""
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=3)
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    _create(client)
    _bulk(client, Ledger(), [f"seed-{i}" for i in range(300)])
    client.close()
    victim, router_node = _leader_victim(cluster, "KV_braid-nodes", avoid=("BRAID_",))
    _search_through_a_nats_kill(cluster, victim, f"nodes bucket leader, router on {router_node}")


def test_searches_survive_the_loss_of_the_routers_watch_consumer(local_cluster) -> None:  # noqa: F811
    """kill -9 the NATS node holding the consumer of the router's braid-nodes watch (the bucket's leader
    moved elsewhere first): every shard server and the bucket stay up, so no search may fail."""
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=3)
    assert cluster.nats is not None
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    _create(client)
    _bulk(client, Ledger(), [f"seed-{i}" for i in range(300)])
    client.close()
    names = [node.name for node in cluster.nats.nodes]
    host = _watch_consumer_host(cluster)
    assert host in names, f"no consumer for the router's braid-nodes watch: {host}"
    _move_leader_off(cluster, "KV_braid-nodes", host)
    assert _watch_consumer_host(cluster) == host
    router_node = names[_router_nats_node(cluster)]
    _search_through_a_nats_kill(cluster, names.index(host), f"router's watch consumer, router on {router_node}")


# ------------------------------------------------------------------ 3. a replica's data directory deleted


def test_replica_rebuilds_from_the_log_after_its_data_directory_is_deleted(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1)
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    ledger = Ledger()
    _create(client)
    ids = [f"doc-{i}" for i in range(2000)]
    _bulk(client, ledger, ids[:1000], batch=4)  # ~250 log records per shard: replay takes several fetches
    _bulk(client, ledger, ids[1000:], batch=200)
    _, uid, before = _wait_replicas_agree(cluster)
    counts = [before[0][n].documents for n in range(SHARDS)]
    assert sum(counts) == 2000

    data_dir = cluster.directory / cluster.shards[1].name
    assert (data_dir / "replicas").is_dir(), f"no replicas under {data_dir}"
    assert cluster.shards[1].stop() == 0
    shutil.rmtree(data_dir)
    began = time.monotonic()
    cluster.shards[1].restart()
    serving_s = time.monotonic() - began
    # A rebuilding replica never answers with part of its documents: its first answer is complete.
    first_answers: dict[int, tuple[int, float]] = {}
    with ShardServerView(cluster, 1) as view:
        deadline = time.monotonic() + CATCH_UP_S
        while len(first_answers) < SHARDS and time.monotonic() < deadline:
            for n in set(range(SHARDS)) - set(first_answers):
                ref = spb.ReplicaRef(collection=COLLECTION, uid=uid, shard=n)
                try:
                    response = view.stub.Count(spb.ShardCountRequest(replica=ref, min_seq=0), timeout=3)
                except grpc.RpcError as err:
                    assert _code(err) in EXPECTED_WRITE_FAILURES, f"{_code(err).name} {err.details()}"
                    continue
                first_answers[n] = (response.count, time.monotonic() - began)
            time.sleep(0.01)
    _, uid_after, after = _wait_replicas_agree(cluster)
    rebuild_s = time.monotonic() - began
    print(
        f"\n[rebuild] shard-1 served {serving_s:.1f} s after its restart, first answered for its shards after "
        f"{sorted((n, round(t, 2)) for n, (_, t) in first_answers.items())} s, and its replicas agreed with "
        f"shard-0's {rebuild_s:.1f} s after it ({counts} documents per shard)"
    )
    assert set(first_answers) == set(range(SHARDS)), f"the rebuilt replicas never answered: {first_answers}"
    for n, (count, _) in first_answers.items():
        assert count == counts[n], f"shard {n}: the rebuilding replica first answered with {count} of {counts[n]}"
    assert uid_after == uid
    for n in range(SHARDS):
        assert after[1][n].documents == after[0][n].documents == counts[n], f"shard {n}: {after}"
    sample = random.Random(3).sample(ids, 300)
    with ShardServerView(cluster, 1) as view:
        for n in range(SHARDS):
            shard_ids = [doc_id for doc_id in sample if shard_of(doc_id, SHARDS) == n]
            found = view.versions(uid, n, shard_ids)
            assert len(found) == len(shard_ids), f"shard {n}: {len(shard_ids) - len(found)} sampled docs missing"
            ledger.check(found, shard_ids, f"rebuilt replica of shard {n}")
    client.close()


# ------------------------------------------------------------------ 4. kill -9 every process


def test_kill9_every_process_then_restart(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1, shard_args=["--checkpoint-interval-s", "1"])
    assert cluster.nats is not None
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    ledger = Ledger()
    _create(client)
    rng = random.Random(7)
    ids = [f"doc-{i}" for i in range(1200)]
    _bulk(client, ledger, ids[:600])
    client.flush(COLLECTION)  # a checkpoint, then more log after it: recovery = checkpoint + replay
    _bulk(client, ledger, ids[600:])
    replaced = rng.sample(ids, 150)
    for chunk in _chunks(replaced, 50):
        request = pb.UpsertRequest(collection=COLLECTION, documents=[_doc(i, 1) for i in chunk])
        ledger.sent(chunk, 1)
        assert client.stub.Upsert(request, timeout=RPC_TIMEOUT_S).upserted == len(chunk)
        ledger.ack(chunk, 1)
    deleted = rng.sample(ids, 120)  # some of them replaced first
    for chunk in _chunks(deleted, 40):
        ledger.sent(chunk, DELETED)
        assert client.delete(COLLECTION, chunk) == len(chunk)
        ledger.ack(chunk, DELETED)
    client.close()
    expected_live = ledger.acknowledged_docs()

    for child in [*cluster.routers, *cluster.shards]:
        child.kill()
    for node in cluster.nats.nodes:
        node.kill()
    began = time.monotonic()
    for node in cluster.nats.nodes:
        node.restart()
    for shard in cluster.shards:
        shard.restart(wait=False)
    for shard in cluster.shards:
        shard.wait_ready()
    cluster.routers[0].restart()
    restarted_s = time.monotonic() - began

    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    found = _eventually(lambda: _router_versions(client.stub, ids), "reading back through the router")
    answered_s = time.monotonic() - began
    ledger.check(found, ids, "through the restarted router")  # type: ignore[arg-type]
    count = client.count(COLLECTION)
    print(
        f"\n[kill9 all] restarted in {restarted_s:.1f} s, first complete read {answered_s:.1f} s after the "
        f"restart began; {count} documents (expected {expected_live})"
    )
    assert count == expected_live
    _check_replicas(cluster, ledger)
    client.close()


# ------------------------------------------------------------------ 5. SIGTERM the router mid-stream


def test_sigterm_router_mid_stream(local_cluster) -> None:  # noqa: F811
    cluster = local_cluster(shard_servers=2, routers=1, nats_nodes=1, router_args=["--shutdown-grace-s", "1"])
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    ledger = Ledger()
    _create(client)
    client.close()
    stream_client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)

    sent: list[list[str]] = []
    done = threading.Event()
    outcome: dict[str, object] = {}

    def requests() -> Iterator[pb.UpsertRequest]:
        for n in range(2000):
            if done.is_set():
                return
            batch = [f"b{n}-{i}" for i in range(50)]
            ledger.sent(batch, 0)
            sent.append(batch)
            yield pb.UpsertRequest(collection=COLLECTION, documents=[_doc(i, 0) for i in batch])
            time.sleep(0.01)

    def stream() -> None:
        try:
            outcome["response"] = stream_client.stub.BulkUpsert(requests(), timeout=60)
        except grpc.RpcError as err:
            outcome["error"] = err
        finally:
            done.set()

    errors = _ThreadErrors()
    thread = threading.Thread(target=errors.wrap(stream), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while len(sent) < 20 and not done.is_set() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(sent) >= 20 and not done.is_set(), f"the stream did not get going: {outcome}"
    router = cluster.routers[0]
    signalled_at = len(sent)
    router.terminate()
    thread.join(timeout=40)
    assert not thread.is_alive(), "the stream did not end after the router was SIGTERMed"
    errors.check()
    # The one SIGTERM must end it: a second one (stop() sends it) could land in the interpreter's
    # own exit, after it restored the default handler, and count as a kill.
    exit_status = router.wait_exit()
    if exit_status is None:
        exit_status = router.stop()

    if "error" in outcome:
        err = outcome["error"]
        assert isinstance(err, grpc.RpcError)
        assert _code(err) == grpc.StatusCode.UNAVAILABLE, f"{_code(err).name} {err.details()}"
        applied = _applied_batches(err)
        assert applied is not None, f"no braid-batches-applied in the trailing metadata: {err.trailing_metadata()}"
        documents = dict(err.trailing_metadata() or ()).get("braid-documents-applied")
        assert documents == str(50 * applied), (documents, applied)
        how = f"UNAVAILABLE ({err.details()})"
    else:
        response = outcome["response"]
        assert isinstance(response, pb.BulkUpsertResponse)
        applied = response.batches
        assert applied == len(sent)
        how = "completed"
    assert 0 < applied <= len(sent)
    for batch in sent[:applied]:
        ledger.ack(batch, 0)
    print(
        f"\n[sigterm router] SIGTERM after {signalled_at} batches; the stream {how}: {applied} of {len(sent)} "
        f"batches applied; router exit status {exit_status}"
    )
    assert exit_status == 0, router.tail()

    router.restart()
    stream_client.close()
    client = BraidClient(cluster.router_address, timeout=RPC_TIMEOUT_S)
    ids = [doc_id for batch in sent for doc_id in batch]
    found = _eventually(lambda: _router_versions(client.stub, ids), "reading back through the restarted router")
    ledger.check(found, ids, "through the restarted router")  # type: ignore[arg-type]
    assert client.count(COLLECTION) >= 50 * applied
    _check_replicas(cluster, ledger)
    client.close()


# ------------------------------------------------------------------ 6. a record lost in flight to a replica


class _Relay:
    """A TCP relay on loopback between NATS clients and one ``nats-server``: a real network hop
    that a test can fault. ``hold()``: bytes from the server are kept back from then on (they
    wait in the relay); ``cut()``: every connection is closed and what was held is dropped, as a
    NATS node dying or a network fault does to a delivery in flight. New connections relay again."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"nats://127.0.0.1:{self.port}"
        self.held_bytes = 0
        self._hold = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
                server = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
                server.settimeout(None)
            except OSError:
                continue
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_server: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_server and self._hold.is_set():
                    with self._lock:
                        self.held_bytes += len(data)  # kept back, dropped by cut()
                    continue
                sink.sendall(data)
        except OSError:
            pass

    def hold(self) -> None:
        self._hold.set()

    def cut(self) -> None:
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._hold.clear()

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut()


def _consumers(node: NatsNode, stream: str) -> list[dict]:
    """The consumers of ``stream`` as the node's /jsz reports them."""
    jsz = node.get_json("/jsz?consumers=true&accounts=true") or {}
    for account in jsz.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                return list(detail.get("consumer_detail") or [])
    return []


def _wait_until(condition: Callable[[], object], what: str, timeout: float = CATCH_UP_S) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting until {what}")
        time.sleep(0.02)


def _lose_in_flight(node: NatsNode, relay: _Relay, stream: str, publish: Callable[[], int]) -> int:
    """Once a fetch waits on a consumer of ``stream`` (its client connected through ``relay``), hold
    what the server sends, ``publish`` a record, wait until the consumer has delivered it (into the
    relay), and cut the connection: the record is lost in flight. Returns its sequence. Each wait
    is on the consumer's own state as nats-server reports it, so the loss is certain."""
    waiting: dict = {}

    def a_fetch_waits() -> bool:
        waiting.update(next((c for c in _consumers(node, stream) if c.get("num_waiting", 0) >= 1), {}))
        return bool(waiting)

    _wait_until(a_fetch_waits, "a fetch waits on the consumer")
    relay.hold()
    seq = publish()

    def delivered() -> bool:
        consumer = next((c for c in _consumers(node, stream) if c.get("name") == waiting["name"]), {})
        return int((consumer.get("delivered") or {}).get("stream_seq", 0)) >= seq

    _wait_until(delivered, f"the consumer delivered record {seq}")
    _wait_until(lambda: relay.held_bytes > 0, f"record {seq} reached the relay")
    relay.cut()
    return seq


@pytest.mark.parametrize("then", ["another record follows", "nothing follows"])
def test_log_reader_rereads_a_record_lost_in_flight(nats1, then: str) -> None:  # noqa: F811
    """A replica's reader (an ephemeral pull consumer that acknowledges nothing) loses a delivery in
    flight: the consumer sent record m1 to a pending fetch, the connection was cut before it
    arrived. JetStream counts m1 as delivered and never sends it again, and the subject's stream
    sequences cannot show the hole (another subject's records lie between). The reader must
    re-read m1 rather than advance past it: when another record follows (it would have returned
    it after m0) and when nothing follows (it would have reported itself at the end without m1).
    Deterministic: the waits are on the consumer's own state, as nats-server reports it."""
    node = nats1.nodes[0]
    relay = _Relay(node.port)
    writer = NatsLink([node.url], "test-writer")
    reader_link = NatsLink([relay.url], "test-reader")
    reader = LogReader(reader_link, "LOST", "lost.0")
    try:
        assert writer.wait_connected(10) and reader_link.wait_connected(10)
        writer.add_stream("LOST", ["lost.*"], 1)

        def publish(subject: str, name: str) -> int:
            seq = writer.publish_many([(subject, name.encode(), 0, name)], "LOST", 5.0)[0]
            assert isinstance(seq, int), seq
            return seq

        m0 = publish("lost.0", "m0")
        publish("lost.1", "other-a")
        assert [seq for seq, _, _ in reader.fetch(0, 16, 1.0)] == [m0]

        # A fetch waits on the consumer for the next record; the relay then holds back what the
        # server sends, m1 is published and delivered into the relay, and the connection is cut.
        pending: dict[str, object] = {}

        def fetch_in_background() -> None:
            try:
                pending["records"] = reader.fetch(m0, 16, 4.0)
            except Exception as err:  # checked in the main thread
                pending["error"] = err

        waiting = threading.Thread(target=fetch_in_background, daemon=True)
        waiting.start()
        m1 = _lose_in_flight(node, relay, "LOST", lambda: publish("lost.0", "m1"))
        waiting.join(timeout=30)
        assert not waiting.is_alive(), "the fetch did not return"
        error = pending.get("error")
        assert error is None or isinstance(error, Unavailable), f"the fetch across the cut failed: {error!r}"
        got: list[int] = [seq for seq, _, _ in pending.get("records") or []]  # type: ignore[union-attr]
        publish("lost.1", "other-b")
        last = publish("lost.0", "m2") if then == "another record follows" else m1

        # Read on as a replica does: from the last record taken, retrying what fails.
        after = got[-1] if got else m0
        deadline = time.monotonic() + CATCH_UP_S
        while after < last and time.monotonic() < deadline:
            try:
                batch = reader.fetch(after, 16, 1.0)
            except Unavailable:  # the link reconnecting, or a gap the reader found: retried
                time.sleep(0.2)
                continue
            got += [seq for seq, _, _ in batch]
            if batch:
                after = batch[-1][0]
        wanted = [m1] if then == "nothing follows" else [m1, last]
        assert got == wanted, (
            f"after record {m0} the reader returned {got}, the subject holds {wanted}: "
            f"{'it skipped' if m1 not in got else 'it read'} m1 (lost in flight); "
            f"{getattr(reader, 'gaps', 0)} gaps found"
        )
        assert reader.gaps >= 1, "the reader re-read m1 without finding a gap"
        reader.fetch(after, 16, 0.5, check_end=True)
        assert reader.at_end, "the reader does not know it holds the subject's last record"
    finally:
        reader.close()
        reader_link.close()
        writer.close()
        relay.close()


def test_replica_rereads_a_record_lost_in_flight(nats1, tmp_path: Path) -> None:  # noqa: F811
    """The same loss one level up: a Replica (a follower Shard fed by its reader; service/cluster/
    replica.py) whose connection is cut with its record m1 in flight, and nothing written after it
    on its subject (another shard's record moves the stream on). It must apply m1 and hold its
    document; before, it stayed at m0 for good, caught up as far as its consumer could tell."""
    node = nats1.nodes[0]
    relay = _Relay(node.port)
    writer = NatsLink([node.url], "test-writer")
    link = NatsLink([relay.url], "test-replica")
    schema_json = schema_from_proto(_schema()).to_json()
    meta = CollectionMeta("lost", "lostuid", schema_json, 2, 1, time.time(), (("here",), ("here",)))
    replica = Replica(meta, 0, tmp_path / "replica", link, StoragePolicy(min_free_bytes=0))
    try:
        assert writer.wait_connected(10) and link.wait_connected(10)
        writer.add_stream(meta.stream, [f"braid.{meta.uid}.*"], 1)

        def publish(shard: int, doc_id: str) -> int:
            vector = _VECTORS[zlib.crc32(doc_id.encode()) % len(_VECTORS)]
            doc = DocumentWrite(id=doc_id, dense={"emb": vector}, payload={"tag": f"{doc_id}@0"})
            item = (meta.subject(shard), records.encode_upsert([doc]), records.UPSERT, doc_id)
            seq = writer.publish_many([item], meta.stream, 5.0)[0]
            assert isinstance(seq, int), seq
            return seq

        m0 = publish(0, "d0")
        publish(1, "x0")
        replica.start()
        _wait_until(lambda: replica.caught_up.is_set() and replica.applied_seq >= m0, "the replica opened")
        m1 = _lose_in_flight(node, relay, meta.stream, lambda: publish(0, "d1"))
        publish(1, "x1")
        _wait_until(lambda: replica.applied_seq >= m1, f"the replica applied record {m1} (lost in flight)")
        shard = replica.serving(need_caught_up=True)
        assert shard.label_of("d1") is not None and shard.count(None) == 2
    finally:
        replica.close()
        link.close()
        writer.close()
        relay.close()
