"""Standalone ``braid serve`` against a local cluster (NATS + router + 2 shard servers), in one run.

    python bench/cluster.py [--n 20000] [--dim 384] [--queries 1000] [--shards 2] [--seconds 10]
                            [--clients 16] [--client-procs 4] [--out bench/results/cluster.json]

Uses the shared vector set (../shared/bench/make_vectors.py, cached under bench/results/).
Both deployments run in child processes on loopback, one after the other (never both busy
at once), with the same collection: one dense field "v", dim, COSINE, HNSW M=16,
ef_construction=200, ef_search=64, ``--shards`` shards:

  standalone  ``braid serve`` with its own data directory;
  cluster     LocalCluster(shard_servers=2, routers=1, nats_nodes=1), replication_factor 2
              (every shard server holds a replica of every shard).

For each it measures
  1. BulkUpsert docs/s: all n vectors in one stream of 500-document batches (packed float32),
     timed until the response; on the cluster with the default ack (WRITE_ACK_APPLIED: one
     replica of each shard applied it) and, into a second collection at the very end, with
     WRITE_ACK_LOGGED (JetStream stored it: what the log alone costs), plus the time until
     every replica applied that second load;
  2. single-client Search (plain dense, limit 10, ef 64) p50 / p99 over the queries after a
     warm-up of 100, and recall@10 against the exact top 10; router hop = cluster p50 -
     standalone p50 (the two phases run minutes apart, so a machine whose load changes moves
     it), and the interleaved router hop: the standalone server, idle since its own phases,
     and the router answer the same queries alternately, one call at a time, after the
     cluster's concurrent phase (the standalone server is stopped right after);
  3. ``--clients`` concurrent searchers for ``--seconds``: ``--client-procs`` processes
     (spawned) of clients / client-procs threads each, one channel per thread; QPS, p50, p99;
  4. (cluster only) replica rebuild from the log: SIGTERM shard server 1, delete its data
     directory, start it again, and time until its braid.cluster.v1.Shard/Status reports
     every replica it held caught up with as many documents as shard server 0's replica of
     the same shard.
Reference in the same run: raw hnswlib in this process (same M / ef_construction, ef 64),
one query per call on one thread: QPS and recall@10.
Targets: cluster BulkUpsert >= 0.7 x standalone; router hop <= 0.5 ms; recall equal.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense import recall_at_10, shared_vectors  # noqa: E402
from settle import settle  # noqa: E402

from braid.cluster.v1 import shard_pb2 as spb  # noqa: E402
from braid.cluster.v1 import shard_pb2_grpc  # noqa: E402
from braid.service.client import BraidClient, dense_vector  # noqa: E402
from braid.service.cluster.local import ROUTER_READY, Child, LocalCluster, child_env  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402

M, EF_CONSTRUCTION, EF = 16, 200, 64
BATCH = 500
WARMUP = 100
FIELD = "v"
COLLECTION = "bench"
LOGGED_COLLECTION = "bench_logged"
STREAM_TIMEOUT_S = 3600.0
REBUILD_TIMEOUT_S = 600.0
_POLL_S = 0.05


def schema(dim: int) -> pb.Schema:
    return pb.Schema(
        dense_fields=[
            pb.DenseVectorField(
                name=FIELD,
                dim=dim,
                metric=pb.COSINE,
                hnsw=pb.HnswParams(m=M, ef_construction=EF_CONSTRUCTION, ef_search=EF),
            )
        ]
    )


def search_request(collection: str, vector: np.ndarray) -> pb.SearchRequest:
    return pb.SearchRequest(
        collection=collection,
        limit=10,
        queries=[pb.SubQuery(dense=pb.DenseQuery(field=FIELD, vector=dense_vector(vector), ef=EF))],
    )


def upsert_batches(collection: str, base: np.ndarray, ack: int = pb.WRITE_ACK_APPLIED) -> list[pb.UpsertRequest]:
    """The whole load, built before the clock starts."""
    return [
        pb.UpsertRequest(
            collection=collection,
            ack=ack,
            documents=[
                pb.Document(id=str(i), dense={FIELD: dense_vector(base[i])})
                for i in range(start, min(start + BATCH, len(base)))
            ],
        )
        for start in range(0, len(base), BATCH)
    ]


def bulk_upsert(client: BraidClient, batches: list[pb.UpsertRequest], n: int) -> float:
    """Seconds from opening the stream to its response."""
    began = time.perf_counter()
    response = client.stub.BulkUpsert(iter(batches), timeout=STREAM_TIMEOUT_S)
    seconds = time.perf_counter() - began
    if response.upserted != n:
        raise RuntimeError(f"BulkUpsert answered upserted={response.upserted}, expected {n}")
    return seconds


def percentiles(latencies_s: np.ndarray) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    p50, p99 = np.percentile(latencies_s, [50, 99]) * 1e3
    return float(p50), float(p99)


# ------------------------------------------------------------------ single client


def single_client(client: BraidClient, queries: np.ndarray, gt: np.ndarray, collection: str) -> dict[str, float]:
    requests = [search_request(collection, q) for q in queries]
    for i in range(WARMUP):
        client.stub.Search(requests[i % len(requests)], timeout=client.timeout)
    latencies = np.empty(len(requests))
    found = []
    for i, request in enumerate(requests):
        began = time.perf_counter()
        response = client.stub.Search(request, timeout=client.timeout)
        latencies[i] = time.perf_counter() - began
        found.append([int(hit.id) for hit in response.hits])
    p50, p99 = percentiles(latencies)
    return {
        "p50_ms": p50,
        "p99_ms": p99,
        "qps": len(requests) / float(latencies.sum()),
        "recall": recall_at_10(found, gt),
    }


# ------------------------------------------------------------------ concurrent clients


def _searchers(
    address: str,
    queries: np.ndarray,
    threads: int,
    offset: int,
    ready: Any,
    go: Any,
    seconds: float,
) -> tuple[list[float], int, float, float]:
    """``threads`` searchers (one channel each): warm up, report ready, wait for ``go``, search for
    ``seconds``. Returns the latencies, the error count, and the first start / last end (monotonic)."""
    latencies: list[list[float]] = [[] for _ in range(threads)]
    errors = [0] * threads
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * threads
    clients = [BraidClient(address, timeout=30) for _ in range(threads)]
    requests = [search_request(COLLECTION, q) for q in queries]
    barrier = threading.Barrier(threads + 1)

    def run(t: int) -> None:
        stub = clients[t].stub
        i = (offset + t) * 37
        try:
            for _ in range(20):
                stub.Search(requests[i % len(requests)], timeout=30)
                i += 1
        except BaseException:
            barrier.abort()  # the others, and the caller, get BrokenBarrierError
            raise
        barrier.wait()
        mine = latencies[t]
        began = time.monotonic()
        deadline = began + seconds
        now = began
        while now < deadline:
            request = requests[i % len(requests)]
            i += 1
            try:
                stub.Search(request, timeout=30)
            except grpc.RpcError:
                errors[t] += 1
                now = time.monotonic()
                continue
            end = time.monotonic()
            mine.append(end - now)
            now = end
        spans[t] = (began, now)

    workers = [threading.Thread(target=run, args=(t,), daemon=True) for t in range(threads)]
    for worker in workers:
        worker.start()
    ready()
    go()
    barrier.wait()
    for worker in workers:
        worker.join()
    for client in clients:
        client.close()
    return (
        [x for mine in latencies for x in mine],
        sum(errors),
        min(s[0] for s in spans),
        max(s[1] for s in spans),
    )


def _client_process(
    address: str, queries: np.ndarray, threads: int, offset: int, seconds: float, ready_q: Any, go: Any, out: Any
) -> None:
    try:
        result = _searchers(address, queries, threads, offset, lambda: ready_q.put(offset), go.wait, seconds)
        out.put((np.asarray(result[0], dtype=np.float64), result[1], result[2], result[3]))
    except BaseException as err:
        ready_q.put(-1)
        out.put(repr(err))


def concurrent(address: str, queries: np.ndarray, clients: int, procs: int, seconds: float) -> dict[str, Any]:
    """``clients`` searchers for ``seconds``: in ``procs`` spawned processes, or threads here when procs is 1."""
    procs = max(1, min(procs, clients))
    if procs == 1:
        latencies, errors, first, last = _searchers(address, queries, clients, 0, lambda: None, lambda: None, seconds)
        spans = [(first, last)]
        mode = f"{clients} threads in the benchmark process"
    else:
        context = multiprocessing.get_context("spawn")  # never fork a process that holds gRPC channels
        ready_q, out, go = context.Queue(), context.Queue(), context.Event()
        shares = [clients // procs + (1 if p < clients % procs else 0) for p in range(procs)]
        children = [
            context.Process(
                target=_client_process,
                args=(address, queries, shares[p], sum(shares[:p]), seconds, ready_q, go, out),
                daemon=True,
            )
            for p in range(procs)
        ]
        for child in children:
            child.start()
        try:
            for _ in children:
                if ready_q.get(timeout=300) < 0:
                    break
            go.set()
            results = [out.get(timeout=seconds + 300) for _ in children]
        finally:
            for child in children:
                child.join(timeout=30)
                if child.is_alive():
                    child.kill()
        failed = [r for r in results if isinstance(r, str)]
        if failed:
            raise RuntimeError(f"a client process failed: {failed[0]}")
        latencies = np.concatenate([r[0] for r in results])
        errors = sum(r[1] for r in results)
        spans = [(r[2], r[3]) for r in results]
        mode = f"{procs} processes x {'/'.join(str(s) for s in sorted(set(shares)))} threads"
    elapsed = max(s[1] for s in spans) - min(s[0] for s in spans)
    p50, p99 = percentiles(np.asarray(latencies))
    return {
        "qps": len(latencies) / elapsed,
        "p50_ms": p50,
        "p99_ms": p99,
        "searches": len(latencies),
        "errors": errors,
        "elapsed_s": elapsed,
        "clients": mode,
    }


# ------------------------------------------------------------------ replica rebuild


def shard_status(address: str) -> spb.StatusResponse:
    with grpc.insecure_channel(address) as channel:
        return shard_pb2_grpc.ShardStub(channel).Status(spb.StatusRequest(), timeout=10)


def _key(status: spb.ReplicaStatus) -> tuple[str, str, int]:
    return (status.replica.collection, status.replica.uid, status.replica.shard)


def rebuild_replica(cluster: LocalCluster) -> dict[str, Any]:
    """SIGTERM shard server 1, delete its data, start it; seconds until every replica it held is back."""
    zero, one = cluster.shards[0], cluster.shards[1]
    before = {_key(r): r.documents for r in shard_status(cluster.address_of(one)).replicas}
    held = set(before)
    if not held:
        raise RuntimeError("shard server 1 holds no replica")
    one.stop()
    shutil.rmtree(cluster.directory / one.name)
    began = time.perf_counter()
    one.start()
    one.wait_ready()
    ready_s = time.perf_counter() - began
    deadline = time.monotonic() + REBUILD_TIMEOUT_S
    polls = 0
    while True:
        polls += 1
        try:
            mine = {_key(r): r for r in shard_status(cluster.address_of(one)).replicas}
            theirs = {_key(r): r.documents for r in shard_status(cluster.address_of(zero)).replicas}
        except grpc.RpcError:
            mine, theirs = {}, {}
        # as many documents as before the stop, and as server 0's copy where it holds one (replication 2)
        if held <= mine.keys() and all(
            mine[k].caught_up and not mine[k].problem and mine[k].documents == theirs.get(k, before[k]) == before[k]
            for k in held
        ):
            seconds = time.perf_counter() - began
            documents = sum(mine[k].documents for k in held)
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"shard server 1 did not rebuild in {REBUILD_TIMEOUT_S:.0f} s: {mine}")
        time.sleep(_POLL_S)
    return {
        "seconds": seconds,
        "ready_line_s": ready_s,
        "replicas": len(held),
        "documents": documents,
        "docs_per_s": documents / seconds,
        "polls": polls,
    }


def applied_everywhere(cluster: LocalCluster, collection: str, n: int, began: float, copies: int = 2) -> float:
    """Seconds from ``began`` until the replicas of ``collection`` on all shard servers hold copies x n documents."""
    deadline = time.monotonic() + REBUILD_TIMEOUT_S
    while True:
        held = 0
        for shard in cluster.shards:
            replicas = shard_status(cluster.address_of(shard)).replicas
            held += sum(r.documents for r in replicas if r.replica.collection == collection)
        if held == n * copies:
            return time.perf_counter() - began
        if time.monotonic() > deadline:
            raise RuntimeError(f"{collection} was not applied on every replica in {REBUILD_TIMEOUT_S:.0f} s")
        time.sleep(_POLL_S)


# ------------------------------------------------------------------ deployments


def interleaved_hop(standalone: str, router: str, queries: np.ndarray) -> dict[str, float]:
    """The same plain dense searches, one call at a time, alternately to the standalone server
    and to the router (which goes first alternates too): p50 / p99 of each, and the hop."""
    latencies: dict[str, list[float]] = {"standalone": [], "cluster": []}
    with BraidClient(standalone, timeout=60) as a, BraidClient(router, timeout=60) as b:
        stubs = {"standalone": a.stub, "cluster": b.stub}
        requests = [search_request(COLLECTION, q) for q in queries]
        for i in range(WARMUP):
            for stub in stubs.values():
                stub.Search(requests[i % len(requests)], timeout=60)
        for i, request in enumerate(requests):
            for name in ("standalone", "cluster") if i % 2 else ("cluster", "standalone"):
                began = time.perf_counter()
                stubs[name].Search(request, timeout=60)
                latencies[name].append(time.perf_counter() - began)
    out: dict[str, float] = {}
    for name, values in latencies.items():
        out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = percentiles(np.asarray(values))
    out["hop_ms"] = out["cluster_p50_ms"] - out["standalone_p50_ms"]
    return out


def run_standalone(
    workdir: Path, base: np.ndarray, queries: np.ndarray, gt: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, Any], Child]:
    """The standalone phases; the server is left running (idle) for the interleaved hop: the caller stops it."""
    n = len(base)
    data = workdir / "standalone"
    server = Child(
        "standalone",
        [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(data), "--port", "0"],
        ROUTER_READY,  # the same line: "serving braid.v1.Braid on host:port"
        env=child_env(),
        log_path=workdir / "logs" / "standalone.log",
    )
    result: dict[str, Any] = {}
    try:
        with BraidClient(server.address, timeout=60) as client:
            client.create_collection(COLLECTION, schema(args.dim), shards=args.shards)
            seconds = bulk_upsert(client, upsert_batches(COLLECTION, base), n)
            result["bulk_upsert"] = {"seconds": seconds, "docs_per_s": n / seconds}
            print(f"standalone: BulkUpsert {n} in {seconds:.1f} s", flush=True)
            assert client.count(COLLECTION) == n
            assert server.proc is not None
            result["settle_s"] = settle([server.proc.pid])  # background graph builds, before timing searches
            result["search"] = single_client(client, queries, gt, COLLECTION)
            print(f"standalone: single client {result['search']}", flush=True)
        result["concurrent"] = concurrent(server.address, queries, args.clients, args.client_procs, args.seconds)
        print(f"standalone: concurrent {result['concurrent']}", flush=True)
    except BaseException:
        print(f"--- standalone output:\n{server.tail()}", file=sys.stderr)
        server.stop()
        raise
    return result, server


def run_cluster(
    workdir: Path, base: np.ndarray, queries: np.ndarray, gt: np.ndarray, args: argparse.Namespace, standalone: Child
) -> dict[str, Any]:
    n = len(base)
    result: dict[str, Any] = {}
    began = time.perf_counter()
    with LocalCluster(workdir / "cluster", shard_servers=2, routers=1, nats_nodes=1) as cluster:
        result["started_s"] = time.perf_counter() - began
        print(f"cluster: up in {result['started_s']:.1f} s", flush=True)
        try:
            address = cluster.router_address
            with BraidClient(address, timeout=60) as client:
                client.create_collection(
                    COLLECTION, schema(args.dim), shards=args.shards, replication_factor=args.replication_factor
                )
                seconds = bulk_upsert(client, upsert_batches(COLLECTION, base), n)
                result["bulk_upsert"] = {"seconds": seconds, "docs_per_s": n / seconds}
                print(f"cluster: BulkUpsert {n} in {seconds:.1f} s (ack applied)", flush=True)
                assert client.count(COLLECTION) == n
                # the second replica of each shard may still be applying: let it finish first
                applied_everywhere(cluster, COLLECTION, n, time.perf_counter(), args.replication_factor)
                result["settle_s"] = settle([c.proc.pid for c in cluster.children if c.proc is not None])
                result["search"] = single_client(client, queries, gt, COLLECTION)
                print(f"cluster: single client {result['search']}", flush=True)
            result["concurrent"] = concurrent(address, queries, args.clients, args.client_procs, args.seconds)
            print(f"cluster: concurrent {result['concurrent']}", flush=True)
            result["interleaved"] = interleaved_hop(standalone.address, address, queries)
            standalone.stop()
            print(f"cluster: interleaved with standalone {result['interleaved']}", flush=True)

            result["rebuild"] = rebuild_replica(cluster)
            print(f"cluster: rebuild {result['rebuild']}", flush=True)

            # Last, so its replicas applying in the background disturb nothing else.
            with BraidClient(address, timeout=60) as client:
                client.create_collection(
                    LOGGED_COLLECTION, schema(args.dim), shards=args.shards, replication_factor=args.replication_factor
                )
                batches = upsert_batches(LOGGED_COLLECTION, base, pb.WRITE_ACK_LOGGED)
                began = time.perf_counter()
                response = client.stub.BulkUpsert(iter(batches), timeout=STREAM_TIMEOUT_S)
                seconds = time.perf_counter() - began
                applied = applied_everywhere(cluster, LOGGED_COLLECTION, n, began, args.replication_factor)
                result["bulk_upsert_logged"] = {
                    "seconds": seconds,
                    "docs_per_s": n / seconds,
                    "upserted": response.upserted,
                    "applied_everywhere_s": applied,
                    "applied_everywhere_docs_per_s": n / applied,
                }
                print(
                    f"cluster: BulkUpsert {n} in {seconds:.1f} s (ack logged), on every replica after {applied:.1f} s"
                )
        except BaseException:
            for child in cluster.children:
                print(f"--- {child.name} output:\n{child.tail(20)}", file=sys.stderr)
            raise
    return result


def raw_reference(base: np.ndarray, queries: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    began = time.perf_counter()
    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION)
    index.add_items(base, np.arange(len(base)))
    build = time.perf_counter() - began
    index.set_ef(EF)
    latencies = np.empty(len(queries))
    found = []
    for i, q in enumerate(queries):
        t = time.perf_counter()
        labels, _ = index.knn_query(q, k=10, num_threads=1)
        latencies[i] = time.perf_counter() - t
        found.append(labels[0].tolist())
    p50, p99 = percentiles(latencies)
    return {
        "build_s": build,
        "qps": len(queries) / float(latencies.sum()),
        "p50_ms": p50,
        "p99_ms": p99,
        "recall": recall_at_10(found, gt),
    }


# ------------------------------------------------------------------ report


def table(s: dict[str, Any], c: dict[str, Any]) -> list[str]:
    def row(label: str, a: float, b: float, fmt: str) -> str:
        return f"| {label} | {a:{fmt}} | {b:{fmt}} | {b / a:.2f} |"

    return [
        "| measure | standalone | cluster | ratio |",
        "|---|---|---|---|",
        row("BulkUpsert docs/s (ack applied)", s["bulk_upsert"]["docs_per_s"], c["bulk_upsert"]["docs_per_s"], ",.0f"),
        row(
            "BulkUpsert docs/s (cluster ack logged)",
            s["bulk_upsert"]["docs_per_s"],
            c["bulk_upsert_logged"]["docs_per_s"],
            ",.0f",
        ),
        row("Search p50 ms, 1 client", s["search"]["p50_ms"], c["search"]["p50_ms"], ".2f"),
        row("Search p99 ms, 1 client", s["search"]["p99_ms"], c["search"]["p99_ms"], ".2f"),
        row("Search QPS, 1 client", s["search"]["qps"], c["search"]["qps"], ",.0f"),
        row("recall@10", s["search"]["recall"], c["search"]["recall"], ".3f"),
        row("Search QPS, concurrent", s["concurrent"]["qps"], c["concurrent"]["qps"], ",.0f"),
        row("Search p50 ms, concurrent", s["concurrent"]["p50_ms"], c["concurrent"]["p50_ms"], ".2f"),
        row("Search p99 ms, concurrent", s["concurrent"]["p99_ms"], c["concurrent"]["p99_ms"], ".2f"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument(
        "--replication-factor", type=int, default=2, help="of the cluster's collection (2: every server indexes all)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each concurrent-search phase")
    parser.add_argument("--clients", type=int, default=16, help="concurrent searchers")
    parser.add_argument(
        "--client-procs", type=int, default=4, help="processes the concurrent searchers run in (1: threads here)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster.json")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: a temporary folder)")
    args = parser.parse_args()

    wall = time.perf_counter()
    base, queries, gt = shared_vectors(args.n, args.dim, args.queries)
    n = len(base)
    print(
        f"shared set: {n} x {args.dim}, {len(queries)} queries; {args.shards} shards; HNSW M={M} "
        f"ef_construction={EF_CONSTRUCTION} ef={EF}; {os.cpu_count()} CPUs",
        flush=True,
    )
    reference = raw_reference(base, queries, gt)
    print(f"reference: raw hnswlib {reference}", flush=True)

    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="braid-bench-cluster-")
        workdir = Path(temporary.name)
    else:
        workdir = args.workdir.absolute()
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        standalone, server = run_standalone(workdir, base, queries, gt, args)
        try:
            cluster = run_cluster(workdir, base, queries, gt, args, server)
        finally:
            server.stop()
    finally:
        if temporary is not None:
            temporary.cleanup()

    hop = cluster["search"]["p50_ms"] - standalone["search"]["p50_ms"]
    ingest_ratio = cluster["bulk_upsert"]["docs_per_s"] / standalone["bulk_upsert"]["docs_per_s"]
    rebuild = cluster["rebuild"]
    logged = cluster["bulk_upsert_logged"]
    wall_s = time.perf_counter() - wall
    print()
    print(
        f"n={n} dim={args.dim} queries={len(queries)} shards={args.shards} "
        f"replication_factor={args.replication_factor} (cluster) "
        f"clients={args.clients} ({cluster['concurrent']['clients']}) seconds={args.seconds:g} cpus={os.cpu_count()}"
    )
    print("\n".join(table(standalone, cluster)))
    print()
    print(
        f"BulkUpsert cluster/standalone {ingest_ratio:.2f} "
        f"(target >= 0.7: {'met' if ingest_ratio >= 0.7 else 'NOT met'}); "
        f"ack logged: every replica had applied it {logged['applied_everywhere_s']:.1f} s after the stream opened "
        f"({logged['applied_everywhere_docs_per_s']:,.0f} docs/s)"
    )
    inter = cluster["interleaved"]
    print(
        f"router hop (p50 cluster - standalone): {hop:.3f} ms "
        f"(target <= 0.5 ms: {'met' if hop <= 0.5 else 'NOT met'}); "
        f"interleaved: {inter['hop_ms']:.3f} ms ({inter['cluster_p50_ms']:.2f} - {inter['standalone_p50_ms']:.2f}; "
        f"target <= 0.5 ms: {'met' if inter['hop_ms'] <= 0.5 else 'NOT met'})"
    )
    print(
        f"replica rebuild from the log: {rebuild['replicas']} replicas, {rebuild['documents']:,} documents in "
        f"{rebuild['seconds']:.1f} s ({rebuild['docs_per_s']:,.0f} docs/s; "
        f"process ready after {rebuild['ready_line_s']:.1f} s)"
    )
    print(
        f"reference: raw hnswlib, 1 thread, ef {EF}: {reference['qps']:,.0f} QPS, p50 {reference['p50_ms']:.3f} ms, "
        f"recall@10 {reference['recall']:.3f} (build {reference['build_s']:.1f} s)"
    )
    errors = standalone["concurrent"]["errors"] + cluster["concurrent"]["errors"]
    if errors:
        print(f"WARNING: {errors} concurrent searches failed (standalone {standalone['concurrent']['errors']})")
    print(f"wall time {wall_s:.0f} s")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "params": {
                    "n": n,
                    "dim": args.dim,
                    "queries": len(queries),
                    "shards": args.shards,
                    "replication_factor": args.replication_factor,
                    "seconds": args.seconds,
                    "clients": args.clients,
                    "client_procs": args.client_procs,
                    "m": M,
                    "ef_construction": EF_CONSTRUCTION,
                    "ef": EF,
                    "batch": BATCH,
                },
                "machine": {"cpu_count": os.cpu_count()},
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "standalone": standalone,
                "cluster": cluster,
                "router_hop_ms": hop,
                "router_hop_interleaved_ms": inter["hop_ms"],
                "bulk_upsert_ratio": ingest_ratio,
                "reference_raw_hnswlib": reference,
                "wall_s": wall_s,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
