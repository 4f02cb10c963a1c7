"""The dense strand of an HNSW field in one shard: searches never wait for writes.

hnswlib cannot search a graph while it inserts into it (nmslib/hnswlib#562), and it holds
Python's GIL while it copies, saves or loads one, so no write ever touches a graph that
searches read, and graphs are only ever built by ``add_items`` (which releases the GIL)
into a graph nobody searches yet. The strand has three kinds of part:

* ``growing``: an appendable block of rows (labels ascending, float32 vectors in one
  contiguous array; cosine rows normalised once, ``stored_form``). A write copies its
  vectors in under the shard's write lock (microseconds); searches scan it exactly.
  At SEAL_ROWS rows it is frozen and a fresh one starts.
* ``frozen``: full growing blocks, immutable, scanned exactly until the sealer builds
  them into a graph.
* ``graphs``: sealed segments, oldest first, over disjoint ascending label ranges; each an
  hnswlib graph plus a contiguous copy of its vectors (the filter planner's exact scans
  read it: hnswlib hands vectors out only one label at a time). Immutable while searched
  except for delete marks, which writers set under the shard's write lock (searches hold
  the read lock).

Labels only grow, so graph labels < frozen labels < growing labels. The parts and their exact
scoring live in index/hnsw_parts.py.

Three background threads per strand, each alive only while it has work:

* the **sealer** builds every frozen block's live rows into a new graph (no lock held),
  then appends it under the write lock, marking the deletes made meanwhile. Writers wait,
  before they log anything or take a lock, while more than MAX_PENDING_ROWS rows are
  frozen or more than MAX_GRAPHS graphs wait for the merger: ingest slows to what the
  threads build, and a search scans and walks a bounded number of parts.
* the **merger** keeps the graph count small, as an LSM tree does (its policy: index/hnsw_tiers.py):
  adjacent graphs of one size tier are rebuilt into one, a graph with many deletes alone, and
  once neither a seal nor a write came for IDLE_MERGE_S, every graph into one when that
  pays, so a strand that was loaded and then queried is searched as one graph. It builds in chunks and stops
  between them when the strand closes. The merged graph replaces its inputs under the
  write lock.
* the **filter graph builder** builds, for a filter that repeats and keeps 20-45% of a graph,
  an hnswlib graph of just those rows (index/hnsw_filter_graphs.py; its queue and thread:
  index/hnsw_filter_builder.py); it stops between chunks when the strand closes or the graph
  was merged away (its filter graphs go with it).

All three build on BUILD_THREADS threads (every core but one: searches keep a core) and copy
rows COPY_CHUNK at a time (numpy holds the GIL while it copies).

During recovery (before ``start``) nothing searches, so frozen rows go straight into the
newest graph recovery made (in place, in the replaying thread): replay inserts each
vector once.

Search (``search``), a batch of queries at once (BatchSearch's plain dense queries reach
it as one call): one walk of each graph for the whole batch, an exact scan of each frozen
and growing block (one matrix product), then every part's best candidates are scored the
same exact way (one gather and one float64 product per part) and the best k kept (one
sort over the parts' padded rows): a query's hits are the same bits in any batch.

With a filter (a bool mask over labels, one for the whole batch; the service still sends a
filtered BatchSearch one query at a time), each graph is planned on its own: a view scan, a
gather scan, a walk or a walk of the filter's own graph, whichever costs least
(index/hnsw_plan.py owns the cost model). Both scans are exact; the walks keep recall@10
inside the filter >= 0.95. No Python callback runs per visited node.

In a checkpoint generation directory (``save`` / ``load``)::

    <field>.g<id>.hnsw       a graph (hnswlib's serialisation, checked by index/hnswfile.py). Named
                             once and never rewritten: while a graph is unchanged, later
                             checkpoints hard-link its file from the previous generation.
    <field>.rows.npy         the live frozen and growing rows' vectors (float32, n x dim; absent when none)
    <field>.rows-labels.npy  their labels (int64, ascending)
    <field>.hnsw.json        {"format": 1, "graphs": ["<field>.g<id>.hnsw", ...] (oldest first),
                              "next_id": N, "crc32"}

A checkpoint written before segments (one ``<field>.hnsw``, no ``.hnsw.json``) loads as
one graph. Delete marks are not part of the files: ``load`` marks every label of a graph
that ``present`` (the checkpoint's live labels with a vector) leaves out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import hnswlib
import numpy as np

from . import durable, hnsw_plan, hnsw_tiers, hnswfile
from .dense import hnsw_memory_bytes, score_rows
from .errors import DataLoss
from .hnsw_filter_builder import FilterGraphBuilder
from .hnsw_parts import (
    COPY_CHUNK,
    EMPTY,
    PAD,
    SPACES,
    Block,
    Graph,
    Hit,
    Hits,
    best,
    best_exact,
    inside,
    live_rows,
    mark,
    unpadded,
    walk,
    walk_index,
)
from .labelmask import HoldsLabels, LabelMask
from .locks import ReadWriteLock
from .manifest import dumps_checked, read_json
from .pacing import background_thread
from .schema import DenseFieldSpec, Metric
from .split_scan import dot_rows, top_columns
from .stats import JobStats

log = logging.getLogger("braid.hnsw")

FORMAT_VERSION = 1
SEAL_ROWS = 1024  # a growing block this full is frozen; every search scans it (384 dims: ~0.1 ms)
MAX_PENDING_ROWS = 16 * SEAL_ROWS  # writers wait while more rows than this are frozen
MAX_GRAPHS = 12  # writers also wait while more graphs than this wait for the merger
IDLE_MERGE_S = 5.0  # after this long without a seal or a write, every graph may be merged into one
BUILD_CHUNK = 4096  # rows a merge inserts between looks at whether the strand is closing
# Background builds leave a core to searches: on every core they would slow searches by the
# CPU they take (recovery, which nothing searches, builds on every core).
BUILD_THREADS = max(1, (os.cpu_count() or 2) - 1)
_SLACK = 4  # candidates past k that get exact scores: the first ranking may round differently
ROOM_WAIT_S = 60.0  # a writer waits at most this long for the sealer before it goes on anyway


class HnswStrand(HoldsLabels):
    """One HNSW field of one shard (module doc). Writes hold the shard's write lock, searches its read lock."""

    def __init__(self, spec: DenseFieldSpec, present: LabelMask | None = None) -> None:
        self.spec = spec
        self._present = present if present is not None else LabelMask()
        self._graphs: tuple[Graph, ...] = ()
        self._frozen: tuple[Block, ...] = ()
        self._growing = Block(spec.dim, SEAL_ROWS)
        self._next_id = 0  # the next graph file's id
        self._cond = threading.Condition()  # guards the threads' state below; writers wait on it for room
        self._pending = 0  # rows frozen and not yet sealed
        self._sealer: threading.Thread | None = None
        self._merger: threading.Thread | None = None
        self._filter_graphs = FilterGraphBuilder(
            spec, self._new_index, self._filter_graph_stopped, self._job, COPY_CHUNK, BUILD_THREADS
        )
        self._closing = False
        self._failures = 0  # seals failed in a row (writers stop waiting for room meanwhile)
        self._last_seal = time.monotonic()
        self._last_write = 0.0  # monotonic time of the last add: a plain float, set under the write lock
        self._recording: list[list[int]] = []  # per build in flight: labels deleted since it started
        self._lock: ReadWriteLock | None = None  # the shard's, once started (None: recovering, build in place)
        self._version = 0  # changes of the present labels or the graph set (``_changed``)
        self._inputs: hnsw_plan.FilterInputs | None = None  # the last read-only filter's plan inputs
        self.stats = JobStats()

    # ------------------------------------------------------------- lifecycle

    def start(self, lock: ReadWriteLock, stats: JobStats | None = None) -> None:
        """Serve: from now on seals and merges run in the background and swap under ``lock`` (the shard's)."""
        if stats is not None:
            self.stats = stats
        for graph in self._graphs:
            graph.mutable = False
        with self._cond:
            self._lock = lock
            self._filter_graphs.serve()
            if self._frozen:
                self._start("sealer")
            if len(self._graphs) > 1:
                self._start("merger")

    def close(self) -> None:
        """Stop the background threads (a running merge or filter graph build is abandoned at its next
        chunk) and wait for them.
        Never call it holding the shard's lock: a thread may be waiting for it to swap."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            threads = [self._sealer, self._merger, self._filter_graphs.close()]
        for thread in threads:
            if thread is not None and thread is not threading.current_thread():
                thread.join()

    # ------------------------------------------------------------------ writes

    def add(self, labels: np.ndarray, vectors: np.ndarray, stored: bool = False) -> None:
        """New vectors under fresh (ascending, larger than any held) labels go to the growing block;
        ``stored``: they already went through ``stored_form`` (outside the write lock)."""
        if not stored:
            vectors = self.stored_form(np.asarray(vectors, np.float32))
        self._last_write = time.monotonic()
        self._present.add(labels)
        self._changed()
        if len(labels) > self._growing.room():
            if self._growing.n:
                self._freeze(self._growing.view())
            self._growing = Block(self.spec.dim, max(SEAL_ROWS, len(labels)))
        self._growing.append(labels, vectors)
        if not self._growing.room():
            self._freeze(self._growing.view())
            self._growing = Block(self.spec.dim, SEAL_ROWS)

    def remove(self, label: int) -> bool:
        """Delete the label's vector; False when it has none here."""
        if not self._present.discard(label):
            return False
        self._changed()
        for graph in self._graphs:
            if graph.first <= label <= graph.top:
                if mark(graph.graph, label):
                    graph.dead += 1
                break
        for deleted in self._recording:
            deleted.append(label)
        return True

    def wait_for_room(self, timeout_s: float = ROOM_WAIT_S) -> None:
        """Block (holding no lock) while more than MAX_PENDING_ROWS rows wait for the sealer, or more
        than MAX_GRAPHS graphs for the merger: searches scan and walk a bounded number of parts."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._failures and (
                (self._pending > MAX_PENDING_ROWS and self._sealer is not None)
                or (len(self._graphs) > MAX_GRAPHS and self._merger is not None)
            ):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    return
                self._cond.wait(remaining)

    def stored_form(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the strand keeps and scores them: cosine ones normalised (as hnswlib would)."""
        if self.spec.metric is not Metric.COSINE:
            return vectors
        return vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + np.float32(1e-30))

    def _freeze(self, block: Block) -> None:
        with self._cond:
            self._frozen += (block,)
            self._pending += block.n
            if self._lock is None:
                if self._pending > MAX_PENDING_ROWS:
                    self._seal_in_place()
            else:
                self._start("sealer")

    # ------------------------------------------------------------------- reads

    def memory_bytes(self) -> int:
        """Estimated resident bytes: every graph (``hnsw_memory_bytes``), its vectors' copy, filter views
        and filter graphs, the frozen and growing blocks and the live-label mask."""
        total = self._present.mask.nbytes + self._growing.vectors.nbytes + self._growing.labels.nbytes
        total += sum(block.vectors.nbytes + block.labels.nbytes for block in self._frozen)
        spec = self.spec
        for graph in self._graphs:
            index = graph.graph
            total += hnsw_memory_bytes(index.get_max_elements(), index.get_current_count(), spec.dim, spec.hnsw.m)
            total += graph.vectors.nbytes + graph.labels.nbytes + graph.views.nbytes + graph.fgraphs.nbytes
        return total

    def segments(self) -> dict[str, int]:
        """For operators and tests: graphs (how many), and rows by part: sealed (in graphs, dead
        included), dead (deleted, still in a graph), frozen (waiting for the sealer), growing."""
        graphs, frozen = self._graphs, self._frozen
        return {
            "graphs": len(graphs),
            "sealed": sum(len(graph.labels) for graph in graphs),
            "dead": sum(graph.dead for graph in graphs),
            "frozen": sum(block.n for block in frozen),
            "growing": self._growing.n,
        }

    def vectors(self, labels: list[int]) -> np.ndarray:
        """The stored vectors of live labels (cosine ones normalised, as searches score them)."""
        out = np.empty((len(labels), self.spec.dim), np.float32)
        for i, label in enumerate(labels):
            out[i] = self._row(int(label))
        return out

    def _row(self, label: int) -> np.ndarray:
        for part in (*self._graphs, *self._frozen, self._growing.view()):
            labels = part.labels
            if len(labels) and labels[0] <= label <= labels[-1]:
                return part.vectors[int(np.searchsorted(labels, label))]
        raise KeyError(label)

    def search(self, queries: np.ndarray, k: int, ef: int, allowed: np.ndarray | None = None) -> list[Hit]:
        """k best live vectors of each query row, as (labels int64, scores float32) best first.

        ``allowed`` is a bool mask over labels (labels past its end are excluded); the
        planner (index/hnsw_plan.py) decides how each graph honours it. Every part ranks its
        own candidates, then scores its best ones the same exact way (``exact_scores``),
        so a document's score never depends on which part holds it.
        """
        queries = self.stored_form(np.asarray(queries, np.float32).reshape(-1, self.spec.dim))
        if self.live <= 0 or k <= 0:
            return [EMPTY for _ in range(len(queries))]
        inputs = self._filter_inputs(allowed) if allowed is not None else None
        parts: list[Hits | None] = []
        for graph in self._graphs:
            if graph.live > 0:
                parts.append(self._search_graph(graph, queries, k, ef, inputs))
        for block in (*self._frozen, self._growing.view()):
            if block.n:
                mask = inputs.anded if inputs is not None else self._present.mask
                parts.append(self._scan(block.labels, block.vectors, queries, k, inside(mask, block.labels)))
        found = [part for part in parts if part is not None]
        if not found:
            return [EMPTY for _ in range(len(queries))]
        return unpadded(found[0] if len(found) == 1 else best(k, found))

    def filtered_cost(self, allowed: np.ndarray, k: int, ef: int) -> float:
        """What ``search`` of one query with the filter ``allowed`` would cost, in the planner's
        unit (a row gathered and scanned), by the plans it would pick: the server asks before
        it runs a filtered search on its event loop. A mask computation, no search."""
        inputs = self._filter_inputs(allowed)
        cost = 0.0
        for graph in self._graphs:
            if graph.live > 0:
                window, known = inputs.window(graph)
                plan = hnsw_plan.graph_plan(graph, window, k, ef, remember=False, inputs=known)
                cost += plan.cost if plan is not None else 0.0
        return cost + sum(block.n for block in (*self._frozen, self._growing.view()))

    def _filter_inputs(self, allowed: np.ndarray) -> hnsw_plan.FilterInputs:
        """The plan inputs of the filter ``allowed``: kept for the last read-only mask while no
        vector or graph changes (a writable one may change under the same array)."""
        inputs = self._inputs
        if inputs is None or not inputs.holds(allowed, self._version):
            inputs = hnsw_plan.FilterInputs(allowed, self._present.mask, self._version)
            if not allowed.flags.writeable:
                self._inputs = inputs
        return inputs

    def _changed(self) -> None:
        """The present labels or the graph set changed (the caller excludes searches)."""
        self._version += 1
        self._inputs = None  # it holds graphs: a merged-away one must not stay in memory for it

    def _search_graph(
        self, graph: Graph, queries: np.ndarray, k: int, ef: int, inputs: hnsw_plan.FilterInputs | None
    ) -> Hits | None:
        """The graph's best k of each query (None: none allowed); one walk for the whole batch."""
        if inputs is None:
            want = min(max(k, ef), graph.live)
            found = walk(graph, queries, want)
            if found is None:  # hnswlib found fewer than `want` live neighbours: scan instead
                return self._scan(graph.labels, graph.vectors, queries, k, inside(self._present.mask, graph.labels))
            return self._rescored(graph, queries, found[:, : k + _SLACK], k)
        window, known = inputs.window(graph)
        plan = hnsw_plan.graph_plan(graph, window, k, ef, inputs=known)
        if plan is None:
            return None
        if plan.build:
            assert plan.key is not None
            self._filter_graphs.ask(graph, plan.key, plan.count)
        count, want, key = plan.count, plan.want, plan.view_key
        if plan.filter_graph is not None:  # every row of it matches: its best are the filter's
            found = walk_index(plan.filter_graph.index, queries, want)
            if found is not None:
                return self._rescored(graph, queries, found[:, : k + _SLACK], k)
            return self._scan_graph(graph, window, key, queries, k)
        if plan.kind == "scan":
            return self._scan_graph(graph, window, key, queries, k)
        found = walk(graph, queries, want)
        if found is None:  # the exact scan is always right
            return self._scan_graph(graph, window, key, queries, k)
        keep = inside(window, found - graph.first)
        # Each row's first k + _SLACK allowed labels, in walk order (a stable sort puts them first).
        first = np.argsort(~keep, axis=1, kind="stable")[:, : k + _SLACK]
        rows = np.arange(len(found))[:, None]
        labels = found[rows, first]
        labels[~keep[rows, first]] = PAD
        hits = self._rescored(graph, queries, labels, k, padded=True)
        short = np.flatnonzero(np.count_nonzero(keep, axis=1) < min(k, count))
        if len(short):  # those walks came back short: the exact scan is always right
            scanned = self._scan_graph(graph, window, key, queries[short], k)
            assert scanned is not None  # count > 0 rows are allowed
            hits[0][short], hits[1][short] = scanned
        return hits

    def _scan_graph(self, graph: Graph, window: np.ndarray, key: bytes | None, queries: np.ndarray, k: int) -> Hits:
        """Exact top k of each query over the graph's rows ``window`` (a mask from its first label)
        allows: from the filter's view (``key``); with no key (more rows than a view may hold), every
        row scored in place; else those rows gathered into one contiguous copy, kept as the view."""
        view = graph.views.get(key) if key is not None else None
        if view is not None:
            hits = self._scan(*view, queries, k, None)
        elif key is None:
            dense = graph.dense and len(window) == len(graph.labels)
            keep = window if dense else inside(window, graph.labels - graph.first)
            hits = self._scan(graph.labels, graph.vectors, queries, k, keep)
        else:
            rows = graph.rows(window)
            labels, vectors = graph.labels[rows], graph.vectors[rows]
            graph.views.put(key, labels, vectors)
            hits = self._scan(labels, vectors, queries, k, None)
        assert hits is not None  # the caller saw allowed rows
        return hits

    def _rescored(self, graph: Graph, queries: np.ndarray, labels: np.ndarray, k: int, padded: bool = False) -> Hits:
        """Best k of each query's candidate labels of the graph (B x c; PAD allowed with ``padded``) by exact score."""
        rows = np.searchsorted(graph.labels, labels)
        if padded:
            np.minimum(rows, len(graph.labels) - 1, out=rows)  # PAD's row: any row, its score is dropped
        return best_exact(self.spec.metric, queries, labels, graph.vectors[rows], k, padded)

    def _scan(
        self, labels: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int, keep: np.ndarray | None
    ) -> Hits | None:
        """Exact top k of each query over the rows ``keep`` allows (None: all of them); None when none is."""
        allowed = len(labels)
        if keep is not None:
            allowed = int(np.count_nonzero(keep))
            if allowed == 0:
                return None
            if allowed == len(labels):
                keep = None
            elif allowed < hnsw_plan.VIEW_COST * len(labels):  # few rows: copy them out rather than score them all
                labels, vectors, keep = labels[keep], vectors[keep], None
        if not len(labels):
            return None
        metric = Metric.DOT if self.spec.metric is Metric.COSINE else self.spec.metric  # queries are normalised
        # float32, one matrix product (a large one on two threads: index/split_scan.py): a first ranking
        scores = dot_rows(queries, vectors) if metric is Metric.DOT else score_rows(metric, queries, vectors)
        if keep is not None:  # scored in place (reading rows in order costs less than copying them)
            scores[:, ~keep] = -np.inf
        want = min(k + _SLACK, allowed)  # every row with a finite score is allowed
        if want < len(labels):
            top = top_columns(scores, want)
        else:
            top = np.broadcast_to(np.arange(len(labels)), (len(queries), len(labels)))
        return best_exact(self.spec.metric, queries, labels[top], vectors[top], k)

    # ------------------------------------------------------- sealing, merging

    def _start(self, which: str) -> None:
        """Start the sealer or the merger unless it runs (caller holds ``_cond``)."""
        if self._closing:
            return
        if which == "sealer" and self._sealer is None:
            self._sealer = background_thread(self._seal_loop, f"braid-seal-{self.spec.name}")
        elif which == "merger" and self._merger is None:
            self._merger = background_thread(self._merge_loop, f"braid-merge-{self.spec.name}")
        self._cond.notify_all()

    def _seal_loop(self) -> None:
        while True:
            with self._cond:
                if not self._frozen or self._closing:
                    self._sealer = None
                    self._cond.notify_all()
                    return
                if self._failures:  # back off after a failure: 1 s, 2 s, ... at most a minute
                    self._cond.wait(min(60.0, 2.0 ** (self._failures - 1)))
                    if self._closing:
                        continue
            ok = self._job("seal", self._seal)
            with self._cond:
                self._failures = 0 if ok else self._failures + 1
                self._last_seal = time.monotonic()
                self._cond.notify_all()  # writers waiting for room (they go on after a failure too)
                self._start("merger")

    def _merge_loop(self) -> None:
        while True:
            with self._cond:
                if self._closing:
                    self._merger = None
                    self._cond.notify_all()
                    return
                plan = hnsw_tiers.next_merge(self._graphs)
                if plan is None and hnsw_tiers.worth_one_graph(self._graphs):
                    idle = IDLE_MERGE_S - (time.monotonic() - max(self._last_seal, self._last_write))
                    if idle > 0 or self._sealer is not None:  # not yet quiet: look again then
                        self._cond.wait(max(idle, 0.05))
                        continue
                    plan = (0, len(self._graphs))
                if plan is None:
                    self._merger = None
                    self._cond.notify_all()
                    return
            if not self._job("merge", lambda plan=plan: self._merge(*plan)):
                with self._cond:  # a failed merge is tried again by the next seal, not in a loop
                    self._merger = None
                    self._cond.notify_all()
                    return

    def _job(self, kind: str, run: Callable[[], bool]) -> bool:
        started = time.perf_counter()
        try:
            done = run()
        except Exception:
            log.exception("HNSW %s of field %s failed; it is tried again later", kind, self.spec.name)
            self.stats.record(f"hnsw-{kind}", "failed", time.perf_counter() - started)
            return False
        self.stats.record(f"hnsw-{kind}", "ok" if done else "cancelled", time.perf_counter() - started)
        return True

    def _seal(self) -> bool:
        """Build every frozen block into one new graph and append it; False when closing stopped it."""

        def place(blocks: tuple[Block, ...], fresh: Graph) -> bool:
            self._graphs += (fresh,)
            self._frozen = self._frozen[len(blocks) :]
            return True

        blocks = self._rebuild(lambda: self._frozen, place)
        if blocks is not None:
            with self._cond:
                self._pending -= sum(block.n for block in blocks)
        return blocks is not None

    def _merge(self, start: int, end: int) -> bool:
        """Rebuild graphs[start:end] (adjacent) from their live rows into one; False when closing stopped it."""

        def place(inputs: tuple[Graph, ...], merged: Graph) -> bool:
            if self._graphs[start:end] != inputs:
                return False
            self._graphs = (*self._graphs[:start], merged, *self._graphs[end:])
            return True

        swapped = self._rebuild(lambda: self._graphs[start:end], place)
        with self._cond:
            self._cond.notify_all()  # writers waiting for the graph count to fall
        return swapped is not None

    def _rebuild(self, take: Callable[[], tuple], place: Callable[[tuple, Graph], bool]) -> tuple | None:
        """Build the live rows of the parts ``take`` picks (under the write lock) into one graph, off
        every lock; then, under the write lock again, mark in it the deletes made meanwhile and let
        ``place`` swap it in (False: its inputs changed). The parts it replaced; None when closing
        stopped it or ``place`` refused."""
        lock = self._lock
        assert lock is not None
        with lock.write():
            parts = take()
            deleted: list[int] = []
            self._recording.append(deleted)
        built, placed = None, False
        try:
            built = self._build(*live_rows(self._present.mask, parts))
        finally:
            with lock.write():
                self._recording = [r for r in self._recording if r is not deleted]  # by identity
                if built is not None and not self._closing:
                    built.install(deleted, self._present.mask)  # harmless when ``place`` then drops it
                    placed = place(parts, built)
                    self._changed()
        return parts if placed else None

    def _seal_in_place(self) -> None:
        """Recovery's seal (nothing searches yet): frozen rows go into the graph this recovery made,
        or a new one. Caller holds ``_cond``."""
        labels, vectors = live_rows(self._present.mask, self._frozen)
        newest = self._graphs[-1] if self._graphs else None
        if newest is not None and newest.mutable:
            index = newest.graph
            if len(labels):
                index.resize_index(index.get_current_count() + len(labels))
                index.add_items(vectors, labels, num_threads=-1)
            grown = Graph(index, np.concatenate([newest.labels, labels]), np.concatenate([newest.vectors, vectors]))
            grown.dead, grown.mutable = newest.dead, True
            self._graphs = (*self._graphs[:-1], grown)
        else:
            fresh = self._build(labels, vectors)
            fresh.mutable = True
            self._graphs += (fresh,)
        self._frozen, self._pending = (), 0
        self._changed()

    def _new_index(self, capacity: int) -> hnswlib.Index:
        """An empty hnswlib graph of this field's space and parameters for ``capacity`` rows."""
        spec = self.spec
        index = hnswlib.Index(space=SPACES[spec.metric], dim=spec.dim)
        index.init_index(max_elements=max(capacity, 1), M=spec.hnsw.m, ef_construction=spec.hnsw.ef_construction)
        # The index-wide ef stays tiny: a query raises its own beam by asking for more
        # neighbours (hnswlib searches with max(ef, k)); set_ef is state concurrent queries would race on.
        index.set_ef(1)
        return index

    def _build(self, labels: np.ndarray, vectors: np.ndarray) -> Graph:
        """A new graph of these rows, built off every lock in chunks (hnswlib releases the GIL while it
        inserts); stops early, unfinished, when the strand closes (the caller then drops it)."""
        index = self._new_index(len(labels))
        for start in range(0, len(labels), BUILD_CHUNK):
            if self._closing:
                break
            chunk = slice(start, start + BUILD_CHUNK)
            index.add_items(vectors[chunk], labels[chunk], num_threads=BUILD_THREADS)
        return Graph(index, labels, vectors)

    def _filter_graph_stopped(self, graph: Graph) -> bool:
        """A filter graph build of ``graph`` stops: the strand closes, or the graph was merged away."""
        return self._closing or graph not in self._graphs

    def wait_merged(self, timeout_s: float, settled: bool = False) -> bool:
        """Block until no rows are frozen (and, with ``settled``, no merge is due or running) or
        ``timeout_s`` passes; whether it got there. For benchmarks and tests."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while (self._frozen and self._sealer is not None) or (settled and self._merger is not None):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._frozen

    # ------------------------------------------------------------- persistence

    def save(self, directory: Path, previous: Path | None = None) -> None:
        """Write the strand into checkpoint ``directory`` (the shard holds writes off; searches and
        the threads go on): each graph once (linked from ``previous``, the last generation, while it
        is unchanged), the live frozen and growing rows, and ``<field>.hnsw.json``."""
        name = self.spec.name
        with self._lock.read() if self._lock is not None else contextlib.nullcontext():
            graphs, blocks = self._graphs, (*self._frozen, self._growing.view())  # a swap: both or neither
        files = []
        for graph in graphs:
            file = graph.file or f"{name}.g{self._next_id}.hnsw"
            if graph.file is None:
                self._next_id += 1
            if not _link(previous / file if previous is not None and graph.file else None, directory / file):
                hnswfile.save(graph.graph, directory / file, self.spec.dim)
            if not graph.mutable:  # a graph recovery may still grow is saved again next time
                graph.file = file
            files.append(file)
        labels, vectors = live_rows(self._present.mask, blocks)
        if len(labels):
            durable.write_npy(directory / f"{name}.rows.npy", vectors)
            durable.write_npy(directory / f"{name}.rows-labels.npy", labels)
        meta = {"format": FORMAT_VERSION, "graphs": files, "next_id": self._next_id}
        durable.write_bytes(directory / f"{name}.hnsw.json", dumps_checked(meta))

    @classmethod
    def load(cls, directory: Path, spec: DenseFieldSpec, present: list[int]) -> HnswStrand:
        """Open a checkpoint's strand; ``present`` lists the labels holding a live vector in this field."""
        strand = cls(spec, LabelMask(np.asarray(present, dtype=np.int64)))
        path = directory / f"{spec.name}.hnsw.json"
        meta = read_json(path)
        if meta is None:  # written before segments: one graph, or nothing yet
            legacy = directory / f"{spec.name}.hnsw"
            if legacy.exists():
                strand._graphs = (strand._load_graph(legacy),)
            return strand
        graphs = meta.get("graphs")
        if (
            meta.get("format") != FORMAT_VERSION
            or not isinstance(meta.get("next_id"), int)
            or not isinstance(graphs, list)
        ):
            raise DataLoss(f"{path}: unsupported format {meta.get('format')!r}, or no next_id or graphs")
        strand._next_id = meta["next_id"]
        for file in graphs:
            graph = strand._load_graph(directory / str(file))
            graph.file = str(file)
            strand._graphs += (graph,)
        rows = directory / f"{spec.name}.rows.npy"
        if rows.exists():
            vectors = np.load(rows, allow_pickle=False)
            labels = np.load(directory / f"{spec.name}.rows-labels.npy", allow_pickle=False)
            if vectors.shape != (len(labels), spec.dim) or labels.dtype != np.int64:
                raise DataLoss(f"{rows}: {vectors.shape} rows for {labels.shape} {labels.dtype} labels, dim {spec.dim}")
            for start in range(0, len(labels), SEAL_ROWS):
                block = Block.of(labels[start : start + SEAL_ROWS], vectors[start : start + SEAL_ROWS])
                strand._frozen += (block,)
                strand._pending += block.n
        return strand

    def _load_graph(self, path: Path) -> Graph:
        problem = hnswfile.check(path, self.spec.dim)  # hnswlib trusts its input: a cut file must not reach it
        if problem is not None:
            raise DataLoss(f"{path}: {problem}")
        index = hnswlib.Index(space=SPACES[self.spec.metric], dim=self.spec.dim)
        index.load_index(str(path))
        index.set_ef(1)
        labels, vectors = hnswfile.rows(path)  # dead rows keep their vectors: they are never scanned
        live = inside(self._present.mask, labels)
        for label in labels[~live].tolist():
            mark(index, label)  # deleted after the graph was saved (or before: already marked)
        graph = Graph(index, labels, vectors)
        graph.dead = int(np.count_nonzero(~live))
        return graph


def _link(source: Path | None, target: Path) -> bool:
    """Hard-link an unchanged checkpoint file into a new generation; False when it cannot be."""
    if source is None or not source.exists():
        return False
    try:
        os.link(source, target)
    except OSError:
        return False
    return True
