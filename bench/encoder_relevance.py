"""Relevance of the in-process encoders through Braid's gRPC API, beside BM25, in one run.

    python bench/encoder_relevance.py [--collections cranfield,scifact,...] [--models-dir DIR] [--no-sparse]

For each BEIR-layout collection: one Braid collection whose text field ``body``
(title + " " + text) feeds four encoder-backed fields -- all-MiniLM-L6-v2 fp32 and
int8 (dense), and minilm-tied-splade in both sparse query modes (model, and
inference-free IDF) -- filled by BulkUpsert of text only. Every judged query then
runs as plain text through Search, once per strand, plus a BM25 + dense hybrid (no
fusion given: the server default); nDCG@10 and R@100 come from ir-measures. The index time (text in,
vectors encoded and indexed) and the mean Search latency per strand are printed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ir_data import DATA, ROOT, braid_server, collections

from braid.encoders.export import BUILTIN_MODELS, export_builtin
from braid.service.client import BraidClient
from braid.service.evaluate import measure as score
from braid.v1 import braid_pb2 as pb

DEPTH = 100
DENSE, SPARSE = "all-minilm-l6-v2", "minilm-tied-splade"


def schema(sparse: bool) -> pb.Schema:
    def encoder(model: str, **options: object) -> pb.Encoder:
        return pb.Encoder(model=model, source_fields=["body"], **options)  # type: ignore[arg-type]

    return pb.Schema(
        text_fields=[pb.TextField(name="body")],
        dense_fields=[
            pb.DenseVectorField(name="minilm", metric=pb.COSINE, encoder=encoder(DENSE)),
            pb.DenseVectorField(name="minilm_int8", metric=pb.COSINE, encoder=encoder(DENSE, precision="int8")),
        ],
        sparse_fields=[
            pb.SparseVectorField(name="splade", encoder=encoder(SPARSE, top_k=256)),
            pb.SparseVectorField(name="splade_idf", encoder=encoder(SPARSE, top_k=256, query_mode="idf")),
        ]
        if sparse
        else [],
    )


def strands(text: str, sparse: bool = True) -> dict[str, list[pb.SubQuery]]:
    bm25 = pb.SubQuery(bm25=pb.Bm25Query(text=text))
    dense = pb.SubQuery(dense=pb.DenseQuery(field="minilm", text=text))
    out = {
        "BM25": [bm25],
        "dense MiniLM fp32": [dense],
        "dense MiniLM int8": [pb.SubQuery(dense=pb.DenseQuery(field="minilm_int8", text=text))],
        "sparse tied-SPLADE (model queries)": [pb.SubQuery(sparse=pb.SparseQuery(field="splade", text=text))],
        "sparse tied-SPLADE (IDF queries)": [pb.SubQuery(sparse=pb.SparseQuery(field="splade_idf", text=text))],
        "hybrid BM25 + dense, server default fusion": [bm25, dense],
    }
    return out if sparse else {k: v for k, v in out.items() if not k.startswith("sparse")}


def run_collection(
    client: BraidClient, corpus: dict[str, str], queries: dict[str, str], sparse: bool
) -> tuple[dict, float, dict]:
    started = time.perf_counter()
    client.create_collection("bench", schema(sparse))
    client.bulk_upsert("bench", ({"id": k, "text": {"body": v}} for k, v in corpus.items()), batch_size=256)
    index_s = time.perf_counter() - started
    runs: dict[str, dict] = {}
    latency: dict[str, float] = {}
    for name in strands("x", sparse):
        run, started = {}, time.perf_counter()
        for qid, text in queries.items():
            request = pb.SearchRequest(collection="bench", limit=DEPTH, queries=strands(text, sparse)[name])
            run[qid] = {h.id: h.score for h in client.stub.Search(request, timeout=600).hits}
        latency[name] = (time.perf_counter() - started) / len(queries) * 1000
        runs[name] = run
    client.delete_collection("bench")
    return runs, index_s, latency


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--collections", default="cranfield")
    parser.add_argument("--models-dir", default=str(ROOT / "bench" / "results" / "models"))
    parser.add_argument("--no-sparse", action="store_true", help="skip the (slow) SPLADE fields")
    args = parser.parse_args()
    for name in BUILTIN_MODELS:
        export_builtin(name, Path(args.models_dir))
    rows = []
    with (
        braid_server("--models-dir", args.models_dir) as port,
        BraidClient(f"127.0.0.1:{port}", timeout=3600) as client,
    ):
        for collection, corpus, queries, qrels in collections(args.data, args.collections):
            runs, index_s, latency = run_collection(client, corpus, queries, not args.no_sparse)
            fields = 2 if args.no_sparse else 4
            print(f"{collection}: {len(corpus)} docs indexed with {fields} encoded fields in {index_s:.1f} s")
            for strand, run in runs.items():
                rows.append((collection, strand, score(run, qrels), latency[strand]))
    print("| collection | strand | nDCG@10 | R@100 | ms/query |")
    print("|---|---|---|---|---|")
    for collection, strand, scores, ms in rows:
        print(f"| {collection} | {strand} | {scores['nDCG@10']:.4f} | {scores['R@100']:.4f} | {ms:.2f} |")


if __name__ == "__main__":
    main()
