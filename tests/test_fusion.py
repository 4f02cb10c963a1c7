"""Fusion rules (index/fusion.py) on hand-worked examples, their errors, and against a slow reference."""

from __future__ import annotations

import bisect
import math
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from braid.index import fusion
from braid.index.errors import InvalidArgument
from braid.index.fusion import Fused, Strand, apply_window, fuse, rrf, single, weighted


def strand(keys: list[int], scores: list[float], weight: float = 1.0) -> Strand:
    return Strand(np.asarray(keys, np.int64), np.asarray(scores, np.float64), weight)


def assert_same(a: Fused, b: Fused) -> None:
    """Bit-for-bit the same result (NaN equal to NaN in ``raw``)."""
    assert a.keys.tolist() == b.keys.tolist()
    assert a.scores.tolist() == b.scores.tolist()
    assert np.array_equal(a.ranks, b.ranks)
    assert np.array_equal(a.raw, b.raw, equal_nan=True)


NAN = math.nan

# Two strands over keys 10..40 used by several tests:
#   A: 10 (0.9), 20 (0.8), 30 (0.7)      ranks 1, 2, 3
#   B: 20 (5.0), 40 (4.0), 10 (3.0)      ranks 1, 2, 3
A = ([10, 20, 30], [0.9, 0.8, 0.7])
B = ([20, 40, 10], [5.0, 4.0, 3.0])


# ------------------------------------------------------------------ rrf


def test_rrf_by_hand_with_explain():
    fused = fuse([strand(*A), strand(*B)], "rrf", k=60)
    # 20: 1/(60+2) + 1/(60+1) = 0.016129 + 0.016393 = 0.032522
    # 10: 1/(60+1) + 1/(60+3) = 0.016393 + 0.015873 = 0.032266
    # 40: 0        + 1/(60+2) = 0.016129
    # 30: 1/(60+3) + 0        = 0.015873
    assert fused.keys.tolist() == [20, 10, 40, 30]
    assert fused.scores.tolist() == pytest.approx([1 / 62 + 1 / 61, 1 / 61 + 1 / 63, 1 / 62, 1 / 63], rel=1e-15)
    assert fused.keys.dtype == np.int64 and fused.scores.dtype == np.float64
    assert fused.ranks.dtype == np.int32 and fused.raw.dtype == np.float64
    assert fused.ranks.tolist() == [[2, 1], [1, 3], [0, 2], [3, 0]]
    np.testing.assert_array_equal(fused.raw, [[0.8, 5.0], [0.9, 3.0], [NAN, 4.0], [0.7, NAN]])


def test_rrf_weights_and_k():
    fused = rrf([strand(*A, weight=2.0), strand(*B, weight=0.5)], k=1)
    # k = 1: 20: 2/(1+2) + 0.5/(1+1) = 0.6667 + 0.25 = 0.9167
    #        10: 2/(1+1) + 0.5/(1+3) = 1.0    + 0.125 = 1.125
    #        30: 2/(1+3)             = 0.5
    #        40: 0.5/(1+2)           = 0.1667
    assert fused.keys.tolist() == [10, 20, 30, 40]
    assert fused.scores.tolist() == pytest.approx([1.125, 2 / 3 + 0.25, 0.5, 0.5 / 3], rel=1e-15)


def test_rrf_default_k_is_60():
    assert_same(rrf([strand(*A), strand(*B)]), fuse([strand(*A), strand(*B)], "rrf", k=60))


def test_rrf_ties_in_a_strand_share_the_better_rank():
    # Scores 3, 2, 2, 1: competition ranks 1, 2, 2, 4 ("1224"), whatever order the tied keys come in.
    fused = rrf([strand([7, 8, 9, 6], [3.0, 2.0, 2.0, 1.0])], k=60)
    assert fused.keys.tolist() == [7, 8, 9, 6]  # 8 and 9 tie at 1/62: smaller key first
    assert fused.ranks[:, 0].tolist() == [1, 2, 2, 4]
    assert fused.scores.tolist() == pytest.approx([1 / 61, 1 / 62, 1 / 62, 1 / 64], rel=1e-15)


# ------------------------------------------------------------------ weighted

# For the normalization examples:
#   P: keys 1, 2, 3 with scores 10, 6, 2      min 2, max 10, mean 6, population std sqrt(32/3) = 3.26599
#   Q: keys 3, 4    with scores 0.9, 0.5      min 0.5, max 0.9, mean 0.7, population std 0.2
P = ([1, 2, 3], [10.0, 6.0, 2.0])
Q = ([3, 4], [0.9, 0.5])


def test_weighted_min_max_by_hand():
    fused = weighted([strand(*P), strand(*Q, weight=2.0)], "min_max")
    # P: (s - 2) / 8 -> 1: 1.0, 2: 0.5, 3: 0.0;  Q: (s - 0.5) / 0.4 -> 3: 1.0, 4: 0.0, times weight 2
    # 1: 1.0;  2: 0.5;  3: 0.0 + 2 * 1.0 = 2.0;  4: 2 * 0.0 = 0.0
    assert fused.keys.tolist() == [3, 1, 2, 4]
    assert fused.scores.tolist() == pytest.approx([2.0, 1.0, 0.5, 0.0], abs=1e-15)
    assert fused.ranks.tolist() == [[3, 1], [1, 0], [2, 0], [0, 2]]
    np.testing.assert_array_equal(fused.raw, [[2.0, 0.9], [10.0, NAN], [6.0, NAN], [NAN, 0.5]])


def test_weighted_min_max_flat_strand_is_a_full_match():
    # A lone candidate, and a strand whose candidates all score the same: max == min -> 1.0 each.
    assert weighted([strand([5], [0.3])], "min_max").scores.tolist() == [1.0]
    fused = weighted([strand([5, 6], [0.3, 0.3]), strand([6], [7.0], weight=0.5)], "min_max")
    # 5: 1.0;  6: 1.0 + 0.5 * 1.0 = 1.5
    assert fused.keys.tolist() == [6, 5]
    assert fused.scores.tolist() == [1.5, 1.0]


def test_weighted_z_score_by_hand():
    fused = weighted([strand(*P), strand(*Q)], "z_score")
    # P: (s - 6) / sqrt(32/3) -> 1: +sqrt(3/2) = 1.224745, 2: 0.0, 3: -1.224745
    # Q: (s - 0.7) / 0.2      -> 3: +1.0, 4: -1.0
    # 1: 1.224745;  2: 0.0;  3: -1.224745 + 1.0 = -0.224745;  4: -1.0
    z = math.sqrt(1.5)
    assert fused.keys.tolist() == [1, 2, 3, 4]
    assert fused.scores.tolist() == pytest.approx([z, 0.0, 1.0 - z, -1.0], rel=1e-12, abs=1e-12)


def test_weighted_z_score_flat_strand_is_zero():
    # 0.1 three times: the float mean is 0.10000000000000002, yet the strand is flat -> 0.0 exactly, not +-1.
    fused = weighted([strand([1, 2, 3], [0.1, 0.1, 0.1]), strand([4], [9.0])], "z_score")
    assert fused.scores.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert fused.keys.tolist() == [1, 2, 3, 4]  # all tie at 0 and all rank 1 (ties share it): by key


def test_weighted_dbsf_by_hand():
    fused = weighted([strand(*P), strand(*Q)], "dbsf")
    # norm = (s - (mean - 3 std)) / (6 std) = 0.5 + z / 6, clipped to [0, 1]
    # P: z = +-sqrt(3/2), 0 -> 1: 0.5 + 0.204124 = 0.704124, 2: 0.5, 3: 0.295876
    # Q: z = +-1           -> 3: 0.666667, 4: 0.333333
    # 3: 0.295876 + 0.666667 = 0.962542;  1: 0.704124;  2: 0.5;  4: 0.333333
    d = math.sqrt(1.5) / 6
    assert fused.keys.tolist() == [3, 1, 2, 4]
    assert fused.scores.tolist() == pytest.approx([0.5 - d + 0.5 + 1 / 6, 0.5 + d, 0.5, 0.5 - 1 / 6], rel=1e-12)


def test_weighted_dbsf_clips_outliers_and_flat_strands_are_half():
    # Key 0 scores 10, keys 1..10 score 0: mean 10/11, population std sqrt(1000)/11 = 2.874798.
    # z(10) = (10 - 10/11) / 2.874798 = sqrt(10) = 3.1623 > 3 -> 0.5 + 3.1623/6 = 1.027 -> clipped to 1.0
    # z(0) = -(10/11) / 2.874798 = -1/sqrt(10) -> 0.5 - 0.052705 = 0.447295
    keys = list(range(11))
    fused = weighted([strand(keys, [10.0] + [0.0] * 10)], "dbsf")
    assert fused.keys.tolist() == keys  # the ten tied at 0.447 share rank 2, so they go by key
    assert fused.scores.tolist() == pytest.approx([1.0] + [0.5 - 1 / math.sqrt(10) / 6] * 10, rel=1e-12)
    assert fused.ranks[:, 0].tolist() == [1] + [2] * 10
    # std == 0 (a flat strand, a lone candidate): 0.5 each, as Qdrant does.
    assert weighted([strand([1, 2], [4.0, 4.0])], "dbsf").scores.tolist() == [0.5, 0.5]
    assert weighted([strand([1], [4.0])], "dbsf").scores.tolist() == [0.5]


def test_weighted_none_adds_raw_scores():
    fused = fuse([strand(*P), strand(*Q, weight=10.0)], "weighted", normalization="none")
    # 1: 10;  2: 6;  3: 2 + 10 * 0.9 = 11;  4: 10 * 0.5 = 5
    assert fused.keys.tolist() == [3, 1, 2, 4]
    assert fused.scores.tolist() == pytest.approx([11.0, 10.0, 6.0, 5.0], rel=1e-15)


def test_weighted_default_normalization_is_min_max():
    assert_same(fuse([strand(*P), strand(*Q)], "weighted"), weighted([strand(*P), strand(*Q)], "min_max"))


# ------------------------------------------------------------------ single


def test_single_keeps_raw_scores_and_ignores_the_weight():
    fused = fuse([strand([5, 3, 9], [3.5, 2.0, 2.0], weight=4.0)], "single", k=1, normalization="dbsf")
    assert fused.keys.tolist() == [5, 3, 9]
    assert fused.scores.tolist() == [3.5, 2.0, 2.0]
    assert fused.ranks.tolist() == [[1], [2], [2]]
    assert fused.raw.tolist() == [[3.5], [2.0], [2.0]]
    # Tied keys listed in the other order: same result.
    assert_same(single(strand([5, 9, 3], [3.5, 2.0, 2.0])), fused)


def test_single_with_two_strands_is_an_error():
    with pytest.raises(InvalidArgument, match=r"^fusion: single-strand fusion needs exactly one sub-query, got 2$"):
        fuse([strand(*A), strand(*B)], "single")


# ------------------------------------------------------------------ errors


def test_unknown_rule_lists_the_valid_ones():
    with pytest.raises(InvalidArgument, match=r"^fusion: unknown value 'borda'; valid: rrf, single, weighted$"):
        fuse([strand(*A)], "borda")


def test_unknown_normalization_lists_the_valid_ones():
    with pytest.raises(InvalidArgument) as info:
        fuse([strand(*A)], "weighted", normalization="l2")
    assert str(info.value) == ("fusion.weighted.normalization: unknown value 'l2'; valid: dbsf, min_max, none, z_score")


@pytest.mark.parametrize("k", [0, -5])
def test_rrf_k_below_one(k):
    with pytest.raises(InvalidArgument, match=rf"^fusion\.rrf\.k: must be >= 1, got {k}$"):
        fuse([strand(*A)], "rrf", k=k)
    with pytest.raises(InvalidArgument, match=r"^fusion\.rrf\.k"):
        fuse([], "rrf", k=k)  # checked even without candidates


def test_rrf_k_must_be_an_integer():
    with pytest.raises(InvalidArgument, match=r"^fusion\.rrf\.k: must be an integer, got 1.5$"):
        rrf([strand(*A)], k=1.5)  # type: ignore[arg-type]


@pytest.mark.parametrize(("weight", "shown"), [(-1.0, "-1.0"), (NAN, "nan"), (math.inf, "inf"), (-math.inf, "-inf")])
@pytest.mark.parametrize("rule", ["rrf", "weighted"])
def test_bad_weight_names_the_sub_query(rule, weight, shown):
    with pytest.raises(InvalidArgument, match=rf"^queries\[1\]\.weight: must be finite and >= 0, got {shown}$"):
        fuse([strand(*A), strand(*B, weight=weight)], rule)


def test_bad_weight_single():
    with pytest.raises(InvalidArgument, match=r"^queries\[0\]\.weight: must be finite and >= 0, got nan$"):
        fuse([strand(*A, weight=NAN)], "single")


def test_weight_of_the_wrong_type():
    with pytest.raises(InvalidArgument, match=r"^queries\[0\]\.weight: must be a number, got '1'$"):
        rrf([strand(*A, weight="1")])  # type: ignore[arg-type]


def test_keys_and_scores_of_different_lengths():
    bad = Strand(np.array([1, 2], np.int64), np.array([3.0, 2.0, 1.0]))
    with pytest.raises(InvalidArgument, match=r"^queries\[1\]\.scores: must have one score per key: 2 keys, 3 scores$"):
        fuse([strand(*A), bad], "rrf")


def test_duplicate_key_within_a_strand():
    with pytest.raises(InvalidArgument, match=r"^queries\[1\]\.keys: must be unique within a sub-query, got 40 twice$"):
        fuse([strand(*A), strand([20, 40, 40], [3.0, 2.0, 1.0])], "weighted")


def test_non_finite_scores():
    with pytest.raises(InvalidArgument, match=r"^queries\[2\]\.scores: must be finite$"):
        fuse([strand(*A), strand([], []), strand([1, 2], [1.0, NAN])], "rrf")


def test_non_integer_keys():
    with pytest.raises(InvalidArgument, match=r"^queries\[0\]\.keys: must be integers, got dtype float64$"):
        rrf([Strand(np.array([1.0, 2.0]), np.array([2.0, 1.0]))])


# ------------------------------------------------------------------ zero weight, empty


@pytest.mark.parametrize("rule", ["rrf", "weighted"])
def test_zero_weight_strand_contributes_nothing_but_its_candidates_stay(rule):
    fused = fuse([strand([1, 2], [0.9, 0.1]), strand([3, 1], [5.0, 4.0], weight=0.0)], rule, k=60)
    # rrf:     1: 1/61 + 0 * 1/62 = 1/61;  2: 1/62;  3: 0 * 1/61 = 0
    # min_max: 1: 1.0  + 0 * 0.0  = 1.0;   2: 0.0;   3: 0 * 1.0  = 0
    #          (2 and 3 tie at 0: 3's best rank is 1, 2's is 2, so 3 goes first)
    if rule == "rrf":
        assert fused.keys.tolist() == [1, 2, 3]
        assert fused.scores.tolist() == pytest.approx([1 / 61, 1 / 62, 0.0], rel=1e-15)
        assert fused.ranks.tolist() == [[1, 2], [2, 0], [0, 1]]
    else:
        assert fused.keys.tolist() == [1, 3, 2]
        assert fused.scores.tolist() == [1.0, 0.0, 0.0]
        assert fused.ranks.tolist() == [[1, 2], [0, 1], [2, 0]]


@pytest.mark.parametrize("rule", ["rrf", "weighted", "single"])
def test_no_strands_is_an_empty_result(rule):
    fused = fuse([], rule)
    assert len(fused) == 0
    assert fused.keys.dtype == np.int64 and fused.keys.shape == (0,)
    assert fused.scores.dtype == np.float64 and fused.scores.shape == (0,)
    assert fused.ranks.shape == (0, 0) and fused.raw.shape == (0, 0)


@pytest.mark.parametrize("normalization", ["min_max", "z_score", "dbsf", "none"])
def test_empty_strands_are_fine(normalization):
    empty = strand([], [])
    fused = fuse([empty, strand(*P), empty], "weighted", normalization=normalization)
    alone = fuse([strand(*P)], "weighted", normalization=normalization)
    assert fused.keys.tolist() == alone.keys.tolist()
    assert fused.scores.tolist() == alone.scores.tolist()
    assert fused.ranks.tolist() == [[0, r, 0] for r in alone.ranks[:, 0].tolist()]
    assert np.isnan(fused.raw[:, [0, 2]]).all() and fused.raw[:, 1].tolist() == alone.raw[:, 0].tolist()
    nothing = fuse([empty, empty], "weighted", normalization=normalization)
    assert len(nothing) == 0 and nothing.ranks.shape == (0, 2) and nothing.raw.shape == (0, 2)
    assert len(fuse([empty], "single")) == 0 and len(fuse([empty, empty], "rrf")) == 0


# ------------------------------------------------------------------ ties and determinism


def test_ties_break_by_best_rank_then_key():
    # k = 1. X: A:   50 (1), 60 (2), 70 (3)                       weight 1
    #        B:   80 (1), 90 (2), 5 (3)                           weight 2
    # 80: 2/2 = 1.0;  90: 2/3;  50: 1/2 = 0.5 (best rank 1);  5: 2/4 = 0.5 (best rank 3);  60: 1/3;  70: 1/4
    # 50 and 5 tie exactly at 0.5: the better best rank (50's 1) wins over the smaller key (5).
    fused = rrf([strand([50, 60, 70], [3.0, 2.0, 1.0]), strand([80, 90, 5], [3.0, 2.0, 1.0], weight=2.0)], k=1)
    assert fused.keys.tolist() == [80, 90, 50, 5, 60, 70]
    assert fused.scores.tolist() == pytest.approx([1.0, 2 / 3, 0.5, 0.5, 1 / 3, 0.25], rel=1e-15)
    # Same score and same best rank: smaller key first. 3 and 7 at 1/61 (rank 1); 1 and 8 at 1/62 (rank 2).
    fused = rrf([strand([7, 1], [2.0, 1.0]), strand([3, 8], [2.0, 1.0])])
    assert fused.keys.tolist() == [3, 7, 1, 8]


@pytest.mark.parametrize(
    ("rule", "normalization"),
    [("rrf", "min_max"), ("weighted", "min_max"), ("weighted", "z_score"), ("weighted", "dbsf"), ("weighted", "none")],
)
def test_order_of_strands_and_of_tied_keys_does_not_matter(rule, normalization):
    strands = [
        strand([1, 2, 3, 4, 5], [0.9, 0.7, 0.7, 0.7, 0.1], weight=1.3),
        strand([4, 6, 1, 7], [12.0, 11.0, 11.0, 2.5], weight=0.7),
        strand([7, 3, 2, 8], [0.3, 0.2, 0.2, 0.2], weight=2.1),
        strand([9, 8, 1], [1.0, 1.0, 1.0], weight=0.0),
    ]
    base = fuse(strands, rule, normalization=normalization)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        other = fuse([strands[i] for i in perm], rule, normalization=normalization)
        assert other.keys.tolist() == base.keys.tolist()
        assert other.scores.tolist() == base.scores.tolist()
        assert np.array_equal(other.ranks, base.ranks[:, perm])
        assert np.array_equal(other.raw, base.raw[:, perm], equal_nan=True)
    # The tied keys of each strand listed in another order: the very same result.
    shuffled = [
        strand([1, 4, 2, 3, 5], [0.9, 0.7, 0.7, 0.7, 0.1], weight=1.3),
        strand([4, 1, 6, 7], [12.0, 11.0, 11.0, 2.5], weight=0.7),
        strand([7, 8, 2, 3], [0.3, 0.2, 0.2, 0.2], weight=2.1),
        strand([1, 8, 9], [1.0, 1.0, 1.0], weight=0.0),
    ]
    assert_same(fuse(shuffled, rule, normalization=normalization), base)


@pytest.mark.parametrize("n_strands", [3, 4, 5, 6])
def test_every_strand_order_gives_bit_identical_scores(n_strands):
    # Every key in every strand, random weights and scores: each hit sums n_strands terms whose float sum depends on
    # the order of addition unless the terms are added in a canonical (ascending) order.
    rng = np.random.default_rng(n_strands)
    strands = []
    for _ in range(n_strands):
        keys = rng.permutation(300)
        strands.append(Strand(keys, np.sort(rng.random(300))[::-1].copy(), float(rng.random() * 3)))
    for rule, normalization in (("rrf", "min_max"), ("weighted", "min_max"), ("weighted", "z_score")):
        base = fuse(strands, rule, k=3, normalization=normalization)
        for _ in range(5):
            perm = rng.permutation(n_strands).tolist()
            other = fuse([strands[i] for i in perm], rule, k=3, normalization=normalization)
            assert other.keys.tolist() == base.keys.tolist()
            assert other.scores.tolist() == base.scores.tolist()


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5])
def test_sorted_columns_sorts_rows(width):
    matrix = np.random.default_rng(width).random((500, width))
    matrix[::7, 0] = 0.0  # repeated values too
    np.testing.assert_array_equal(np.stack(fusion._sorted_columns(matrix), axis=1), np.sort(matrix, axis=1))


# ------------------------------------------------------------------ apply_window


def windowed() -> Fused:
    # Scores 4, 3, 2, 1 on keys 40, 30, 20, 10 (one strand, as is).
    return fuse([strand([40, 30, 20, 10], [4.0, 3.0, 2.0, 1.0])], "single")


def test_apply_window_threshold_offset_limit():
    assert apply_window(windowed(), 0, 10, None).keys.tolist() == [40, 30, 20, 10]
    assert apply_window(windowed(), 1, 2, None).keys.tolist() == [30, 20]
    assert apply_window(windowed(), 0, 10, 2.0).keys.tolist() == [40, 30, 20]  # score == threshold stays
    assert apply_window(windowed(), 0, 10, 2.5).keys.tolist() == [40, 30]
    cut = apply_window(windowed(), 1, 1, 2.5)  # threshold first, then the window
    assert cut.keys.tolist() == [30]
    assert cut.scores.tolist() == [3.0] and cut.ranks.tolist() == [[2]] and cut.raw.tolist() == [[3.0]]
    for fused in (
        apply_window(windowed(), 4, 3, None),
        apply_window(windowed(), 0, 0, None),
        apply_window(windowed(), 0, 5, 9.0),
        apply_window(windowed(), 2, 5, 2.5),
    ):
        assert len(fused) == 0 and fused.ranks.shape == (0, 1) and fused.raw.shape == (0, 1)
    assert apply_window(windowed(), 0, 5, -math.inf).keys.tolist() == [40, 30, 20, 10]


def test_apply_window_bad_arguments():
    with pytest.raises(InvalidArgument, match=r"^offset: must be >= 0, got -1$"):
        apply_window(windowed(), -1, 3, None)
    with pytest.raises(InvalidArgument, match=r"^limit: must be >= 0, got -2$"):
        apply_window(windowed(), 0, -2, None)
    with pytest.raises(InvalidArgument, match=r"^score_threshold: must not be NaN$"):
        apply_window(windowed(), 0, 3, NAN)


# ------------------------------------------------------------------ against a slow reference


def reference(strands: list[tuple[list[int], list[float], float]], rule: str, k: int) -> list[tuple]:
    """Per-document Python: (key, score, ranks, raw) best first, for rule "rrf" or "weighted" with min_max."""
    terms: dict[int, list[float]] = {}
    ranks: dict[int, list[int]] = {}
    raw: dict[int, list[float]] = {}
    for i, (keys, scores, w) in enumerate(strands):
        lo, hi = (min(scores), max(scores)) if scores else (0.0, 0.0)
        ascending = sorted(scores)
        for key, s in zip(keys, scores, strict=True):
            rank = 1 + len(scores) - bisect.bisect_right(ascending, s)  # competition rank: 1 + #scores above s
            if rule == "rrf":
                term = w / (k + rank)
            else:
                term = w * (1.0 if hi == lo else (s - lo) / (hi - lo))
            terms.setdefault(key, []).append(term)
            ranks.setdefault(key, [0] * len(strands))[i] = rank
            raw.setdefault(key, [NAN] * len(strands))[i] = s
    total = {key: sum(sorted(ts)) for key, ts in terms.items()}  # ascending order, like the implementation
    best = {key: min(r for r in ranks[key] if r > 0) for key in terms}
    order = sorted(terms, key=lambda key: (-total[key], best[key], key))
    return [(key, total[key], ranks[key], raw[key]) for key in order]


@st.composite
def strand_lists(draw: st.DrawFn) -> list[tuple[list[int], list[float], float]]:
    """0-4 strands over a small key space (overlaps) with few distinct scores (ties), sorted or not."""
    out = []
    for _ in range(draw(st.integers(0, 4))):
        keys = draw(st.lists(st.integers(0, 25), max_size=12, unique=True))
        pool = draw(st.sampled_from([[0.0, 1.0, 2.0], [0.1, 0.2, 0.3, 0.7], [-3.5, 1e-9, 2.25, 1e6]]))
        scores = draw(st.lists(st.sampled_from(pool), min_size=len(keys), max_size=len(keys)))
        if draw(st.booleans()):
            scores.sort(reverse=True)
        weight = draw(st.sampled_from([0.0, 0.25, 1.0, 1.5, 3.0]) | st.floats(0.0, 5.0))
        out.append((keys, scores, weight))
    return out


def check_against_reference(strands: list[tuple[list[int], list[float], float]], rule: str, k: int) -> None:
    fused = fuse([strand(*s) for s in strands], rule, k=k, normalization="min_max")
    expected = reference(strands, rule, k)
    assert fused.keys.tolist() == [key for key, _, _, _ in expected]
    assert fused.scores.tolist() == pytest.approx([score for _, score, _, _ in expected], rel=1e-12, abs=1e-300)
    assert fused.ranks.tolist() == [r for _, _, r, _ in expected]
    want_raw = np.array([r for _, _, _, r in expected], np.float64).reshape(len(expected), len(strands))
    assert np.array_equal(fused.raw, want_raw, equal_nan=True)


# lexsort_max 0 sends every result through the path that orders more than _LEXSORT_MAX hits.
@pytest.mark.parametrize("lexsort_max", [fusion._LEXSORT_MAX, 0])
@settings(max_examples=300, deadline=None)
@given(strands=strand_lists(), k=st.integers(1, 100))
def test_rrf_matches_reference(lexsort_max, strands, k):
    with mock.patch.object(fusion, "_LEXSORT_MAX", lexsort_max):
        check_against_reference(strands, "rrf", k)


@pytest.mark.parametrize("lexsort_max", [fusion._LEXSORT_MAX, 0])
@settings(max_examples=300, deadline=None)
@given(strands=strand_lists())
def test_weighted_min_max_matches_reference(lexsort_max, strands):
    with mock.patch.object(fusion, "_LEXSORT_MAX", lexsort_max):
        check_against_reference(strands, "weighted", 60)


@pytest.mark.parametrize("rule", ["rrf", "weighted"])
def test_large_lists_match_reference(rule):
    # 3 x 1000 candidates from 10,000 keys: some 2,700 hits, past _LEXSORT_MAX; scores on a 0.01 grid tie often.
    rng = np.random.default_rng(7)
    strands = []
    for weight in (1.0, 0.5, 2.0):
        keys = rng.choice(10_000, 1000, replace=False).tolist()
        scores = sorted(np.round(rng.random(1000) * 10, 2).tolist(), reverse=True)
        strands.append((keys, scores, weight))
    assert len({key for keys, _, _ in strands for key in keys}) > fusion._LEXSORT_MAX
    check_against_reference(strands, rule, 60)


@settings(max_examples=150, deadline=None)
@given(strands=strand_lists(), data=st.data())
def test_strand_order_never_matters(strands, data):
    perm = data.draw(st.permutations(range(len(strands))))
    for rule, normalization in (
        ("rrf", "min_max"),
        ("weighted", "min_max"),
        ("weighted", "z_score"),
        ("weighted", "dbsf"),
    ):
        base = fuse([strand(*s) for s in strands], rule, normalization=normalization)
        other = fuse([strand(*strands[i]) for i in perm], rule, normalization=normalization)
        assert other.keys.tolist() == base.keys.tolist()
        assert other.scores.tolist() == base.scores.tolist()
        assert np.array_equal(other.ranks, base.ranks[:, list(perm)])
