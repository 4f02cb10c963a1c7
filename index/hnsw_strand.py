"""The dense strand of an HNSW field in one shard: searches never wait for writes.

hnswlib cannot search a graph while it inserts into it (nmslib/hnswlib#562), so no
write ever touches a graph that searches read. The strand has three kinds of part:

* ``growing``: an appendable block of rows (labels ascending, float32 vectors in one
  contiguous array; cosine rows normalised as hnswlib stores them). A write copies its
  vectors in under the shard's write lock (microseconds); searches scan it exactly.
  At SEAL_ROWS rows it is frozen and a fresh block starts.
* ``frozen``: full growing blocks, immutable, scanned exactly until the maintainer
  merges them into the base.
* ``base``: one hnswlib graph over every older label, plus a contiguous copy of its
  vectors (the filter planner's exact scans read it: hnswlib hands vectors out only one
  label at a time). Searched without a lock of its own: the only change it sees is a
  delete mark, which writers set under the shard's write lock, which searches exclude by
  holding the read lock.

Labels only grow, so base labels < frozen labels < growing labels, each part sorted.

The maintainer (a thread per strand, alive while blocks are frozen) merges every frozen
block into a *copy* of the base, off every lock: searches keep reading the old base and
the frozen blocks, writes keep landing in the growing block. It then swaps the new
base in under the write lock and marks the deletes made meanwhile. Once deletes reach
TOMBSTONE_RATIO of the base, the merge builds the graph afresh from the live vectors
instead (compaction). Writers wait, before they log anything or take a lock, while more
than MAX_PENDING_ROWS rows are frozen: ingest slows to what the maintainer builds and
searches scan a bounded number of rows exactly. During recovery (before ``start``) there
are no searches, so frozen blocks are merged into the base in place, in the replaying
thread.

Search (``search``), one query batch: the base's graph walk, an exact scan of each
frozen and growing block, and the best k of them. With a filter (a bool mask over
labels), the planner picks per part, from the number of matching live labels ``count``:
an exact scan of just those rows from the contiguous vectors when ``count`` is below
what the walk would visit (WALK_COST per candidate asked for), else an unfiltered walk
asking for enough candidates that about ``ef`` of them should match (the beam an
unfiltered search gets), filtered afterwards (a query row left with fewer than k matches is scanned exactly). No Python
callback runs per visited node.

In a checkpoint generation directory (``save`` / ``load``)::

    <field>.g<id>.hnsw       the base graph (hnswlib's serialisation, checked by index/hnswfile.py).
                             Named once and never rewritten: while the base is unchanged a later
                             checkpoint hard-links the file from the previous generation.
    <field>.rows.npy         the live frozen and growing rows' vectors (float32, n x dim; absent when none)
    <field>.rows-labels.npy  their labels (int64, ascending)
    <field>.hnsw.json        {"format": 1, "base": "<field>.g<id>.hnsw" | null, "next_id": N, "crc32"}

A checkpoint written before segments (a single ``<field>.hnsw``, no ``.hnsw.json``) loads
as the base. Delete marks are not part of the files: ``load`` marks every label of the
graph that ``present`` (the checkpoint's live labels with a vector) leaves out.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import threading
import time
from pathlib import Path

import hnswlib
import numpy as np

from . import durable, hnswfile
from .dense import hnsw_memory_bytes, score_rows, top_indices
from .errors import DataLoss
from .labelmask import LabelMask
from .locks import ReadWriteLock
from .manifest import dumps_checked, read_json
from .schema import DenseFieldSpec, Metric
from .stats import JobStats

log = logging.getLogger("braid.hnsw")

FORMAT_VERSION = 1
SEAL_ROWS = 2048  # a growing block this full is frozen; an exact scan of it costs about one graph walk
MAX_PENDING_ROWS = 8 * SEAL_ROWS  # writers wait while more rows than this are frozen
TOMBSTONE_RATIO = 0.25  # a base with this share of its labels deleted is rebuilt from its live vectors
WALK_COST = 8.0  # a graph walk asking for n candidates costs about as much as scanning WALK_COST x n rows
_SLACK = 4  # candidates past k that get exact scores: the first ranking may round differently
ROOM_WAIT_S = 60.0  # a writer waits at most this long for the maintainer before it goes on anyway
# Cosine rows are normalised here, once (``_stored_form``), and searched as inner products: a
# cosine-space graph would normalise them again and store slightly different floats.
_SPACES = {Metric.COSINE: "ip", Metric.DOT: "ip", Metric.L2: "l2"}
Hit = tuple[np.ndarray, np.ndarray]
_EMPTY: Hit = (np.empty(0, np.int64), np.empty(0, np.float32))


class _Block:
    """Rows of the strand outside the base: labels ascending, vectors row by row."""

    __slots__ = ("labels", "n", "vectors")

    def __init__(self, dim: int, capacity: int) -> None:
        self.labels = np.empty(capacity, np.int64)
        self.vectors = np.empty((capacity, dim), np.float32)
        self.n = 0

    @classmethod
    def of(cls, labels: np.ndarray, vectors: np.ndarray) -> _Block:
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

    def view(self) -> _Block:
        """The rows so far, immutable from here on (appends only write past them)."""
        return _Block.of(self.labels[: self.n], self.vectors[: self.n])


class _Base:
    """The strand's graph: every label it holds (ascending) and their vectors in the same order."""

    __slots__ = ("dead", "file", "graph", "labels", "vectors")

    def __init__(self, graph: hnswlib.Index, labels: np.ndarray, vectors: np.ndarray, file: str | None) -> None:
        self.graph = graph
        self.labels = labels
        self.vectors = vectors
        self.file = file  # its checkpoint file once it has one (immutable, so later checkpoints link it)
        self.dead = 0  # labels of the graph marked deleted

    @property
    def top(self) -> int:
        return int(self.labels[-1]) if len(self.labels) else -1

    @property
    def live(self) -> int:
        return len(self.labels) - self.dead


class HnswStrand:
    """One HNSW field of one shard (module doc). Writes hold the shard's write lock, searches its read lock."""

    def __init__(self, spec: DenseFieldSpec, present: LabelMask | None = None) -> None:
        self.spec = spec
        self._present = present if present is not None else LabelMask()
        self._base: _Base | None = None
        self._frozen: tuple[_Block, ...] = ()
        self._growing = _Block(spec.dim, SEAL_ROWS)
        self._next_id = 0  # the next base file's id
        self._cond = threading.Condition()  # guards the maintainer's state below; writers wait on it for room
        self._pending = 0  # rows frozen and not yet merged
        self._thread: threading.Thread | None = None
        self._closing = False
        self._failures = 0  # merges failed in a row (writers stop waiting for room meanwhile)
        self._merge_deletes: list[int] | None = None  # labels deleted while a merge builds
        self._lock: ReadWriteLock | None = None  # the shard's, once started (None: recovering, merge in place)
        self.stats = JobStats()

    # ------------------------------------------------------------- lifecycle

    def start(self, lock: ReadWriteLock, stats: JobStats | None = None) -> None:
        """Serve: from now on merges run in the background and swap under ``lock`` (the shard's)."""
        if stats is not None:
            self.stats = stats
        with self._cond:
            self._lock = lock
            if self._frozen:
                self._start_maintainer()

    def close(self) -> None:
        """Stop the maintainer (a running merge is abandoned) and wait for it. Never call it
        holding the shard's lock: the maintainer may be waiting for it to swap."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # ------------------------------------------------------------------ writes

    def add(self, labels: np.ndarray, vectors: np.ndarray, stored: bool = False) -> None:
        """New vectors under fresh (ascending, larger than any held) labels go to the growing block;
        ``stored``: they already went through ``stored_form`` (outside the write lock)."""
        if not stored:
            vectors = self.stored_form(np.asarray(vectors, np.float32))
        self._present.add(labels)
        if len(labels) > self._growing.room():
            if self._growing.n:
                self._freeze(self._growing.view())
            self._growing = _Block(self.spec.dim, max(SEAL_ROWS, len(labels)))
        self._growing.append(labels, vectors)
        if not self._growing.room():
            self._freeze(self._growing.view())
            self._growing = _Block(self.spec.dim, SEAL_ROWS)

    def remove(self, label: int) -> bool:
        """Delete the label's vector; False when it has none here."""
        if not self._present.discard(label):
            return False
        base = self._base
        if base is not None and label <= base.top and _mark(base.graph, label):
            base.dead += 1
        if self._merge_deletes is not None:
            self._merge_deletes.append(label)
        return True

    def wait_for_room(self, timeout_s: float = ROOM_WAIT_S) -> None:
        """Block (holding no lock) while more than MAX_PENDING_ROWS rows wait for the maintainer."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending > MAX_PENDING_ROWS and self._thread is not None and not self._failures:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closing:
                    return
                self._cond.wait(remaining)

    def stored_form(self, vectors: np.ndarray) -> np.ndarray:
        if self.spec.metric is not Metric.COSINE:
            return vectors
        return vectors / (np.linalg.norm(vectors, axis=1, keepdims=True) + np.float32(1e-30))  # as hnswlib does

    def _freeze(self, block: _Block) -> None:
        with self._cond:
            self._frozen += (block,)
            self._pending += block.n
            if self._lock is None:
                if self._pending > MAX_PENDING_ROWS:
                    self._merge_in_place()
            else:
                self._start_maintainer()

    # ------------------------------------------------------------------- reads

    def has(self, label: int) -> bool:
        return label in self._present

    def present_labels(self) -> np.ndarray:
        return self._present.labels()

    @property
    def live(self) -> int:
        return self._present.count

    def memory_bytes(self) -> int:
        """Estimated resident bytes: the base graph (``hnsw_memory_bytes``) and its vectors' copy,
        the frozen and growing blocks and the live-label mask."""
        total = self._present.mask.nbytes + self._growing.vectors.nbytes + self._growing.labels.nbytes
        total += sum(block.vectors.nbytes + block.labels.nbytes for block in self._frozen)
        base = self._base
        if base is not None:
            graph = base.graph
            spec = self.spec
            total += hnsw_memory_bytes(graph.get_max_elements(), graph.get_current_count(), spec.dim, spec.hnsw.m)
            total += base.vectors.nbytes + base.labels.nbytes
        return total

    def segments(self) -> dict[str, int]:
        """Rows in each kind of part (for operators and tests): base, frozen, growing, dead."""
        base = self._base
        return {
            "base": 0 if base is None else len(base.labels),
            "dead": 0 if base is None else base.dead,
            "frozen": sum(block.n for block in self._frozen),
            "growing": self._growing.n,
        }

    def vectors(self, labels: list[int]) -> np.ndarray:
        """The stored vectors of live labels (cosine ones normalised, as searches score them)."""
        out = np.empty((len(labels), self.spec.dim), np.float32)
        for i, label in enumerate(labels):
            out[i] = self._row(int(label))
        return out

    def _row(self, label: int) -> np.ndarray:
        base = self._base
        if base is not None and label <= base.top:
            return base.vectors[int(np.searchsorted(base.labels, label))]
        for block in (*self._frozen, self._growing.view()):
            if block.n and label <= block.labels[-1]:
                return block.vectors[int(np.searchsorted(block.labels, label))]
        raise KeyError(label)

    def search(self, queries: np.ndarray, k: int, ef: int, allowed: np.ndarray | None = None) -> list[Hit]:
        """k best live vectors of each query row, as (labels int64, scores float32) best first.

        ``allowed`` is a bool mask over labels (labels past its end are excluded); the
        planner in the module doc decides how each part honours it. Every part ranks its
        own candidates, then scores its best ones the same exact way (``_exact_scores``),
        so a document's score never depends on which part holds it.
        """
        queries = self.stored_form(np.asarray(queries, np.float32).reshape(-1, self.spec.dim))
        if self.live <= 0 or k <= 0:
            return [_EMPTY for _ in range(len(queries))]
        present = self._present.mask
        if allowed is not None:
            size = min(len(allowed), len(present))
            allowed = allowed[:size] & present[:size]
        parts: list[list[Hit]] = []
        base = self._base
        if base is not None and base.live > 0:
            parts.append(self._search_base(base, queries, k, ef, allowed))
        for block in (*self._frozen, self._growing.view()):
            if block.n:
                mask = allowed if allowed is not None else present
                parts.append(self._scan(block.labels, block.vectors, queries, k, _inside(mask, block.labels)))
        if len(parts) == 1:
            return parts[0]
        return [_best(k, [part[i] for part in parts]) for i in range(len(queries))]

    def _search_base(self, base: _Base, queries: np.ndarray, k: int, ef: int, allowed: np.ndarray | None) -> list[Hit]:
        if allowed is None:
            want = min(max(k, ef), base.live)
            found = self._walk(base, queries, want)
            if found is None:  # hnswlib found fewer than `want` live neighbours: scan instead
                return self._scan(base.labels, base.vectors, queries, k, _inside(self._present.mask, base.labels))
            return [
                self._rescored(base, query, labels[: k + _SLACK], k)
                for query, labels in zip(queries, found, strict=True)
            ]
        window = allowed[: base.top + 1]
        count = int(np.count_nonzero(window))
        if count == 0:
            return [_EMPTY for _ in range(len(queries))]
        # As many candidates as keep about ef matching ones: the beam an unfiltered search gets.
        want = min(base.live, math.ceil(max(k, ef) * base.live / count))
        if count <= WALK_COST * want:  # scanning the matching rows costs less than the walk
            return self._scan_rows(base, queries, k, self._base_rows(base, window))
        found = self._walk(base, queries, want)
        out: list[Hit] = []
        rows = None
        for i, query in enumerate(queries):
            if found is not None:
                labels = found[i]
                labels = labels[_inside(window, labels)]
                if len(labels) >= min(k, count):
                    out.append(self._rescored(base, query, labels[: k + _SLACK], k))
                    continue
            if rows is None:  # the walk came back short: the exact scan is always right
                rows = self._base_rows(base, window)
            out.append(self._scan_rows(base, query[None, :], k, rows)[0])
        return out

    @staticmethod
    def _walk(base: _Base, queries: np.ndarray, want: int) -> list[np.ndarray] | None:
        """The graph's ``want`` nearest labels of each query, nearest first; None when it cannot find that many."""
        try:
            # A batch spreads over every core (hnswlib releases the GIL); one query stays on this thread.
            labels, _ = base.graph.knn_query(queries, k=want, num_threads=-1 if len(queries) > 1 else 1)
        except RuntimeError:
            return None
        return list(labels.astype(np.int64))

    def _rescored(self, base: _Base, query: np.ndarray, labels: np.ndarray, k: int) -> Hit:
        rows = np.searchsorted(base.labels, labels)
        return _best_exact(self.spec.metric, query, labels, base.vectors[rows], k)

    @staticmethod
    def _base_rows(base: _Base, mask: np.ndarray) -> np.ndarray:
        """Rows of the base whose labels the mask allows."""
        return np.searchsorted(base.labels, np.flatnonzero(mask[: base.top + 1]))

    def _scan_rows(self, base: _Base, queries: np.ndarray, k: int, rows: np.ndarray) -> list[Hit]:
        return self._scan(base.labels[rows], base.vectors[rows], queries, k, None)

    def _scan(
        self, labels: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int, keep: np.ndarray | None
    ) -> list[Hit]:
        """Exact top k of each query over the rows ``keep`` allows (None: all of them)."""
        if keep is not None:
            if not keep.any():
                return [_EMPTY for _ in range(len(queries))]
            if not keep.all():
                labels, vectors = labels[keep], vectors[keep]
        if not len(labels):
            return [_EMPTY for _ in range(len(queries))]
        metric = Metric.DOT if self.spec.metric is Metric.COSINE else self.spec.metric  # queries are normalised
        out = []
        for query, scores in zip(queries, score_rows(metric, queries, vectors), strict=True):
            top = top_indices(scores, k + _SLACK)
            out.append(_best_exact(self.spec.metric, query, labels[top], vectors[top], k))
        return out

    # --------------------------------------------------------------- merging

    def _start_maintainer(self) -> None:
        """Caller holds ``_cond``."""
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._maintain, name=f"braid-hnsw-{self.spec.name}", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    def _maintain(self) -> None:
        while True:
            with self._cond:
                if not self._frozen or self._closing:
                    self._thread = None
                    self._cond.notify_all()
                    return
                if self._failures:  # back off after a failure: 1 s, 2 s, ... at most a minute
                    self._cond.wait(min(60.0, 2.0 ** (self._failures - 1)))
                    if self._closing:
                        continue
            started = time.perf_counter()
            try:
                merged = self._merge_in_background()
            except Exception:
                log.exception("merging frozen rows of field %s failed; it is tried again", self.spec.name)
                self.stats.record("hnsw-merge", "failed", time.perf_counter() - started)
                with self._cond:
                    self._failures += 1
                    self._cond.notify_all()  # writers waiting for room go on
                continue
            self.stats.record("hnsw-merge", "ok" if merged else "cancelled", time.perf_counter() - started)
            with self._cond:
                self._failures = 0

    def _merge_in_background(self) -> bool:
        """One merge of every frozen block into a copy of the base; False when closing stopped it."""
        lock = self._lock
        assert lock is not None
        with lock.write():
            base, blocks = self._base, self._frozen
            self._merge_deletes = []
        try:
            fresh = self._build(base, blocks, copy_base=True)
        except BaseException:
            with lock.write():
                self._merge_deletes = None
            raise
        with lock.write():
            deleted, self._merge_deletes = self._merge_deletes, None
            if self._closing:
                return False
            self._install(fresh, deleted)
            self._frozen = self._frozen[len(blocks) :]
        with self._cond:
            self._pending -= sum(block.n for block in blocks)
            self._cond.notify_all()
        return True

    def _merge_in_place(self) -> None:
        """Recovery's merge (no searches run yet): the frozen blocks go straight into the base graph.
        Caller holds ``_cond``."""
        fresh = self._build(self._base, self._frozen, copy_base=False)
        self._install(fresh, [])
        self._frozen, self._pending = (), 0

    def _build(self, base: _Base | None, blocks: tuple[_Block, ...], copy_base: bool) -> _Base:
        """A base holding ``base``'s graph plus the live rows of ``blocks`` (no lock held)."""
        present = self._present.mask
        keep = [_inside(present, block.labels) for block in blocks]
        labels = np.concatenate([block.labels[m] for block, m in zip(blocks, keep, strict=True)] or [_EMPTY[0]])
        vectors = np.concatenate(
            [block.vectors[m] for block, m in zip(blocks, keep, strict=True)]
            or [np.empty((0, self.spec.dim), np.float32)]
        )
        if base is None or base.dead > TOMBSTONE_RATIO * len(base.labels):
            if base is not None:  # compaction: the live rows of the base first, then the new ones
                live = _inside(present, base.labels)
                labels = np.concatenate([base.labels[live], labels])
                vectors = np.concatenate([base.vectors[live], vectors])
            graph = self._new_graph(len(labels))
            if len(labels):
                graph.add_items(vectors, labels, num_threads=-1)
            return _Base(graph, labels, vectors, None)
        graph = copy.deepcopy(base.graph) if copy_base else base.graph
        if len(labels):
            graph.resize_index(graph.get_current_count() + len(labels))
            graph.add_items(vectors, labels, num_threads=-1)
        return _Base(graph, np.concatenate([base.labels, labels]), np.concatenate([base.vectors, vectors]), None)

    def _install(self, fresh: _Base, deleted: list[int] | None) -> None:
        """Make ``fresh`` the base (caller excludes searches), marking the labels deleted while it
        was built, and count its dead labels."""
        top = fresh.top
        for label in deleted or ():
            if label <= top:
                _mark(fresh.graph, label)
        fresh.dead = len(fresh.labels) - int(np.count_nonzero(_inside(self._present.mask, fresh.labels)))
        self._base = fresh

    def _new_graph(self, capacity: int) -> hnswlib.Index:
        spec = self.spec
        graph = hnswlib.Index(space=_SPACES[spec.metric], dim=spec.dim)
        graph.init_index(max_elements=max(capacity, 1), M=spec.hnsw.m, ef_construction=spec.hnsw.ef_construction)
        # The index-wide ef stays tiny: a query raises its own beam by asking for more
        # neighbours (hnswlib searches with max(ef, k)); set_ef is state concurrent queries would race on.
        graph.set_ef(1)
        return graph

    def wait_merged(self, timeout_s: float) -> bool:
        """Block until no rows are frozen (True) or ``timeout_s`` passes (False). For benchmarks and tests."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._frozen and self._thread is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return not self._frozen

    # ------------------------------------------------------------- persistence

    def save(self, directory: Path, previous: Path | None = None) -> None:
        """Write the strand into checkpoint ``directory`` (the shard holds writes off; searches and
        the maintainer go on): the base graph once (linked from ``previous``, the last generation,
        while it is unchanged), the live frozen and growing rows, and ``<field>.hnsw.json``."""
        name = self.spec.name
        with self._lock.read() if self._lock is not None else contextlib.nullcontext():
            base, blocks = self._base, (*self._frozen, self._growing.view())  # one merge's swap: both or neither
        meta: dict = {"format": FORMAT_VERSION, "base": None}
        if base is not None:
            file = base.file or f"{name}.g{self._next_id}.hnsw"
            if base.file is None:
                self._next_id += 1
            if not _link(previous / file if previous is not None and base.file else None, directory / file):
                hnswfile.save(base.graph, directory / file, self.spec.dim)
            base.file = meta["base"] = file
        meta["next_id"] = self._next_id
        present = self._present.mask
        keep = [_inside(present, block.labels) for block in blocks]
        labels = np.concatenate([block.labels[m] for block, m in zip(blocks, keep, strict=True)])
        if len(labels):
            vectors = np.concatenate([block.vectors[m] for block, m in zip(blocks, keep, strict=True)])
            durable.write_npy(directory / f"{name}.rows.npy", vectors)
            durable.write_npy(directory / f"{name}.rows-labels.npy", labels)
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
                strand._install(strand._load_graph(legacy), None)
            return strand
        if meta.get("format") != FORMAT_VERSION or not isinstance(meta.get("next_id"), int):
            raise DataLoss(f"{path}: unsupported format {meta.get('format')!r} or no next_id")
        strand._next_id = meta["next_id"]
        if meta.get("base"):
            base = strand._load_graph(directory / str(meta["base"]))
            base.file = str(meta["base"])
            strand._install(base, None)
        rows = directory / f"{spec.name}.rows.npy"
        if rows.exists():
            vectors = np.load(rows, allow_pickle=False)
            labels = np.load(directory / f"{spec.name}.rows-labels.npy", allow_pickle=False)
            if vectors.shape != (len(labels), spec.dim) or labels.dtype != np.int64:
                raise DataLoss(f"{rows}: {vectors.shape} rows for {labels.shape} {labels.dtype} labels, dim {spec.dim}")
            for start in range(0, len(labels), SEAL_ROWS):
                block = _Block.of(labels[start : start + SEAL_ROWS], vectors[start : start + SEAL_ROWS])
                strand._frozen += (block,)
                strand._pending += block.n
        return strand

    def _load_graph(self, path: Path) -> _Base:
        problem = hnswfile.check(path, self.spec.dim)  # hnswlib trusts its input: a cut file must not reach it
        if problem is not None:
            raise DataLoss(f"{path}: {problem}")
        graph = hnswlib.Index(space=_SPACES[self.spec.metric], dim=self.spec.dim)
        graph.load_index(str(path))
        graph.set_ef(1)
        labels = np.sort(np.asarray(graph.get_ids_list(), np.int64))
        live = _inside(self._present.mask, labels)
        # hnswlib hands out no vector of a label marked deleted; dead rows are never scanned, so zeros do.
        vectors = np.zeros((len(labels), self.spec.dim), np.float32)
        if live.any():
            vectors[live] = np.asarray(graph.get_items(labels[live], return_type="numpy"), np.float32)
        for label in labels[~live].tolist():
            _mark(graph, label)  # deleted after the graph was saved (or before: already marked)
        return _Base(graph, labels, vectors, None)


def _inside(mask: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """mask[labels], False for labels past the mask's end."""
    if not len(labels):
        return np.zeros(0, bool)
    if int(labels.max()) < len(mask):
        return mask[labels]
    out = np.zeros(len(labels), bool)
    inside = labels < len(mask)
    out[inside] = mask[labels[inside]]
    return out


def _mark(graph: hnswlib.Index, label: int) -> bool:
    """Mark a label of the graph deleted; False when it already was (or is not in the graph)."""
    try:
        graph.mark_deleted(int(label))
    except RuntimeError:
        return False
    return True


def _link(source: Path | None, target: Path) -> bool:
    """Hard-link an unchanged checkpoint file into a new generation; False when it cannot be."""
    if source is None or not source.exists():
        return False
    try:
        os.link(source, target)
    except OSError:
        return False
    return True


def _exact_scores(metric: Metric, query: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Scores of one query against a few stored vectors, computed the same way whatever part
    holds them (float64, a pairwise sum along each row): BLAS and hnswlib's SIMD round
    differently for different batch shapes, and results must not depend on the shard count."""
    rows = vectors.astype(np.float64)
    q = query.astype(np.float64)
    if metric is Metric.L2:
        return -np.sqrt(((rows - q) ** 2).sum(axis=1))
    return (rows * q).sum(axis=1)


def _best_exact(metric: Metric, query: np.ndarray, labels: np.ndarray, vectors: np.ndarray, k: int) -> Hit:
    scores = _exact_scores(metric, query, vectors).astype(np.float32)
    order = np.lexsort((labels, -scores))[:k]
    return labels[order], scores[order]


def _best(k: int, hits: list[Hit]) -> Hit:
    """Best k of several parts' hits (their labels are disjoint)."""
    labels = np.concatenate([h[0] for h in hits])
    scores = np.concatenate([h[1] for h in hits])
    order = np.lexsort((labels, -scores))[:k]
    return labels[order], scores[order].astype(np.float32)
