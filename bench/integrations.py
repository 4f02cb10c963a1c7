"""The framework adapters' overhead: LangChain's BraidVectorStore.similarity_search and
LlamaIndex's BraidVectorStore.query against the raw client's search for the same query, sync and
async, dense and hybrid.

    .venv/bin/python bench/integrations.py [--docs 10000] [--dim 384] [--queries 2000] [--rounds 5]
    .venv/bin/python bench/integrations.py --quick     # smoke run: 500 documents, 200 queries
    .venv/bin/python bench/integrations.py --adapters llamaindex   # one adapter's rows only

One ``braid serve`` child process (loopback, a fresh data directory) holds the collection made by
the adapters' own ``collection_schema`` (a text field, a COSINE dense field of ``--dim``),
``--docs`` documents of random unit vectors, 12 words from a 2,000-word vocabulary and a small
metadata object each (seeded); for LlamaIndex a second collection holds the same documents with
the metadata as LlamaIndex writes a node's (its keys, ref_doc_id and the node as JSON, from which
a hit becomes a node again). The clock starts once the server is idle (bench/settle.py).

Each query is 3 words and a random vector. LangChain's Embeddings is a table lookup of those
precomputed vectors and LlamaIndex's query carries the vector (as a retriever's embed model would
have put it there), so no embedding model is timed: what is measured is the adapter alone
(building the request from the framework's arguments, turning hits into Documents or nodes,
metadata JSON parsed). Both sides send the same SearchRequest (limit 10, the text field and the
metadata returned, as the frameworks need them), one search at a time:

- dense:  ``client.search(dense=("emb", vector), ...)`` vs ``similarity_search(text)`` (LangChain)
  or ``query(VectorStoreQuery(query_embedding=vector, ...))`` (LlamaIndex, mode DEFAULT)
- hybrid: ``client.search(dense=..., bm25=text, ...)`` vs ``similarity_search(text, search_type="hybrid")``
  or ``query(VectorStoreQuery(..., query_str=text, mode=HYBRID))``
- the same on AsyncBraidClient vs ``asimilarity_search`` / ``aquery`` (one event loop, one task).

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
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import VectorStoreQuery, VectorStoreQueryMode
from llama_index.core.vector_stores.utils import node_to_metadata_dict

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

from bench.aio_client import COLLECTION, VOCABULARY, fill  # noqa: E402
from bench.settle import settle  # noqa: E402
from braid.integrations import llamaindex  # noqa: E402
from braid.integrations.langchain import BraidVectorStore, collection_schema  # noqa: E402
from braid.service.aio import AsyncBraidClient  # noqa: E402
from braid.service.client import BraidClient  # noqa: E402
from braid.service.cluster.local import ROUTER_READY, Child, child_env  # noqa: E402
from braid.service.messages import metadata_of  # noqa: E402

ADAPTERS = ("langchain", "llamaindex")
LLAMA_COLLECTION = "bench-llamaindex"


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


def _metadata(i: int) -> dict[str, Any]:
    return {"source": f"file{i % 50}.txt", "page": i % 300, "tags": ["a", "b"]}


def load(client: BraidClient, docs: int, dim: int, rng: np.random.Generator) -> list[str]:
    """The store's collection (its own schema), filled as bench/aio_client.py fills its, with metadata."""
    return fill(client, collection_schema("text", "emb", dim), "text", docs, dim, rng, _metadata)


def load_llamaindex(client: BraidClient, docs: int, dim: int) -> None:
    """LLAMA_COLLECTION: COLLECTION's documents (read back with their vectors), each with the
    metadata LlamaIndex's BraidVectorStore.add writes for a node of that text and metadata."""
    client.create_collection(LLAMA_COLLECTION, collection_schema("text", "emb", dim))
    for start in range(0, docs, 500):
        batch = []
        for doc in client.get(COLLECTION, [f"d{i}" for i in range(start, min(start + 500, docs))], True):
            source = {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=metadata_of(doc)["source"])}
            node = TextNode(id_=doc.id, text=doc.text["text"], metadata=metadata_of(doc), relationships=source)
            doc.metadata = json.dumps(node_to_metadata_dict(node, remove_text=True), separators=(",", ":"))
            batch.append(doc)
        client.upsert(LLAMA_COLLECTION, batch)
    client.flush(LLAMA_COLLECTION)


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
    parser.add_argument("--adapters", default=",".join(ADAPTERS), help="comma-separated: langchain, llamaindex")
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 documents, 200 queries, 2 rounds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.quick:
        args.docs, args.queries, args.rounds = 500, 200, 2
    adapters = [name.strip() for name in args.adapters.split(",") if name.strip()]
    if not adapters or set(adapters) - set(ADAPTERS):
        parser.error(f"--adapters: choose from {', '.join(ADAPTERS)}")
    out = args.out or RESULTS / ("integrations-quick.json" if args.quick else "integrations.json")
    rng = np.random.default_rng(11)

    with tempfile.TemporaryDirectory(prefix="braid-integrations-bench-") as workdir:
        command = [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", f"{workdir}/data", "--port", "0"]
        server = Child("braid serve", command, ROUTER_READY, env=child_env())
        client = BraidClient(server.address)
        try:
            started = time.perf_counter()
            words = load(client, args.docs, args.dim, rng)
            if "llamaindex" in adapters:
                load_llamaindex(client, args.docs, args.dim)
            print(f"loaded {args.docs} x {args.dim} in {time.perf_counter() - started:.1f} s", flush=True)
            assert server.proc is not None
            print(f"settled in {settle([server.proc.pid]):.1f} s", flush=True)
            texts = [" ".join(words[j] for j in rng.integers(0, VOCABULARY, size=3)) for _ in range(args.queries)]
            vectors = rng.standard_normal((args.queries, args.dim)).astype(np.float32).tolist()
            table = dict(zip(texts, vectors, strict=True))
            texts = list(table)  # a repeated text keeps one vector
            rows: list[dict[str, Any]] = []
            for adapter in adapters:
                sync_side, async_sides = SIDES[adapter]
                rows += [sync_side(client, kind, texts, table, args.rounds) for kind in ("dense", "hybrid")]
                rows += asyncio.run(async_sides(server.address, table, texts, args.rounds))
        finally:
            client.close()
            server.stop()

    print()
    print(f"{args.docs:,} x {args.dim} docs, {len(texts):,} queries one at a time, best of {args.rounds} rounds, ")
    print(f"{os.cpu_count()} cores")
    print()
    print("| adapter | client | kind | raw us/search | adapter us/search | adapter/raw | client CPU us raw | adapter |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        raw, adapter_side = row["raw"], row["adapter"]
        print(
            f"| {row['adapter_name']} | {row['client']} | {row['kind']} | {raw['us']:,.0f} | {adapter_side['us']:,.0f} "
            f"| {adapter_side['us'] / raw['us']:.3f} | {raw['cpu_us']:,.0f} | {adapter_side['cpu_us']:,.0f} |"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"\nwritten to {out}")


def _raw_args(kind: str, text: str, vector: list[float]) -> dict[str, Any]:
    # The very request both adapters send for this query (service/integrations/).
    args: dict[str, Any] = {"dense": ("emb", vector), "limit": 10, "text_fields": ["text"], "include_payload": True}
    if kind == "hybrid":
        args["bm25"] = text
    return args


def _best(results: list[dict[str, float]]) -> dict[str, float]:
    return min(results, key=lambda r: r["us"])


def compare(name: str, client_kind: str, kind: str, raw: Callable[[], Any], adapter: Callable[[], Any],
            n: int, rounds: int) -> dict[str, Any]:  # fmt: skip
    """Both sides' hits compared, then ``rounds`` timed rounds each, their order alternating."""
    if raw() != adapter():
        raise SystemExit(f"{name} {client_kind} {kind}: the raw client's and the adapter's hits differ")
    sides: dict[str, list[dict[str, float]]] = {"raw": [], "adapter": []}
    for round_ in range(rounds):
        for side in ("raw", "adapter") if round_ % 2 == 0 else ("adapter", "raw"):
            sides[side].append(timed(raw if side == "raw" else adapter, n))
    return _row(name, client_kind, kind, sides)


async def acompare(name: str, kind: str, raw: Callable[[], Awaitable[Any]], adapter: Callable[[], Awaitable[Any]],
                   n: int, rounds: int) -> dict[str, Any]:  # fmt: skip
    if await raw() != await adapter():
        raise SystemExit(f"{name} async {kind}: the raw client's and the adapter's hits differ")
    sides: dict[str, list[dict[str, float]]] = {"raw": [], "adapter": []}
    for round_ in range(rounds):
        for side in ("raw", "adapter") if round_ % 2 == 0 else ("adapter", "raw"):
            sides[side].append(await timed_async(raw if side == "raw" else adapter, n))
    return _row(name, "async", kind, sides)


def _row(name: str, client_kind: str, kind: str, sides: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    row = {"adapter_name": name, "client": client_kind, "kind": kind}
    row |= {"raw": _best(sides["raw"]), "adapter": _best(sides["adapter"])}
    print(f"{name} {client_kind} {kind}: raw {row['raw']['us']:.0f} us  adapter {row['adapter']['us']:.0f} us")
    return row


# -------------------------------------------------------------- LangChain


def langchain_sync(client: BraidClient, kind: str, texts: list[str], table: dict, rounds: int) -> dict[str, Any]:
    store = BraidVectorStore(COLLECTION, Lookup(table), client=client)
    search_type = "similarity" if kind == "dense" else "hybrid"

    def raw() -> list[list[str]]:
        return [[h.id for h in client.search(COLLECTION, **_raw_args(kind, t, table[t]))] for t in texts]

    def adapter() -> list[list[str]]:
        return [[d.id for d in store.similarity_search(t, k=10, search_type=search_type)] for t in texts]

    return compare("LangChain", "sync", kind, raw, adapter, len(texts), rounds)


async def langchain_async(address: str, table: dict, texts: list[str], rounds: int) -> list[dict[str, Any]]:
    rows = []
    async with AsyncBraidClient(address) as braid:
        store = BraidVectorStore(COLLECTION, Lookup(table), async_client=braid, address=address)
        for kind in ("dense", "hybrid"):
            search_type = "similarity" if kind == "dense" else "hybrid"

            async def raw(kind: str = kind) -> list[list[str]]:
                return [[h.id for h in await braid.search(COLLECTION, **_raw_args(kind, t, table[t]))] for t in texts]

            async def adapter(search_type: str = search_type) -> list[list[str]]:
                return [[d.id for d in await store.asimilarity_search(t, k=10, search_type=search_type)] for t in texts]

            rows.append(await acompare("LangChain", kind, raw, adapter, len(texts), rounds))
        store.close()
    return rows


# -------------------------------------------------------------- LlamaIndex


def _llama_query(kind: str, text: str, vector: list[float]) -> VectorStoreQuery:
    mode = VectorStoreQueryMode.DEFAULT if kind == "dense" else VectorStoreQueryMode.HYBRID
    return VectorStoreQuery(query_embedding=vector, query_str=text, similarity_top_k=10, mode=mode)


def llamaindex_sync(client: BraidClient, kind: str, texts: list[str], table: dict, rounds: int) -> dict[str, Any]:
    store = llamaindex.BraidVectorStore(LLAMA_COLLECTION, client=client)
    queries = {t: _llama_query(kind, t, table[t]) for t in texts}  # as a retriever builds it, outside the clock

    def raw() -> list[list[str]]:
        return [[h.id for h in client.search(LLAMA_COLLECTION, **_raw_args(kind, t, table[t]))] for t in texts]

    def adapter() -> list[list[str]]:
        return [[n.node_id for n in store.query(queries[t]).nodes or ()] for t in texts]

    return compare("LlamaIndex", "sync", kind, raw, adapter, len(texts), rounds)


async def llamaindex_async(address: str, table: dict, texts: list[str], rounds: int) -> list[dict[str, Any]]:
    rows = []
    async with AsyncBraidClient(address) as braid:
        store = llamaindex.BraidVectorStore(LLAMA_COLLECTION, address=address, async_client=braid)
        for kind in ("dense", "hybrid"):
            queries = {t: _llama_query(kind, t, table[t]) for t in texts}

            async def raw(kind: str = kind) -> list[list[str]]:
                collection = LLAMA_COLLECTION
                return [[h.id for h in await braid.search(collection, **_raw_args(kind, t, table[t]))] for t in texts]

            async def adapter(queries: dict = queries) -> list[list[str]]:
                return [[n.node_id for n in (await store.aquery(queries[t])).nodes or ()] for t in texts]

            rows.append(await acompare("LlamaIndex", kind, raw, adapter, len(texts), rounds))
        store.close()
    return rows


SIDES = {"langchain": (langchain_sync, langchain_async), "llamaindex": (llamaindex_sync, llamaindex_async)}


if __name__ == "__main__":
    main()
