"""The filter graph builder of one HNSW strand: a short queue of builds and one background thread.

A search whose plan finds a filter's own graph due (index/hnsw_plan.py) asks here. At most
QUEUE asks wait; the rest are given up at once (their filters may be asked again by a later
plan). One thread, alive only while asks wait and at background priority (index/pacing.py),
builds each ask off every lock: an hnswlib graph of exactly the rows of the sealed graph the
filter's key names (their labels, their stored vectors), inserted ``chunk`` rows at a time
(each chunk's gather holds the GIL), and keeps it in that graph's FilterGraphs
(index/hnsw_filter_graphs.py) if it still has room. A build stops between chunks once
``stopped`` says so (the strand closes, or its graph was merged away); an ask that does not
end in a kept graph is given up. Asks made before ``serve`` (recovery) are given up too.
"""

from __future__ import annotations

import functools
import threading
from collections import deque
from collections.abc import Callable

import hnswlib
import numpy as np

from .dense import hnsw_memory_bytes
from .hnsw_filter_graphs import FilterGraph
from .hnsw_parts import Graph
from .pacing import background_thread
from .schema import DenseFieldSpec

QUEUE = 4  # builds that may wait for the builder; more are given up and asked again later


class FilterGraphBuilder:
    """Builds one strand's filter graphs; ``job(kind, run)`` runs a build and records its outcome."""

    def __init__(
        self,
        spec: DenseFieldSpec,
        new_index: Callable[[int], hnswlib.Index],
        stopped: Callable[[Graph], bool],
        job: Callable[[str, Callable[[], bool]], bool],
        chunk: int,
        threads: int,
    ) -> None:
        self._spec = spec
        self._new_index = new_index  # an empty graph of the field's space and parameters for n rows
        self._stopped = stopped
        self._job = job
        self._chunk = chunk
        self._threads = threads
        self._lock = threading.Lock()
        self._asks: deque[tuple[Graph, bytes, int]] = deque()  # (graph, filter key, rows) to build
        self._thread: threading.Thread | None = None
        self._serving = False
        self._closing = False

    def serve(self) -> None:
        """From now on asks are built (before: recovery, nothing searches)."""
        with self._lock:
            self._serving = True

    def close(self) -> threading.Thread | None:
        """Take no more asks; the running thread (to join, off the shard's lock) gives the waiting ones up."""
        with self._lock:
            self._closing = True
            return self._thread

    def busy(self) -> bool:
        """Whether a build runs or waits (benchmarks and tests)."""
        with self._lock:
            return self._thread is not None or bool(self._asks)

    def waiting(self) -> int:
        with self._lock:
            return len(self._asks)

    def ask(self, graph: Graph, key: bytes, rows: int) -> None:
        """Queue the build of the graph of ``graph``'s ``rows`` rows the filter ``key`` keeps."""
        with self._lock:
            if not self._serving or self._closing or len(self._asks) >= QUEUE:
                graph.fgraphs.given_up(key)
                return
            self._asks.append((graph, key, rows))
            if self._thread is None:
                self._thread = background_thread(self._loop, f"braid-filter-graphs-{self._spec.name}")

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._closing or not self._asks:
                    for graph, key, _ in self._asks:
                        graph.fgraphs.given_up(key)
                    self._asks.clear()
                    self._thread = None
                    return
                graph, key, rows = self._asks.popleft()
            self._job("filter-graph", functools.partial(self.build, graph, key, rows))

    def build(self, graph: Graph, key: bytes, rows: int) -> bool:
        """Build and keep the filter ``key``'s graph; False when stopped or the graphs in use took its room first."""
        kept = False
        try:
            if not graph.fgraphs.room(rows):
                return False
            window = np.unpackbits(np.frombuffer(key, np.uint8))[: graph.top - graph.first + 1].view(bool)
            at = graph.rows(window)
            assert len(at) == rows, "a filter key names the rows it was counted with"
            index = self._new_index(rows)
            for start in range(0, rows, self._chunk):
                if self._stopped(graph):
                    return False
                chunk = at[start : start + self._chunk]
                index.add_items(graph.vectors[chunk], graph.labels[chunk], num_threads=self._threads)
            nbytes = hnsw_memory_bytes(rows, rows, self._spec.dim, self._spec.hnsw.m)
            kept = graph.fgraphs.put(key, FilterGraph(index, rows, nbytes))
            return True
        finally:
            if not kept:
                graph.fgraphs.given_up(key)
