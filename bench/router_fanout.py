"""The router's fan-out against standalone: searches no single server can answer whole.

    python bench/router_fanout.py [--n 5000] [--dim 64] [--queries 300]

A standalone ``braid serve`` and a LocalCluster (NATS, 2 shard servers, 1 router) hold the same
collection: 2 shards, replication factor 1 on the cluster (no server holds both shards, so
every search fans out per shard: the router's Scatter over its RemoteShards), a dense field
"emb" (dim, COSINE, HNSW), text fields "title" and "body", a keyword payload "tag". One
client, one call at a time, alternately to standalone and to the router (which goes first
alternates too), after a warm-up of 50, for each shape:

  hybrid      BM25 + dense, include_payload and both text fields: the DFS phase (TextStats),
              Search, then Fetch, on both shards;
  dense batch a BatchSearch of one plain dense query: SearchDense on both shards;
  bm25        a plain BM25 query: TextStats, then Search.

Printed: p50 / p99 ms of each side, the ratio, and the hop (router p50 - standalone p50).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from braid.service.client import BraidClient, dense_vector
from braid.service.cluster.local import ROUTER_READY, Child, LocalCluster, child_env
from braid.v1 import braid_pb2 as pb

COLLECTION = "fanout"
WARMUP = 50
WORDS = (
    "apple", "banana", "cherry", "delta", "echo", "falcon", "garden", "harbor", "island", "jungle", "kettle",
    "lemon", "meadow", "nectar", "orbit", "pepper", "quartz", "river", "saddle", "timber", "umbrella", "violet",
)  # fmt: skip
TAGS = ("red", "green", "blue", "black", "white")


def schema(dim: int) -> pb.Schema:
    out = pb.Schema(
        dense_fields=[
            pb.DenseVectorField(
                name="emb", dim=dim, metric=pb.COSINE, hnsw=pb.HnswParams(m=16, ef_construction=100, ef_search=64)
            )
        ],
        payload_fields=[pb.PayloadField(name="tag", type=pb.KEYWORD)],
    )
    out.text_fields.add(name="title")
    out.text_fields.add(name="body")
    return out


def documents(n: int, dim: int, rng: np.random.Generator) -> list[pb.Document]:
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    docs = []
    for i in range(n):
        doc = pb.Document(
            id=f"d{i}",
            text={"title": " ".join(rng.choice(WORDS, 3)), "body": " ".join(rng.choice(WORDS, 15))},
        )
        doc.dense["emb"].CopyFrom(dense_vector(vectors[i]))
        doc.payload["tag"].keyword = TAGS[i % len(TAGS)]
        docs.append(doc)
    return docs


def load(client: BraidClient, docs: list[pb.Document], **kw: int) -> None:
    client.create_collection(COLLECTION, schema(len(docs[0].dense["emb"].packed) // 4), shards=2, **kw)
    for start in range(0, len(docs), 500):
        client.stub.Upsert(pb.UpsertRequest(collection=COLLECTION, documents=docs[start : start + 500]), timeout=60)


def shapes(queries: int, dim: int, rng: np.random.Generator) -> dict[str, list[object]]:
    vectors = rng.standard_normal((queries, dim)).astype(np.float32)
    texts = [" ".join(rng.choice(WORDS, 3)) for _ in range(queries)]
    hybrid, batch, bm25 = [], [], []
    for q, text in zip(vectors, texts, strict=True):
        dense = pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(q)))
        words = pb.SubQuery(bm25=pb.Bm25Query(text=text))
        hybrid.append(
            pb.SearchRequest(
                collection=COLLECTION,
                queries=[words, dense],
                limit=10,
                include_payload=True,
                text_fields=["title", "body"],
            )
        )
        batch.append(
            pb.BatchSearchRequest(searches=[pb.SearchRequest(collection=COLLECTION, queries=[dense], limit=10)])
        )
        bm25.append(pb.SearchRequest(collection=COLLECTION, queries=[words], limit=10))
    return {"hybrid": hybrid, "dense batch": batch, "bm25": bm25}


def call(client: BraidClient, request: object) -> None:
    if isinstance(request, pb.BatchSearchRequest):
        client.stub.BatchSearch(request, timeout=60)
    else:
        client.stub.Search(request, timeout=60)


def interleaved(standalone: BraidClient, router: BraidClient, requests: list[object]) -> dict[str, np.ndarray]:
    clients = {"standalone": standalone, "router": router}
    for i in range(WARMUP):
        for client in clients.values():
            call(client, requests[i % len(requests)])
    latencies: dict[str, list[float]] = {"standalone": [], "router": []}
    for i, request in enumerate(requests):
        for name in ("standalone", "router") if i % 2 else ("router", "standalone"):
            began = time.perf_counter()
            call(clients[name], request)
            latencies[name].append(time.perf_counter() - began)
    return {name: np.asarray(values) * 1e3 for name, values in latencies.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    rng = np.random.default_rng(7)
    docs = documents(args.n, args.dim, rng)
    requests = shapes(args.queries, args.dim, rng)
    rows = []
    with tempfile.TemporaryDirectory(prefix="braid-fanout-") as tmp:
        work = Path(tmp)
        server = Child(
            "standalone",
            [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(work / "standalone"), "--port", "0"],
            ROUTER_READY,
            env=child_env(),
            log_path=work / "standalone.log",
        )
        try:
            with (
                LocalCluster(work / "cluster", shard_servers=2, routers=1, nats_nodes=1) as cluster,
                BraidClient(server.address, timeout=60) as standalone,
                BraidClient(cluster.router_address, timeout=60) as router,
            ):
                load(standalone, docs)
                load(router, docs, replication_factor=1)
                for name, shape in requests.items():
                    ms = interleaved(standalone, router, shape)
                    s50, s99 = np.percentile(ms["standalone"], [50, 99])
                    r50, r99 = np.percentile(ms["router"], [50, 99])
                    rows.append((name, s50, r50, s99, r99))
                    print(f"{name}: standalone p50 {s50:.2f} ms, router p50 {r50:.2f} ms", flush=True)
        finally:
            server.stop()
    print(f"\n{args.n:,} docs x {args.dim}, 2 shards (cluster: 2 shard servers, rf 1), {args.queries} queries each\n")
    print("| search | standalone p50 ms | router p50 ms | ratio | hop ms | standalone p99 ms | router p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, s50, r50, s99, r99 in rows:
        print(f"| {name} | {s50:.2f} | {r50:.2f} | {r50 / s50:.2f} | {r50 - s50:+.2f} | {s99:.2f} | {r99:.2f} |")


if __name__ == "__main__":
    main()
