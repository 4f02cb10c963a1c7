"""Filter views of one sealed graph: contiguous copies of the rows a repeated filter keeps.

An exact scan of the rows a filter keeps (index/hnsw_strand.py's planner) costs what
gathering them costs: matching rows lie scattered over the graph's contiguous vectors, and
fetching scattered 1.5 kB rows is bound by memory latency (about 4x the cost of reading the
same rows contiguously, on the 2-core benchmark machine). Real filters repeat (a tenant, a
category, the same range): the copy a scan gathers is kept, keyed by exactly the rows it
holds, and the next search with the same filter scans it in place — a per-value
sub-index (Milvus's partition key) that the queries build, for any filter, not only
keyword ones.

A view is valid for as long as its graph lives: a graph's vectors never change, and a delete
changes the live rows a filter keeps, so it changes the key (the mask of those rows) too.
Views are bounded per graph (``budget`` rows in all), least recently used dropped first.
Many searches read and add views at once: a small lock guards the table, never a copy or
a scan.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

VIEW_SHARE = 0.25  # a graph's views hold at most this share of its rows (memory: +25% of its vectors at most)
SEEN = 64  # filters remembered as seen once (a view is made the second time, when a walk was cheaper the first)


class Views:
    """One graph's filter views: key (the packed mask of its rows) -> (labels, vectors), LRU."""

    __slots__ = ("_lock", "_seen", "_table", "budget", "rows")

    def __init__(self, budget: int) -> None:
        self._lock = threading.Lock()
        self._table: OrderedDict[bytes, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._seen: OrderedDict[bytes, None] = OrderedDict()
        self.budget = budget  # rows all views together may hold
        self.rows = 0

    @staticmethod
    def key(window: np.ndarray) -> bytes:
        """The table's key of a filter: its bool mask over the graph's label range, packed (exact, no hash
        collisions: the dict compares the bytes on a hit)."""
        return np.packbits(window).tobytes()

    def get(self, key: bytes) -> tuple[np.ndarray, np.ndarray] | None:
        with self._lock:
            view = self._table.get(key)
            if view is not None:
                self._table.move_to_end(key)
            return view

    def seen(self, key: bytes) -> bool:
        """Whether ``repeated`` would say this filter came before (remembers nothing)."""
        with self._lock:
            return key in self._seen

    def repeated(self, key: bytes) -> bool:
        """Whether this filter came before (among the last SEEN that got no view); remembers it."""
        with self._lock:
            if key in self._seen:
                self._seen.move_to_end(key)
                return True
            self._seen[key] = None
            if len(self._seen) > SEEN:
                self._seen.popitem(last=False)
            return False

    def fits(self, rows: int) -> bool:
        return 0 < rows <= self.budget

    def put(self, key: bytes, labels: np.ndarray, vectors: np.ndarray) -> None:
        """Keep a view (labels ascending, their rows), dropping the least recently used ones to make room."""
        if not self.fits(len(labels)):
            return
        with self._lock:
            if key in self._table:
                return
            while self.rows + len(labels) > self.budget:
                _, (old, _) = self._table.popitem(last=False)
                self.rows -= len(old)
            self._table[key] = (labels, vectors)
            self._seen.pop(key, None)
            self.rows += len(labels)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(labels.nbytes + vectors.nbytes for labels, vectors in self._table.values())
