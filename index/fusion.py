"""Fusion of ranked lists ("strands"), one per sub-query, into one ranking.

Notation: strand i has weight w_i, candidate list C_i (its keys with raw scores s_i(d), higher is better) and
rank_i(d), the 1-based rank of d in C_i. A document absent from C_i contributes 0 for strand i.

Ranks are competition ranks ("1224"): rank_i(d) = 1 + |{e in C_i : s_i(e) > s_i(d)}|. For a strand whose scores are
all distinct this is simply the 1-based position in the best-first list; candidates with equal raw scores share the
better rank, so the fused result never depends on the order in which tied candidates were listed.

Rules:

  rrf       score(d) = sum_i w_i / (k + rank_i(d))                           k >= 1 (integer), default 60
  weighted  score(d) = sum_i w_i * norm_i(s_i(d))                            norm computed over C_i alone:
              min_max  norm(s) = (s - min) / (max - min);                    max == min -> 1.0 for every candidate
                                                                             (a lone candidate is a full match)
              z_score  norm(s) = (s - mean) / std, std the population std;   std == 0 -> 0.0 for every candidate
              dbsf     lower = mean - 3 std, upper = mean + 3 std (population std),
                       norm(s) = clip((s - lower) / (upper - lower), 0, 1);  std == 0 -> 0.5 for every candidate
              none     norm(s) = s                                           (strands already on one scale)
  single    score(d) = s_1(d): the one strand's raw scores, its weight not applied (one sub-query, no fusion asked).

"std == 0" means every candidate of the strand has the same raw score (tested as max == min, exactly, so float
rounding in the mean cannot turn a constant list into a spread one).

DBSF and Qdrant (lib/segment/src/common/score_fusion.rs): Qdrant maps a constant list (and a lone candidate) to 0.5,
which is mirrored here. Qdrant estimates the spread with the sample variance (n - 1) and does not clip; Braid uses
the population std and clips to [0, 1] as its API documents, so scores differ from Qdrant's when a strand has an
outlier beyond mean +- 3 std or few candidates.

Weights must be finite and >= 0. A zero-weight strand adds nothing to any score, but its candidates still appear in
the result (with that strand's contribution 0) and in the explain matrices.

Order: fused score descending; ties go to the better (smaller) best rank over all strands, then to the smaller key.
A score is the sum of its per-strand terms taken in ascending order of value, so neither the order of the strands nor
the shard count (strands are merged across shards before fusion) changes a score or the ranking by even one ulp.

Explain: ``Fused.ranks[h, i]`` is hit h's rank in strand i (0 = absent) and ``Fused.raw[h, i]`` its raw score there
(NaN = absent); columns follow the order of the strands given.

Everything is vectorized over candidates: one concatenation, one argsort of the keys (the union of keys and each
candidate's row in it, as np.unique with return_inverse does), scatters into (n_hits, n_strands) matrices, per-strand
statistics with ufunc.reduceat, a bincount (or, for 3+ strands, a sorting network over the rows and a column sum) and
one lexsort (two argsorts past _LEXSORT_MAX hits). Python loops run over strands, never over candidates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import InvalidArgument

__all__ = [
    "NORMALIZATIONS",
    "RULES",
    "Fused",
    "Strand",
    "apply_window",
    "empty",
    "fuse",
    "rrf",
    "single",
    "weighted",
]


@dataclass(frozen=True)
class Strand:
    """One sub-query's ranked candidates: unique int64 keys best first, float64 raw scores (non-increasing)."""

    keys: np.ndarray
    scores: np.ndarray
    weight: float = 1.0


@dataclass(frozen=True)
class Fused:
    """Hits best first: int64 keys, float64 fused scores, and for explain (n_hits, n_strands) matrices of int32 ranks
    (0 = absent from that strand) and float64 raw scores (NaN = absent)."""

    keys: np.ndarray
    scores: np.ndarray
    ranks: np.ndarray
    raw: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.shape[0])


def empty(n_strands: int = 0) -> Fused:
    """A result with no hits, explain matrices shaped (0, n_strands)."""
    return Fused(
        keys=np.empty(0, np.int64),
        scores=np.empty(0, np.float64),
        ranks=np.zeros((0, n_strands), np.int32),
        raw=np.full((0, n_strands), np.nan, np.float64),
    )


# ------------------------------------------------------------------ the shared core


@dataclass(frozen=True)
class _Union:
    """Every candidate of every strand, concatenated in strand order, with its row in the union of keys."""

    keys: np.ndarray  # (n_hits,) int64, the union of the strands' keys, ascending
    row: np.ndarray  # (total,) row of each candidate in ``keys``
    col: np.ndarray  # (total,) strand of each candidate
    scores: np.ndarray  # (total,) float64 raw score of each candidate
    rank: np.ndarray  # (total,) competition rank of each candidate within its strand
    weights: np.ndarray  # (n_strands,) float64
    bounds: list[int]  # strand i is [bounds[i], bounds[i + 1]) of the concatenation


def _union(strands: Sequence[Strand]) -> _Union:
    """Validate the strands (InvalidArgument naming ``queries[i]``) and index their candidates."""
    keys_of, scores_of, weights, lengths = [], [], [], []
    bounds = [0]
    for i, strand in enumerate(strands):
        keys = np.asarray(strand.keys)
        scores = np.asarray(strand.scores, dtype=np.float64)
        if keys.ndim != 1 or scores.ndim != 1:
            raise InvalidArgument.field(f"queries[{i}]", "keys and scores must be one-dimensional")
        if keys.shape[0] != scores.shape[0]:
            raise InvalidArgument.field(
                f"queries[{i}].scores", f"must have one score per key: {keys.shape[0]} keys, {scores.shape[0]} scores"
            )
        if keys.dtype.kind not in "iu" and keys.shape[0]:
            raise InvalidArgument.field(f"queries[{i}].keys", f"must be integers, got dtype {keys.dtype}")
        weight = strand.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float, np.integer, np.floating)):
            raise InvalidArgument.field(f"queries[{i}].weight", f"must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise InvalidArgument.field(f"queries[{i}].weight", f"must be finite and >= 0, got {float(weight)}")
        keys_of.append(keys)
        scores_of.append(scores)
        weights.append(float(weight))
        lengths.append(keys.shape[0])
        bounds.append(bounds[-1] + keys.shape[0])
    n_strands, total = len(bounds) - 1, bounds[-1]
    all_keys = (
        np.concatenate(keys_of).astype(np.int64, copy=False)
        if n_strands > 1
        else keys_of[0].astype(np.int64, copy=False)
    )
    scores = np.concatenate(scores_of) if n_strands > 1 else scores_of[0]
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise InvalidArgument.field(f"queries[{np.searchsorted(bounds, bad, 'right') - 1}].scores", "must be finite")
    col = np.repeat(np.arange(n_strands, dtype=np.intp), lengths)
    start = np.asarray(bounds[:-1], np.intp)[col]  # index of each candidate's strand's first candidate

    # The union of keys (np.unique with return_inverse, spelled out: fewer passes).
    by_key = np.argsort(all_keys)  # equal keys get one row whatever their order: no need for a stable sort
    sorted_keys = all_keys[by_key]
    opens = np.empty(total, bool)
    opens[:1] = True
    np.not_equal(sorted_keys[1:], sorted_keys[:-1], out=opens[1:])
    sorted_row = np.add.accumulate(opens, dtype=np.intp)
    sorted_row -= 1
    row = np.empty(total, np.intp)
    row[by_key] = sorted_row

    # Competition ranks. With the scores non-increasing within each strand (the contract), a candidate's rank is
    # 1 + the position in its strand of the first candidate of its run of equal scores; else sort first.
    # (Sorting by strand keeps every strand on its own positions, so ``start`` holds in sorted order too.)
    position = np.arange(total)
    seams = [b - 1 for b in bounds[1:-1] if 0 < b < total]  # pairs (j, j + 1) that straddle two strands
    later, earlier = scores[1:], scores[:-1]
    down = later < earlier
    down[seams] = True
    if down.all():  # strictly decreasing within every strand: the common case
        rank = position - start + 1
    else:
        sorted_down = later <= earlier
        sorted_down[seams] = True
        order = position if sorted_down.all() else np.lexsort((-scores, col))
        sorted_scores = scores[order]
        run_opens = np.ones(total, bool)
        run_opens[1:] = sorted_scores[1:] != sorted_scores[:-1]
        run_opens[[b for b in bounds[1:-1] if b < total]] = True
        rank = np.empty(total, np.intp)
        rank[order] = np.maximum.accumulate(np.where(run_opens, position, 0)) - start + 1
    return _Union(sorted_keys[opens], row, col, scores, rank, np.asarray(weights, np.float64), bounds)


def _finish(u: _Union, terms: np.ndarray) -> Fused:
    """Sum each candidate's term into its hit's score, order the hits and build the explain matrices."""
    n_hits, n_strands = u.keys.shape[0], u.weights.shape[0]
    ranks = np.zeros((n_hits, n_strands), np.int32)
    ranks[u.row, u.col] = u.rank
    if np.count_nonzero(ranks) != u.row.shape[0]:
        _raise_duplicate(u)
    raw = np.empty((n_hits, n_strands), np.float64)
    raw.fill(np.nan)
    raw[u.row, u.col] = u.scores
    if n_strands <= 2:  # at most two terms per hit: a + b == b + a exactly, so the summation order is moot
        scores = np.bincount(u.row, weights=terms, minlength=n_hits)
    else:  # longer sums depend on their order: add each hit's terms in ascending order of value
        contrib = np.zeros((n_hits, n_strands), np.float64)
        contrib[u.row, u.col] = terms
        scores = np.zeros(n_hits, np.float64)  # from +0.0 as bincount does, so no score comes out as -0.0
        for column in _sorted_columns(contrib):  # left to right, spelled out: the order is the point
            scores += column
    # Best rank over the strands: 0 (absent) wraps to the largest uint32, so the minimum skips it.
    shifted = ranks.view(np.uint32) - np.uint32(1)
    best = shifted[:, 0]
    for i in range(1, n_strands):
        best = np.minimum(best, shifted[:, i])
    order = _order(scores, best)
    return Fused(
        keys=u.keys.take(order),
        scores=scores.take(order),
        ranks=ranks.take(order, axis=0),
        raw=raw.take(order, axis=0),
    )


# Compare-exchange pairs of sorting networks (Knuth, TAOCP 5.3.4) for 3 and 4 values; np.sort does wider rows.
_NETWORKS = {3: ((0, 1), (1, 2), (0, 1)), 4: ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2))}


def _sorted_columns(matrix: np.ndarray) -> list[np.ndarray]:
    """The columns of ``matrix`` with every row sorted ascending (a sorting network: faster than a sort of rows)."""
    network = _NETWORKS.get(matrix.shape[1])
    if network is None:
        return list(np.sort(matrix, axis=1).T)
    cols = list(matrix.T)
    for a, b in network:
        cols[a], cols[b] = np.minimum(cols[a], cols[b]), np.maximum(cols[a], cols[b])
    return cols


# Up to this many hits one lexsort orders them; past it, two unstable integer/float argsorts are faster.
_LEXSORT_MAX = 2048


def _order(scores: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Hit order: score descending, then best rank ascending, then row (= key) ascending."""
    n = scores.shape[0]
    if n <= _LEXSORT_MAX:
        return np.lexsort((best, -scores))  # lexsort is stable and rows are in key order: full ties go by key
    by_score = np.argsort(-scores)
    sorted_scores = scores[by_score]
    same = sorted_scores[1:] == sorted_scores[:-1]
    if not same.any():
        return by_score
    # Dense rank of each score (0 = highest), folded with the best rank and the row into one unique int64 key.
    dense_sorted = np.zeros(n, np.int64)
    np.cumsum(~same, out=dense_sorted[1:])
    dense = np.empty(n, np.int64)
    dense[by_score] = dense_sorted
    best64 = best.astype(np.int64)
    span = int(best64.max()) + 1
    if (int(dense_sorted[-1]) + 1) * span * n >= 1 << 62:  # pragma: no cover - beyond any real candidate count
        return np.lexsort((best, -scores))
    return np.argsort((dense * span + best64) * n + np.arange(n))


def _raise_duplicate(u: _Union) -> None:
    for i in range(u.weights.shape[0]):
        keys = u.keys[u.row[u.bounds[i] : u.bounds[i + 1]]]
        uniq, counts = np.unique(keys, return_counts=True)
        if (counts > 1).any():
            dup = int(uniq[np.argmax(counts > 1)])
            raise InvalidArgument.field(f"queries[{i}].keys", f"must be unique within a sub-query, got {dup} twice")
    raise AssertionError("duplicate ranks without a duplicate key")  # pragma: no cover


def _check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise InvalidArgument.field("fusion.rrf.k", f"must be an integer, got {k!r}")
    if k < 1:
        raise InvalidArgument.field("fusion.rrf.k", f"must be >= 1, got {k}")
    return int(k)


# ------------------------------------------------------------------ normalizations


@dataclass(frozen=True)
class _Groups:
    """The candidates of the non-empty strands as segments of one array, for per-strand statistics in one pass."""

    starts: np.ndarray  # (n_groups,) first index of each non-empty strand
    counts: np.ndarray  # (n_groups,) float64 number of candidates of each
    owner: np.ndarray  # (total,) group of each candidate

    @staticmethod
    def of(u: _Union) -> _Groups:
        b = u.bounds
        present = [i for i in range(len(b) - 1) if b[i + 1] > b[i]]  # reduceat cannot express an empty segment
        if len(present) == len(b) - 1:
            owner = u.col
        else:
            group = np.zeros(len(b) - 1, np.intp)
            group[present] = np.arange(len(present))
            owner = group[u.col]
        return _Groups(
            starts=np.asarray([b[i] for i in present], np.intp),
            counts=np.asarray([b[i + 1] - b[i] for i in present], np.float64),
            owner=owner,
        )

    def min_max(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.minimum.reduceat(scores, self.starts), np.maximum.reduceat(scores, self.starts)

    def mean_std(self, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-group mean and population std (two-pass)."""
        mean = np.add.reduceat(scores, self.starts) / self.counts
        dev = scores - mean[self.owner]
        return mean, np.sqrt(np.add.reduceat(dev * dev, self.starts) / self.counts)


def _min_max(scores: np.ndarray, g: _Groups) -> np.ndarray:
    lo, hi = g.min_max(scores)
    flat = hi == lo
    span = np.where(flat, 1.0, hi - lo)
    out = (scores - lo[g.owner]) / span[g.owner]
    if flat.any():
        out[flat[g.owner]] = 1.0
    return out


def _z_score(scores: np.ndarray, g: _Groups) -> np.ndarray:
    lo, hi = g.min_max(scores)
    mean, std = g.mean_std(scores)
    flat = (hi == lo) | (std == 0)
    out = (scores - mean[g.owner]) / np.where(flat, 1.0, std)[g.owner]
    if flat.any():
        out[flat[g.owner]] = 0.0
    return out


def _dbsf(scores: np.ndarray, g: _Groups) -> np.ndarray:
    lo, hi = g.min_max(scores)
    mean, std = g.mean_std(scores)
    flat = (hi == lo) | (std == 0)
    lower, upper = mean - 3.0 * std, mean + 3.0 * std
    out = (scores - lower[g.owner]) / np.where(flat, 1.0, upper - lower)[g.owner]
    np.clip(out, 0.0, 1.0, out=out)
    if flat.any():
        out[flat[g.owner]] = 0.5
    return out


def _none(scores: np.ndarray, g: _Groups) -> np.ndarray:
    return scores


NORMALIZATIONS: dict[str, Callable[[np.ndarray, _Groups], np.ndarray]] = {
    "min_max": _min_max,
    "z_score": _z_score,
    "dbsf": _dbsf,
    "none": _none,
}


def _normalization(name: str) -> Callable[[np.ndarray, _Groups], np.ndarray]:
    try:
        return NORMALIZATIONS[name]
    except (KeyError, TypeError):
        raise InvalidArgument.choice("fusion.weighted.normalization", name, list(NORMALIZATIONS)) from None


# ------------------------------------------------------------------ rules


def rrf(strands: Sequence[Strand], k: int = 60) -> Fused:
    """Reciprocal rank fusion: score(d) = sum_i w_i / (k + rank_i(d))."""
    k = _check_k(k)
    if not strands:
        return empty()
    u = _union(strands)
    return _finish(u, u.weights[u.col] / (k + u.rank))


def weighted(strands: Sequence[Strand], normalization: str = "min_max") -> Fused:
    """Weighted sum of per-strand normalized scores: score(d) = sum_i w_i * norm_i(s_i(d))."""
    norm = _normalization(normalization)
    if not strands:
        return empty()
    u = _union(strands)
    if u.row.shape[0] == 0:
        return _finish(u, u.scores)
    return _finish(u, u.weights[u.col] * norm(u.scores, _Groups.of(u)))


def single(strand: Strand) -> Fused:
    """One strand as is: raw scores, weight validated but not applied; ties ordered by key like every rule."""
    u = _union([strand])
    return _finish(u, u.scores)


def _single_rule(strands: Sequence[Strand]) -> Fused:
    if len(strands) > 1:
        raise InvalidArgument(f"fusion: single-strand fusion needs exactly one sub-query, got {len(strands)}")
    return single(strands[0]) if strands else empty()


RULES: dict[str, Callable[..., Fused]] = {
    "rrf": lambda strands, k, normalization: rrf(strands, k),
    "weighted": lambda strands, k, normalization: weighted(strands, normalization),
    "single": lambda strands, k, normalization: _single_rule(strands),
}


def fuse(strands: Sequence[Strand], rule: str, *, k: int = 60, normalization: str = "min_max") -> Fused:
    """Fuse by rule name: "rrf", "weighted" or "single". ``k`` is read by rrf only, ``normalization`` by weighted."""
    try:
        run = RULES[rule]
    except (KeyError, TypeError):
        raise InvalidArgument.choice("fusion", rule, list(RULES)) from None
    return run(strands, k, normalization)


# ------------------------------------------------------------------ window


def apply_window(fused: Fused, offset: int, limit: int, score_threshold: float | None) -> Fused:
    """Drop hits scoring below ``score_threshold`` (when given), then keep hits [offset, offset + limit)."""
    if offset < 0:
        raise InvalidArgument.field("offset", f"must be >= 0, got {offset}")
    if limit < 0:
        raise InvalidArgument.field("limit", f"must be >= 0, got {limit}")
    if score_threshold is not None:
        if math.isnan(score_threshold):
            raise InvalidArgument.field("score_threshold", "must not be NaN")
        keep = np.flatnonzero(fused.scores >= score_threshold)[offset : offset + limit]
        return Fused(
            keys=fused.keys.take(keep),
            scores=fused.scores.take(keep),
            ranks=fused.ranks.take(keep, axis=0),
            raw=fused.raw.take(keep, axis=0),
        )
    window = slice(offset, offset + limit)
    return Fused(keys=fused.keys[window], scores=fused.scores[window], ranks=fused.ranks[window], raw=fused.raw[window])
