"""A batch of dense queries (HnswStrand.search with many rows, BatchSearch's path) answers each
query exactly as searching it alone does, bit for bit, over a field in every segment state at
once (several sealed graphs with deletes, frozen blocks waiting for the sealer, a growing block),
with and without filters (each branch of the filter planner: exact scans, walks filtered
afterwards, short walks scanned); and its recall@k is brute force's (>= 0.95).

Real hnswlib graphs; the block size is shrunk (module constants) and merges are held off so the
field keeps several graphs.
"""

from __future__ import annotations

import numpy as np
import pytest

from braid.index import hnsw_plan, hnsw_strand, hnsw_tiers
from braid.index.hnsw_strand import HnswStrand
from braid.index.locks import ReadWriteLock
from braid.index.schema import DenseFieldSpec, HnswParams, Metric

from .conftest import random_vectors
from .test_hnsw_segments import _truth

DIM = 16
N = 2600


@pytest.fixture
def held_merges(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hnsw_strand, "SEAL_ROWS", 128)
    monkeypatch.setattr(hnsw_strand, "MAX_PENDING_ROWS", 10**6)  # writers never wait for the sealer
    monkeypatch.setattr(hnsw_tiers, "TIER_FANOUT", 100)  # no tier merge ...
    monkeypatch.setattr(hnsw_strand, "IDLE_MERGE_S", 1e6)  # ... and no idle merge: several graphs stay


@pytest.mark.parametrize("planner", ["default", "walks"])
@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.DOT, Metric.L2])
def test_a_batch_answers_each_query_as_alone_bit_for_bit(
    held_merges: None, monkeypatch: pytest.MonkeyPatch, metric: Metric, planner: str
) -> None:
    """``walks``: the planner walks every filtered graph, asking for too few candidates, so many
    walks come back short and those queries alone are scanned (recall is not checked then)."""
    if planner == "walks":
        monkeypatch.setattr(hnsw_plan, "WALK_COST", 0.0)
        monkeypatch.setattr(hnsw_plan, "oversample", lambda share: 0.3)
    lock = ReadWriteLock()
    strand = HnswStrand(DenseFieldSpec(name="emb", dim=DIM, metric=metric, hnsw=HnswParams(m=16, ef_construction=100)))
    strand.start(lock)
    vectors = random_vectors(N, DIM, seed=21)
    live = np.zeros(N, bool)
    try:
        for start in (0, 700, 1400):  # three seals: three graphs
            with lock.write():
                strand.add(np.arange(start, start + 700, dtype=np.int64), vectors[start : start + 700])
            live[start : start + 700] = True
            assert strand.wait_merged(60)
        with lock.write():
            for label in range(0, 2100, 5):  # deletes in every graph
                assert strand.remove(label)
                live[label] = False
        # The write lock held from here on keeps the sealer off the frozen blocks (searches take no lock here).
        with lock.write():
            strand.add(np.arange(2100, 2500, dtype=np.int64), vectors[2100:2500])  # a frozen block
            strand.add(np.arange(2500, N, dtype=np.int64), vectors[2500:N])  # the growing block
            live[2100:N] = True
            for label in (2101, 2400, N - 1):  # deletes in the frozen blocks and the growing one
                assert strand.remove(label)
                live[label] = False
            parts = strand.segments()
            assert parts["graphs"] >= 3 and parts["frozen"] and parts["growing"] and parts["dead"], parts

            rng = np.random.default_rng(5)
            queries = random_vectors(40, DIM, seed=22)
            filters: list[np.ndarray | None] = [None]
            for share in (0.01, 0.2, 0.6, 0.95):  # exact scans, walks filtered afterwards, short walks
                filters.append(rng.random(N + 50) < share)
            filters.append(np.ones(1200, bool))  # a mask shorter than the labels: past its end is excluded
            for allowed in filters:
                for k, ef in ((10, 64), (5, 8), (40, 40)):
                    batch = strand.search(queries, k, ef, allowed)
                    assert len(batch) == len(queries)
                    where = f"k={k} ef={ef} filter={None if allowed is None else int(allowed.sum())}"
                    allowed_live = live if allowed is None else live & np.pad(allowed, (0, N))[:N]
                    found = total = 0
                    for i, query in enumerate(queries):
                        labels, scores = batch[i]
                        alone_labels, alone_scores = strand.search(query[None, :], k, ef, allowed)[0]
                        assert labels.dtype == np.int64 and scores.dtype == np.float32, where
                        assert np.array_equal(labels, alone_labels), f"query {i}, {where}"
                        assert scores.tobytes() == alone_scores.tobytes(), f"query {i}, {where}: scores differ"
                        assert allowed_live[labels].all(), f"query {i}, {where}: a hit outside the filter or deleted"
                        assert len(labels) == min(k, int(allowed_live.sum())), where
                        truth = set(_truth(vectors, np.flatnonzero(allowed_live), query, k, metric))
                        found += len(truth & set(labels.tolist()))
                        total += len(truth)
                    if planner == "default":
                        assert found / total >= 0.95, f"recall@{k} {found / total:.3f}, {where}"
    finally:
        strand.close()
