"""nDCG@10 of a cluster against standalone ``braid serve`` on every BEIR collection in ../shared/data.

    python bench/cluster_relevance.py [--collections med,cranfield,...] [--shards 2]
                                      [--model all-minilm-l6-v2] [--out bench/results/cluster_relevance.json]

The issue's target: a cluster's nDCG@10 within 0.002 of standalone on every collection.
Everything goes through the public gRPC API (braid.v1), in child processes on loopback.

Vectors: the corpus and the judged queries are encoded once, here, with Braid's own dense
encoder (``ModelStore(models_dir).encoder(model)``, the class and ONNX export the server's
encoders use; exported into ``--models-dir`` if needed), in the calls the server would make
(documents in BulkUpsert batches of 256, each query alone), and cached as .npy under
bench/results/relevance-cache/<collection>/. The servers then get the vectors, not text to
encode: a 2-core machine encodes about 20 documents/s, and the encoding is the same in
every deployment anyway.

Collection (``braid eval``'s schema, service/evaluate.py ``schema``, less the encoder): text
field ``body`` = title + " " + text, analyzer ``english``; dense field ``dense``, dim 384,
COSINE, default HNSW, no encoder; every document carries its vector, packed float32.
Loaded with BulkUpsert in batches of 256.

Deployments, one after the other (each stopped before the next starts):

  standalone  ``braid serve``: one collection of 1 shard and one of ``--shards`` shards;
  cluster     LocalCluster(shard_servers=2, routers=1, nats_nodes=1): one collection of
              ``--shards`` shards, replication factor the default (2: every shard server
              holds a replica of every shard).

Plans (``braid eval``'s, service/evaluate.py ``PLANS``), every judged query, limit 100:
bm25 (text), dense (the query's vector), hybrid (both sub-queries, no fusion: the server's
default plan, each strand contributing its default depth). Metrics: ir-measures
(service/evaluate.py ``measure``): nDCG@10, R@100, RR@10.

Expected differences: dense search is the same HNSW search per shard merged across shards
in both deployments, so with the same shard count the cluster must give the same hits; BM25
scores every shard with the collection's IDF (a DFS phase), so cluster == standalone with the
same shard count exactly, and both differ from 1 shard only through the per-shard average
field length (and dense from 1 shard by HNSW being approximate per shard). Besides the metrics, the script counts the
queries whose ranked ids (and scores) differ between the cluster and standalone(N).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CACHE = ROOT / "bench" / "results" / "relevance-cache"

from braid.encoders.dense import DenseEncoder  # noqa: E402
from braid.encoders.export import export_builtin  # noqa: E402
from braid.encoders.registry import ModelStore  # noqa: E402
from braid.service.client import BraidClient, dense_vector  # noqa: E402
from braid.service.cluster.local import ROUTER_READY, Child, LocalCluster, child_env  # noqa: E402
from braid.service.evaluate import BeirCollection, measure  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402

PLANS = ("bm25", "dense", "hybrid")
LIMIT = 100  # braid eval's --depth: hits per query
BATCH = 256  # BulkUpsert batch (braid eval's) = documents per server-side encoder call
TOLERANCE = 0.002
DIM = 384
STREAM_TIMEOUT_S = 3600.0
SCORE_ATOL = 1e-5  # scores "equal" between deployments (float32 through different merges)


# ------------------------------------------------------------------ data and vectors


def default_collections() -> str:
    return ",".join(sorted(d.name for d in DATA.iterdir() if (d / "corpus.jsonl").is_file()))


def encoder_of(model: str, models_dir: Path) -> DenseEncoder:
    export_builtin(model, models_dir, quantize=False)  # kept when already exported
    encoder = ModelStore(models_dir).encoder(model, "fp32")
    if not isinstance(encoder, DenseEncoder):
        raise SystemExit(f"{model} is not a dense model")
    return encoder


def cached_vectors(
    name: str, kind: str, ids: list[str], texts: list[str], model: str, encode: Any
) -> tuple[np.ndarray, float | None]:
    """float32 [len(ids), dim] from the cache, or encoded and cached; and the seconds encoding took (None: cached)."""
    folder = CACHE / name
    vectors_file, ids_file = folder / f"{kind}.{model}.npy", folder / f"{kind}.{model}.ids.json"
    if vectors_file.is_file() and ids_file.is_file() and json.loads(ids_file.read_text()) == ids:
        vectors = np.load(vectors_file)
        if vectors.shape == (len(ids), DIM) and vectors.dtype == np.float32:
            return vectors, None
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    vectors = encode(texts)
    seconds = time.perf_counter() - began
    np.save(vectors_file, vectors)
    ids_file.write_text(json.dumps(ids))
    return vectors, seconds


def encode_corpus(encoder: DenseEncoder, texts: list[str]) -> np.ndarray:
    """As the server encodes a BulkUpsert: one encoder call per batch of 256 documents."""
    out = np.empty((len(texts), encoder.dim), np.float32)
    for start in range(0, len(texts), BATCH):
        out[start : start + BATCH] = encoder.encode(texts[start : start + BATCH])
        print(f"  encoded {min(start + BATCH, len(texts))}/{len(texts)}", end="\r", flush=True)
    print()
    return out


def encode_queries(encoder: DenseEncoder, texts: list[str]) -> np.ndarray:
    """As the server encodes one search at a time: each query alone."""
    return np.concatenate([encoder.encode([text]) for text in texts]) if texts else np.empty((0, encoder.dim))


class Prepared:
    """One collection: its BEIR data and the vectors of its documents and judged queries."""

    def __init__(self, name: str, encoder: DenseEncoder | None, model: str, models_dir: Path) -> None:
        self.name = name
        self.data = BeirCollection.load(DATA / name)
        self.doc_ids = list(self.data.corpus)
        self.query_ids = list(self.data.queries)
        self.encode_s: dict[str, float | None] = {}

        def need() -> DenseEncoder:
            nonlocal encoder
            if encoder is None:
                encoder = encoder_of(model, models_dir)
            return encoder

        self.docs, self.encode_s["corpus"] = cached_vectors(
            name,
            "corpus",
            self.doc_ids,
            [self.data.corpus[i] for i in self.doc_ids],
            model,
            lambda texts: encode_corpus(need(), texts),
        )
        self.queries, self.encode_s["queries"] = cached_vectors(
            name,
            "queries",
            self.query_ids,
            [self.data.queries[i] for i in self.query_ids],
            model,
            lambda texts: encode_queries(need(), texts),
        )
        self.encoder = encoder


# ------------------------------------------------------------------ through the API


def schema() -> pb.Schema:
    """braid eval's schema (text ``body``, analyzer english; dense ``dense``, COSINE) with vectors given."""
    return pb.Schema(
        text_fields=[pb.TextField(name="body", analyzer="english")],
        dense_fields=[pb.DenseVectorField(name="dense", dim=DIM, metric=pb.COSINE)],
    )


def load(client: BraidClient, collection: str, prepared: Prepared) -> float:
    """BulkUpsert every document (text and packed vector) in batches of 256; seconds until the response."""
    corpus = prepared.data.corpus

    def batches() -> Any:
        for start in range(0, len(prepared.doc_ids), BATCH):
            yield pb.UpsertRequest(
                collection=collection,
                documents=[
                    pb.Document(
                        id=doc_id,
                        text={"body": corpus[doc_id]},
                        dense={"dense": dense_vector(prepared.docs[start + i])},
                    )
                    for i, doc_id in enumerate(prepared.doc_ids[start : start + BATCH])
                ],
            )

    began = time.perf_counter()
    response = client.stub.BulkUpsert(batches(), timeout=STREAM_TIMEOUT_S)
    seconds = time.perf_counter() - began
    if response.upserted != len(corpus):
        raise RuntimeError(f"{collection}: BulkUpsert upserted {response.upserted} of {len(corpus)}")
    count = client.count(collection)
    if count != len(corpus):
        raise RuntimeError(f"{collection}: Count says {count} after loading {len(corpus)}")
    return seconds


def sub_queries(plan: str, text: str, vector: np.ndarray) -> list[pb.SubQuery]:
    bm25 = pb.SubQuery(bm25=pb.Bm25Query(text=text))
    dense = pb.SubQuery(dense=pb.DenseQuery(field="dense", vector=dense_vector(vector)))
    return {"bm25": [bm25], "dense": [dense], "hybrid": [bm25, dense]}[plan]


Run = dict[str, list[tuple[str, float]]]  # query id -> ranked (doc id, score)


def run_plans(client: BraidClient, collection: str, prepared: Prepared) -> dict[str, Run]:
    runs: dict[str, Run] = {}
    for plan in PLANS:
        run: Run = {}
        for qid, vector in zip(prepared.query_ids, prepared.queries, strict=True):
            request = pb.SearchRequest(
                collection=collection,
                queries=sub_queries(plan, prepared.data.queries[qid], vector),
                limit=LIMIT,
            )
            run[qid] = [(hit.id, hit.score) for hit in client.stub.Search(request, timeout=client.timeout).hits]
        runs[plan] = run
    return runs


def scored(run: Run, prepared: Prepared) -> dict[str, float]:
    return measure({qid: dict(hits) for qid, hits in run.items()}, prepared.data.qrels)


def measure_collection(client: BraidClient, collection: str, shards: int, prepared: Prepared, **create: int) -> dict:
    client.create_collection(collection, schema(), shards=shards, **create)
    info = client.get_collection(collection)
    load_s = load(client, collection, prepared)
    began = time.perf_counter()
    runs = run_plans(client, collection, prepared)
    search_s = time.perf_counter() - began
    client.delete_collection(collection)
    return {
        "shards": info.shards,
        "replication_factor": info.replication_factor,
        "load_s": load_s,
        "search_s": search_s,
        "metrics": {plan: scored(run, prepared) for plan, run in runs.items()},
        "runs": runs,
    }


# ------------------------------------------------------------------ deployments


def standalone(workdir: Path, collections: list[Prepared], shards: int) -> dict[str, dict[int, dict]]:
    server = Child(
        "standalone",
        [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(workdir / "standalone"), "--port", "0"],
        ROUTER_READY,  # the same line: "serving braid.v1.Braid on host:port"
        env=child_env(),
        log_path=workdir / "logs" / "standalone.log",
    )
    out: dict[str, dict[int, dict]] = {}
    try:
        with BraidClient(server.address, timeout=120) as client:
            for prepared in collections:
                out[prepared.name] = {}
                for count in sorted({1, shards}):
                    result = measure_collection(client, f"rel_{prepared.name}_s{count}", count, prepared)
                    out[prepared.name][count] = result
                    print(f"standalone {prepared.name} {count} shard(s): {summary(result)}", flush=True)
    except BaseException:
        print(f"--- standalone output:\n{server.tail()}", file=sys.stderr)
        raise
    finally:
        server.stop()
    return out


def cluster(workdir: Path, collections: list[Prepared], shards: int) -> tuple[dict[str, dict], float]:
    out: dict[str, dict] = {}
    with LocalCluster(workdir / "cluster", shard_servers=2, routers=1, nats_nodes=1) as local:
        started_s = local.started_in_s or 0.0
        print(f"cluster: up in {started_s:.1f} s", flush=True)
        try:
            with BraidClient(local.router_address, timeout=120) as client:
                for prepared in collections:
                    result = measure_collection(client, f"rel_{prepared.name}_s{shards}", shards, prepared)
                    out[prepared.name] = result
                    print(f"cluster {prepared.name} {shards} shards: {summary(result)}", flush=True)
        except BaseException:
            for child in local.children:
                print(f"--- {child.name} output:\n{child.tail(20)}", file=sys.stderr)
            raise
    return out, started_s


def summary(result: dict) -> str:
    scores = ", ".join(f"{plan} {m['nDCG@10']:.4f}" for plan, m in result["metrics"].items())
    return (
        f"nDCG@10 {scores}; loaded in {result['load_s']:.1f} s, searched in {result['search_s']:.1f} s "
        f"(replication factor {result['replication_factor']})"
    )


# ------------------------------------------------------------------ comparison


def differences(a: Run, b: Run) -> dict[str, Any]:
    """Queries whose ranked ids differ, and (among the same id lists) whose scores differ beyond SCORE_ATOL."""
    ids_differ = scores_differ = 0
    max_score_diff = 0.0
    for qid, hits in a.items():
        other = b[qid]
        if [h[0] for h in hits] != [h[0] for h in other]:
            ids_differ += 1
            continue
        if hits:
            diff = float(np.max(np.abs(np.array([h[1] for h in hits]) - np.array([h[1] for h in other]))))
            max_score_diff = max(max_score_diff, diff)
            scores_differ += diff > SCORE_ATOL
    return {
        "queries": len(a),
        "ids_differ": ids_differ,
        "scores_differ": scores_differ,
        "max_score_diff": max_score_diff,
    }


EXPECTED = {
    "bm25": (
        "BM25 with the collection's IDF (DFS phase): cluster == standalone with the same shard count exactly; "
        "both differ from 1 shard only through the per-shard average field length"
    ),
    "dense": (
        "the same per-shard HNSW search merged across shards: cluster == standalone with the same shard count; "
        "differs from 1 shard only where HNSW (approximate) finds other neighbours per shard"
    ),
    "hybrid": (
        "z-scored BM25 + dense: equal to standalone with the same shard count; differs from 1 shard through "
        "HNSW per shard and BM25's per-shard average field length"
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collections", default=None, help="comma-separated (default: every folder of ../shared/data)")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--model", default="all-minilm-l6-v2")
    parser.add_argument("--models-dir", type=Path, default=ROOT / "bench" / "results" / "models")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cluster_relevance.json")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: a temporary folder)")
    args = parser.parse_args()
    names = (args.collections or default_collections()).split(",")
    wall = time.perf_counter()

    encoder: DenseEncoder | None = None
    collections = []
    for name in names:
        if not (DATA / name / "corpus.jsonl").is_file():
            raise SystemExit(f"{DATA / name} is not a BEIR collection")
        prepared = Prepared(name, encoder, args.model, args.models_dir)
        encoder = prepared.encoder
        encoded = {k: "cached" if v is None else f"encoded in {v:.0f} s" for k, v in prepared.encode_s.items()}
        print(
            f"{name}: {len(prepared.doc_ids)} documents ({encoded['corpus']}), "
            f"{len(prepared.query_ids)} judged queries ({encoded['queries']})",
            flush=True,
        )
        collections.append(prepared)

    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="braid-bench-cluster-relevance-")
        workdir = Path(temporary.name)
    else:
        workdir = args.workdir.absolute()
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
    try:
        alone = standalone(workdir, collections, args.shards)
        together, cluster_started_s = cluster(workdir, collections, args.shards)
    finally:
        if temporary is not None:
            temporary.cleanup()

    n = args.shards
    rows, results, worst = [], {}, {"vs_n": 0.0, "vs_1": 0.0}
    for prepared in collections:
        name = prepared.name
        one, many, clustered = alone[name][1], alone[name][n], together[name]
        results[name] = {
            "documents": len(prepared.doc_ids),
            "queries": len(prepared.query_ids),
            "encode_s": prepared.encode_s,
            "plans": {},
            "load_s": {
                "standalone_1": one["load_s"],
                f"standalone_{n}": many["load_s"],
                "cluster": clustered["load_s"],
            },
            "cluster_replication_factor": clustered["replication_factor"],
        }
        for plan in PLANS:
            s1, sn, c = (r["metrics"][plan] for r in (one, many, clustered))
            d_n, d_1 = c["nDCG@10"] - sn["nDCG@10"], c["nDCG@10"] - s1["nDCG@10"]
            worst["vs_n"], worst["vs_1"] = max(worst["vs_n"], abs(d_n)), max(worst["vs_1"], abs(d_1))
            diff = differences(clustered["runs"][plan], many["runs"][plan])
            results[name]["plans"][plan] = {
                "standalone_1": s1,
                f"standalone_{n}": sn,
                f"cluster_{n}": c,
                "ndcg10_cluster_minus_standalone_n": d_n,
                "ndcg10_cluster_minus_standalone_1": d_1,
                "cluster_vs_standalone_n_rankings": diff,
                "standalone_n_vs_1_rankings": differences(many["runs"][plan], one["runs"][plan]),
            }
            rows.append(
                f"| {name} | {plan} | {s1['nDCG@10']:.4f} | {sn['nDCG@10']:.4f} | {c['nDCG@10']:.4f} "
                f"| {d_n:+.4f} | {d_1:+.4f} | {diff['ids_differ']}/{diff['queries']} |"
            )
    wall_s = time.perf_counter() - wall

    print()
    factors = ", ".join(sorted({str(together[c.name]["replication_factor"]) for c in collections}))
    print(
        f"nDCG@10, limit {LIMIT}; standalone braid serve vs LocalCluster(2 shard servers, 1 router, 1 NATS node), "
        f"{n} shards, replication factor {factors}"
    )
    print(
        f"| collection | plan | standalone 1 shard | standalone {n} shards | cluster {n} shards "
        f"| cluster - standalone({n}) | cluster - standalone(1) "
        f"| queries ranked differently, cluster vs standalone({n}) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print("Expected differences:")
    for plan, why in EXPECTED.items():
        print(f"  {plan}: {why}")
    ok_n, ok_1 = worst["vs_n"] <= TOLERANCE, worst["vs_1"] <= TOLERANCE
    print(
        f"max |cluster - standalone({n})| = {worst['vs_n']:.4f} ({'within' if ok_n else 'NOT within'} {TOLERANCE}); "
        f"max |cluster - standalone(1)| = {worst['vs_1']:.4f} ({'within' if ok_1 else 'NOT within'} {TOLERANCE})"
    )
    print(f"wall time {wall_s:.0f} s (cluster started in {cluster_started_s:.1f} s)")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "params": {
                    "collections": names,
                    "shards": n,
                    "model": args.model,
                    "limit": LIMIT,
                    "batch": BATCH,
                    "plans": list(PLANS),
                    "tolerance": TOLERANCE,
                },
                "machine": {"cpu_count": os.cpu_count()},
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                "commit": git_commit(),
                "collections": results,
                "max_abs_cluster_minus_standalone_n": worst["vs_n"],
                "max_abs_cluster_minus_standalone_1": worst["vs_1"],
                "within_tolerance": {"standalone_n": ok_n, "standalone_1": ok_1},
                "expected": EXPECTED,
                "wall_s": wall_s,
            },
            indent=1,
        )
    )
    print(f"wrote {args.out}")


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    main()
