"""Restart time against data size and log size, beside raw hnswlib loading the same vectors.

    python bench/recovery.py [--sizes 10000,50000] [--dim 384] [--shards 2]

For each size it bulk-upserts the shared vector set (../shared/bench/make_vectors.py,
cached under bench/results/) into a real ``braid serve``, then measures the time from
``braid serve`` starting to health SERVING after three kinds of stop:

  clean      SIGTERM: the shutdown checkpoints, the next start replays nothing;
  kill, log  kill -9 with automatic checkpoints off: the whole log is replayed
             (the worst case before the recovery bound);
  kill, auto kill -9 with the default checkpoint policy (BRAID_CHECKPOINT_LOG_BYTES /
             BRAID_CHECKPOINT_INTERVAL_S): the bounded replay an operator gets.

The reference is raw hnswlib loading an index of the same vectors from a file in this
process (``load_index``): what a restart costs with no log, no ids, no text and no
process start. Every start includes Python and gRPC start-up (~1 s here).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import hnswlib
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dense import shared_vectors

from braid.service.client import BraidClient, dense_vector
from braid.v1 import braid_pb2 as pb

M, EF_CONSTRUCTION = 16, 200
NO_AUTO_CHECKPOINT = {"BRAID_CHECKPOINT_LOG_BYTES": str(1 << 50), "BRAID_CHECKPOINT_INTERVAL_S": "1e9"}


def start(data: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int, float]:
    """Start braid serve; returns the process, its port and the seconds until health says SERVING."""
    began = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(data), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
    )
    assert proc.stdout is not None
    port = 0
    for line in proc.stdout:
        if "listening on" in line:
            port = int(line.rsplit(":", 1)[1].split(",")[0])
            break
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    while health.Check(health_pb2.HealthCheckRequest(), timeout=30).status != health_pb2.HealthCheckResponse.SERVING:
        time.sleep(0.01)
    seconds = time.perf_counter() - began
    channel.close()
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the log pipe drained
    return proc, port, seconds


def stop(proc: subprocess.Popen, kill: bool) -> None:
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    proc.wait(timeout=600)


def ingest(port: int, base: np.ndarray, shards: int) -> None:
    with BraidClient(f"127.0.0.1:{port}", timeout=600) as client:
        schema = pb.Schema(
            dense_fields=[
                pb.DenseVectorField(
                    name="emb",
                    dim=base.shape[1],
                    metric=pb.COSINE,
                    hnsw=pb.HnswParams(m=M, ef_construction=EF_CONSTRUCTION),
                )
            ],
            text_fields=[pb.TextField(name="body")],
        )
        client.create_collection("bench", schema, shards=shards)
        docs = (
            pb.Document(id=str(i), text={"body": f"document {i}"}, dense={"emb": dense_vector(v)})
            for i, v in enumerate(base)
        )
        client.bulk_upsert("bench", docs, batch_size=500)
        assert client.count("bench") == len(base)


def wal_mb(data: Path) -> float:
    return sum(p.stat().st_size for p in data.glob("collections/*/shard-*/wal/*")) / 1e6


def raw_hnswlib_load(base: np.ndarray, workdir: Path) -> float:
    index = hnswlib.Index(space="cosine", dim=base.shape[1])
    index.init_index(max_elements=len(base), M=M, ef_construction=EF_CONSTRUCTION)
    index.add_items(base, np.arange(len(base)))
    path = workdir / "raw.hnsw"
    index.save_index(str(path))
    del index
    began = time.perf_counter()
    loaded = hnswlib.Index(space="cosine", dim=base.shape[1])
    loaded.load_index(str(path), max_elements=len(base))
    return time.perf_counter() - began


def measure(n: int, dim: int, shards: int) -> list[tuple]:
    base, _, _ = shared_vectors(n, dim, 100)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        raw = raw_hnswlib_load(base, workdir)
        for label, env, kill in (
            ("clean", {}, False),
            ("kill, log", NO_AUTO_CHECKPOINT, True),
            ("kill, auto", {}, True),
        ):
            data = workdir / label.replace(", ", "-")
            proc, port, _ = start(data, env)
            ingest(port, base, shards)
            log_mb = wal_mb(data)
            stop(proc, kill)
            proc, _, seconds = start(data, env)
            stop(proc, kill=False)
            rows.append((n, label, log_mb, seconds, raw, seconds / raw))
            print(f"| {n:,} | {label} | {log_mb:.1f} | {seconds:.2f} | {raw:.3f} | {seconds / raw:.0f}x |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,50000")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--shards", type=int, default=2)
    args = parser.parse_args()
    print(f"restart to SERVING, {args.dim}-dim vectors + a short text field, {args.shards} shards")
    print("| documents | stop | log on disk MB | restart s | raw hnswlib load s | ratio |")
    print("|---|---|---|---|---|---|")
    for n in (int(s) for s in args.sizes.split(",")):
        measure(n, args.dim, args.shards)


if __name__ == "__main__":
    main()
