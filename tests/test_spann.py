"""SPANN segment: recall against brute force, closure assignment, filters, persistence, corruption."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from braid.index import postings as postings_module
from braid.index.errors import DataLoss, InvalidArgument
from braid.index.kmeans import LEAF_SLACK, hierarchical_kmeans
from braid.index.postings import HEADER_SIZE, PostingFile
from braid.index.schema import Metric
from braid.index.spann import CENTROIDS, EXACT_SCAN_MAX, META, POSTINGS, SpannParams, SpannSegment

N, DIM, QUERIES = 20_000, 16, 200


def clustered(n: int, dim: int, seed: int, clusters: int = 100, noise: float = 2.0) -> np.ndarray:
    """Unit vectors around random centres, as ../shared/bench/make_vectors.py draws them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + rng.normal(scale=noise, size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(base: np.ndarray, labels: np.ndarray, queries: np.ndarray, k: int) -> list[set[int]]:
    scores = queries @ base.T
    return [set(labels[np.argsort(-row, kind="stable")[:k]].tolist()) for row in scores]


def recall(found: list[tuple[np.ndarray, np.ndarray]], truth: list[set[int]]) -> float:
    return float(np.mean([len(set(f[0].tolist()) & t) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    both = clustered(N + QUERIES, DIM, seed=7)
    # Labels are the shard's sparse document-version labels, not 0..n-1.
    labels = np.arange(N, dtype=np.int64) * 3 + 5
    return both[:N], labels, both[N:]


@pytest.fixture(scope="module")
def truth(data) -> list[set[int]]:
    base, labels, queries = data
    return brute_force(base, labels, queries, 10)


@pytest.fixture(scope="module")
def segment(data, tmp_path_factory) -> SpannSegment:
    base, labels, _ = data
    return SpannSegment.build(tmp_path_factory.mktemp("spann"), base, labels)


def test_recall_at_defaults(segment, data, truth):
    _, _, queries = data
    found = segment.search(queries, 10)
    assert all(len(f[0]) == 10 for f in found)
    assert all(len(set(f[0].tolist())) == 10 for f in found), "replicated vectors must be deduplicated"
    assert recall(found, truth) >= 0.90


def test_scores_are_cosine_similarity_best_first(segment, data):
    base, labels, queries = data
    position = {int(label): i for i, label in enumerate(labels)}
    found_labels, scores = segment.search(queries[0], 10)[0]
    expected = base[[position[int(label)] for label in found_labels]] @ queries[0]
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(scores) <= 0)


def test_rng_closure_raises_recall_at_equal_probes(data, truth, tmp_path):
    base, labels, queries = data
    single = SpannSegment.build(tmp_path / "single", base, labels, params=SpannParams(replicas=1))
    closure = SpannSegment.build(tmp_path / "closure", base, labels, params=SpannParams())
    assert single.meta["rows"] == N
    assert closure.meta["rows"] > 1.3 * N, "boundary vectors should be written into several lists"
    for lists in (4, 8):
        without = recall(single.search(queries, 10, max_lists=lists, eps=100.0), truth)
        with_closure = recall(closure.search(queries, 10, max_lists=lists, eps=100.0), truth)
        assert with_closure >= without + 0.08, (lists, without, with_closure)


def test_eps_prunes_lists(segment, data, truth):
    _, _, queries = data
    tight = recall(segment.search(queries, 10, max_lists=64, eps=0.0), truth)
    loose = recall(segment.search(queries, 10, max_lists=64, eps=100.0), truth)
    assert tight < loose


def test_filter_returns_only_allowed_labels_with_good_recall(segment, data):
    base, labels, queries = data
    rng = np.random.default_rng(3)
    allowed = np.zeros(int(labels.max()) + 1, dtype=bool)
    kept = rng.random(N) < 0.3
    allowed[labels[kept]] = True
    found = segment.search(queries, 10, allowed=allowed)
    assert all(allowed[f[0]].all() and len(f[0]) == 10 for f in found)
    assert recall(found, brute_force(base[kept], labels[kept], queries, 10)) >= 0.85


@pytest.mark.parametrize("size", [25, 1600])  # exact scan through the locator / widened probe
def test_selective_filter(segment, data, size):
    base, labels, queries = data
    chosen = np.random.default_rng(4).choice(N, size=size, replace=False)
    allowed = np.zeros(int(labels.max()) + 1, dtype=bool)
    allowed[labels[chosen]] = True
    found = segment.search(queries[:50], 10, allowed=allowed)
    truth = brute_force(base[chosen], labels[chosen], queries[:50], 10)
    assert all(allowed[f[0]].all() and len(f[0]) == 10 for f in found)
    assert recall(found, truth) >= (1.0 if size <= EXACT_SCAN_MAX else 0.9)


def test_mask_shorter_than_labels_excludes_the_rest(segment, data):
    _, labels, queries = data
    allowed = np.ones(int(labels[N // 2]), dtype=bool)
    found = segment.search(queries[:5], 10, allowed=allowed)
    assert all(len(f[0]) == 10 and (f[0] < len(allowed)).all() for f in found)
    assert all(len(f[0]) == 0 for f in segment.search(queries[:3], 10, allowed=np.ones(3, dtype=bool)))


def test_reopen_gives_identical_results(segment, data):
    _, _, queries = data
    reopened = SpannSegment.open(segment.directory)
    try:
        for (a_labels, a_scores), (b_labels, b_scores) in zip(
            segment.search(queries[:50], 10), reopened.search(queries[:50], 10), strict=True
        ):
            np.testing.assert_array_equal(a_labels, b_labels)
            np.testing.assert_array_equal(a_scores, b_scores)
    finally:
        reopened.close()


def test_stored_vectors_and_labels(segment, data):
    base, labels, _ = data
    np.testing.assert_array_equal(segment.labels(), np.sort(labels))
    picked = np.array([labels[10], labels[0], labels[-1]])
    np.testing.assert_allclose(segment.vectors(picked), base[[10, 0, N - 1]], rtol=1e-6)
    with pytest.raises(InvalidArgument):
        segment.vectors(np.array([labels[0] + 1]))
    segment.verify()


@pytest.mark.parametrize("buffer_bytes", [postings_module.SCAN_BUFFER_BYTES, 1])  # 1: a flush per list
def test_posting_scan_matches_whole_list_reads(segment, data, monkeypatch, buffer_bytes):
    monkeypatch.setattr(postings_module, "SCAN_BUFFER_BYTES", buffer_bytes)
    query = data[2][0]
    postings = PostingFile(segment.directory / POSTINGS)
    try:
        lists = np.array([3, 0, 7, 1, 12, 5], dtype=np.int64)
        vectors, labels, bounds = postings.read_lists(lists)
        assert bounds[-1] == len(labels) == int(postings.counts[lists].sum())
        scores, scanned = postings.scan(lists, lambda block: block @ query)
        np.testing.assert_array_equal(scanned, labels)
        np.testing.assert_allclose(scores, vectors @ query, rtol=1e-6, atol=1e-6)
    finally:
        postings.close()


@pytest.mark.parametrize("metric", [Metric.L2, Metric.DOT])
def test_other_metrics_match_brute_force(metric, tmp_path):
    rng = np.random.default_rng(5)
    base = clustered(5000, DIM, seed=9) * rng.uniform(0.5, 2.0, size=(5000, 1)).astype(np.float32)
    queries = clustered(50, DIM, seed=10)
    segment = SpannSegment.build(tmp_path, base, np.arange(5000), metric=metric)
    found = segment.search(queries, 10, max_lists=1000, eps=100.0)  # every list: exact
    for (labels, scores), query in zip(found, queries, strict=True):
        if metric is Metric.L2:
            exact = -np.linalg.norm(base - query, axis=1)
        else:
            exact = base @ query
        np.testing.assert_array_equal(labels, np.argsort(-exact, kind="stable")[:10])
        np.testing.assert_allclose(scores, exact[labels], rtol=1e-4, atol=1e-4)


def test_kmeans_is_deterministic_and_balanced(data):
    base = data[0][:5000]
    centroids, leaf = hierarchical_kmeans(base, 50, seed=1)
    again, leaf_again = hierarchical_kmeans(base, 50, seed=1)
    np.testing.assert_array_equal(centroids, again)
    np.testing.assert_array_equal(leaf, leaf_again)
    sizes = np.bincount(leaf)
    assert sizes.max() <= LEAF_SLACK * 50
    assert len(centroids) >= 5000 / 50


def test_invalid_input_is_rejected(tmp_path, data):
    base = data[0]
    with pytest.raises(InvalidArgument):
        SpannSegment.build(tmp_path, base[:10], np.zeros(10, dtype=np.int64))
    with pytest.raises(InvalidArgument):
        SpannSegment.build(tmp_path, base[:10], np.arange(10), params=SpannParams(replicas=0))
    with pytest.raises(DataLoss):
        SpannSegment.open(tmp_path)  # nothing was published


@pytest.fixture
def small_segment(tmp_path, data) -> Path:
    base, labels, _ = data
    SpannSegment.build(tmp_path, base[:3000], labels[:3000]).close()
    return tmp_path


def test_truncated_posting_file_is_data_loss(small_segment):
    path = small_segment / POSTINGS
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size - 100)
    with pytest.raises(DataLoss, match="truncated"):
        SpannSegment.open(small_segment)


def test_corrupt_header_table_and_centroids_are_data_loss(small_segment):
    path = small_segment / POSTINGS
    original = path.read_bytes()
    for offset in (0, 20, HEADER_SIZE + 3):  # magic, header field, offset table
        damaged = bytearray(original)
        damaged[offset] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(DataLoss):
            SpannSegment.open(small_segment)
    path.write_bytes(original)
    centroids = small_segment / CENTROIDS
    raw = bytearray(centroids.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    centroids.write_bytes(bytes(raw))
    with pytest.raises(DataLoss, match="centroid"):
        SpannSegment.open(small_segment)


def test_corrupt_list_is_caught_by_verify(small_segment):
    path = small_segment / POSTINGS
    postings = PostingFile(path)
    first = int(postings.offsets[0])
    postings.close()
    raw = bytearray(path.read_bytes())
    raw[first + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    segment = SpannSegment.open(small_segment)  # list bodies are not read on open
    with pytest.raises(DataLoss, match="posting list 0"):
        segment.verify()
    segment.close()


def test_missing_manifest_is_data_loss(small_segment):
    (small_segment / META).unlink()
    with pytest.raises(DataLoss):
        SpannSegment.open(small_segment)
