"""Searches/s from one asyncio process (AsyncBraidClient, N tasks) against the sync BraidClient
with T threads: same server, same queries, interleaved.

    .venv/bin/python bench/aio_client.py [--docs 10000] [--dim 384] [--queries 2000]
                                         [--concurrency 1,8,32,128] [--rounds 3] [--out ...]
    .venv/bin/python bench/aio_client.py --quick     # smoke run: 500 documents, 200 queries

One ``braid serve`` child process (loopback, a fresh data directory, default workers and
queue) holds one collection: a dense field (``--dim``, COSINE, HNSW m 16, ef 64) and a text
field, ``--docs`` documents of random unit vectors and 12 words drawn from a 2,000-word
vocabulary (seeded). The load waits for the server to go idle (bench/settle.py) before the
clock starts. Queries are ``--queries`` requests made before the clock starts: dense-only
("dense") and BM25 + dense with the server's default fusion ("hybrid"), limit 10.

For every kind and concurrency c, each round runs both sides over all queries, the order
alternating from round to round: "sync" is one BraidClient shared by c threads of a
ThreadPoolExecutor, each taking the next query; "async" is one AsyncBraidClient on one event
loop with c tasks doing the same. searches/s is the best round's (the least disturbed by the
shared machine); "client CPU ms/search" is this process's CPU time (user + system, every
thread) per search in that round, which the machine's other load barely moves. Before timing,
every query's hits from the two clients are compared: they must be the same ids in the same
order, or the run stops.

Results go to bench/results/aio_client.json (aio_client-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from bench.settle import settle  # noqa: E402
from braid.service.aio import AsyncBraidClient  # noqa: E402
from braid.service.client import BraidClient  # noqa: E402
from braid.service.cluster.local import ROUTER_READY, Child, child_env  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402

COLLECTION = "bench"
VOCABULARY = 2000


def load(client: BraidClient, docs: int, dim: int, rng: np.random.Generator) -> list[str]:
    """The collection, filled; returns the vocabulary."""
    schema = pb.Schema(
        text_fields=[pb.TextField(name="body")],
        dense_fields=[
            pb.DenseVectorField(
                name="emb", dim=dim, metric=pb.COSINE, hnsw=pb.HnswParams(m=16, ef_construction=100, ef_search=64)
            )
        ],
    )
    return fill(client, schema, "body", docs, dim, rng)


def fill(
    client: BraidClient,
    schema: pb.Schema,
    text_field: str,
    docs: int,
    dim: int,
    rng: np.random.Generator,
    metadata: Callable[[int], dict[str, Any]] | None = None,
) -> list[str]:
    """COLLECTION made with ``schema`` and filled with ``docs`` documents: 12 random words of the
    vocabulary in ``text_field``, a random unit vector in ``emb`` (and ``metadata(i)``); flushed.
    Returns the vocabulary."""
    words = [f"w{i}" for i in range(VOCABULARY)]
    client.create_collection(COLLECTION, schema)
    vectors = rng.standard_normal((docs, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    picks = rng.integers(0, VOCABULARY, size=(docs, 12))

    def document(i: int) -> dict[str, Any]:
        doc = {"id": f"d{i}", "text": {text_field: " ".join(words[j] for j in picks[i])}, "dense": {"emb": vectors[i]}}
        if metadata is not None:
            doc["metadata"] = metadata(i)
        return doc

    client.bulk_upsert(COLLECTION, (document(i) for i in range(docs)), batch_size=500)
    client.flush(COLLECTION)
    return words


def queries(kind: str, n: int, dim: int, words: list[str], rng: np.random.Generator) -> list[dict[str, Any]]:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    out = []
    for i in range(n):
        query: dict[str, Any] = {"dense": ("emb", vectors[i]), "limit": 10}
        if kind == "hybrid":
            query["bm25"] = " ".join(words[j] for j in rng.integers(0, len(words), size=3))
        out.append(query)
    return out


def run_sync(client: BraidClient, batch: list[dict[str, Any]], threads: int) -> list[list[pb.Hit]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda q: client.search(COLLECTION, **q), batch))


async def run_async(client: AsyncBraidClient, batch: list[dict[str, Any]], tasks: int) -> list[list[pb.Hit]]:
    results: list[list[pb.Hit]] = [[] for _ in batch]
    position = iter(range(len(batch)))

    async def worker() -> None:
        for i in position:  # shared: each task takes the next query
            results[i] = await client.search(COLLECTION, **batch[i])

    await asyncio.gather(*(worker() for _ in range(tasks)))
    return results


def timed(work: Callable[[], Any], n: int) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"qps": n / wall, "cpu_ms": 1000 * cpu / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--concurrency", default="1,8,32,128", help="threads (sync) and tasks (async), comma-separated")
    parser.add_argument("--kinds", default="dense,hybrid")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 documents, 200 queries, 1 round")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.docs, args.queries, args.rounds, args.concurrency = 500, 200, 1, "1,16"
    out = args.out or RESULTS / ("aio_client-quick.json" if args.quick else "aio_client.json")
    levels = [int(c) for c in args.concurrency.split(",")]
    rng = np.random.default_rng(7)

    with tempfile.TemporaryDirectory(prefix="braid-aio-bench-") as workdir:
        command = [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", f"{workdir}/data", "--port", "0"]
        server = Child("braid serve", command, ROUTER_READY, env=child_env())
        sync = BraidClient(server.address)
        try:
            started = time.perf_counter()
            words = load(sync, args.docs, args.dim, rng)
            print(f"loaded {args.docs} x {args.dim} in {time.perf_counter() - started:.1f} s", flush=True)
            assert server.proc is not None
            print(f"settled in {settle([server.proc.pid]):.1f} s", flush=True)
            rows = asyncio.run(measure(sync, server.address, args, levels, words, rng))
        finally:
            sync.close()
            server.stop()

    print()
    print(
        f"{args.docs:,} x {args.dim} docs, {args.queries:,} queries, "
        f"best of {args.rounds} rounds, {os.cpu_count()} cores"
    )
    print()
    print(
        "| kind | concurrency | sync searches/s (threads) | async searches/s (tasks) | async/sync "
        "| client CPU ms/search sync | async |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['kind']} | {row['concurrency']} | {row['sync']['qps']:,.0f} | {row['async']['qps']:,.0f} "
            f"| {row['async']['qps'] / row['sync']['qps']:.2f} | {row['sync']['cpu_ms']:.2f} "
            f"| {row['async']['cpu_ms']:.2f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\nwritten to {out}")


async def measure(
    sync: BraidClient, address: str, args: argparse.Namespace, levels: list[int], words: list[str], rng: Any
) -> list[dict[str, Any]]:
    loop = asyncio.get_running_loop()
    rows = []
    async with AsyncBraidClient(address) as braid:
        for kind in args.kinds.split(","):
            batch = queries(kind, args.queries, args.dim, words, rng)
            want = await loop.run_in_executor(None, run_sync, sync, batch, 8)
            got = await run_async(braid, batch, 32)
            if [[h.id for h in hits] for hits in want] != [[h.id for h in hits] for hits in got]:
                raise SystemExit(f"{kind}: the two clients' hits differ")
            for level in levels:
                best: dict[str, dict[str, float]] = {}
                for round_ in range(args.rounds):
                    order = ("sync", "async") if round_ % 2 == 0 else ("async", "sync")
                    for side in order:
                        if side == "sync":
                            # The sync side runs on a thread of its own so this loop stays idle meanwhile.
                            result = await loop.run_in_executor(
                                None, timed, lambda b=batch, c=level: run_sync(sync, b, c), len(batch)
                            )
                        else:
                            result = await timed_async(braid, batch, level)
                        if side not in best or result["qps"] > best[side]["qps"]:
                            best[side] = result
                print(
                    f"{kind} c={level}: sync {best['sync']['qps']:,.0f}/s  async {best['async']['qps']:,.0f}/s  "
                    f"ratio {best['async']['qps'] / best['sync']['qps']:.2f}",
                    flush=True,
                )
                rows.append({"kind": kind, "concurrency": level, **best})
    return rows


async def timed_async(braid: AsyncBraidClient, batch: list[dict[str, Any]], tasks: int) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    await run_async(braid, batch, tasks)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"qps": len(batch) / wall, "cpu_ms": 1000 * cpu / len(batch)}


if __name__ == "__main__":
    main()
