"""``braid eval``: relevance of search plans on a BEIR-layout collection, through the public gRPC API.

    braid eval DIR [--plans bm25,dense,hybrid,...] [--model all-minilm-l6-v2] [--out DIR]

DIR holds corpus.jsonl ({"_id", "title", "text"}), queries.jsonl ({"_id", "text"}) and
qrels/test.tsv (a header, then query-id, corpus-id, grade). The corpus goes into a
collection whose text field ``body`` is title + " " + text (analyzer ``english`` unless
told otherwise); the server's encoders fill the dense field ``dense`` from it, and with
``--sparse-model`` a sparse field ``sparse``. Every judged query then runs as plain text
through Search, once per plan: ``hybrid`` sends BM25 and dense with no fusion (the
server's default plan), ``rrf``/``minmax``/``zscore``/``dbsf`` name their rule. Metrics come from ir-measures (nDCG@10,
R@100, RR@10 = MRR@10); latency is each Search round trip, query encoding included.
Each plan's ranking is written as a TREC run file, and all figures as a JSON summary.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from braid.v1 import braid_pb2 as pb

from .client import BraidClient

MEASURES = ("nDCG@10", "R@100", "RR@10")


def _bm25(text: str) -> pb.SubQuery:
    return pb.SubQuery(bm25=pb.Bm25Query(text=text))


def _dense(text: str) -> pb.SubQuery:
    return pb.SubQuery(dense=pb.DenseQuery(field="dense", text=text))


def _sparse(text: str) -> pb.SubQuery:
    return pb.SubQuery(sparse=pb.SparseQuery(field="sparse", text=text))


def _hybrid(fusion: pb.Fusion) -> Callable[[str], tuple[list[pb.SubQuery], pb.Fusion | None]]:
    return lambda text: ([_bm25(text), _dense(text)], fusion)


def _weighted(normalization: int) -> pb.Fusion:
    return pb.Fusion(weighted=pb.WeightedSumFusion(normalization=normalization))  # type: ignore[arg-type]


PLANS: dict[str, Callable[[str], tuple[list[pb.SubQuery], pb.Fusion | None]]] = {
    "bm25": lambda text: ([_bm25(text)], None),
    "dense": lambda text: ([_dense(text)], None),
    "hybrid": lambda text: ([_bm25(text), _dense(text)], None),  # no fusion given: the server's default plan
    "sparse": lambda text: ([_sparse(text)], None),  # needs --sparse-model
    "rrf": _hybrid(pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60))),
    "minmax": _hybrid(_weighted(pb.MIN_MAX)),
    "zscore": _hybrid(_weighted(pb.Z_SCORE)),
    "dbsf": _hybrid(_weighted(pb.DBSF)),
}


@dataclass
class PlanResult:
    plan: str
    metrics: dict[str, float]
    latency_ms: dict[str, float]  # p50, p95, p99, mean
    run_file: str


@dataclass
class BeirCollection:
    corpus: dict[str, str]  # id -> title + " " + text
    queries: dict[str, str]  # judged queries only
    qrels: dict[str, dict[str, int]]

    @classmethod
    def load(cls, directory: Path) -> BeirCollection:
        for required in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
            if not (directory / required).is_file():
                raise FileNotFoundError(f"{directory} is not a BEIR collection: {required} is missing")
        corpus = {}
        with (directory / "corpus.jsonl").open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    row = json.loads(line)
                    corpus[str(row["_id"])] = f"{row.get('title', '')} {row.get('text', '')}".strip()
        qrels: dict[str, dict[str, int]] = {}
        with (directory / "qrels" / "test.tsv").open(encoding="utf-8") as lines:
            next(lines)  # header
            for line in lines:
                if line.strip():
                    qid, doc_id, grade = line.rstrip("\n").split("\t")
                    qrels.setdefault(qid, {})[doc_id] = int(grade)
        queries = {}
        with (directory / "queries.jsonl").open(encoding="utf-8") as lines:
            for line in lines:
                if line.strip():
                    row = json.loads(line)
                    if str(row["_id"]) in qrels:
                        queries[str(row["_id"])] = row["text"]
        return cls(corpus, queries, qrels)


def schema(
    model: str, precision: str, analyzer: str = "english", sparse_model: str = "", sparse_query_mode: str = ""
) -> pb.Schema:
    """Text field ``body``, dense field ``dense`` from ``model``; sparse field ``sparse`` when ``sparse_model``."""
    sparse = pb.Encoder(model=sparse_model, source_fields=["body"], query_mode=sparse_query_mode)
    return pb.Schema(
        text_fields=[pb.TextField(name="body", analyzer=analyzer)],
        dense_fields=[
            pb.DenseVectorField(
                name="dense",
                metric=pb.COSINE,
                encoder=pb.Encoder(model=model, source_fields=["body"], precision=precision),
            )
        ],
        sparse_fields=[pb.SparseVectorField(name="sparse", encoder=sparse)] if sparse_model else [],
    )


def ingest(client: BraidClient, name: str, data: BeirCollection, batch_size: int = 256, progress: bool = True) -> None:
    from tqdm import tqdm

    with tqdm(total=len(data.corpus), unit="doc", desc=f"ingest {name}", disable=not progress) as bar:

        def documents():  # type: ignore[no-untyped-def]
            for doc_id, body in data.corpus.items():
                yield {"id": doc_id, "text": {"body": body}}
                bar.update(1)

        client.bulk_upsert(name, documents(), batch_size=batch_size)


def run_plan(client: BraidClient, name: str, plan: str, data: BeirCollection, depth: int) -> tuple[dict, list[float]]:
    """Every judged query through Search with one plan: (run, per-query latency in ms)."""
    build = PLANS[plan]
    run: dict[str, dict[str, float]] = {}
    latencies = []
    for qid, text in data.queries.items():
        queries, fusion = build(text)
        request = pb.SearchRequest(collection=name, queries=queries, limit=depth)
        if fusion is not None:
            request.fusion.CopyFrom(fusion)
        started = time.perf_counter()
        hits = client.stub.Search(request, timeout=client.timeout).hits
        latencies.append((time.perf_counter() - started) * 1000)
        run[qid] = {hit.id: hit.score for hit in hits}
    return run, latencies


def measure(run: dict[str, dict[str, float]], qrels: dict[str, dict[str, int]]) -> dict[str, float]:
    import ir_measures

    measures = [ir_measures.parse_measure(m) for m in MEASURES]
    result = ir_measures.calc_aggregate(measures, qrels, run)
    return {str(m): float(result[m]) for m in measures}


def percentiles(latencies: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "mean": statistics.fmean(latencies)}


def write_trec(path: Path, run: dict[str, dict[str, float]], tag: str) -> None:
    with path.open("w", encoding="utf-8") as out:
        for qid, hits in run.items():
            ranked = sorted(hits.items(), key=lambda item: (-item[1], item[0]))
            for rank, (doc_id, score) in enumerate(ranked, 1):
                out.write(f"{qid} Q0 {doc_id} {rank} {score:.6f} {tag}\n")


def evaluate(
    client: BraidClient,
    directory: Path,
    plans: list[str],
    out: Path,
    name: str | None = None,
    model: str = "all-minilm-l6-v2",
    precision: str = "fp32",
    analyzer: str = "english",
    sparse_model: str = "",
    sparse_query_mode: str = "",
    depth: int = 100,
    reuse: bool = False,
    progress: bool = True,
    shards: int = 1,
) -> dict:
    """Ingest (unless ``reuse``), run every plan, write run files and ``summary.json`` under ``out``."""
    unknown = [p for p in plans if p not in PLANS]
    if unknown:
        raise ValueError(f"unknown plan(s) {unknown}; valid: {', '.join(PLANS)}")
    if "sparse" in plans and not (sparse_model or reuse):
        raise ValueError("plan sparse needs --sparse-model (a sparse encoder, e.g. minilm-tied-splade)")
    data = BeirCollection.load(directory)
    name = name or f"eval-{directory.name.lower()}"
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if not reuse:
        client.create_collection(
            name, schema(model, precision, analyzer, sparse_model, sparse_query_mode), shards=shards
        )
        ingest(client, name, data, progress=progress)
    index_s = time.perf_counter() - started
    results = []
    for plan in plans:
        run, latencies = run_plan(client, name, plan, data, depth)
        run_file = out / f"{name}.{plan}.trec"
        write_trec(run_file, run, f"braid-{plan}")
        results.append(PlanResult(plan, measure(run, data.qrels), percentiles(latencies), str(run_file)))
    summary = {
        "collection": name,
        "directory": str(directory),
        "documents": len(data.corpus),
        "queries": len(data.queries),
        "model": model,
        "precision": precision,
        "analyzer": None if reuse else analyzer,
        "sparse_model": None if reuse else sparse_model or None,
        "depth": depth,
        "shards": shards,
        "index_seconds": None if reuse else round(index_s, 2),
        "plans": [asdict(r) for r in results],
    }
    (out / f"{name}.summary.json").write_text(json.dumps(summary, indent=2))
    return summary
