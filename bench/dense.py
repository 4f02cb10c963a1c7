"""Dense search through Braid's gRPC API against raw hnswlib and a bare gRPC echo, in one run.

    python bench/dense.py [--n 100000] [--dim 384] [--queries 1000] [--efs 32,64,128]

Uses the shared vector set (../shared/bench/make_vectors.py, cached under bench/results/).
For every ef it prints recall@10 and single-client QPS of
  raw      hnswlib in this process (same M / ef_construction / ef), one query per call,
  echo     a bare grpcio service (separate process) that receives the same SearchRequest bytes
           and returns the same SearchResponse bytes Braid would, doing no work,
  braid    Search through the API (server in a separate process),
and ideal = 1 / (1/raw + 1/echo): what a server that adds nothing to hnswlib and gRPC could do.
Then BatchSearch of 100 queries against raw hnswlib's batched knn_query.
Targets (issue 3): braid >= 0.8 x ideal at recall@10 >= 0.95; batch >= 0.6 x raw batched.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from concurrent import futures
from pathlib import Path

import grpc
import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_VECTORS = ROOT.parent / "shared" / "bench" / "make_vectors.py"
RESULTS = ROOT / "bench" / "results"
M, EF_CONSTRUCTION = 16, 200
sys.path.insert(0, str(ROOT))

from braid.service.client import BraidClient, dense_vector  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402


def shared_vectors(n: int, dim: int, queries: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = RESULTS / f"vectors-{n}x{dim}-q{queries}"
    if not (out / "gt.npy").exists():
        subprocess.run(
            [
                sys.executable,
                str(SHARED_VECTORS),
                str(out),
                "--n",
                str(n),
                "--dim",
                str(dim),
                "--queries",
                str(queries),
            ],
            check=True,
        )
    return np.load(out / "base.npy"), np.load(out / "queries.npy"), np.load(out / "gt.npy")


def recall_at_10(found: list[list[int]], gt: np.ndarray) -> float:
    return float(np.mean([len(set(f[:10]) & set(g[:10].tolist())) / 10 for f, g in zip(found, gt, strict=True)]))


# -------------------------------------------------------------------- echo


def echo_server_main(port_file: str, response_hex: str) -> None:
    """A bare gRPC service answering every Search with fixed response bytes."""
    response = bytes.fromhex(response_hex)

    def handle(request: bytes, context: grpc.ServicerContext) -> bytes:
        return response

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
    for _ in range(600):
        if port_file.exists() and port_file.read_text().strip():
            return proc, int(port_file.read_text())
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args} did not start")


def start_braid(data_dir: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(data_dir), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "serving braid.v1.Braid on" in line:
            return proc, int(re.search(r"on [\d.]+:(\d+)", line).group(1))  # type: ignore[union-attr]
    raise RuntimeError("braid did not start")


# -------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--efs", default="32,64,128")
    parser.add_argument("--batch", type=int, default=100)
    args = parser.parse_args()
    efs = [int(x) for x in args.efs.split(",")]
    base, queries, gt = shared_vectors(args.n, args.dim, args.queries)
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

        request0 = pb.SearchRequest(
            collection="bench",
            limit=10,
            queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(queries[0]), ef=64))],
        )
        response0 = client.stub.Search(request0)
        port_file = tmp_path / "echo.port"
        echo_proc, echo_port = start_process(
            [__file__, "--echo-server", str(port_file), response0.SerializeToString().hex()], port_file
        )
        echo_channel = grpc.insecure_channel(f"127.0.0.1:{echo_port}")
        echo = echo_channel.unary_unary(
            "/braid.v1.Braid/Search",
            request_serializer=pb.SearchRequest.SerializeToString,
            response_deserializer=pb.SearchResponse.FromString,
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
            for _ in range(200):  # warm up both channels
                echo(requests[efs[0]][0])
                client.stub.Search(requests[efs[0]][0])
            t = time.perf_counter()
            for r in requests[efs[0]]:
                echo(r)
            echo_qps = len(queries) / (time.perf_counter() - t)
            for ef in efs:
                raw.set_ef(ef)
                t = time.perf_counter()
                raw_found = [raw.knn_query(q, k=10)[0][0].tolist() for q in queries]
                raw_qps = len(queries) / (time.perf_counter() - t)
                t = time.perf_counter()
                api_found = [[int(h.id) for h in client.stub.Search(r).hits] for r in requests[ef]]
                api_qps = len(queries) / (time.perf_counter() - t)
                ideal = 1 / (1 / raw_qps + 1 / echo_qps)
                # batched: raw knn_query over `batch` rows vs BatchSearch of `batch` requests
                raw_batches = [queries[i : i + args.batch] for i in range(0, len(queries), args.batch)]
                t = time.perf_counter()
                for block in raw_batches:
                    raw.knn_query(block, k=10)
                raw_batch_qps = len(queries) / (time.perf_counter() - t)
                api_batches = [
                    pb.BatchSearchRequest(searches=requests[ef][i : i + args.batch])
                    for i in range(0, len(queries), args.batch)
                ]
                t = time.perf_counter()
                batch_found = []
                for request in api_batches:
                    for result in client.stub.BatchSearch(request).results:
                        batch_found.append([int(h.id) for h in result.hits])
                api_batch_qps = len(queries) / (time.perf_counter() - t)
                rows.append(
                    {
                        "ef": ef,
                        "raw_recall": recall_at_10(raw_found, gt),
                        "api_recall": recall_at_10(api_found, gt),
                        "batch_recall": recall_at_10(batch_found, gt),
                        "raw_qps": raw_qps,
                        "echo_qps": echo_qps,
                        "ideal_qps": ideal,
                        "api_qps": api_qps,
                        "api_vs_ideal": api_qps / ideal,
                        "raw_batch_qps": raw_batch_qps,
                        "api_batch_qps": api_batch_qps,
                        "batch_vs_raw": api_batch_qps / raw_batch_qps,
                    }
                )
        finally:
            echo_channel.close()
            client.close()
            echo_proc.kill()
            braid_proc.terminate()
            braid_proc.wait(timeout=60)

    print(
        f"build: raw hnswlib {raw_build:.1f} s; braid BulkUpsert ingest {braid_ingest:.1f} s "
        f"({n / braid_ingest:,.0f} docs/s, WAL-durable, index built as it streams)"
    )
    header = (
        "| ef | recall@10 raw | recall@10 api | raw QPS | echo QPS | ideal QPS | api QPS | api/ideal "
        f"| raw batched QPS | BatchSearch({args.batch}) QPS | batch/raw |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        print(
            f"| {r['ef']} | {r['raw_recall']:.3f} | {r['api_recall']:.3f} | {r['raw_qps']:,.0f} | "
            f"{r['echo_qps']:,.0f} | {r['ideal_qps']:,.0f} | {r['api_qps']:,.0f} | {r['api_vs_ideal']:.2f} | "
            f"{r['raw_batch_qps']:,.0f} | {r['api_batch_qps']:,.0f} | {r['batch_vs_raw']:.2f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dense.json").write_text(
        json.dumps(
            {"n": n, "dim": args.dim, "rows": rows, "raw_build_s": raw_build, "ingest_s": braid_ingest}, indent=1
        )
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--echo-server":
        echo_server_main(sys.argv[2], sys.argv[3])
    else:
        main()
