"""Plain counters and timings that index/ keeps for operators: no Prometheus here.

index/ never imports service/, so it only counts: small objects, cheap to update on the
write and search paths (a bisect and a short lock per observation). service/metrics.py
reads them when /metrics is scraped and exports them in Prometheus form.

- ``Histogram``: bucket counts, count and sum of observations (seconds, or a count);
- ``ShardStats``: what one shard measured (its WAL, checkpoints, merges, SPANN reads); it
  lives as long as the shard object, across reopens, so its counters only grow;
- ``SearchTrace``: per-strand timings of the searches of one call, recorded only while a
  caller set one (``tracing``): the slow-query log, and the stage spans of OpenTelemetry
  tracing (service/tracing.py), which also use the wall-clock starts kept here.
"""

from __future__ import annotations

import bisect
import contextlib
import contextvars
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

# Upper bounds (le) of histogram buckets; +Inf is implied.
FAST_SECONDS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
SLOW_SECONDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Histogram:
    """Counts of observations per bucket (not cumulative), their count and sum. Thread-safe."""

    __slots__ = ("_lock", "bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += 1
            self.count += 1
            self.sum += value

    def snapshot(self) -> tuple[list[int], int, float]:
        """(per-bucket counts, count, sum), consistent with each other."""
        with self._lock:
            return list(self.counts), self.count, self.sum


@dataclass
class WalStats:
    """A local write-ahead log's writes (index/wal.py): one append per write, fsyncs shared by group commit."""

    append_seconds: Histogram = field(default_factory=lambda: Histogram(FAST_SECONDS))
    fsync_seconds: Histogram = field(default_factory=lambda: Histogram(FAST_SECONDS))
    appended_bytes: int = 0


@dataclass
class SpannStats:
    """Posting-list reads of one SPANN field's sealed segments (index/spann.py)."""

    lists_read: int = 0
    bytes_read: int = 0
    lists_per_query: Histogram = field(default_factory=lambda: Histogram(COUNTS))  # per query and segment

    def read(self, lists: int, nbytes: int) -> None:
        self.lists_read += lists  # a lost increment under a race only undercounts: no lock on the search path
        self.bytes_read += nbytes


@dataclass
class JobStats:
    """Background jobs of one kind (checkpoints, merges): how many ended how, and how long the good ones took."""

    outcomes: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, outcome) -> count
    seconds: dict[str, Histogram] = field(default_factory=dict)  # kind -> durations of successful jobs
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, kind: str, outcome: str, seconds: float) -> None:
        with self._lock:
            self.outcomes[(kind, outcome)] = self.outcomes.get((kind, outcome), 0) + 1
            histogram = self.seconds.get(kind)
            if histogram is None:
                histogram = self.seconds[kind] = Histogram(SLOW_SECONDS)
        if outcome == "ok":
            histogram.observe(seconds)


@dataclass
class ShardStats:
    """Everything one shard measures; the shard hands the parts to its WAL, merger and SPANN strands."""

    wal: WalStats = field(default_factory=WalStats)
    checkpoints: JobStats = field(default_factory=JobStats)
    merges: JobStats = field(default_factory=JobStats)
    spann: dict[str, SpannStats] = field(default_factory=dict)  # SPANN field -> its reads
    # Documents written by writes applied since this process opened the shard (not by recovery's
    # replay): "upsert" counts every document of an upsert, "delete" every document a delete removed.
    written: dict[str, int] = field(default_factory=lambda: {"upsert": 0, "delete": 0})

    def count_written(self, op: str, documents: int) -> None:
        self.written[op] += documents  # under the shard's write lock: no lock of its own

    def spann_for(self, name: str) -> SpannStats:
        stats = self.spann.get(name)
        if stats is None:
            stats = self.spann[name] = SpannStats()
        return stats


# ----------------------------------------------------------------- search traces


@dataclass
class SearchTiming:
    """One search of a call: seconds per strand (summed over shards), then fusion and fetching hits.
    ``started_ns`` (wall clock) is when the search began, ``ended_ns`` when ``finish`` was called (0: never)."""

    strands: list[float] = field(default_factory=list)
    fusion_s: float = 0.0
    fetch_s: float = 0.0
    started_ns: int = field(default_factory=time.time_ns)
    ended_ns: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def finish(self, fusion_s: float, fetch_s: float) -> None:
        """Fusion and fetching took these seconds, and ended now."""
        self.fusion_s, self.fetch_s, self.ended_ns = fusion_s, fetch_s, time.time_ns()

    def add_strand(self, i: int, seconds: float) -> None:
        """Strand ``i`` ran ``seconds`` in one shard (shards may run in parallel threads)."""
        with self._lock:
            self.strands[i] += seconds


class SearchTrace:
    """The searches of one call, in order, and named stages (e.g. ``encode``); filled while ``tracing``."""

    def __init__(self) -> None:
        self.searches: list[SearchTiming] = []
        self.stages: dict[str, float] = {}
        self.stage_starts: dict[str, int] = {}  # name -> wall clock (ns) its first run began
        self._lock = threading.Lock()

    def search(self, strands: int) -> SearchTiming:
        """A new search of the call, with ``strands`` strands."""
        timing = SearchTiming([0.0] * strands)
        with self._lock:
            self.searches.append(timing)
        return timing

    def stage(self, name: str, seconds: float, started_ns: int | None = None) -> None:
        """Stage ``name`` ran ``seconds``, from ``started_ns`` (wall clock; None: it ended just now)."""
        if started_ns is None:
            started_ns = time.time_ns() - int(seconds * 1e9)
        with self._lock:
            self.stages[name] = self.stages.get(name, 0.0) + seconds
            self.stage_starts.setdefault(name, started_ns)


_trace: contextvars.ContextVar[SearchTrace | None] = contextvars.ContextVar("braid_search_trace", default=None)


def current_trace() -> SearchTrace | None:
    """The trace of the call this code runs for, or None (then nothing is timed)."""
    return _trace.get()


@contextlib.contextmanager
def tracing(trace: SearchTrace) -> Iterator[SearchTrace]:
    """Record the searches run inside the block (and in contexts copied from it) into ``trace``."""
    token = _trace.set(trace)
    try:
        yield trace
    finally:
        _trace.reset(token)


@contextlib.contextmanager
def timed_stage(name: str) -> Iterator[None]:
    """Add the block's duration to the current trace's stage ``name`` (nothing when not tracing)."""
    trace = _trace.get()
    if trace is None:
        yield
        return
    started, started_ns = time.perf_counter(), time.time_ns()
    try:
        yield
    finally:
        trace.stage(name, time.perf_counter() - started, started_ns)
