"""SPANN's closure assignment: which posting lists each vector is written into.

Every vector goes to its nearest centroid (its *primary* list) and, when it lies near
a boundary, also to up to ``replicas - 1`` further lists. Candidates are the
``candidates`` nearest centroids (from the centroid hnswlib index), walked nearest
first; candidate ``c_j`` is taken only if

* it is close:  ``d(x, c_j) <= (1 + eps) * d(x, c_1)`` (euclidean, not squared), and
* the RNG rule does not prune it: no already chosen ``c_i`` has
  ``d(c_j, c_i) < d(x, c_j)``. A centroid that lies behind a chosen one, as seen from
  x, covers the same region of space; a second copy there buys no recall.

So replicas go where they help: in directions the chosen lists do not already cover.
The loop is vectorised over a chunk of vectors and runs over candidate ranks.
"""

from __future__ import annotations

import hnswlib
import numpy as np

# Vectors per chunk: bounds the gathered candidate centroids (chunk x candidates x dim floats).
_CHUNK = 4096


def closure_assign(
    vectors: np.ndarray,
    centroids: np.ndarray,
    index: hnswlib.Index,
    replicas: int,
    candidates: int,
    eps: float,
) -> np.ndarray:
    """Lists of each vector: int64 n x replicas, nearest first, padded with -1.

    Args:
        vectors: n x dim float32 (normalised already for cosine).
        centroids: L x dim float32, the list centroids; ``index`` is an "l2" hnswlib
            index over them labelled 0..L-1.
        replicas: most lists one vector is written into (1 = plain nearest assignment).
        candidates: nearest centroids considered per vector.
        eps: closeness bound of the first rule above.
    """
    n = len(vectors)
    m = max(1, min(candidates, len(centroids)))
    out = np.full((n, replicas), -1, dtype=np.int64)
    if n == 0:
        return out
    index.set_ef(max(2 * m, 64))
    c_sq = np.einsum("ij,ij->i", centroids, centroids)
    limit = (1.0 + eps) ** 2  # on squared distances
    for start in range(0, n, _CHUNK):
        block = vectors[start : start + _CHUNK]
        near, dist_sq = index.knn_query(block, k=m, num_threads=-1)
        near = near.astype(np.int64)
        out[start : start + len(block)] = _rng_select(centroids, c_sq, near, dist_sq, replicas, limit)
    return out


def _rng_select(
    centroids: np.ndarray, c_sq: np.ndarray, near: np.ndarray, dist_sq: np.ndarray, replicas: int, limit: float
) -> np.ndarray:
    rows, m = near.shape
    chosen = np.full((rows, replicas), -1, dtype=np.int64)
    chosen[:, 0] = near[:, 0]
    if replicas == 1 or m == 1:
        return chosen
    gathered = centroids[near]  # rows x m x dim
    gram = np.matmul(gathered, gathered.transpose(0, 2, 1))  # rows x m x m
    norms = c_sq[near]
    between = norms[:, :, None] + norms[:, None, :] - 2.0 * gram  # squared d(c_i, c_j)
    taken = np.zeros((rows, m), dtype=bool)
    taken[:, 0] = True
    count = np.ones(rows, dtype=np.int64)
    for j in range(1, m):
        ok = (dist_sq[:, j] <= limit * dist_sq[:, 0]) & (count < replicas)
        # RNG rule: some chosen c_i is nearer to c_j than x is.
        dominated = (taken[:, :j] & (between[:, j, :j] < dist_sq[:, j : j + 1])).any(axis=1)
        ok &= ~dominated
        hit = np.flatnonzero(ok)
        chosen[hit, count[hit]] = near[hit, j]
        taken[hit, j] = True
        count[hit] += 1
    return chosen
