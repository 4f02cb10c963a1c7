"""Gathering shards' answers into one: what a collection (standalone, or a router over remote
shards) does after every shard answered, so both rank through the same code.

Each strand's candidates are merged across shards (cut to the strand's depth) and only then
fused, so dense and sparse results do not depend on the shard count; ties break by the
client id's order, never by where a document lives. BM25's DFS phase sums every shard's
document frequencies into the collection's IDF. Hits are keyed across shards as
``shard << SHARD_SHIFT | label``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import fusion
from .query import Bm25Query, DenseQuery, SearchPlan, SearchResult, SubQuery
from .text import bm25_idf

SHARD_SHIFT = 40
LABEL_MASK = (1 << SHARD_SHIFT) - 1
# The default hybrid plan (two or more sub-queries, no fusion given): a weighted sum of
# z-scored strands, every weight 1, each strand contributing max(window, 200) candidates.
# Chosen on six real collections (docs/relevance.md, bench/fusion_grid.py): it beats the
# better single strand on all six, where RRF (k = 60, depth 100) lost on one.
DEFAULT_FUSION = ("weighted", "z_score")
MIN_FUSION_DEPTH = 200


@dataclass
class Ranked:
    """One strand's candidates: global keys, scores (best first) and client ids."""

    keys: np.ndarray
    scores: np.ndarray
    ids: list[str]


def strand_depths(plan: SearchPlan) -> list[int]:
    """How many candidates each strand contributes (per shard, and after merging across shards)."""
    window = plan.offset + plan.limit
    single = len(plan.queries) == 1
    return [sub.depth or (window if single else max(window, MIN_FUSION_DEPTH)) for sub in plan.queries]


def combine(plan: SearchPlan, per_shard: list[list[Ranked]], depths: list[int]) -> tuple[SearchResult, list[int]]:
    """Merge each strand across shards (cut to its depth), then fuse the strands and apply the
    window: the hits, and each hit's key (shard << 40 | label) for fetching its payload and text.
    A collection and a cluster router both rank through here, so both give the same hits."""
    single = len(plan.queries) == 1
    ranked = [
        merge_ranked([strands[i] for strands in per_shard], depths[i]) if len(per_shard) > 1 else per_shard[0][i]
        for i in range(len(plan.queries))
    ]
    rule, normalization = (plan.fusion, plan.normalization) if plan.fusion else DEFAULT_FUSION
    if single and not plan.fusion:
        rule = "single"
    if rule == "single" and single and not plan.explain:
        return _single_strand(ranked[0], plan)
    fusion_keys, ids, shard_keys = _id_ordered_keys(ranked)
    strands = [
        fusion.Strand(keys, r.scores.astype(np.float64), sub.weight)
        for keys, r, sub in zip(fusion_keys, ranked, plan.queries, strict=True)
    ]
    fused = fusion.fuse(strands, rule, k=plan.rrf_k, normalization=normalization)
    fused = fusion.apply_window(fused, plan.offset, plan.limit, plan.score_threshold)
    result = SearchResult(ids=[ids[key] for key in fused.keys.tolist()], scores=fused.scores)
    if plan.explain:
        result.strand_names = [_strand_name(sub) for sub in plan.queries]
        result.ranks, result.raw = fused.ranks, fused.raw
    return result, shard_keys[fused.keys].tolist()


def _single_strand(ranked: Ranked, plan: SearchPlan) -> tuple[SearchResult, list[int]]:
    """One strand needs no fusion: it is already ranked, so only the window is applied."""
    end = len(ranked.scores)
    if plan.score_threshold is not None:
        # scores are non-increasing: keep those >= threshold
        end = int(np.searchsorted(-ranked.scores, -np.float32(plan.score_threshold), side="right"))
    window = slice(plan.offset, min(end, plan.offset + plan.limit))
    result = SearchResult(ids=ranked.ids[window], scores=ranked.scores[window].astype(np.float64))
    return result, ranked.keys[window].tolist()


def global_bm25_idf(terms: list[tuple[str, str]], stats: list[tuple[list[int], int]]) -> dict[tuple[str, str], float]:
    """The IDF of each term over every shard's statistics (tantivy's formula, index/text.py)."""
    if not terms:
        return {}
    documents = sum(total for _, total in stats)
    frequencies = np.array([df for df, _ in stats], np.int64).sum(axis=0)  # shards x terms, summed
    return dict(zip(terms, bm25_idf(frequencies, documents).tolist(), strict=True))


def sparse_idf_of(df: np.ndarray, documents: int) -> np.ndarray:
    """idf = ln(1 + (N - df + 0.5) / (df + 0.5)); 0 for terms no document has, so inference-free queries drop them."""
    idf = np.log1p((documents - df + 0.5) / (df + 0.5))
    return np.where(df > 0, idf, 0.0).astype(np.float32)


def _strand_name(sub: SubQuery) -> str:
    if sub.name:
        return sub.name
    query = sub.query
    if isinstance(query, Bm25Query):
        return "bm25:" + ",".join(query.fields) if query.fields else "bm25"
    kind = "dense" if isinstance(query, DenseQuery) else "sparse"
    return f"{kind}:{query.field}"


def _id_ordered_keys(ranked: list[Ranked]) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """Re-key every candidate by its client id's position in sorted order.

    Fusion breaks exact ties (common in RRF) by key; keys derived from client ids keep
    that order independent of which shard holds a document. Returns the per-strand fusion
    keys, the id of each key, and each key's shard-local key (shard << 40 | label).
    """
    if len(ranked) == 1:  # one strand is already in its final order; no ties to break
        only = ranked[0]
        return [np.arange(len(only.ids), dtype=np.int64)], only.ids, only.keys
    all_ids = [doc_id for r in ranked for doc_id in r.ids]
    unique, inverse = (
        np.unique(np.asarray(all_ids, dtype=object), return_inverse=True)
        if all_ids
        else (np.empty(0, object), np.empty(0, np.int64))
    )
    shard_keys = np.empty(len(unique), np.int64)
    shard_keys[inverse] = np.concatenate([r.keys for r in ranked])
    bounds = np.cumsum([len(r.ids) for r in ranked])[:-1]
    return [part.astype(np.int64) for part in np.split(inverse, bounds)], unique.tolist(), shard_keys


def merge_ranked(parts: list[Ranked], depth: int) -> Ranked:
    """One strand's candidates from every shard, best first, cut to depth (ties by smaller key)."""
    keys = np.concatenate([p.keys for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    ids = [doc_id for p in parts for doc_id in p.ids]
    order = np.lexsort((keys, -scores))[:depth]
    return Ranked(keys[order], scores[order], [ids[i] for i in order.tolist()])


def merge_batches(parts: list[list[Ranked]], k: int) -> list[SearchResult]:
    """A batch of plain dense queries answered by every shard (one ranked list per query each):
    each query's hits, merged across shards and cut to k."""
    results = []
    for i in range(len(parts[0])):
        ranked = merge_ranked([part[i] for part in parts], k) if len(parts) > 1 else parts[0][i]
        results.append(SearchResult(ids=ranked.ids, scores=ranked.scores))
    return results
