"""A sealed SPANN segment: list centroids in memory (hnswlib), posting lists on disk.

Build (``SpannSegment.build``): hierarchical balanced k-means (index/kmeans.py) cuts the
vectors into lists of about ``target_list_size``; an "l2" hnswlib index over the list
centroids is built; every vector is written into its nearest list and, by closure
assignment with the RNG rule (index/closure.py), into up to ``replicas - 1`` more; the
lists go into one posting file (index/postings.py).

Search: the ``max_lists`` nearest centroids of the query come from hnswlib; only the
lists whose centroid distance is within ``(1 + eps)`` of the nearest one are read
(query-aware pruning, distances euclidean, not squared), scanned with numpy,
deduplicated (a replicated vector appears in several lists) and cut to the exact top-k
among what was read. With an ``allowed`` mask over labels, rows outside it are dropped
while scanning; when the mask dropped rows, the probe widens (ignoring eps) by
1/sqrt(share of rows allowed), then doubles until k allowed hits are found or every
list was read. A mask allowing at most ``EXACT_SCAN_MAX`` labels is answered exactly
from those labels' vectors, found through the posting file's locator.

Scores are higher-is-better like DenseIndex: cosine similarity (vectors and queries are
normalised), inner product, or ``-euclidean distance``. Lists are routed by euclidean
distance for every metric (for "dot" that is exact only for vectors of equal norm).

Segment directory (files published by atomic rename; ``spann.json`` last, so a
directory without it is an unfinished build)::

    spann.json      {"format": 1, "metric", "dim", "count", "lists", "rows", "params": {...},
                     "centroids_bytes", "centroids_crc32", "postings_bytes", "postings_crc32",
                     "build_seconds", "crc32"}
    centroids.hnsw  hnswlib's serialisation of the centroid index (label = list number)
    postings.bin    the posting file (byte layout in index/postings.py)

Checksums: spann.json carries its own ``crc32`` (index/manifest.py). ``open`` checks
centroids.hnsw's size and CRC *before* hnswlib reads it (hnswlib trusts its input and
can crash on a corrupt link list), and the posting file's header, offset table and
locator; each posting list is checked when read (index/postings.py). The whole-file
``postings_crc32`` (and every list's CRC) is checked by ``check`` (the offline scrub),
not at open: reading a multi-GB segment at every start would be prohibitive. Segments
written before ``postings_bytes`` / ``postings_crc32`` existed open the same way.

Resident memory: the centroid index (lists x (4 dim + ~8 M) bytes) and the posting
file's offset table (16 bytes a list). Vectors are read per query with positioned reads
and freed; the OS page cache, not the process, holds hot lists.
"""

from __future__ import annotations

import math
import time
import zlib
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np

from . import hnswfile
from .checksums import Problem, crc32_file
from .closure import closure_assign
from .dense import hnsw_memory_bytes
from .errors import DataLoss, InvalidArgument
from .kmeans import hierarchical_kmeans
from .manifest import fsync_dir, read_json, write_json_atomic
from .postings import PostingFile, write_postings
from .schema import Metric, SpannParams
from .stats import SpannStats

FORMAT_VERSION = 1
META = "spann.json"
CENTROIDS = "centroids.hnsw"
POSTINGS = "postings.bin"

Hit = tuple[np.ndarray, np.ndarray]
# A filter matching at most this many labels is answered by an exact scan of their vectors.
EXACT_SCAN_MAX = 1024


def prepare_vectors(metric: Metric, vectors: np.ndarray) -> np.ndarray:
    """float32, C-contiguous, and unit length for cosine (zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim == 1:
        vectors = vectors[None, :]
    if metric is Metric.COSINE:
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1.0, norms)
    return vectors


class SpannSegment:
    """One sealed, read-only SPANN segment. Searches may run concurrently."""

    def __init__(self, directory: Path, meta: dict[str, Any], centroids: hnswlib.Index, postings: PostingFile) -> None:
        self.directory = directory
        self.metric = Metric(meta["metric"])
        self.dim = int(meta["dim"])
        self.count = int(meta["count"])
        self.params = SpannParams.from_json(meta["params"])
        self.meta = meta
        # The index-wide ef stays 1; each query asks for max(k, ef) neighbours instead,
        # because hnswlib searches with max(ef, k) and set_ef is global state.
        centroids.set_ef(1)
        self._centroids = centroids
        self._postings = postings
        self.n_lists = postings.n_lists
        # Empty lists are marked deleted in the centroid index: never returned by it.
        self._live_lists = int(np.count_nonzero(postings.counts))
        self.stats = SpannStats()  # the strand that attaches it shares its own (index/stats.py)

    # ------------------------------------------------------------------ build

    @classmethod
    def build(
        cls,
        directory: Path,
        vectors: np.ndarray,
        labels: np.ndarray,
        metric: Metric = Metric.COSINE,
        params: SpannParams | None = None,
    ) -> SpannSegment:
        """Cluster, assign with closure, write the segment into ``directory`` and open it."""
        params = params or SpannParams()
        params.validate()
        started = time.perf_counter()
        vectors = prepare_vectors(metric, vectors)
        labels = np.asarray(labels, dtype=np.int64)
        if len(vectors) == 0:
            raise InvalidArgument.field("vectors", "a SPANN segment needs at least one vector")
        if len(labels) != len(vectors):
            raise InvalidArgument.field("labels", f"expected {len(vectors)} labels, got {len(labels)}")
        if len(np.unique(labels)) != len(labels):
            raise InvalidArgument.field("labels", "labels must be distinct")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        spherical = metric is Metric.COSINE
        centroids, _ = hierarchical_kmeans(vectors, params.target_list_size, params.seed, spherical=spherical)
        index = _centroid_index(centroids, params)
        assigned = closure_assign(
            vectors, centroids, index, params.replicas, params.closure_candidates, params.eps_build
        )
        members, primary = _members(assigned, len(centroids))
        for empty in np.flatnonzero([len(m) == 0 for m in members]):
            index.mark_deleted(int(empty))  # never route a query to a list with nothing in it
        write_postings(directory / POSTINGS, vectors, labels, members, primary)
        postings_bytes, postings_crc = crc32_file(directory / POSTINGS)  # read back from the page cache
        centroid_bytes, centroid_crc = _save_centroids(index, directory / CENTROIDS)
        meta = {
            "format": FORMAT_VERSION,
            "metric": metric.value,
            "dim": int(vectors.shape[1]),
            "count": len(vectors),
            "lists": len(members),
            "rows": int(sum(len(m) for m in members)),
            "params": params.to_json(),
            "centroids_bytes": centroid_bytes,
            "centroids_crc32": centroid_crc,
            "postings_bytes": postings_bytes,
            "postings_crc32": postings_crc,
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        write_json_atomic(directory / META, meta)
        return cls.open(directory)

    @classmethod
    def open(cls, directory: Path) -> SpannSegment:
        """Open a built segment; DataLoss if a file is missing, truncated or corrupt."""
        directory = Path(directory)
        meta = read_json(directory / META)
        if meta is None:
            raise DataLoss(f"{directory}: no {META}: not a complete SPANN segment")
        if meta.get("format") != FORMAT_VERSION:
            raise DataLoss(f"{directory / META}: unsupported format {meta.get('format')}, expected {FORMAT_VERSION}")
        missing = {"metric", "dim", "count", "lists", "params", "centroids_bytes", "centroids_crc32"} - meta.keys()
        if missing:
            raise DataLoss(f"{directory / META}: missing keys {sorted(missing)}")
        path = directory / CENTROIDS
        try:
            raw = path.read_bytes()
        except FileNotFoundError as err:
            raise DataLoss(f"{path}: missing centroid index") from err
        if len(raw) != meta["centroids_bytes"] or zlib.crc32(raw) != meta["centroids_crc32"]:
            raise DataLoss(
                f"{path}: centroid index is corrupt: {len(raw)} bytes, expected {meta['centroids_bytes']} "
                "with a matching crc32"
            )
        del raw
        problem = hnswfile.check(path, int(meta["dim"]), int(meta["lists"]))  # a cut file published before the check
        if problem is not None:
            raise DataLoss(f"{path}: {problem}")
        try:
            postings = PostingFile(directory / POSTINGS)
        except FileNotFoundError as err:
            raise DataLoss(f"{directory / POSTINGS}: missing posting file") from err
        if postings.dim != meta["dim"] or postings.n_labels != meta["count"] or postings.n_lists != meta["lists"]:
            postings.close()
            raise DataLoss(f"{directory}: posting file does not match {META}")
        index = hnswlib.Index(space="l2", dim=int(meta["dim"]))
        index.load_index(str(path))
        return cls(directory, meta, index, postings)

    # ----------------------------------------------------------------- search

    def search(
        self,
        queries: np.ndarray,
        k: int,
        allowed: np.ndarray | None = None,
        max_lists: int | None = None,
        eps: float | None = None,
    ) -> list[Hit]:
        """Top-k of each query row as (labels int64, scores float32), best first.

        Args:
            queries: q x dim (or one dim-vector).
            k: hits wanted per query.
            allowed: bool mask over labels; labels past its end are excluded.
            max_lists: most lists read per query (default: the segment's params).
            eps: read lists within (1 + eps) of the nearest centroid's distance.
        """
        queries = prepare_vectors(self.metric, queries)
        if queries.shape[1] != self.dim:
            raise InvalidArgument.dimension("vector", self.dim, queries.shape[1])
        max_lists = self.params.max_lists if max_lists is None else max_lists
        eps = self.params.eps if eps is None else eps
        if k <= 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(queries))]
        if allowed is not None and np.count_nonzero(allowed) <= EXACT_SCAN_MAX:
            return self._exact(queries, k, np.flatnonzero(allowed))
        probe = min(max(1, max_lists), self._live_lists)
        near, dist_sq = self._nearest_lists(queries, probe)
        dist = np.sqrt(np.maximum(dist_sq, 0.0))
        out = []
        for i, query in enumerate(queries):
            lists = near[i][dist[i] <= (1.0 + eps) * dist[i, 0]]
            hit, scanned, passed = self._scan(query, lists, k, allowed)
            read = len(lists)
            if allowed is not None and (passed < scanned or len(hit[0]) < k):
                hit, read = self._widen(query, lists, hit, k, allowed, passed / max(scanned, 1))
            self.stats.lists_per_query.observe(read)
            out.append(hit)
        return out

    def _widen(
        self, query: np.ndarray, lists: np.ndarray, hit: Hit, k: int, allowed: np.ndarray, share: float
    ) -> tuple[Hit, int]:
        """The filter dropped rows: read more lists, nearest first and ignoring eps; (hits, lists read).

        First 1/sqrt(share) times as many as were read (``share``: the allowed part of
        the rows scanned), as DenseIndex raises its beam; then twice as many each round
        until k allowed hits are found or every list was read.
        """
        want = min(self._live_lists, math.ceil(max(len(lists), 1) / math.sqrt(max(share, 1e-6))))
        while True:
            if want > len(lists):
                wider, _ = self._nearest_lists(query[None, :], want)
                fresh = wider[0][~np.isin(wider[0], lists)]
                lists = np.concatenate([lists, fresh])
                hit = _merge(hit, self._scan(query, fresh, k, allowed)[0], k)
            if len(hit[0]) >= k or len(lists) >= self._live_lists:
                return hit, len(lists)
            want = min(self._live_lists, 2 * len(lists))

    def _exact(self, queries: np.ndarray, k: int, candidates: np.ndarray) -> list[Hit]:
        """Exact top-k over the few allowed labels that live here (read through the locator)."""
        locator = self._postings.locator()
        at = np.minimum(np.searchsorted(locator["label"], candidates), len(locator) - 1)
        found = locator[at[locator["label"][at] == candidates]]
        vectors = self._postings.read_rows(found["list"].astype(np.int64), found["row"].astype(np.int64))
        self.stats.read(0, len(locator) * locator.itemsize + vectors.nbytes)
        labels = found["label"].astype(np.int64)
        return [_top_distinct(labels, self._score(vectors, query), k, 1) for query in queries]

    def _nearest_lists(self, queries: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
        threads = -1 if len(queries) > 1 else 1
        want = min(max(count, self.params.centroid_ef), self._live_lists)
        near, dist_sq = self._centroids.knn_query(queries, k=want, num_threads=threads)
        return near[:, :count].astype(np.int64), dist_sq[:, :count]

    def _scan(self, query: np.ndarray, lists: np.ndarray, k: int, allowed: np.ndarray | None) -> tuple[Hit, int, int]:
        """Best k distinct allowed labels of the lists, rows scanned, rows allowed."""
        scores, labels = self._postings.scan(lists, lambda block: self._score(block, query))
        scanned = len(labels)
        self.stats.read(len(lists), scanned * (4 * self.dim + 8))  # each row: its vector and its label
        if allowed is not None:
            ok = labels < len(allowed)
            ok[ok] = allowed[labels[ok]]
            labels, scores = labels[ok], scores[ok]
        return _top_distinct(labels, scores, k, self.params.replicas), scanned, len(labels)

    def _score(self, vectors: np.ndarray, query: np.ndarray) -> np.ndarray:
        scores = vectors @ query
        if self.metric is Metric.L2:
            sq = np.einsum("ij,ij->i", vectors, vectors) - 2.0 * scores + float(query @ query)
            scores = -np.sqrt(np.maximum(sq, 0.0))
        return scores

    # ------------------------------------------------------------ whole segment

    def labels(self) -> np.ndarray:
        """Every label in the segment, ascending (reads the locator from disk)."""
        return self._postings.locator()["label"].copy()

    def live_vectors(self, allowed: np.ndarray, chunk_lists: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(labels, vectors) of every label the bool mask allows, each once, read list by list.

        What a merge rebuilds from: sequential reads of whole lists (a replicated vector
        is kept at its first occurrence), not one positioned read per vector.
        """
        seen = np.zeros(len(allowed), dtype=bool)
        labels_out: list[np.ndarray] = []
        vectors_out: list[np.ndarray] = [np.empty((0, self.dim), np.float32)]
        for start in range(0, self.n_lists, chunk_lists):
            vectors, labels, _ = self._postings.read_lists(np.arange(start, min(start + chunk_lists, self.n_lists)))
            ok = labels < len(allowed)
            ok[ok] = allowed[labels[ok]] & ~seen[labels[ok]]
            rows = np.flatnonzero(ok)
            _, first = np.unique(labels[rows], return_index=True)
            rows = rows[first]
            seen[labels[rows]] = True
            labels_out.append(labels[rows])
            vectors_out.append(vectors[rows])
        return np.concatenate([np.empty(0, np.int64), *labels_out]), np.concatenate(vectors_out)

    def vectors(self, labels: np.ndarray) -> np.ndarray:
        """The stored vectors of the given labels (unit length for cosine); InvalidArgument names an unknown label."""
        locator = self._postings.locator()
        labels = np.asarray(labels, dtype=np.int64)
        at = np.searchsorted(locator["label"], labels)
        at = np.minimum(at, len(locator) - 1)
        missing = locator["label"][at] != labels
        if missing.any():
            raise InvalidArgument.field("labels", f"label {int(labels[missing][0])} is not in this segment")
        found = locator[at]
        return self._postings.read_rows(found["list"].astype(np.int64), found["row"].astype(np.int64))

    def verify(self) -> None:
        """Read the whole posting file and check every checksum."""
        self._postings.verify()

    @classmethod
    def check(cls, directory: Path) -> list[Problem]:
        """Every problem of a sealed segment directory, reading all of it (the offline scrub)."""
        directory = Path(directory)
        try:
            segment = cls.open(directory)
        except DataLoss as err:
            return [Problem.from_message(str(err))]
        try:
            path = directory / POSTINGS
            problems = [
                Problem(str(path), f"posting list {n} fails its crc32 checksum", int(segment._postings.offsets[n]))
                for n in segment._postings.bad_lists()
            ]
            try:
                segment._postings.locator()
            except DataLoss as err:
                problems.append(Problem.from_message(str(err)))
            if "postings_crc32" in segment.meta:
                size, crc = crc32_file(path)
                if (size, crc) != (segment.meta["postings_bytes"], segment.meta["postings_crc32"]):
                    problems.append(Problem(str(path), f"whole-file crc32 {crc} ({size} bytes) does not match {META}"))
            return problems
        finally:
            segment.close()

    def drop_cache(self) -> None:
        """Evict the posting file from the OS page cache (cold-read benchmarks)."""
        self._postings.drop_cache()

    def close(self) -> None:
        self._postings.close()

    def disk_bytes(self) -> int:
        return sum((self.directory / name).stat().st_size for name in (META, CENTROIDS, POSTINGS))

    def memory_bytes(self) -> int:
        """Estimated resident bytes: the centroid HNSW index (index/dense.py ``hnsw_memory_bytes``) and
        the posting file's per-list tables (offsets, counts, CRCs as arrays and Python lists: ~96 bytes
        a list). Posting lists themselves are read per query and live in the OS page cache."""
        centroids = self._centroids
        capacity = centroids.get_max_elements()
        return hnsw_memory_bytes(capacity, capacity, self.dim, self.params.centroid_m) + 96 * self.n_lists


def _centroid_index(centroids: np.ndarray, params: SpannParams) -> hnswlib.Index:
    index = hnswlib.Index(space="l2", dim=centroids.shape[1])
    index.init_index(
        max_elements=len(centroids),
        M=params.centroid_m,
        ef_construction=params.centroid_ef_construction,
        random_seed=params.seed,
    )
    index.add_items(centroids, np.arange(len(centroids)), num_threads=-1)
    return index


def _save_centroids(index: hnswlib.Index, path: Path) -> tuple[int, int]:
    """Save the centroid index (checked whole before it is renamed: index/hnswfile.py); its (size, crc32)."""
    hnswfile.save(index, path, index.dim)
    fsync_dir(path.parent)
    return crc32_file(path)


def _members(assigned: np.ndarray, n_lists: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Row numbers of each list (ascending) and each row's primary list."""
    rows = np.repeat(np.arange(len(assigned), dtype=np.int64), assigned.shape[1])
    lists = assigned.ravel()
    used = lists >= 0
    rows, lists = rows[used], lists[used]
    order = np.argsort(lists, kind="stable")
    bounds = np.cumsum(np.bincount(lists, minlength=n_lists))[:-1]
    return np.split(rows[order], bounds), assigned[:, 0].copy()


def _top_distinct(labels: np.ndarray, scores: np.ndarray, k: int, replicas: int) -> Hit:
    """Best k distinct labels; a label occurs at most ``replicas`` times, always with one score."""
    take = min(len(scores), k * replicas)
    if take == 0:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    if take < len(scores):
        part = np.argpartition(-scores, take - 1)[:take]
    else:
        part = np.arange(len(scores))
    part = part[np.argsort(-scores[part], kind="stable")]
    ranked = labels[part]
    _, first = np.unique(ranked, return_index=True)
    first.sort()
    best = part[first[:k]]
    return labels[best], scores[best].astype(np.float32)


def _merge(a: Hit, b: Hit, k: int) -> Hit:
    labels = np.concatenate([a[0], b[0]])
    scores = np.concatenate([a[1], b[1]])
    return _top_distinct(labels, scores, k, 2)


__all__ = ["SpannParams", "SpannSegment", "prepare_vectors"]
