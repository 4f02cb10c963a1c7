"""The parts an HNSW strand (index/hnsw_strand.py) is made of, and how they are scored.

``Block``: rows outside the graphs (growing or frozen), labels ascending, vectors in one
contiguous array. ``Graph``: a sealed segment, an hnswlib graph with its labels (ascending)
and a contiguous copy of its vectors. ``walk`` asks a graph for a batch's nearest labels;
``exact_scores`` / ``best_exact`` / ``best`` score and rank candidates the same way whatever
part holds them and however many queries share the call, so a document's score depends
neither on the shard count nor on the batch. A batch is ranked at once: its hits are padded
matrices (``Hits``, a row a query), scored with one gather and one float64 product per part
and merged with one sort. ``inside`` and ``mark`` are the label-mask and delete-mark helpers
the strand shares; ``live_rows`` copies parts' live rows out for a build or a checkpoint.
"""

from __future__ import annotations

import hnswlib
import numpy as np

from .hnsw_filter_graphs import BUDGET_SHARE, FilterGraphs
from .hnsw_views import VIEW_SHARE, Views
from .schema import Metric

# Cosine rows are normalised once, by the strand (``HnswStrand.stored_form``), and searched as
# inner products: a cosine-space graph would normalise them again and store slightly different floats.
SPACES = {Metric.COSINE: "ip", Metric.DOT: "ip", Metric.L2: "l2"}
Hit = tuple[np.ndarray, np.ndarray]  # one query's (labels int64, scores float32), best first
EMPTY: Hit = (np.empty(0, np.int64), np.empty(0, np.float32))
# A batch's hits: labels (int64) and scores (float32), B x k, a row a query, best first; a row with
# fewer than k hits is padded with PAD labels scored -inf, so rows of different lengths sort as one matrix.
Hits = tuple[np.ndarray, np.ndarray]
PAD = np.iinfo(np.int64).max
COPY_CHUNK = 1024  # rows copied at a time while the GIL is held (~0.4 ms at 384 dims)
SCORE_CHUNK = 16  # queries scored in float64 at once: temporaries of ~0.7 MB at 14 x 384 stay in cache (64: slower)
_ROWS = np.arange(1024)[:, None]  # row indices for picking each row's columns (made once)


class Block:
    """Rows of the strand outside the graphs: labels ascending, vectors row by row."""

    __slots__ = ("labels", "n", "vectors")

    def __init__(self, dim: int, capacity: int) -> None:
        self.labels = np.empty(capacity, np.int64)
        self.vectors = np.empty((capacity, dim), np.float32)
        self.n = 0

    @classmethod
    def of(cls, labels: np.ndarray, vectors: np.ndarray) -> Block:
        block = cls.__new__(cls)
        block.labels, block.vectors, block.n = labels, vectors, len(labels)
        return block

    def room(self) -> int:
        return len(self.labels) - self.n

    def append(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        end = self.n + len(labels)
        self.vectors[self.n : end] = vectors
        self.labels[self.n : end] = labels
        self.n = end  # last: a reader that sees n sees the rows

    def view(self) -> Block:
        """The rows so far, immutable from here on (appends only write past them)."""
        return Block.of(self.labels[: self.n], self.vectors[: self.n])


class Graph:
    """A sealed segment: an hnswlib graph, every label it holds (ascending) and their vectors in that
    order, and the filter views and filter graphs searches made of them (index/hnsw_views.py,
    index/hnsw_filter_graphs.py)."""

    __slots__ = ("dead", "dense", "fgraphs", "file", "graph", "labels", "mutable", "vectors", "views")

    def __init__(self, graph: hnswlib.Index, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.graph = graph
        self.labels = labels
        self.vectors = vectors
        self.file: str | None = None  # its checkpoint file once it has one (immutable: later checkpoints link it)
        self.dead = 0  # labels of the graph marked deleted
        self.mutable = False  # made by this recovery: frozen rows may still go into it in place
        self.views = Views(int(VIEW_SHARE * len(labels)))
        self.fgraphs = FilterGraphs(int(BUDGET_SHARE * len(labels)))
        # Labels first..top without a gap: a label's row is label - first (no search needed).
        self.dense = bool(len(labels)) and int(labels[-1]) - int(labels[0]) + 1 == len(labels)

    @property
    def first(self) -> int:
        return int(self.labels[0]) if len(self.labels) else -1

    @property
    def top(self) -> int:
        return int(self.labels[-1]) if len(self.labels) else -1

    @property
    def live(self) -> int:
        return len(self.labels) - self.dead

    def install(self, deleted: list[int], present: np.ndarray) -> None:
        """Mark the labels deleted while this graph was built (the caller excludes searches) and
        count its dead: its labels ``present`` (a mask over labels) no longer holds."""
        for label in deleted:
            if self.first <= label <= self.top:
                mark(self.graph, label)
        self.dead = len(self.labels) - int(np.count_nonzero(inside(present, self.labels)))

    def rows(self, window: np.ndarray) -> np.ndarray:
        """The rows (of ``labels`` and ``vectors``) of the labels a mask from the first label allows."""
        found = np.flatnonzero(window)
        return found if self.dense else np.searchsorted(self.labels, found + self.first)


def walk(graph: Graph, queries: np.ndarray, want: int) -> np.ndarray | None:
    """The graph's ``want`` nearest labels of each query (one row each, nearest first); None when it
    cannot find that many."""
    return walk_index(graph.graph, queries, want)


def walk_index(index: hnswlib.Index, queries: np.ndarray, want: int) -> np.ndarray | None:
    """``walk`` of any hnswlib graph (a sealed graph's, or a filter graph's)."""
    try:
        # A batch spreads over every core (hnswlib releases the GIL); one query stays on this thread.
        labels, _ = index.knn_query(queries, k=want, num_threads=-1 if len(queries) > 1 else 1)
    except RuntimeError:
        return None
    return labels.astype(np.int64)


def inside(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """mask[labels] (any shape of labels), False for labels past the mask's end (or below 0)."""
    if not labels.size:
        return np.zeros(labels.shape, bool)
    if int(labels.max()) < len(mask) and int(labels.min()) >= 0:
        return mask[labels]
    out = np.zeros(labels.shape, bool)
    inside = (labels >= 0) & (labels < len(mask))
    out[inside] = mask[labels[inside]]
    return out


def live_rows(present: np.ndarray, parts: tuple[Block, ...] | tuple[Graph, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The rows of ``parts`` whose labels ``present`` (a mask over labels) holds, in order, copied
    COPY_CHUNK rows at a time: numpy holds the GIL while it copies, and one copy of a merge's tens
    of MB would stall every search that long."""
    keeps = [inside(present, part.labels) for part in parts]
    total = sum(int(np.count_nonzero(keep)) for keep in keeps)
    dim = parts[0].vectors.shape[1] if parts else 0
    labels = np.empty(total, np.int64)
    vectors = np.empty((total, dim), np.float32)
    at = 0
    for part, keep in zip(parts, keeps, strict=True):
        for start in range(0, len(keep), COPY_CHUNK):
            chunk = keep[start : start + COPY_CHUNK]
            rows = int(np.count_nonzero(chunk))
            labels[at : at + rows] = part.labels[start : start + COPY_CHUNK][chunk]
            vectors[at : at + rows] = part.vectors[start : start + COPY_CHUNK][chunk]
            at += rows
    return labels, vectors


def mark(graph: hnswlib.Index, label: int) -> bool:
    """Mark a label of the graph deleted; False when it already was (or is not in the graph)."""
    try:
        graph.mark_deleted(int(label))
    except RuntimeError:
        return False
    return True


def exact_scores(metric: Metric, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Scores (B x c, float64) of each query (B x dim) against its own candidates' vectors (B x c x dim),
    computed the same way whatever part holds them and however many queries a batch has: float64,
    a pairwise sum along each row (numpy reduces every row of the last axis alone, so a row's score
    is the same bits in any batch shape). BLAS and hnswlib's SIMD round differently for different
    batch shapes, and results must depend neither on the shard count nor on the batch."""
    if len(queries) <= SCORE_CHUNK:
        return _scores(metric, queries, vectors)
    out = np.empty(vectors.shape[:2], np.float64)
    for start in range(0, len(queries), SCORE_CHUNK):  # bounds the float64 temporaries of a big batch
        at = slice(start, start + SCORE_CHUNK)
        out[at] = _scores(metric, queries[at], vectors[at])
    return out


def _scores(metric: Metric, queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    q = queries[:, None, :].astype(np.float64)  # the float32 rows widen exactly as they meet it
    if metric is Metric.L2:
        diff = np.subtract(vectors, q)
        return -np.sqrt(np.square(diff, out=diff).sum(axis=2))
    return np.multiply(vectors, q).sum(axis=2)


def best_exact(
    metric: Metric, queries: np.ndarray, labels: np.ndarray, vectors: np.ndarray, k: int, padded: bool = False
) -> Hits:
    """Each query's best k of its candidates (``labels`` B x c; with ``padded``, PAD where a row has
    fewer; ``vectors`` their rows B x c x dim, anything under PAD) by exact score."""
    scores = exact_scores(metric, queries, vectors).astype(np.float32)
    if padded:
        scores[labels == PAD] = -np.inf
    return ranked(labels, scores, k)


def ranked(labels: np.ndarray, scores: np.ndarray, k: int) -> Hits:
    """Each row's best k (higher score first, then smaller label), padded to exactly k columns."""
    if labels.shape[1] < k:
        wide = np.full((len(labels), k), PAD, np.int64), np.full((len(labels), k), -np.inf, np.float32)
        wide[0][:, : labels.shape[1]], wide[1][:, : labels.shape[1]] = labels, scores
        labels, scores = wide
    order = np.lexsort((labels, -scores), axis=-1)[:, :k]
    rows = _ROWS[: len(labels)] if len(labels) <= len(_ROWS) else np.arange(len(labels))[:, None]
    return labels[rows, order], scores[rows, order]  # plain indexing: take_along_axis costs more per call


def best(k: int, parts: list[Hits]) -> Hits:
    """Each query's best k over several parts' hits (their labels are disjoint): one sort of the padded rows."""
    return ranked(np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1), k)


def unpadded(hits: Hits) -> list[Hit]:
    """One (labels, scores) pair per query, without the padding."""
    labels, scores = hits
    counts = (labels != PAD).sum(axis=1).tolist()
    return [(labels[i, :n], scores[i, :n]) for i, n in enumerate(counts)]
