"""Choose the default hybrid plan: replay fusion rules over BM25 and dense run files of ``braid eval``.

    braid eval ../shared/data/<c> --plans bm25,dense --depth 1000 --out eval-results   # each collection
    python bench/fusion_grid.py --runs eval-results [--collections cranfield,scifact,...]

``braid eval`` writes each plan's ranking with its raw scores (BM25, cosine) to a TREC run
file. At depth 1000 those hold every candidate a fusion plan would see at any candidate
depth up to 1000, so this script can re-fuse them offline with Braid's own fusion code
(braid.index.fusion, the function the server calls) for a whole grid of plans in seconds:
rule (rrf, or weighted with min_max / z_score / dbsf normalization), RRF k, dense weight
(BM25 weight 1), and candidate depth per strand. Each plan is scored with ir-measures.

Prints, per plan, nDCG@10 on every collection, the mean, and the worst margin over the
better single strand (hybrid - max(bm25, dense)); the best plans by mean with a worst
margin >= 0 first. The winner is then confirmed through the gRPC API by ``braid eval``
(plan ``hybrid``: two sub-queries, no fusion given, i.e. the server's default).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ir_data import DATA

from braid.index import fusion
from braid.service.evaluate import BeirCollection, measure

ALL = "cranfield,scifact,cacm,lisa,npl,med"


@dataclass(frozen=True)
class Plan:
    rule: str  # "rrf" or a normalization of the weighted rule
    dense_weight: float
    depth: int
    k: int = 60
    # Relevance filter on the dense strand before fusion: "" (none), "cos" (raw cosine >= cut)
    # or "z" (the query's calibrated cosine, (cos - mean) / std over its top-1000, >= cut).
    filter: str = ""
    cut: float = 0.0

    def __str__(self) -> str:
        head = f"rrf k={self.k}" if self.rule == "rrf" else self.rule
        tail = f" {self.filter}>={self.cut:g}" if self.filter else ""
        return f"{head} w_dense={self.dense_weight:g} depth={self.depth}{tail}"


def keep_relevant(scores: np.ndarray, plan: Plan) -> int:
    """How many of a dense strand's best-first candidates pass the plan's relevance filter."""
    if not plan.filter or not scores.size:
        return scores.size
    if plan.filter == "cos":
        calibrated = scores
    else:
        spread = scores.std()
        calibrated = (scores - scores.mean()) / (spread if spread > 0 else 1.0)
    return int(np.count_nonzero(calibrated >= plan.cut))


def read_run(path: Path) -> dict[str, tuple[list[str], np.ndarray]]:
    """query -> (doc ids best first, float64 scores)."""
    rows: dict[str, list[tuple[str, float]]] = defaultdict(list)
    with path.open() as lines:
        for line in lines:
            qid, _, doc, _, score, _ = line.split()
            rows[qid].append((doc, float(score)))
    return {q: ([d for d, _ in hits], np.array([s for _, s in hits], np.float64)) for q, hits in rows.items()}


def threshold_study(dense: dict[str, dict], qrels: dict[str, dict], keep: float = 0.9) -> None:
    """One global threshold on the dense strand's top 100: raw cosine against the query-calibrated score.

    Calibrated score (the "Relevance Filtering for Embedding-based Retrieval" idea without a
    learned adapter): z = (cos - mean) / std over the query's own top 200, the candidates a
    fused strand holds anyway. For each, the single threshold keeping ``keep`` of all judged
    relevant hits, pooled over the collections; then per collection the share of relevant
    hits kept and of unjudged/irrelevant hits dropped. A calibration that works makes the
    shares even across collections and drops more irrelevant hits at the same recall.
    """
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name, run in dense.items():
        raw, calibrated, relevant = [], [], []
        for qid, (docs, scores) in run.items():
            top = scores[:200]
            spread = top.std() or 1.0
            raw.append(scores[:100])
            calibrated.append((scores[:100] - top.mean()) / spread)
            relevant.append(np.array([qrels[name].get(qid, {}).get(d, 0) > 0 for d in docs[:100]]))
        pairs[name] = {"cos": np.concatenate(raw), "z": np.concatenate(calibrated), "rel": np.concatenate(relevant)}
    print(f"\nOne global threshold on the dense top 100, set to keep {keep:.0%} of all relevant hits:")
    print("| score | threshold | " + " | ".join(f"{n} rel kept / other dropped" for n in pairs) + " | all |")
    print("|" + "---|" * (len(pairs) + 3))
    for kind in ("cos", "z"):
        pooled = np.concatenate([p[kind][p["rel"]] for p in pairs.values()])
        cut = float(np.quantile(pooled, 1 - keep))
        cells, kept_all, dropped_all = [], [], []
        for p in pairs.values():
            passed = p[kind] >= cut
            kept_all.append(passed[p["rel"]])
            dropped_all.append(~passed[~p["rel"]])
            cells.append(f"{kept_all[-1].mean():.2f} / {dropped_all[-1].mean():.2f}")
        total = f"{np.concatenate(kept_all).mean():.2f} / {np.concatenate(dropped_all).mean():.2f}"
        print(f"| {kind} | {cut:.3f} | " + " | ".join(cells) + f" | {total} |")


def _strand(hits: tuple[list[str], np.ndarray], depth: int, weight: float, ids: dict[str, int]) -> fusion.Strand:
    docs, scores = hits
    return fusion.Strand(np.fromiter((ids[d] for d in docs[:depth]), np.int64), scores[:depth], weight)


def fuse_run(bm25: dict, dense: dict, plan: Plan, ids: dict[str, int], names: list[str]) -> dict:
    run = {}
    none: tuple[list[str], np.ndarray] = ([], np.empty(0))
    for qid in set(bm25) | set(dense):
        lexical, semantic = bm25.get(qid, none), dense.get(qid, none)
        kept = min(plan.depth, keep_relevant(semantic[1], plan))
        strands = [_strand(lexical, plan.depth, 1.0, ids), _strand(semantic, kept, plan.dense_weight, ids)]
        fused = fusion.rrf(strands, plan.k) if plan.rule == "rrf" else fusion.weighted(strands, plan.rule)
        run[qid] = {names[k]: float(s) for k, s in zip(fused.keys[:100].tolist(), fused.scores[:100], strict=True)}
    return run


# Braid's default hybrid plan (index/gather.py DEFAULT_FUSION, MIN_FUSION_DEPTH) and the one before it.
DEFAULT = Plan("z_score", 1.0, 200)
PREVIOUS = Plan("rrf", 1.0, 100, 60)


def grid() -> list[Plan]:
    depths, weights = (20, 50, 100, 200, 300, 1000), (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
    plans = [Plan("rrf", w, d, k) for k, w, d in itertools.product((5, 10, 20, 40, 60, 100), weights, depths)]
    plans += [Plan(n, w, d) for n, w, d in itertools.product(("min_max", "z_score", "dbsf"), weights, depths)]
    # The relevance filter on the dense strand, on a few good fusion plans.
    filters = [("cos", c) for c in (0.2, 0.3, 0.4, 0.5)] + [("z", c) for c in (-0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0)]
    bases = [("rrf", 60), ("rrf", 20), ("min_max", 60), ("z_score", 60), ("dbsf", 60)]
    plans += [
        Plan(rule, w, d, k, kind, cut)
        for (rule, k), w, d, (kind, cut) in itertools.product(bases, (1.0, 1.5), (100, 1000), filters)
    ]
    return plans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", required=True, help="folder of braid eval run files (bm25 and dense, depth 1000)")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--collections", default=ALL)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    names = [c for c in args.collections.split(",") if c]
    plans = grid()
    table: dict[Plan, dict[str, float]] = defaultdict(dict)
    singles: dict[str, tuple[float, float]] = {}
    dense_runs: dict[str, dict] = {}
    all_qrels: dict[str, dict] = {}
    for name in names:
        qrels = BeirCollection.load(Path(args.data) / name).qrels
        bm25 = read_run(Path(args.runs) / f"eval-{name}.bm25.trec")
        dense = read_run(Path(args.runs) / f"eval-{name}.dense.trec")
        dense_runs[name], all_qrels[name] = dense, qrels
        doc_names = sorted({d for run in (bm25, dense) for docs, _ in run.values() for d in docs})
        ids = {d: i for i, d in enumerate(doc_names)}
        singles[name] = tuple(  # type: ignore[assignment]
            measure({q: dict(zip(docs[:100], s[:100], strict=True)) for q, (docs, s) in run.items()}, qrels)["nDCG@10"]
            for run in (bm25, dense)
        )
        for plan in plans:
            table[plan][name] = measure(fuse_run(bm25, dense, plan, ids, doc_names), qrels)["nDCG@10"]
        print(f"{name}: bm25 {singles[name][0]:.4f} dense {singles[name][1]:.4f}", file=sys.stderr, flush=True)

    def margin(plan: Plan) -> float:
        return min(table[plan][n] - max(singles[n]) for n in names)

    def mean(plan: Plan) -> float:
        return float(np.mean([table[plan][n] for n in names]))

    ranked = sorted(plans, key=lambda p: (margin(p) < 0, -mean(p)))
    print("| plan | " + " | ".join(names) + " | mean | worst margin |")
    print("|" + "---|" * (len(names) + 3))
    for i, strand in enumerate(("bm25", "dense")):
        cells = " | ".join(f"{singles[n][i]:.4f}" for n in names)
        print(f"| {strand} | {cells} | {np.mean([singles[n][i] for n in names]):.4f} | |")
    marked = {DEFAULT: "**default** ", PREVIOUS: "previous default "}
    shown = ranked[: args.top] + [p for p in marked if p not in ranked[: args.top]]
    for plan in shown:
        cells = " | ".join(f"{table[plan][n]:.4f}" for n in names)
        print(f"| {marked.get(plan, '')}{plan} | {cells} | {mean(plan):.4f} | {margin(plan):+.4f} |")
    threshold_study(dense_runs, all_qrels)
    print("\nbest of each rule by mean (unfiltered | with the best dense relevance filter):")
    for rule in ("rrf", "min_max", "z_score", "dbsf"):
        plain = max((p for p in plans if p.rule == rule and not p.filter), key=mean)
        filtered = max((p for p in plans if p.rule == rule and p.filter), key=mean)
        print(
            f"  {plain}: mean {mean(plain):.4f}, worst margin {margin(plain):+.4f} | "
            f"{filtered}: mean {mean(filtered):.4f}, worst margin {margin(filtered):+.4f}"
        )
    # Is the choice over-fitted? Pick the best unfiltered plan on five collections, score it on the sixth.
    print("\nleave one collection out (best unfiltered plan by mean on the other five, scored on the held-out one):")
    for held in names:
        rest = [n for n in names if n != held]
        pick = max((p for p in plans if not p.filter), key=lambda p: np.mean([table[p][n] for n in rest]))
        print(
            f"  {held}: {pick} -> {table[pick][held]:.4f} (default {table[DEFAULT][held]:.4f}, "
            f"better strand {max(singles[held]):.4f})"
        )


if __name__ == "__main__":
    main()
