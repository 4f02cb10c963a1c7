"""BM25 relevance through Braid's gRPC API against tantivy and bm25s used directly, in one run.

    python bench/bm25.py [--collections cranfield,scifact,...] [--data ../shared/data]

For each BEIR-layout collection: index title + " " + text as one text field through
BulkUpsert, once per analyzer (``default`` and ``english``, index/analyzers.py), run every
judged query through Search (BM25 only, depth 100), and score nDCG@10 and R@100 with
ir-measures. References in the same run, on the same text:

- tantivy used directly with the ``english`` analyzer and a bag-of-words query whose terms
  are boosted by their count in the query: what Braid should compute, with no service in
  between (tantivy's BM25: k1=1.2, b=0.75);
- bm25s with the same analysis (``\\w\\w+`` words, lower case, the same 33 English stop
  words, Snowball English stemming via PyStemmer) and the same k1=1.2, b=0.75;
- bm25s with BEIR/Anserini's k1=0.9, b=0.4 and the same analysis, for reference;
- the published BM25 figure where the collection is a BEIR one (SciFact).

Target: Braid ``english`` within 0.01 nDCG@10 of bm25s (k1=1.2, b=0.75) on every collection,
and of the published BM25 flat figure on BEIR collections.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import tantivy

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ir_data import DATA, PUBLISHED, braid_server, collections

from braid.index import analyzers
from braid.index.schema import Analyzer
from braid.service.evaluate import measure as score
from braid.v1 import braid_pb2 as pb

DEPTH = 100
ANALYZERS = ("default", "english")


def run_braid(corpus: dict[str, str], queries: dict[str, str]) -> dict[str, tuple[dict, float]]:
    """Per analyzer: (run, ms per query)."""
    from braid.service.client import BraidClient

    out = {}
    with braid_server() as port, BraidClient(f"127.0.0.1:{port}", timeout=600) as client:
        for analyzer in ANALYZERS:
            name = f"bench-{analyzer}"
            client.create_collection(name, pb.Schema(text_fields=[pb.TextField(name="body", analyzer=analyzer)]))
            client.bulk_upsert(name, ({"id": k, "text": {"body": v}} for k, v in corpus.items()))
            run, started = {}, time.perf_counter()
            for qid, text in queries.items():
                hits = client.search(name, bm25=text, limit=DEPTH)
                run[qid] = {h.id: h.score for h in hits}
            out[analyzer] = (run, (time.perf_counter() - started) / len(queries) * 1000)
    return out


def run_tantivy(corpus: dict[str, str], queries: dict[str, str]) -> dict:
    analyzer = analyzers.build(Analyzer.ENGLISH)
    builder = tantivy.SchemaBuilder()
    builder.add_text_field("body", stored=False, tokenizer_name="english")
    builder.add_text_field("id", stored=True, tokenizer_name="raw")
    schema = builder.build()
    index = tantivy.Index(schema)
    index.register_tokenizer("english", analyzer)
    writer = index.writer(64_000_000, 1)
    for k, v in corpus.items():
        writer.add_document(tantivy.Document(body=v, id=k))
    writer.commit()
    index.reload()
    searcher = index.searcher()
    run = {}
    for qid, text in queries.items():
        terms = Counter(analyzer.analyze(text))
        query = tantivy.Query.boolean_query(
            [
                (tantivy.Occur.Should, tantivy.Query.boost_query(tantivy.Query.term_query(schema, "body", t), float(n)))
                for t, n in terms.items()
            ]
        )
        run[qid] = {searcher.doc(addr)["id"][0]: s for s, addr in searcher.search(query, DEPTH).hits} if terms else {}
    return run


def run_bm25s(corpus: dict[str, str], queries: dict[str, str], k1: float, b: float) -> dict:
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    ids = list(corpus)
    retriever = bm25s.BM25(k1=k1, b=b)
    tokens = bm25s.tokenize([corpus[i] for i in ids], stopwords="en", stemmer=stemmer, show_progress=False)
    retriever.index(tokens, show_progress=False)
    query_tokens = bm25s.tokenize(list(queries.values()), stopwords="en", stemmer=stemmer, show_progress=False)
    docs, scores = retriever.retrieve(query_tokens, k=min(DEPTH, len(ids)), show_progress=False)
    return {
        qid: {ids[d]: float(s) for d, s in zip(docs[i], scores[i], strict=True) if s > 0}
        for i, qid in enumerate(queries)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--collections", default="cranfield,scifact,cacm,lisa,npl,med")
    args = parser.parse_args()
    n, r = "nDCG@10", "R@100"
    print(
        "| collection | docs | queries | braid default | braid english | tantivy english | bm25s 1.2/0.75 "
        "| bm25s 0.9/0.4 | published | braid-tantivy | braid-bm25s | braid english R@100 | bm25s R@100 "
        "| braid ms/query |"
    )
    print("|" + "---|" * 14)
    for name, corpus, queries, qrels in collections(args.data, args.collections):
        braid = {a: (score(run, qrels), ms) for a, (run, ms) in run_braid(corpus, queries).items()}
        (default, _), (english, ms) = braid["default"], braid["english"]
        direct = score(run_tantivy(corpus, queries), qrels)
        ref = score(run_bm25s(corpus, queries, 1.2, 0.75), qrels)
        beir = score(run_bm25s(corpus, queries, 0.9, 0.4), qrels)
        published = PUBLISHED.get(name, {}).get("bm25")
        print(
            f"| {name} | {len(corpus)} | {len(queries)} | {default[n]:.4f} | {english[n]:.4f} | {direct[n]:.4f} "
            f"| {ref[n]:.4f} | {beir[n]:.4f} | {published or '-'} | {english[n] - direct[n]:+.4f} "
            f"| {english[n] - ref[n]:+.4f} | {english[r]:.4f} | {ref[r]:.4f} | {ms:.2f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
