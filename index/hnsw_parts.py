"""The parts an HNSW strand (index/hnsw_strand.py) is made of, and how they are scored.

``Block``: rows outside the graphs (growing or frozen), labels ascending, vectors in one
contiguous array. ``Graph``: a sealed segment, an hnswlib graph with its labels (ascending)
and a contiguous copy of its vectors. ``walk`` asks a graph for its nearest labels;
``exact_scores`` / ``best_exact`` / ``best`` score and rank candidates the same way whatever
part holds them, so a document's score does not depend on the shard count; ``inside`` and
``mark`` are the label-mask and delete-mark helpers the strand shares.
"""

from __future__ import annotations

import hnswlib
import numpy as np

from .schema import Metric

# Cosine rows are normalised once, by the strand (``HnswStrand.stored_form``), and searched as
# inner products: a cosine-space graph would normalise them again and store slightly different floats.
SPACES = {Metric.COSINE: "ip", Metric.DOT: "ip", Metric.L2: "l2"}
Hit = tuple[np.ndarray, np.ndarray]
EMPTY: Hit = (np.empty(0, np.int64), np.empty(0, np.float32))


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
    """A sealed segment: an hnswlib graph, every label it holds (ascending) and their vectors in that order."""

    __slots__ = ("dead", "file", "graph", "labels", "mutable", "vectors")

    def __init__(self, graph: hnswlib.Index, labels: np.ndarray, vectors: np.ndarray) -> None:
        self.graph = graph
        self.labels = labels
        self.vectors = vectors
        self.file: str | None = None  # its checkpoint file once it has one (immutable: later checkpoints link it)
        self.dead = 0  # labels of the graph marked deleted
        self.mutable = False  # made by this recovery: frozen rows may still go into it in place

    @property
    def first(self) -> int:
        return int(self.labels[0]) if len(self.labels) else -1

    @property
    def top(self) -> int:
        return int(self.labels[-1]) if len(self.labels) else -1

    @property
    def live(self) -> int:
        return len(self.labels) - self.dead


def walk(graph: Graph, queries: np.ndarray, want: int) -> list[np.ndarray] | None:
    """The graph's ``want`` nearest labels of each query, nearest first; None when it cannot find that many."""
    try:
        # A batch spreads over every core (hnswlib releases the GIL); one query stays on this thread.
        labels, _ = graph.graph.knn_query(queries, k=want, num_threads=-1 if len(queries) > 1 else 1)
    except RuntimeError:
        return None
    return list(labels.astype(np.int64))


def inside(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """mask[labels], False for labels past the mask's end (or below 0)."""
    if not len(labels):
        return np.zeros(0, bool)
    if int(labels.max()) < len(mask) and int(labels.min()) >= 0:
        return mask[labels]
    out = np.zeros(len(labels), bool)
    inside = (labels >= 0) & (labels < len(mask))
    out[inside] = mask[labels[inside]]
    return out


def mark(graph: hnswlib.Index, label: int) -> bool:
    """Mark a label of the graph deleted; False when it already was (or is not in the graph)."""
    try:
        graph.mark_deleted(int(label))
    except RuntimeError:
        return False
    return True


def exact_scores(metric: Metric, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Scores of one query against a few stored vectors, computed the same way whatever part
    holds them (float64, a pairwise sum along each row): BLAS and hnswlib's SIMD round
    differently for different batch shapes, and results must not depend on the shard count."""
    rows = vectors.astype(np.float64)
    q = query.astype(np.float64)
    if metric is Metric.L2:
        return -np.sqrt(((rows - q) ** 2).sum(axis=1))
    return (rows * q).sum(axis=1)


def best_exact(metric: Metric, query: np.ndarray, labels: np.ndarray, vectors: np.ndarray, k: int) -> Hit:
    scores = exact_scores(metric, query, vectors).astype(np.float32)
    order = np.lexsort((labels, -scores))[:k]
    return labels[order], scores[order]


def best(k: int, hits: list[Hit]) -> Hit:
    """Best k of several parts' hits (their labels are disjoint)."""
    labels = np.concatenate([h[0] for h in hits])
    scores = np.concatenate([h[1] for h in hits])
    order = np.lexsort((labels, -scores))[:k]
    return labels[order], scores[order].astype(np.float32)
