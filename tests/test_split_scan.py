"""index/split_scan.py: the two-thread product and the sampled top are what numpy's give.

The product split in two equals one product to the last bit for every row, also while the helper
is busy (the caller then scores both halves); the sampled top finds exactly the argpartition's
set for random scores, ties, rows mostly -inf (the in-place scan's filtered-out rows) and a row
whose sample misleads (the best scores all in the rows the sample skips), and batches of
queries take the plain path.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from braid.index import split_scan
from braid.index.split_scan import dot_rows, top_columns


def _plain_top(scores: np.ndarray, want: int) -> list[set[int]]:
    n = scores.shape[1]
    return [set(row.tolist()) for row in np.argpartition(scores, n - want, axis=1)[:, n - want :]]


def _values(scores: np.ndarray, columns: np.ndarray) -> list[list[float]]:
    return [sorted(scores[i, columns[i]].tolist()) for i in range(len(scores))]


def test_the_split_product_equals_one_product() -> None:
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(6000, 384)).astype(np.float32)  # 9 MB: split
    assert vectors.nbytes >= split_scan.SPLIT_BYTES
    query = rng.normal(size=(1, 384)).astype(np.float32)
    assert dot_rows(query, vectors).tobytes() == np.asarray(query @ vectors.T).tobytes()
    small = vectors[:100]
    assert dot_rows(query, small).tobytes() == (query @ small.T).tobytes()
    batch = rng.normal(size=(3, 384)).astype(np.float32)
    assert dot_rows(batch, vectors).tobytes() == (batch @ vectors.T).tobytes()


def test_a_busy_helper_leaves_the_whole_product_to_the_caller() -> None:
    rng = np.random.default_rng(2)
    vectors = rng.normal(size=(6000, 384)).astype(np.float32)
    query = rng.normal(size=(1, 384)).astype(np.float32)
    release = threading.Event()
    busy = split_scan._pool().submit(release.wait, 30)
    try:
        assert dot_rows(query, vectors).tobytes() == (query @ vectors.T).tobytes()
    finally:
        release.set()
    assert busy.result(30)


@pytest.mark.parametrize("want", [1, 14, 104, 600])
def test_the_sampled_top_is_the_partition_top(want: int) -> None:
    rng = np.random.default_rng(want)
    cases = {
        "random": rng.normal(size=(1, 20_000)).astype(np.float32),
        "ties": rng.integers(0, 5, size=(1, 20_000)).astype(np.float32),
    }
    mostly_filtered = rng.normal(size=(1, 20_000)).astype(np.float32)
    mostly_filtered[0, rng.random(20_000) < 0.97] = -np.inf
    cases["mostly -inf"] = mostly_filtered
    misleading = rng.normal(size=(1, 20_000)).astype(np.float32)
    misleading[0, 1 :: split_scan.SAMPLE_STEP] += 100.0  # the best ones where the sample never looks
    cases["misleading sample"] = misleading
    for name, scores in cases.items():
        if np.count_nonzero(np.isfinite(scores)) < want:
            continue
        got = top_columns(scores, want)
        assert got.shape == (1, want), name
        assert len(set(got[0].tolist())) == want, name
        # the same scores (ties may pick other columns of an equal score)
        assert _values(scores, got) == _values(scores, np.array([list(_plain_top(scores, want)[0])])), name


def test_batches_and_short_rows_take_the_plain_partition() -> None:
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(4, 20_000)).astype(np.float32)
    got = top_columns(scores, 14)
    assert [set(row.tolist()) for row in got] == _plain_top(scores, 14)
    short = rng.normal(size=(1, 1000)).astype(np.float32)
    assert set(top_columns(short, 14)[0].tolist()) == _plain_top(short, 14)[0]
