"""In-memory dense vector index of one field in one shard: hnswlib plus an exact-scan planner.

Labels are the shard's document-version labels. A replaced or deleted version
is marked deleted in hnswlib, whose slot is reused by later inserts
(``allow_replace_deleted``), so the graph does not grow with churn.

Scores are "higher is better" for every metric:
  cosine: 1 - cosine distance (= cosine similarity), dot: inner product,
  l2: -sqrt(squared euclidean distance).

On disk (written by ``save``): ``<name>.hnsw``, hnswlib's own serialisation
(header with M / ef_construction / counts, then the level-0 link lists and
vectors, then upper levels; layout in index/hnswfile.py), which ``load`` checks by
structure and reads back with the same space and dim. hnswlib never reports a failed
write, so ``save`` goes through index/hnswfile.py, which does not publish a cut file.
"""

from __future__ import annotations

import math
from pathlib import Path

import hnswlib
import numpy as np

from . import hnswfile
from .errors import DataLoss
from .labelmask import HoldsLabels, LabelMask
from .schema import DenseFieldSpec, Metric

SPACES = {Metric.COSINE: "cosine", Metric.DOT: "ip", Metric.L2: "l2"}
_INITIAL_CAPACITY = 1024
# Above this many matching vectors a filtered HNSW walk beats gathering and scanning them.
EXACT_SCAN_MAX = 4096
# A filter keeping less than this share of the live vectors is scanned exactly.
EXACT_SCAN_SELECTIVITY = 0.02
# Cap on the beam of a filtered HNSW walk.
MAX_FILTERED_EF = 4096


def hnsw_memory_bytes(capacity: int, count: int, dim: int, m: int) -> int:
    """Estimated bytes of an hnswlib index (its C++ layout, hnswalg.h).

    hnswlib allocates level 0 for ``capacity`` elements up front: per element the vector
    (dim x 4), 2M links of 4 bytes and their count (4), the label (8), plus a link-list
    mutex (40), its level (4) and an upper-level pointer (8). Of the ``count`` elements
    inserted, about 1/(M-1) upper-level link lists of M links + count (M x 4 + 4) each, and a
    label -> id hash entry (~32 bytes).
    """
    level0 = dim * 4 + 2 * m * 4 + 4 + 8 + 40 + 4 + 8
    upper = (m * 4 + 4) / max(m - 1, 1)
    return int(capacity * level0 + count * (upper + 32))


def distances_to_scores(metric: Metric, distances: np.ndarray) -> np.ndarray:
    """Turn hnswlib distances into higher-is-better scores."""
    if metric is Metric.L2:
        return -np.sqrt(np.maximum(distances, 0.0))
    return 1.0 - distances


class DenseIndex(HoldsLabels):
    """One hnswlib index with filtered search and an exact-scan fallback."""

    def __init__(self, spec: DenseFieldSpec, index: hnswlib.Index | None = None) -> None:
        self.spec = spec
        if index is None:
            index = hnswlib.Index(space=SPACES[spec.metric], dim=spec.dim)
            index.init_index(
                max_elements=_INITIAL_CAPACITY,
                M=spec.hnsw.m,
                ef_construction=spec.hnsw.ef_construction,
                allow_replace_deleted=True,
            )
        # The index-wide ef stays tiny: a query raises its own beam by asking for
        # more neighbours, because hnswlib searches with max(ef, k) and set_ef is
        # global state that concurrent queries would race on.
        index.set_ef(1)
        self._index = index
        # Which labels hold a live vector here; hnswlib exposes neither its deleted
        # labels nor their count, and the exact-scan fallback needs the live ones.
        self._present = LabelMask()

    # ------------------------------------------------------------------ writes

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Insert vectors under fresh labels; callers hold the shard's write lock."""
        needed = self._index.get_current_count() + len(labels)
        capacity = self._index.get_max_elements()
        if needed > capacity:
            # Not thread-safe against concurrent queries: the shard write lock covers it.
            self._index.resize_index(max(needed, capacity * 2))
        # Big batches (bulk ingest) build on every core; hnswlib releases the GIL meanwhile.
        threads = -1 if len(labels) >= 256 else 1
        self._index.add_items(vectors, labels, num_threads=threads, replace_deleted=True)
        self._present.add(labels)

    def remove(self, label: int) -> bool:
        """Delete the label's vector; False when it has none here."""
        if not self._present.discard(label):
            return False
        self._index.mark_deleted(int(label))
        return True

    def memory_bytes(self) -> int:
        """Estimated resident bytes: the hnswlib index (``hnsw_memory_bytes``) and the live-label mask."""
        index, spec = self._index, self.spec
        estimate = hnsw_memory_bytes(index.get_max_elements(), index.get_current_count(), spec.dim, spec.hnsw.m)
        return estimate + self._present.mask.nbytes

    # ----------------------------------------------------------------- queries

    def search(
        self, queries: np.ndarray, k: int, ef: int, allowed: np.ndarray | None = None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """k nearest live vectors of each query row, as (labels int64, scores float32) best first.

        ``allowed`` is a bool mask over labels (labels past its end are excluded);
        with it, the planner scans the matching vectors exactly when they are few
        or a small share of the live vectors, and otherwise walks HNSW with a
        filter callback and a beam raised by the inverse selectivity.
        """
        empty = (np.empty(0, np.int64), np.empty(0, np.float32))
        if self.live <= 0 or k <= 0:
            return [empty for _ in range(len(queries))]
        if allowed is None:
            want = min(max(k, ef), self.live)
            try:
                # A batch spreads over every core (hnswlib releases the GIL); one query stays on this thread.
                labels, distances = self._index.knn_query(queries, k=want, num_threads=-1 if len(queries) > 1 else 1)
            except RuntimeError:
                # hnswlib raises when the graph walk finds fewer than `want` live
                # neighbours (k near the live count, many deletions): scan exactly.
                return self.exact(queries, k, self.present_labels())
            return [self._top(labels[i], distances[i], k) for i in range(len(queries))]
        # Only documents that have a vector in this field can match.
        present = self._present.mask
        size = min(len(allowed), len(present))
        allowed = allowed[:size] & present[:size]
        count = int(np.count_nonzero(allowed))
        if count == 0:
            return [empty for _ in range(len(queries))]
        if count <= EXACT_SCAN_MAX or count < EXACT_SCAN_SELECTIVITY * self.live:
            return self.exact(queries, k, np.flatnonzero(allowed))
        return [self._filtered_walk(q, k, ef, allowed, count) for q in queries]

    def _filtered_walk(
        self, query: np.ndarray, k: int, ef: int, allowed: np.ndarray, count: int
    ) -> tuple[np.ndarray, np.ndarray]:
        size = len(allowed)

        def accept(label: int) -> bool:
            return label < size and bool(allowed[label])

        selectivity = count / max(self.live, 1)
        beam = min(MAX_FILTERED_EF, max(k, math.ceil(max(ef, k) / math.sqrt(selectivity))))
        want = min(max(k, beam), count)
        try:
            labels, distances = self._index.knn_query(query, k=want, num_threads=1, filter=accept)
        except RuntimeError:
            # hnswlib raises when the walk finds fewer than `want` matches; the
            # exact scan is always correct, so fall back to it.
            return self.exact(query[None, :], k, np.flatnonzero(allowed))[0]
        return self._top(labels[0], distances[0], k)

    def exact(self, queries: np.ndarray, k: int, labels: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """Brute-force top-k of each query over the given live labels."""
        labels = labels.astype(np.int64, copy=False)
        vectors = np.asarray(self._index.get_items(labels, return_type="numpy"), dtype=np.float32)
        out = []
        for row in score_rows(self.spec.metric, queries, vectors):
            top = top_indices(row, k)
            out.append((labels[top], row[top].astype(np.float32)))
        return out

    def _top(self, labels: np.ndarray, distances: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = distances_to_scores(self.spec.metric, distances[:k]).astype(np.float32)
        return labels[:k].astype(np.int64), scores

    def vectors(self, labels: list[int]) -> np.ndarray:
        return np.asarray(self._index.get_items(labels, return_type="numpy"), dtype=np.float32)

    # ------------------------------------------------------------- persistence

    def save(self, directory: Path) -> None:
        """Write ``<name>.hnsw``: through a temporary name, fsynced, checked whole (index/hnswfile.py)."""
        hnswfile.save(self._index, directory / f"{self.spec.name}.hnsw", self.spec.dim)

    @classmethod
    def load(cls, directory: Path, spec: DenseFieldSpec, present: list[int]) -> DenseIndex:
        """Load the saved index; ``present`` lists the labels holding a live vector."""
        path = directory / f"{spec.name}.hnsw"
        if not path.exists():
            return cls(spec)
        problem = hnswfile.check(path, spec.dim)  # hnswlib trusts its input: a cut file must not reach it
        if problem is not None:
            raise DataLoss(f"{path}: {problem}")
        index = hnswlib.Index(space=SPACES[spec.metric], dim=spec.dim)
        index.load_index(str(path), allow_replace_deleted=True)
        dense = cls(spec, index)
        dense._present = LabelMask(np.asarray(present, dtype=np.int64))
        return dense


def score_rows(metric: Metric, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Exact higher-is-better scores of each query against each vector (as stored: cosine ones
    normalised), one row a query."""
    queries = np.asarray(queries, dtype=np.float32)
    if metric is Metric.L2:
        sq = (vectors * vectors).sum(axis=1)[None, :] - 2.0 * queries @ vectors.T
        sq += (queries * queries).sum(axis=1)[:, None]
        return -np.sqrt(np.maximum(sq, 0.0))
    if metric is Metric.COSINE:
        norms = np.linalg.norm(queries, axis=1, keepdims=True)
        queries = queries / np.where(norms == 0, 1.0, norms)
    return queries @ vectors.T


def top_indices(row: np.ndarray, k: int) -> np.ndarray:
    if k >= len(row):
        return np.argsort(-row, kind="stable")
    part = np.argpartition(-row, k - 1)[:k]
    return part[np.argsort(-row[part], kind="stable")]
