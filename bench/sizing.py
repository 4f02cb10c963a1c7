"""Sizing for a deployment (docs/deploy.md): memory and disk per million vectors, router CPU per 1,000 searches/s.

    .venv/bin/python bench/sizing.py                      # 100,000 x 384, HNSW and SPANN, router at 100 and 200/s
    .venv/bin/python bench/sizing.py --n 20000 --quick    # a few minutes

1. Footprint per field kind (``--kinds hnsw,spann``): one ``braid serve`` child on a fresh data
   directory (the same index code a shard server runs for each replica it holds), one
   collection with one 384-dim COSINE dense field of that kind, no text, no payload. The
   shared vector set is streamed in two halves by BulkUpsert; after each half the server is
   left to finish its background builds (bench/settle.py), the collection is flushed
   (a checkpoint) and the server's resident memory (VmRSS), its peak (VmHWM) and the data
   directory's size on disk (allocated blocks, hard links counted once) are read. Per
   million vectors = the growth from the empty server (printed too) to all n, scaled; and the
   marginal figure, from the first half to the second (a SPANN field's growing segment and
   compactions make the two halves differ: its marginal figures are noisy).
   Reference in the same run: raw hnswlib (same M / ef_construction) in a child process,
   built to the same two sizes: RSS growth and saved index size per million, and Braid's
   ratio to it.
2. Router CPU (``--rates``): a local cluster (1 NATS, 2 shard servers, 1 router), a
   2-shard collection of ``--router-n`` vectors (RF 1), then for each rate an open-loop
   client (calls started on a fixed schedule, never waiting for answers) sends plain dense
   Searches (limit 10) for ``--seconds``; CPU seconds used by the router process
   (utime + stime) per second, per 1,000 searches/s, and the same for the shard servers.

Prints markdown tables; the JSON goes to bench/results/sizing-<n>x<dim>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

from dense import shared_vectors  # noqa: E402
from ir_data import BraidProcess  # noqa: E402
from settle import settle  # noqa: E402

from braid.service.client import BraidClient, dense_vector  # noqa: E402
from braid.service.cluster.local import LocalCluster  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402

FIELD = "v"
COLLECTION = "sizing"
BATCH = 500
M, EF_CONSTRUCTION = 16, 200
STREAM_TIMEOUT_S = 3600.0
MIB = 1024 * 1024


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM of a process, MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) / 1024 for key in ("VmRSS", "VmHWM")}  # type: ignore[union-attr]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def disk_mib(folder: Path) -> float:
    """Allocated size of every file under ``folder``, a hard-linked file counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in folder.rglob("*"):
        try:
            st = path.lstat()
        except OSError:
            continue
        if path.is_file() and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total / MIB


def field_schema(kind: str, dim: int) -> pb.Schema:
    field = pb.DenseVectorField(
        name=FIELD, dim=dim, metric=pb.COSINE, hnsw=pb.HnswParams(m=M, ef_construction=EF_CONSTRUCTION)
    )
    if kind == "spann":
        field.index = "spann"
    return pb.Schema(dense_fields=[field])


def batches(base: np.ndarray, start: int, stop: int) -> list[pb.UpsertRequest]:
    return [
        pb.UpsertRequest(
            collection=COLLECTION,
            documents=[
                pb.Document(id=str(i), dense={FIELD: dense_vector(base[i])}) for i in range(s, min(s + BATCH, stop))
            ],
        )
        for s in range(start, stop, BATCH)
    ]


def footprint(kind: str, base: np.ndarray) -> dict[str, Any]:
    """Empty server, then half and all of ``base`` in one field of ``kind``: RSS, peak RSS, disk."""
    n, dim = base.shape
    half = n // 2
    out: dict[str, Any] = {"kind": kind, "n": n, "dim": dim}
    with tempfile.TemporaryDirectory(prefix="braid-sizing-") as tmp:
        data = Path(tmp)
        server = BraidProcess(data)
        try:
            with BraidClient(f"127.0.0.1:{server.port}", timeout=STREAM_TIMEOUT_S) as client:
                client.create_collection(COLLECTION, field_schema(kind, dim))
                out["empty"] = {**proc_status(server.proc.pid), "disk_mib": disk_mib(data)}
                for label, (start, stop) in (("half", (0, half)), ("all", (half, n))):
                    began = time.perf_counter()
                    response = client.stub.BulkUpsert(iter(batches(base, start, stop)), timeout=STREAM_TIMEOUT_S)
                    assert response.upserted == stop - start, response
                    loaded = time.perf_counter() - began
                    waited = settle([server.proc.pid])
                    client.flush(COLLECTION)
                    settle([server.proc.pid], quiet_s=2.0)
                    out[label] = {
                        **proc_status(server.proc.pid),
                        "disk_mib": disk_mib(data),
                        "docs": stop,
                        "load_s": loaded,
                        "settle_s": waited,
                    }
                    print(f"{kind}: {stop} vectors: {out[label]}", flush=True)
        finally:
            server.stop()
    grown = n - half
    for key, src in (("rss", "VmRSS"), ("peak", "VmHWM"), ("disk", "disk_mib")):
        out[f"{key}_mib_per_million"] = (out["all"][src] - out["empty"][src]) * 1e6 / n
        out[f"{key}_marginal_mib_per_million"] = (out["all"][src] - out["half"][src]) * 1e6 / grown
    return out


def raw_hnswlib_child(path: str, n: int, dim: int) -> None:
    """In a child: build raw hnswlib to n/2 then n from the shared set; print RSS and saved size as JSON."""
    import hnswlib

    base, _, _ = shared_vectors(n, dim, 1)
    half = n // 2
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION)
    rows = [{"docs": 0, **proc_status(os.getpid()), "disk_mib": 0.0}]  # vectors loaded, index empty
    for stop, start in ((half, 0), (n, half)):
        index.add_items(base[start:stop], np.arange(start, stop))
        index.save_index(path)
        rows.append({"docs": stop, **proc_status(os.getpid()), "disk_mib": os.path.getsize(path) / MIB})
    print(json.dumps(rows), flush=True)


def raw_reference(n: int, dim: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="braid-sizing-raw-") as tmp:
        out = subprocess.run(
            [sys.executable, __file__, "--raw-child", str(Path(tmp) / "raw.bin"), "--n", str(n), "--dim", str(dim)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    empty, half, full = json.loads(out.strip().splitlines()[-1])
    grown = full["docs"] - half["docs"]
    # hnswlib allocates max_elements up front: its RSS grows as pages are touched, the file by count.
    return {
        "empty": empty,
        "half": half,
        "all": full,
        "rss_mib_per_million": (full["VmRSS"] - empty["VmRSS"]) * 1e6 / full["docs"],
        "disk_mib_per_million": full["disk_mib"] * 1e6 / full["docs"],
        "rss_marginal_mib_per_million": (full["VmRSS"] - half["VmRSS"]) * 1e6 / grown,
    }


# ------------------------------------------------------------------ router CPU


def open_loop(address: str, queries: np.ndarray, rate: float, seconds: float) -> dict[str, Any]:
    """Calls started every 1/rate s for ``seconds`` (never waiting for answers); latencies and errors."""
    channel = grpc.insecure_channel(address)
    search = channel.unary_unary(
        "/braid.v1.Braid/Search",
        request_serializer=pb.SearchRequest.SerializeToString,
        response_deserializer=pb.SearchResponse.FromString,
    )
    requests = [
        pb.SearchRequest(
            collection=COLLECTION,
            limit=10,
            queries=[pb.SubQuery(dense=pb.DenseQuery(field=FIELD, vector=dense_vector(q)))],
        )
        for q in queries
    ]
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    pending: list[Any] = []

    def done(started: float) -> Any:
        def callback(future: Any) -> None:
            with lock:
                if future.exception() is None:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors[0] += 1

        return callback

    total = int(rate * seconds)
    began = time.perf_counter()
    for i in range(total):
        due = began + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        future = search.future(requests[i % len(requests)], timeout=30)
        future.add_done_callback(done(time.perf_counter()))
        pending.append(future)
    sent_s = time.perf_counter() - began
    for future in pending:
        with contextlib.suppress(grpc.RpcError):
            future.result(timeout=60)
    channel.close()
    lat = np.asarray(latencies) * 1e3
    return {
        "offered_per_s": rate,
        "sent_per_s": total / sent_s,
        "ok": len(latencies),
        "errors": errors[0],
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
    }


def router_cpu(n: int, dim: int, rates: list[float], seconds: float) -> dict[str, Any]:
    base, queries, _ = shared_vectors(n, dim, 1000)
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="braid-sizing-cluster-") as tmp,
        LocalCluster(Path(tmp), shard_servers=2, routers=1, nats_nodes=1) as cluster,
    ):
        with BraidClient(cluster.router_address, timeout=STREAM_TIMEOUT_S) as client:
            client.create_collection(COLLECTION, field_schema("hnsw", dim), shards=2, replication_factor=1)
            response = client.stub.BulkUpsert(iter(batches(base, 0, n)), timeout=STREAM_TIMEOUT_S)
            assert response.upserted == n, response
        pids = {child.name: child.proc.pid for child in cluster.children if child.proc is not None}
        router_pid = cluster.routers[0].proc.pid  # type: ignore[union-attr]
        shard_pids = [child.proc.pid for child in cluster.shards if child.proc is not None]
        settle(list(pids.values()))
        open_loop(cluster.router_address, queries, min(rates), 3.0)  # warm the channels and caches
        for rate in rates:
            router_before, shards_before = cpu_seconds(router_pid), sum(cpu_seconds(p) for p in shard_pids)
            began = time.perf_counter()
            load = open_loop(cluster.router_address, queries, rate, seconds)
            elapsed = time.perf_counter() - began
            router_used = cpu_seconds(router_pid) - router_before
            shards_used = sum(cpu_seconds(p) for p in shard_pids) - shards_before
            answered_per_s = load["ok"] / elapsed
            row = {
                **load,
                "answered_per_s": answered_per_s,
                "router_cores": router_used / elapsed,
                "router_cores_per_1000": router_used / elapsed / answered_per_s * 1000,
                "shard_cores": shards_used / elapsed,
                "shard_cores_per_1000": shards_used / elapsed / answered_per_s * 1000,
            }
            rows.append(row)
            print(f"router at {rate}/s: {row}", flush=True)
    return {"n": n, "dim": dim, "seconds": seconds, "rows": rows}


# ------------------------------------------------------------------ report


def print_footprint(rows: list[dict[str, Any]], raw: dict[str, Any]) -> None:
    print(
        "\n| field | vectors | empty server RSS | RSS at n | peak RSS at n | disk at n "
        "| RSS / 1M | peak / 1M | disk / 1M | marginal RSS / 1M |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['kind']} | {r['n']:,} x {r['dim']} | {r['empty']['VmRSS']:.0f} MiB | {r['all']['VmRSS']:.0f} MiB "
            f"| {r['all']['VmHWM']:.0f} MiB | {r['all']['disk_mib']:.0f} MiB | {r['rss_mib_per_million']:,.0f} MiB "
            f"| {r['peak_mib_per_million']:,.0f} MiB | {r['disk_mib_per_million']:,.0f} MiB "
            f"| {r['rss_marginal_mib_per_million']:,.0f} MiB |"
        )
    print(
        f"| raw hnswlib (reference) | {raw['all']['docs']:,} | — | {raw['all']['VmRSS']:.0f} MiB | "
        f"{raw['all']['VmHWM']:.0f} MiB | {raw['all']['disk_mib']:.0f} MiB | {raw['rss_mib_per_million']:,.0f} MiB "
        f"| — | {raw['disk_mib_per_million']:,.0f} MiB | {raw['rss_marginal_mib_per_million']:,.0f} MiB |"
    )
    for r in rows:
        print(
            f"\n{r['kind']}: RSS per million {r['rss_mib_per_million'] / raw['rss_mib_per_million']:.2f}x raw hnswlib, "
            f"disk {r['disk_mib_per_million'] / raw['disk_mib_per_million']:.2f}x",
            end="",
        )
    print()


def print_router(result: dict[str, Any]) -> None:
    print(
        f"\nrouter CPU ({result['n']:,} x {result['dim']}, 2 shards, RF 1, "
        f"open loop {result['seconds']:.0f} s per rate)"
    )
    print(
        "| offered /s | answered /s | errors | p50 | p99 | router cores "
        "| router cores per 1,000/s | shard servers cores per 1,000/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(
            f"| {r['offered_per_s']:.0f} | {r['answered_per_s']:.0f} | {r['errors']} | {r['p50_ms']:.2f} ms "
            f"| {r['p99_ms']:.2f} ms | {r['router_cores']:.2f} | {r['router_cores_per_1000']:.2f} "
            f"| {r['shard_cores_per_1000']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--kinds", default="hnsw,spann")
    parser.add_argument("--rates", default="100,200", help="router load, searches/s (comma-separated)")
    parser.add_argument("--router-n", type=int, default=20_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--sections", default="footprint,router")
    parser.add_argument("--quick", action="store_true", help="short router windows (10 s)")
    parser.add_argument("--raw-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_child:
        raw_hnswlib_child(args.raw_child, args.n, args.dim)
        return
    seconds = 10.0 if args.quick else args.seconds
    sections = set(args.sections.split(","))
    result: dict[str, Any] = {"command": " ".join(sys.argv[1:])}
    if "footprint" in sections:
        base, _, _ = shared_vectors(args.n, args.dim, 1)
        result["raw"] = raw_reference(args.n, args.dim)
        result["footprint"] = [footprint(kind, base) for kind in args.kinds.split(",")]
    if "router" in sections:
        rates = [float(r) for r in args.rates.split(",")]
        result["router"] = router_cpu(args.router_n, args.dim, rates, seconds)
    if "footprint" in result:
        print_footprint(result["footprint"], result["raw"])
    if "router" in result:
        print_router(result["router"])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"sizing-{args.n}x{args.dim}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"\nresults: {out.relative_to(BENCH.parent)}")


if __name__ == "__main__":
    main()
