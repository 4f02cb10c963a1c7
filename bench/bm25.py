"""BM25 relevance through Braid's gRPC API against tantivy and bm25s used directly, in one run.

    python bench/bm25.py [--collections cranfield,scifact,...] [--data ../shared/data]

For each BEIR-layout collection: index title + " " + text as one text field through
BulkUpsert, run every query through Search (BM25 only, depth 100), and score nDCG@10 and
R@100 with ir-measures. The same text goes into tantivy directly (same defaults: default
tokenizer, k1=1.2, b=0.75) and into bm25s (k1=1.2, b=0.75, English stop words). Prints a
table with Braid's difference from each reference (target |delta| <= 0.01 vs tantivy or bm25s).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import tantivy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ir_data import DATA, braid_server, collections

from braid.service.evaluate import measure as score
from braid.v1 import braid_pb2 as pb

DEPTH = 100


def run_braid(corpus: dict[str, str], queries: dict[str, str]) -> tuple[dict, float]:
    from braid.service.client import BraidClient

    with braid_server() as port, BraidClient(f"127.0.0.1:{port}", timeout=600) as client:
        client.create_collection("bench", pb.Schema(text_fields=[pb.TextField(name="body")]))
        client.bulk_upsert("bench", ({"id": k, "text": {"body": v}} for k, v in corpus.items()))
        run, started = {}, time.perf_counter()
        for qid, text in queries.items():
            hits = client.search("bench", bm25=text, limit=DEPTH)
            run[qid] = {h.id: h.score for h in hits}
        per_query_ms = (time.perf_counter() - started) / len(queries) * 1000
    return run, per_query_ms


def run_tantivy(corpus: dict[str, str], queries: dict[str, str]) -> dict:
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("body", stored=False)
    builder.add_text_field("id", stored=True, tokenizer_name="raw")
    index = tantivy.Index(builder.build())
    writer = index.writer(64_000_000, 1)
    for k, v in corpus.items():
        writer.add_document(tantivy.Document(body=v, id=k))
    writer.commit()
    index.reload()
    searcher = index.searcher()
    run = {}
    for qid, text in queries.items():
        # Plain words: punctuation to spaces and lower case, so query-language characters and
        # upper-case AND/OR/NOT are text, not syntax (the default tokenizer lower-cases anyway).
        words = re.sub(r"[\W_]+", " ", text).lower().strip()
        if not words:
            run[qid] = {}
            continue
        query = index.parse_query(words, ["body"])
        run[qid] = {searcher.doc(addr)["id"][0]: score for score, addr in searcher.search(query, DEPTH).hits}
    return run


def run_bm25s(corpus: dict[str, str], queries: dict[str, str]) -> dict:
    import bm25s

    ids = list(corpus)
    retriever = bm25s.BM25(k1=1.2, b=0.75)
    retriever.index(bm25s.tokenize([corpus[i] for i in ids], stopwords="en", show_progress=False), show_progress=False)
    tokens = bm25s.tokenize(list(queries.values()), stopwords="en", show_progress=False)
    docs, scores = retriever.retrieve(tokens, k=min(DEPTH, len(ids)), show_progress=False)
    return {
        qid: {ids[d]: float(s) for d, s in zip(docs[i], scores[i], strict=True) if s > 0}
        for i, qid in enumerate(queries)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--collections", default="cranfield")
    args = parser.parse_args()
    rows = []
    for name, corpus, queries, qrels in collections(args.data, args.collections):
        braid_run, ms = run_braid(corpus, queries)
        b, t, s = (
            score(braid_run, qrels),
            score(run_tantivy(corpus, queries), qrels),
            score(run_bm25s(corpus, queries), qrels),
        )
        rows.append((name, len(corpus), len(queries), b, t, s, ms))
    print(
        "| collection | docs | queries | braid nDCG@10 | tantivy nDCG@10 | bm25s nDCG@10 | braid-tantivy "
        "| braid-bm25s | braid R@100 | tantivy R@100 | bm25s R@100 | braid ms/query |"
    )
    print("|" + "---|" * 12)
    for name, docs, nq, b, t, s, ms in rows:
        n, r = "nDCG@10", "R@100"
        print(
            f"| {name} | {docs} | {nq} | {b[n]:.4f} | {t[n]:.4f} | {s[n]:.4f} | {b[n] - t[n]:+.4f} | "
            f"{b[n] - s[n]:+.4f} | {b[r]:.4f} | {t[r]:.4f} | {s[r]:.4f} | {ms:.2f} |"
        )


if __name__ == "__main__":
    main()
