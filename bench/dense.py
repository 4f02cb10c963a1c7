"""Dense search through Braid's gRPC API against raw hnswlib and a bare gRPC echo, in one run.

    python bench/dense.py [--n 100000] [--dim 384] [--queries 1000] [--efs 32,64,128]

Uses the shared vector set (../shared/bench/make_vectors.py, cached under bench/results/; without
../shared the project's identical generator, loadtest/vectors.py).
For every ef it prints recall@10 and single-client QPS of
  raw      hnswlib in this process (same M / ef_construction / ef), one query per call,
  echo     a bare grpcio service (separate process) that receives the same SearchRequest bytes
           and returns the same SearchResponse bytes Braid would, doing no work,
  bare     that service decoding each request and running raw hnswlib on it: the floor
           for any Python gRPC server around hnswlib,
  braid    Search through the API (server in a separate process),
and ideal = 1 / (1/raw + 1/echo): what a server that adds nothing to hnswlib and gRPC could do.
Then BatchSearch of 100 queries against raw hnswlib's batched knn_query.
Targets (issue 3): braid >= 0.8 x ideal at recall@10 >= 0.95; batch >= 0.6 x raw batched.

    python bench/dense.py --n 20000 --efs 64 --queries 2000 --code before=/tmp/wt-old --code after=.

compares versions of Braid instead (on a busy machine, where back-to-back runs drift): one
server per ``--code NAME=CHECKOUT`` (a checkout of any commit, e.g. ``git worktree add
/tmp/wt-old <commit>``; its protos are compiled into a temporary copy of its ``braid``
package), each loaded with the same vectors, then --rounds rounds, each timing every
server's single Searches and BatchSearches, the bare gRPC+hnswlib server and raw batched
hnswlib one after the other (the order rotating each round). It prints per server the
median over rounds of each rate, of its ratio to the first server, and of the CPU time the
server process spent a query (less sensitive than rates to other work on the machine).
With --strand it times index/hnsw_strand.py's search alone, no gRPC: one graph of all but
the last 1,000 vectors (built here once, loaded by every version as a checkpoint from before
segments) and those 1,000 in the strand's growing rows, as a settled server holds them after
a bulk load; per round one child process per version (OPENBLAS_NUM_THREADS=1, as
``braid serve``) times every query alone and in batches of --batch; it prints medians of
time and CPU a query (and the CPU outside hnswlib's graph walks: what the strand adds), and
whether every version returned the same hits, bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
M, EF_CONSTRUCTION = 16, 200
sys.path.insert(0, str(ROOT))

from settle import settle  # noqa: E402  # bench/settle.py (bench/ is on the path when this runs)

from braid.service.client import BraidClient, dense_vector  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402
from loadtest.vectors import load_vectors, set_dir  # noqa: E402


def shared_vectors(n: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(base, queries, gt) of the shared set, cached under bench/results/ (loadtest/vectors.py: made by
    ../shared/bench/make_vectors.py, or by the project's identical copy of it when ../shared is absent)."""
    return load_vectors(n, dim, queries, log=print)


def recall_at_10(found: list[list[int]], gt: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(g[:10].tolist())) / 10 for f, g in zip(found, gt, strict=True)]))


# -------------------------------------------------------------------- echo


def echo_server_main(port_file: str, response_hex: str, base_path: str = "") -> None:
    """A bare gRPC service answering every Search with fixed response bytes.

    With ``base_path`` it is the "bare" reference instead: it decodes each request and
    runs raw hnswlib on it (same M / ef_construction, ef from the request): what any
    Python gRPC server around hnswlib must do, and nothing more.
    """
    response = bytes.fromhex(response_hex)
    index = None
    if base_path:
        base = np.load(base_path)
        index = hnswlib.Index(space="cosine", dim=base.shape[1])
        index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION)
        index.add_items(base, np.arange(len(base)))

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        if index is not None:
            message = pb.SearchRequest.FromString(request)
            dense = message.queries[0].dense
            index.set_ef(dense.ef)  # one client at a time, so the global ef is safe here
            index.knn_query(np.frombuffer(dense.vector.packed, "<f4"), k=message.limit, num_threads=1)
        return response

    serve_search(handle, port_file)


def serve_search(handle: Any, port_file: str) -> None:
    """A bare grpcio (thread pool) server whose braid.v1.Braid/Search is ``handle`` on raw bytes; its
    port goes into ``port_file``. Serves until killed."""
    handler = grpc.method_handlers_generic_handler(
        "braid.v1.Braid",
        {"Search": grpc.unary_unary_rpc_method_handler(handle, lambda b: b, lambda b: b)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


def start_process(args: list[str], port_file: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(12_000):  # up to 10 minutes: the bare reference builds its index first
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def start_braid(data_dir: Path, package: Path | None = None) -> tuple[subprocess.Popen, int]:
    """``braid serve`` in a child process; with ``package`` (``code_package``), that code's."""
    env = None
    if package is not None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(
        [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(data_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "serving braid.v1.Braid on" in line:
            # Keep reading its log: a full pipe would stall the server mid-benchmark.
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, int(re.search(r"on [\d.]+:(\d+)", line).group(1))  # type: ignore[union-attr]
    raise RuntimeError("braid did not start")


def code_package(checkout: Path, into: Path) -> Path:
    """A directory to put first on PYTHONPATH to run ``checkout``'s Braid: its ``braid`` package laid
    out as pyproject.toml maps it (proto/braid, with the protos compiled, plus index/, service/,
    encoders/ linked in)."""
    from grpc_tools import protoc

    package = into / "braid"
    shutil.copytree(checkout / "proto" / "braid", package, ignore=shutil.ignore_patterns("*_pb2*", "__pycache__"))
    include = str(Path(protoc.__file__).parent / "_proto")
    protos = sorted(str(path.relative_to(into)) for path in package.rglob("*.proto"))
    args = ["protoc", f"-I{into}", f"-I{include}", f"--python_out={into}", f"--grpc_python_out={into}"]
    if protoc.main(args + protos) != 0:
        raise RuntimeError(f"protoc failed on {checkout}'s protos")
    for name in ("index", "service", "encoders"):
        (package / name).symlink_to((checkout / name).resolve())
    return into


# -------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--efs", default="32,64,128")
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument(
        "--code", action="append", default=[], metavar="NAME=CHECKOUT", help="compare versions (module doc)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="with --code: rounds of interleaved timings")
    parser.add_argument("--strand", action="store_true", help="with --code: time the HNSW strand alone (module doc)")
    args = parser.parse_args()
    if args.code and args.strand:
        compare_strands(args)
        return
    if args.code:
        compare(args)
        return
    efs = [int(x) for x in args.efs.split(",")]
    base, queries, gt = shared_vectors(args.n, args.dim, args.queries)
    base_path = set_dir(args.n, args.dim, args.queries) / "base.npy"
    n = len(base)
    print(f"shared set: {n} x {args.dim}, {len(queries)} queries; M={M} ef_construction={EF_CONSTRUCTION}")

    # raw hnswlib
    t = time.perf_counter()
    raw = hnswlib.Index(space="cosine", dim=args.dim)
    raw.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION)
    raw.add_items(base, np.arange(n))
    raw_build = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        braid_proc, braid_port = start_braid(tmp_path / "data")
        client = BraidClient(f"127.0.0.1:{braid_port}", timeout=600)
        schema = pb.Schema(
            dense_fields=[
                pb.DenseVectorField(
                    name="emb", dim=args.dim, metric=pb.COSINE, hnsw=pb.HnswParams(m=M, ef_construction=EF_CONSTRUCTION)
                )
            ]
        )
        client.create_collection("bench", schema)
        t = time.perf_counter()
        client.bulk_upsert("bench", ({"id": str(i), "dense": {"emb": base[i]}} for i in range(n)), batch_size=1000)
        braid_ingest = time.perf_counter() - t
        braid_settle = settle([braid_proc.pid])  # the background graph builds the load left behind

        request0 = pb.SearchRequest(
            collection="bench",
            limit=10,
            queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(queries[0]), ef=64))],
        )
        response0 = client.stub.Search(request0)
        response_hex = response0.SerializeToString().hex()
        echo_proc, echo_port = start_process(
            [__file__, "--echo-server", str(tmp_path / "echo"), response_hex], tmp_path / "echo"
        )
        bare_proc, bare_port = start_process(
            [__file__, "--echo-server", str(tmp_path / "bare"), response_hex, str(base_path)], tmp_path / "bare"
        )
        channels = [grpc.insecure_channel(f"127.0.0.1:{port}") for port in (echo_port, bare_port)]
        echo, bare = (
            channel.unary_unary(
                "/braid.v1.Braid/Search",
                request_serializer=pb.SearchRequest.SerializeToString,
                response_deserializer=pb.SearchResponse.FromString,
            )
            for channel in channels
        )
        rows = []
        try:
            requests = {
                ef: [
                    pb.SearchRequest(
                        collection="bench",
                        limit=10,
                        queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(q), ef=ef))],
                    )
                    for q in queries
                ]
                for ef in efs
            }
            for _ in range(200):  # warm up every channel
                for call in (echo, bare, client.stub.Search):
                    call(requests[efs[0]][0])

            def qps(call, items) -> tuple[float, list]:  # type: ignore[no-untyped-def]
                started = time.perf_counter()
                out = [call(item) for item in items]
                return len(items) / (time.perf_counter() - started), out

            for ef in efs:
                raw.set_ef(ef)
                raw_qps, raw_out = qps(lambda q: raw.knn_query(q, k=10)[0][0].tolist(), list(queries))
                echo_qps, _ = qps(echo, requests[ef])
                bare_qps, _ = qps(bare, requests[ef])
                api_qps, api_out = qps(client.stub.Search, requests[ef])
                ideal = 1 / (1 / raw_qps + 1 / echo_qps)
                raw_batch_qps, _ = qps(
                    lambda block: raw.knn_query(block, k=10),
                    [queries[i : i + args.batch] for i in range(0, len(queries), args.batch)],
                )
                raw_batch_qps *= args.batch
                api_batch_qps, batch_out = qps(
                    client.stub.BatchSearch,
                    [
                        pb.BatchSearchRequest(searches=requests[ef][i : i + args.batch])
                        for i in range(0, len(queries), args.batch)
                    ],
                )
                api_batch_qps *= args.batch
                batch_found = [[int(h.id) for h in r.hits] for response in batch_out for r in response.results]
                rows.append(
                    {
                        "ef": ef,
                        "raw_recall": recall_at_10(raw_out, gt),
                        "api_recall": recall_at_10([[int(h.id) for h in r.hits] for r in api_out], gt),
                        "batch_recall": recall_at_10(batch_found, gt),
                        "raw_qps": raw_qps,
                        "echo_qps": echo_qps,
                        "ideal_qps": ideal,
                        "bare_qps": bare_qps,
                        "api_qps": api_qps,
                        "api_vs_ideal": api_qps / ideal,
                        "api_vs_bare": api_qps / bare_qps,
                        "raw_batch_qps": raw_batch_qps,
                        "api_batch_qps": api_batch_qps,
                        "batch_vs_raw": api_batch_qps / raw_batch_qps,
                    }
                )
        finally:
            for channel in channels:
                channel.close()
            client.close()
            echo_proc.kill()
            bare_proc.kill()
            braid_proc.terminate()
            braid_proc.wait(timeout=60)

    print(
        f"build: raw hnswlib {raw_build:.1f} s; braid BulkUpsert ingest {braid_ingest:.1f} s "
        f"({n / braid_ingest:,.0f} docs/s, WAL-durable and searchable), then {braid_settle:.1f} s of background "
        "graph builds before the server was idle"
    )
    header = (
        "| ef | recall@10 raw | recall@10 api | raw QPS | echo QPS | ideal QPS | bare gRPC+hnswlib QPS | api QPS "
        f"| api/ideal | api/bare | raw batched QPS | BatchSearch({args.batch}) QPS | batch/raw |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['ef']} | {r['raw_recall']:.3f} | {r['api_recall']:.3f} | {r['raw_qps']:,.0f} | "
            f"{r['echo_qps']:,.0f} | {r['ideal_qps']:,.0f} | {r['bare_qps']:,.0f} | {r['api_qps']:,.0f} | "
            f"{r['api_vs_ideal']:.2f} | {r['api_vs_bare']:.2f} | "
            f"{r['raw_batch_qps']:,.0f} | {r['api_batch_qps']:,.0f} | {r['batch_vs_raw']:.2f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dense.json").write_text(
        json.dumps(
            {
                "n": n,
                "dim": args.dim,
                "rows": rows,
                "raw_build_s": raw_build,
                "ingest_s": braid_ingest,
                "settle_s": braid_settle,
            },
            indent=1,
        )
    )


def compare(args: argparse.Namespace) -> None:
    """Several versions of Braid side by side, interleaved round by round (module doc)."""
    codes = [(name, Path(path)) for name, _, path in (item.partition("=") for item in args.code)]
    ef = int(args.efs.split(",")[0])
    base, queries, gt = shared_vectors(args.n, args.dim, args.queries)
    base_path = set_dir(args.n, args.dim, args.queries) / "base.npy"
    n = len(base)
    print(f"shared set: {n} x {args.dim}, {len(queries)} queries, ef {ef}; versions: {', '.join(c for c, _ in codes)}")
    raw = hnswlib.Index(space="cosine", dim=args.dim)
    raw.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION)
    raw.add_items(base, np.arange(n))
    raw.set_ef(ef)
    schema = pb.Schema(
        dense_fields=[
            pb.DenseVectorField(
                name="emb", dim=args.dim, metric=pb.COSINE, hnsw=pb.HnswParams(m=M, ef_construction=EF_CONSTRUCTION)
            )
        ]
    )
    requests = [
        pb.SearchRequest(
            collection="bench",
            limit=10,
            queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(q), ef=ef))],
        )
        for q in queries
    ]
    batches = [
        pb.BatchSearchRequest(searches=requests[i : i + args.batch]) for i in range(0, len(requests), args.batch)
    ]
    blocks = [queries[i : i + args.batch] for i in range(0, len(queries), args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        procs, clients = [], []
        try:
            for i, (_, checkout) in enumerate(codes):
                package = code_package(checkout, tmp_path / f"code{i}")
                proc, port = start_braid(tmp_path / f"data{i}", package)
                procs.append(proc)
                client = BraidClient(f"127.0.0.1:{port}", timeout=600)
                clients.append(client)
                client.create_collection("bench", schema)
                client.bulk_upsert(
                    "bench", ({"id": str(j), "dense": {"emb": base[j]}} for j in range(n)), batch_size=1000
                )
            settled = settle([proc.pid for proc in procs])
            response_hex = clients[0].stub.Search(requests[0]).SerializeToString().hex()
            bare_proc, bare_port = start_process(
                [__file__, "--echo-server", str(tmp_path / "bare"), response_hex, str(base_path)], tmp_path / "bare"
            )
            procs.append(bare_proc)
            channel = grpc.insecure_channel(f"127.0.0.1:{bare_port}")
            bare = channel.unary_unary(
                "/braid.v1.Braid/Search",
                request_serializer=pb.SearchRequest.SerializeToString,
                response_deserializer=pb.SearchResponse.FromString,
            )
            found: dict[str, tuple[list, list]] = {}
            for (name, _), client in zip(codes, clients, strict=True):  # recall, and a warm-up
                singles = [[int(h.id) for h in client.stub.Search(r).hits] for r in requests]
                batched = [[int(h.id) for h in r.hits] for b in batches for r in client.stub.BatchSearch(b).results]
                found[name] = (singles, batched)
            for request in requests[:200]:
                bare(request)
            # Each timing: (what, rate kind, a call, its items, the process that does the work).
            timings: list[tuple[str, str, Any, list, int]] = [
                ("raw", "batch", lambda b: raw.knn_query(b, k=10), blocks, os.getpid())
            ]
            timings.append(("bare", "single", bare, requests, bare_proc.pid))
            for (name, _), client, proc in zip(codes, clients, procs[: len(codes)], strict=True):
                timings.append((name, "single", client.stub.Search, requests, proc.pid))
                timings.append((name, "batch", client.stub.BatchSearch, batches, proc.pid))
            rates: dict[tuple[str, str], list[float]] = {}
            cpu: dict[tuple[str, str], list[float]] = {}  # the working process's CPU seconds a query
            for r in range(args.rounds):
                turn = timings[r % len(timings) :] + timings[: r % len(timings)]
                for what, kind, call, items, pid in turn:
                    cpu_before, started = cpu_seconds(pid), time.perf_counter()
                    for item in items:
                        call(item)
                    rates.setdefault((what, kind), []).append(len(queries) / (time.perf_counter() - started))
                    cpu.setdefault((what, kind), []).append((cpu_seconds(pid) - cpu_before) / len(queries))
            channel.close()
        finally:
            for client in clients:
                client.close()
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
    load = os.getloadavg()[0]
    print(
        f"{settled:.1f} s of background graph builds before the servers were idle; load average {load:.1f} at the end"
    )
    print(f"medians of {args.rounds} interleaved rounds (per round: every query once per row)")
    header = (
        f"| code | recall@10 Search | recall@10 BatchSearch | Search QPS | Search/bare | BatchSearch({args.batch}) QPS "
        f"| batch/raw batched | Search vs {codes[0][0]} | BatchSearch vs {codes[0][0]} "
        "| server CPU us/query Search | server CPU us/query BatchSearch |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    first = codes[0][0]
    for name, _ in codes:
        single, batch = np.array(rates[(name, "single")]), np.array(rates[(name, "batch")])
        print(
            f"| {name} | {recall_at_10(found[name][0], gt):.3f} | {recall_at_10(found[name][1], gt):.3f} "
            f"| {np.median(single):,.0f} | {np.median(single / np.array(rates[('bare', 'single')])):.2f} "
            f"| {np.median(batch):,.0f} | {np.median(batch / np.array(rates[('raw', 'batch')])):.2f} "
            f"| {np.median(single / np.array(rates[(first, 'single')])):.2f} "
            f"| {np.median(batch / np.array(rates[(first, 'batch')])):.2f} "
            f"| {np.median(cpu[(name, 'single')]) * 1e6:,.0f} | {np.median(cpu[(name, 'batch')]) * 1e6:,.0f} |"
        )
    print(
        f"bare gRPC+hnswlib {np.median(rates[('bare', 'single')]):,.0f} QPS "
        f"({np.median(cpu[('bare', 'single')]) * 1e6:,.0f} us CPU a query), "
        f"raw batched hnswlib {np.median(rates[('raw', 'batch')]):,.0f} QPS "
        f"({np.median(cpu[('raw', 'batch')]) * 1e6:,.0f} us CPU a query)"
    )


def cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare_strands(args: argparse.Namespace) -> None:
    """HnswStrand.search of several versions, each in its own child process, round by round (module doc)."""
    codes = [(name, Path(path)) for name, _, path in (item.partition("=") for item in args.code)]
    ef = int(args.efs.split(",")[0])
    base, queries, _ = shared_vectors(args.n, args.dim, args.queries)
    growing = min(1000, len(base) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        unit = base / np.linalg.norm(base, axis=1, keepdims=True)  # cosine fields are inner-product graphs
        graph = hnswlib.Index(space="ip", dim=args.dim)
        graph.init_index(max_elements=len(base) - growing, M=M, ef_construction=EF_CONSTRUCTION)
        graph.add_items(unit[: len(base) - growing], np.arange(len(base) - growing))
        graph.save_index(str(tmp_path / "emb.hnsw"))
        np.save(tmp_path / "base.npy", base)
        np.save(tmp_path / "queries.npy", queries)
        packages = [code_package(checkout, tmp_path / f"code{i}") for i, (_, checkout) in enumerate(codes)]
        runs: dict[str, list[dict]] = {}
        for r in range(args.rounds):
            for i in [(r + j) % len(codes) for j in range(len(codes))]:
                env = dict(os.environ, PYTHONPATH=str(packages[i]), OPENBLAS_NUM_THREADS="1")
                out = tmp_path / f"hits{i}.npz"
                child = [__file__, "--strand-child", str(tmp_path), str(growing), str(ef), str(args.batch), str(out)]
                line = subprocess.run(
                    [sys.executable, *child], env=env, check=True, capture_output=True, text=True
                ).stdout
                runs.setdefault(codes[i][0], []).append(json.loads(line.strip().splitlines()[-1]))
        hits = [np.load(tmp_path / f"hits{i}.npz") for i in range(len(codes))]
        keys = ("single_labels", "single_scores", "batch_labels", "batch_scores")
        same = all(h[key].tobytes() == hits[0][key].tobytes() for h in hits for key in keys)
        same = same and all(
            h[f"batch_{x}"].tobytes() == h[f"single_{x}"].tobytes() for h in hits for x in ("labels", "scores")
        )
    print(
        f"HnswStrand.search, {len(base) - growing:,} vectors in one graph + {growing:,} growing, ef {ef}, "
        f"{len(queries)} queries; medians of {args.rounds} rounds; load average {os.getloadavg()[0]:.1f} at the end"
    )
    header = (
        f"| code | one query: us | one query: CPU us | of which outside hnswlib | batch of {args.batch}: us a query "
        f"| batch: CPU us a query | of which outside hnswlib | one query vs {codes[0][0]} | batch vs {codes[0][0]} |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    first = runs[codes[0][0]]
    for name, _ in codes:
        run = runs[name]

        def med(key: str, run: list[dict] = run) -> float:
            return float(np.median([x[key] for x in run])) * 1e6

        ratio_single = np.median([a["single"] / b["single"] for a, b in zip(first, run, strict=True)])
        ratio_batch = np.median([a["batch"] / b["batch"] for a, b in zip(first, run, strict=True)])
        print(
            f"| {name} | {med('single'):.0f} | {med('single_cpu'):.0f} | {med('single_rest'):.0f} | {med('batch'):.0f} "
            f"| {med('batch_cpu'):.0f} | {med('batch_rest'):.0f} "
            f"| {ratio_single:.2f}x | {ratio_batch:.2f}x |"
        )
    print(f"every version's hits equal, bit for bit, alone and in batches: {'yes' if same else 'NO'}")


def strand_child(directory: str, growing: str, ef: str, batch: str, out: str) -> None:
    """One version's timing (``compare_strands``), run with that version first on PYTHONPATH."""
    from braid.index import hnsw_strand
    from braid.index.hnsw_strand import HnswStrand
    from braid.index.schema import DenseFieldSpec, HnswParams, Metric

    walked = [0.0]  # CPU seconds inside hnswlib's walks (every thread of the process)
    inner = hnsw_strand.walk

    def timed_walk(*args: Any) -> Any:
        started = time.process_time()
        try:
            return inner(*args)
        finally:
            walked[0] += time.process_time() - started

    hnsw_strand.walk = timed_walk
    folder = Path(directory)
    base, queries = np.load(folder / "base.npy"), np.load(folder / "queries.npy")
    n, dim, size = len(base), base.shape[1], int(batch)
    spec = DenseFieldSpec(
        name="emb", dim=dim, metric=Metric.COSINE, hnsw=HnswParams(m=M, ef_construction=EF_CONSTRUCTION)
    )
    strand = HnswStrand.load(folder, spec, list(range(n)))
    strand.add(np.arange(n - int(growing), n), base[n - int(growing) :])
    k, beam = 10, int(ef)
    blocks = [queries[i : i + size] for i in range(0, len(queries), size)]
    for query in queries[:100]:  # warm up
        strand.search(query[None, :], k, beam)
    times, hits = {}, {}
    for kind in ("single", "batch"):
        wall, cpu, walked[0] = time.perf_counter(), time.process_time(), 0.0
        if kind == "single":
            found = [strand.search(query[None, :], k, beam)[0] for query in queries]
        else:
            found = [hit for block in blocks for hit in strand.search(block, k, beam)]
        times[kind] = (time.perf_counter() - wall) / len(queries)
        times[f"{kind}_cpu"] = (time.process_time() - cpu) / len(queries)
        times[f"{kind}_rest"] = times[f"{kind}_cpu"] - walked[0] / len(queries)
        hits[f"{kind}_labels"] = np.stack([labels for labels, _ in found])
        hits[f"{kind}_scores"] = np.stack([scores for _, scores in found])
    np.savez(out, **hits)
    print(json.dumps(times))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--echo-server":
        echo_server_main(*sys.argv[2:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--strand-child":
        strand_child(*sys.argv[2:])
    else:
        main()
