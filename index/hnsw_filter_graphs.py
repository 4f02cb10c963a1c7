"""Filter graphs of one sealed graph: an HNSW graph of just the rows a repeated filter keeps.

A filter keeping 20-50% of a graph is answered by a walk of the whole graph asking for
``oversample(share) x ef / share`` candidates (index/hnsw_plan.py): 2-5x the work of an
unfiltered walk. A scan is no cheaper there: a filter view holds at most a quarter of the
graph's rows (index/hnsw_views.py), and scanning 30,000 rows of 384 dims reads 46 MB. Real
filters repeat (a tenant, a language, the date range of a dashboard). Once one has been
planned BUILD_AFTER times, a background thread of the strand builds an hnswlib graph of
exactly its rows (the field's M and ef_construction, the same labels, the same stored
vectors), and from then on a search with that filter walks it with the beam of an unfiltered
search (wider below 30%: ``hnsw_plan.filter_graph_beam``). It is what Qdrant's payload-aware
links and Milvus's partition keys give one value, for any filter; the planner decides per
search whether it beats the view scan and the walk (index/hnsw_plan.py).

Keys are the filter views' keys: the packed mask of exactly the live rows the filter keeps in
the graph, so a delete of one of those rows changes the key, and a filter graph is never
asked for another set of rows. Filter graphs live as long as their graph (a sealed graph
never changes), are not saved (after a restart they are built again when their filters come
back), and hold at most ``budget`` rows in all (BUDGET_SHARE of the graph's). A filter graph
unused for IDLE_S makes room for a new one; one used lately is never dropped for another, so
two filters that do not fit together cannot keep rebuilding each other (a build takes a core
for seconds): the second is not built while the first is in use. A small lock guards the
tables, never a build or a walk.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import hnswlib

BUDGET_SHARE = 1.0  # a graph's filter graphs hold at most as many rows as it (memory: its vectors once more, + links)
MIN_ROWS = 5_000  # fewer rows are scanned from a view (5,000 rows: about 1.4 unfiltered walks of ef 64)
BUILD_AFTER = 8  # plans of a filter before its graph is built: a filter that repeats, not a one-off range
COUNTED = 64  # filters whose plans are counted (least recently planned forgotten)
IDLE_S = 600.0  # a filter graph unused this long may be dropped to make room for another


class FilterGraph:
    """An hnswlib graph of one filter's rows (labels: the sealed graph's), its estimated resident bytes
    and when a search last used it (time.monotonic())."""

    __slots__ = ("index", "nbytes", "rows", "used")

    def __init__(self, index: hnswlib.Index, rows: int, nbytes: int) -> None:
        self.index = index
        self.rows = rows
        self.nbytes = nbytes
        self.used = time.monotonic()


class FilterGraphs:
    """One sealed graph's filter graphs: key (index/hnsw_views.py ``Views.key``) -> FilterGraph, LRU."""

    __slots__ = ("_asked", "_counts", "_lock", "_table", "budget", "rows")

    def __init__(self, budget: int) -> None:
        self._lock = threading.Lock()
        self._table: OrderedDict[bytes, FilterGraph] = OrderedDict()
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._asked: set[bytes] = set()  # builds asked for and not yet put or given up
        self.budget = budget  # rows all filter graphs together may hold
        self.rows = 0

    def fits(self, rows: int) -> bool:
        return MIN_ROWS <= rows <= self.budget

    def get(self, key: bytes) -> FilterGraph | None:
        with self._lock:
            found = self._table.get(key)
            if found is not None:
                self._table.move_to_end(key)
                found.used = time.monotonic()
            return found

    def count(self, key: bytes, rows: int) -> bool:
        """One more plan of this filter of ``rows`` rows (whose graph would pay); True once, when its
        build is due and there is room for it."""
        with self._lock:
            if key in self._table or key in self._asked:
                return False
            seen = self._counts.pop(key, 0) + 1
            if seen < BUILD_AFTER or not self._room(rows):
                self._counts[key] = seen
                if len(self._counts) > COUNTED:
                    self._counts.popitem(last=False)
                return False
            self._asked.add(key)
            return True

    def given_up(self, key: bytes) -> None:
        """A build asked for did not finish (closing, its graph merged away, a failure): it may be asked again."""
        with self._lock:
            self._asked.discard(key)

    def room(self, rows: int) -> bool:
        """Whether a graph of ``rows`` rows would be kept now (a builder asks before it builds)."""
        with self._lock:
            return self._room(rows)

    def _room(self, rows: int) -> bool:
        """Whether ``rows`` more fit, once the filter graphs unused for IDLE_S are dropped (caller holds the lock)."""
        idle = time.monotonic() - IDLE_S
        free = self.budget - self.rows + sum(old.rows for old in self._table.values() if old.used < idle)
        return self.fits(rows) and rows <= free

    def put(self, key: bytes, built: FilterGraph) -> bool:
        """Keep a filter graph, dropping idle ones (least recently used first) to make room; False
        when it does not fit beside those in use (it is then dropped)."""
        with self._lock:
            self._asked.discard(key)
            if key in self._table or not self._room(built.rows):
                return False
            while self.rows + built.rows > self.budget:
                _, old = self._table.popitem(last=False)  # the least recently used: idle, as _room found
                self.rows -= old.rows
            self._table[key] = built
            self.rows += built.rows
            return True

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(built.nbytes for built in self._table.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._table)
