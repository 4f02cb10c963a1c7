"""The LangChain adapter's overhead: BraidVectorStore.similarity_search against the raw client's
search for the same query, sync and async, dense and hybrid.

    .venv/bin/python bench/integrations.py [--docs 10000] [--dim 384] [--queries 2000] [--rounds 5]
    .venv/bin/python bench/integrations.py --quick     # smoke run: 500 documents, 200 queries

One ``braid serve`` child process (loopback, a fresh data directory) holds one collection made
by the adapter's own ``collection_schema`` (a text field, a COSINE dense field of ``--dim``),
``--docs`` documents of random unit vectors, 12 words from a 2,000-word vocabulary and a small
metadata object each (seeded); the clock starts once the server is idle (bench/settle.py).

Each query is 3 words and a random vector. The store's Embeddings is a table lookup of those
precomputed vectors, so the adapter side pays no embedding model: what is measured is the
adapter alone (building the request from LangChain's arguments, turning hits into Documents,
metadata JSON parsed). Both sides send the same SearchRequest (limit 10, the text field and the
metadata returned, as LangChain needs them), one search at a time:

- dense:  ``client.search(dense=("emb", vector), ...)`` vs ``store.similarity_search(text)``
- hybrid: ``client.search(dense=..., bm25=text, ...)`` vs ``store.similarity_search(text, search_type="hybrid")``
- the same two on AsyncBraidClient vs ``asimilarity_search`` (one event loop, one task).

Rounds alternate the order of the sides; the table shows the best round's mean latency per
search (the least disturbed by the shared machine), the adapter/raw ratio, and this process's
CPU per search. Before timing, both sides' hits must be the same ids in the same order.
Results go to bench/results/integrations.json (integrations-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from langchain_core.embeddings import Embeddings

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from bench.aio_client import COLLECTION, VOCABULARY, fill  # noqa: E402
from bench.settle import settle  # noqa: E402
from braid.integrations.langchain import BraidVectorStore, collection_schema  # noqa: E402
from braid.service.aio import AsyncBraidClient  # noqa: E402
from braid.service.client import BraidClient  # noqa: E402
from braid.service.cluster.local import ROUTER_READY, Child, child_env  # noqa: E402


class Lookup(Embeddings):
    """Precomputed query vectors by text: embedding costs a dict lookup, so the adapter is all that is timed."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return [self.table[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        return self.table[text]

    async def aembed_query(self, text: str) -> list[float]:
        # Embeddings' default runs embed_query on a thread pool: a thread hop that is not the adapter's.
        return self.table[text]


def load(client: BraidClient, docs: int, dim: int, rng: np.random.Generator) -> list[str]:
    """The store's collection (its own schema), filled as bench/aio_client.py fills its, with metadata."""
    schema = collection_schema("text", "emb", dim)

    def metadata(i: int) -> dict[str, Any]:
        return {"source": f"file{i % 50}.txt", "page": i % 300, "tags": ["a", "b"]}

    return fill(client, schema, "text", docs, dim, rng, metadata)


def timed(work: Callable[[], Any], n: int) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"us": 1e6 * wall / n, "cpu_us": 1e6 * cpu / n}


async def timed_async(work: Callable[[], Awaitable[Any]], n: int) -> dict[str, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    await work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"us": 1e6 * wall / n, "cpu_us": 1e6 * cpu / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 documents, 200 queries, 2 rounds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.docs, args.queries, args.rounds = 500, 200, 2
    out = args.out or RESULTS / ("integrations-quick.json" if args.quick else "integrations.json")
    rng = np.random.default_rng(11)

    with tempfile.TemporaryDirectory(prefix="braid-integrations-bench-") as workdir:
        command = [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", f"{workdir}/data", "--port", "0"]
        server = Child("braid serve", command, ROUTER_READY, env=child_env())
        client = BraidClient(server.address)
        try:
            started = time.perf_counter()
            words = load(client, args.docs, args.dim, rng)
            print(f"loaded {args.docs} x {args.dim} in {time.perf_counter() - started:.1f} s", flush=True)
            assert server.proc is not None
            print(f"settled in {settle([server.proc.pid]):.1f} s", flush=True)
            texts = [" ".join(words[j] for j in rng.integers(0, VOCABULARY, size=3)) for _ in range(args.queries)]
            vectors = rng.standard_normal((args.queries, args.dim)).astype(np.float32).tolist()
            table = dict(zip(texts, vectors, strict=True))
            texts = list(table)  # a repeated text keeps one vector
            store = BraidVectorStore(COLLECTION, Lookup(table), client=client)
            rows = [measure_sync(client, store, kind, texts, table, args.rounds) for kind in ("dense", "hybrid")]
            rows += asyncio.run(measure_async(server.address, table, texts, args.rounds))
        finally:
            client.close()
            server.stop()

    print()
    print(f"{args.docs:,} x {args.dim} docs, {len(texts):,} queries one at a time, best of {args.rounds} rounds, ")
    print(f"{os.cpu_count()} cores")
    print()
    print("| client | kind | raw us/search | BraidVectorStore us/search | adapter/raw | client CPU us raw | adapter |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        raw, adapter = row["raw"], row["adapter"]
        print(
            f"| {row['client']} | {row['kind']} | {raw['us']:,.0f} | {adapter['us']:,.0f} "
            f"| {adapter['us'] / raw['us']:.3f} | {raw['cpu_us']:,.0f} | {adapter['cpu_us']:,.0f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\nwritten to {out}")


def _raw_args(kind: str, text: str, vector: list[float]) -> dict[str, Any]:
    # The very request the adapter sends for this query (service/integrations/langchain.py).
    args: dict[str, Any] = {"dense": ("emb", vector), "limit": 10, "text_fields": ["text"], "include_payload": True}
    if kind == "hybrid":
        args["bm25"] = text
    return args


def _best(results: list[dict[str, float]]) -> dict[str, float]:
    return min(results, key=lambda r: r["us"])


def measure_sync(
    client: BraidClient, store: BraidVectorStore, kind: str, texts: list[str], table: dict, rounds: int
) -> dict[str, Any]:
    search_type = "similarity" if kind == "dense" else "hybrid"

    def raw() -> list[list[str]]:
        return [[h.id for h in client.search(COLLECTION, **_raw_args(kind, t, table[t]))] for t in texts]

    def adapter() -> list[list[str]]:
        return [[d.id for d in store.similarity_search(t, k=10, search_type=search_type)] for t in texts]

    if raw() != adapter():
        raise SystemExit(f"sync {kind}: the raw client's and the adapter's hits differ")
    sides: dict[str, list[dict[str, float]]] = {"raw": [], "adapter": []}
    for round_ in range(rounds):
        for side in ("raw", "adapter") if round_ % 2 == 0 else ("adapter", "raw"):
            sides[side].append(timed(raw if side == "raw" else adapter, len(texts)))
    row = {"client": "sync", "kind": kind, "raw": _best(sides["raw"]), "adapter": _best(sides["adapter"])}
    print(f"sync {kind}: raw {row['raw']['us']:.0f} us  adapter {row['adapter']['us']:.0f} us", flush=True)
    return row


async def measure_async(address: str, table: dict, texts: list[str], rounds: int) -> list[dict[str, Any]]:
    rows = []
    async with AsyncBraidClient(address) as braid:
        store = BraidVectorStore(COLLECTION, Lookup(table), async_client=braid, address=address)
        for kind in ("dense", "hybrid"):
            search_type = "similarity" if kind == "dense" else "hybrid"

            async def raw(kind: str = kind) -> list[list[str]]:
                return [[h.id for h in await braid.search(COLLECTION, **_raw_args(kind, t, table[t]))] for t in texts]

            async def adapter(search_type: str = search_type) -> list[list[str]]:
                return [[d.id for d in await store.asimilarity_search(t, k=10, search_type=search_type)] for t in texts]

            if await raw() != await adapter():
                raise SystemExit(f"async {kind}: the raw client's and the adapter's hits differ")
            sides: dict[str, list[dict[str, float]]] = {"raw": [], "adapter": []}
            for round_ in range(rounds):
                for side in ("raw", "adapter") if round_ % 2 == 0 else ("adapter", "raw"):
                    sides[side].append(await timed_async(raw if side == "raw" else adapter, len(texts)))
            row = {"client": "async", "kind": kind, "raw": _best(sides["raw"]), "adapter": _best(sides["adapter"])}
            print(f"async {kind}: raw {row['raw']['us']:.0f} us  adapter {row['adapter']['us']:.0f} us", flush=True)
            rows.append(row)
        store.close()
    return rows


if __name__ == "__main__":
    main()
