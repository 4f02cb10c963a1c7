"""SPANN against HNSW inside the real server: the serving process's memory, recall and latency over gRPC.

    python bench/spann_service.py [--n 100000] [--dim 384] [--merge-threshold 20000]

bench/spann.py measures the index alone; this runs the whole service. For each index type
of one dense field (``hnsw``, ``spann``) it starts ``braid serve`` on a fresh data
directory, bulk-upserts the shared vector set (../shared/bench/make_vectors.py, cached under
bench/results/; see dense.shared_vectors) through BulkUpsert, flushes until no merge is running, stops the server,
and starts a fresh one on the same directory: the process a restarted node would be. It
then sends every query through Search (k=10, one client, one query per call), once to warm
up and once timed per setting, and reads the server's VmRSS. An empty server's RSS is the
baseline (Python, gRPC, tantivy, numpy loaded). Prints recall@10, p50/p99 and the RSS over
the baseline, with SPANN's ratios against HNSW.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dense import shared_vectors
from ir_data import BraidProcess

from braid.service.client import BraidClient, dense_vector
from braid.v1 import braid_pb2 as pb


class Server(BraidProcess):
    """``braid serve`` in a child process, with a client."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.client = BraidClient(f"127.0.0.1:{self.port}", timeout=3600)

    def stop(self, timeout: float = 600) -> None:
        self.client.close()
        super().stop(timeout)


def field(index: str, dim: int, merge_threshold: int) -> pb.DenseVectorField:
    spec = pb.DenseVectorField(name="emb", dim=dim, metric=pb.COSINE, index=index)
    if index == "spann":
        spec.spann.merge_threshold = merge_threshold
    return spec


def ingest(server: Server, base: np.ndarray, spec: pb.DenseVectorField) -> float:
    server.client.create_collection("bench", pb.Schema(dense_fields=[spec]))
    started = time.perf_counter()
    server.client.bulk_upsert("bench", ({"id": str(i), "dense": {"emb": v}} for i, v in enumerate(base)), 1000)
    server.client.flush("bench")  # waits for a running merge; a second flush catches one started by the first
    server.client.flush("bench")
    return time.perf_counter() - started


def query(server: Server, queries: np.ndarray, gt: np.ndarray, **knobs: int | float) -> tuple[float, float, float]:
    """(recall@10, p50 ms, p99 ms) of every query, one Search call each, after a warm-up pass."""
    requests = [
        pb.SearchRequest(
            collection="bench",
            limit=10,
            queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(q), **knobs))],
        )
        for q in queries
    ]
    for request in requests:
        server.client.stub.Search(request)
    latencies, found = [], []
    for request in requests:
        started = time.perf_counter()
        hits = server.client.stub.Search(request).hits
        latencies.append((time.perf_counter() - started) * 1000)
        found.append([int(h.id) for h in hits])
    recall = float(np.mean([len(set(f) & set(g[:10].tolist())) / 10 for f, g in zip(found, gt, strict=True)]))
    return recall, float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--merge-threshold", type=int, default=20_000)
    parser.add_argument("--efs", default="32,64")
    parser.add_argument("--probes", default="2:0.5,4:0.5,16:0.5")
    args = parser.parse_args()
    base, queries, gt = shared_vectors(args.n, args.dim, args.queries)
    with tempfile.TemporaryDirectory() as tmp:
        empty = Server(Path(tmp) / "empty")
        baseline = empty.rss_mib()
        empty.stop()
        rows, memory = [], {}
        for index in ("hnsw", "spann"):
            directory = Path(tmp) / index
            server = Server(directory)
            ingest_s = ingest(server, base, field(index, args.dim, args.merge_threshold))
            server.stop()
            server = Server(directory)  # a fresh process on the same data: what a restarted node holds
            settings = (
                [(f"ef={e}", {"ef": int(e)}) for e in args.efs.split(",")]
                if index == "hnsw"
                else [
                    (p, {"max_lists": int(p.split(":")[0]), "eps": float(p.split(":")[1])})
                    for p in args.probes.split(",")
                ]
            )
            for label, knobs in settings:
                rows.append((index, label, *query(server, queries, gt, **knobs)))
            memory[index] = (server.rss_mib() - baseline, ingest_s)
            disk = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**20
            memory[index] += (disk,)
            server.stop()
    print(f"\n{args.n:,} x {args.dim}, merge_threshold {args.merge_threshold:,}; empty server RSS {baseline:.0f} MiB\n")
    print("| index | setting | recall@10 | p50 ms | p99 ms |")
    print("|---|---|---|---|---|")
    for index, label, recall, p50, p99 in rows:
        print(f"| {index} | {label} | {recall:.3f} | {p50:.2f} | {p99:.2f} |")
    print("\n| index | ingest + flush s | server RSS over empty MiB | data dir MiB |")
    print("|---|---|---|---|")
    for index, (rss, ingest_s, disk) in memory.items():
        print(f"| {index} | {ingest_s:.0f} | {rss:.1f} | {disk:.0f} |")
    print(f"\nSPANN / HNSW resident memory over the empty server: {memory['spann'][0] / memory['hnsw'][0]:.3f} x")


if __name__ == "__main__":
    main()
