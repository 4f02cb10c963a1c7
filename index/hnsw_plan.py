"""The filter planner's cost model for an HNSW strand's graphs (index/hnsw_strand.py searches by it).

With a filter (a bool mask over labels), the planner picks per graph, from the number ``count``
of matching live labels in it (share = count / live) and three costs in one unit, a row
gathered and scanned:

* a **view scan**, VIEW_COST a row: when a search with the same filter (the same matching
  rows) made a filter view of the graph (index/hnsw_views.py), a contiguous copy of exactly
  those rows, the scan reads it in place (gathering scattered rows is bound by memory latency,
  about 4x reading them in order);
* a **gather scan**, 1 a row: the matching rows copied out of the graph's contiguous vectors
  (``label - first`` is the row when the graph's labels have no gap), then one matrix product;
  the copy is kept as the filter's view when it fits the graph's view budget (a quarter of its
  rows); a filter keeping more than that is scanned in place instead, VIEW_COST a row of the
  graph (every row scored, the others' scores dropped: reading in order costs less);
* a **walk**, WALK_COST a candidate: an unfiltered walk asking for ``oversample(share)`` x ef /
  share candidates (so that E[matches] >= ef), filtered afterwards; the queries left with
  fewer than k matches are scanned exactly, together.

* a **filter graph walk**, WALK_COST a candidate: when the filter's own graph was built
  (index/hnsw_filter_graphs.py), a walk of it asking for ``filter_graph_beam(share)`` x ef
  candidates, every one a match.

The cheapest wins; a filter seen before whose walk costs more than its view would gets the
view made now (the gather once, then view scans). A filter of at least MIN_ROWS rows whose
graph would cost at most FILTER_GRAPH_GAIN of the cheapest other plan is counted, and its
graph built in the background once it has come BUILD_AFTER times. Both scans are exact; the
walks keep recall@10 inside the filter >= 0.95 (``oversample``, ``filter_graph_beam``).

Every name here is looked up at call time (the strand reads ``hnsw_plan.VIEW_COST``, not a
copy), so tests and benchmarks set the costs on this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .hnsw_filter_graphs import FilterGraph
from .hnsw_parts import Graph

WALK_COST = (
    14.0  # a graph walk asking for n candidates costs about as much as gathering and scanning WALK_COST x n rows
)
VIEW_COST = 0.25  # scanning a contiguous filter view costs this much a row, against gathering the rows first
# A filter graph is built only when walking it would cost at most this share of the plan it replaces
# (a build takes a core for seconds: 20-25 s for 30,000 x 384 on the benchmark machine).
FILTER_GRAPH_GAIN = 0.45


@dataclass(frozen=True, slots=True)
class Plan:
    """How one graph honours a filter: ``kind`` "scan" (the rows ``view_key`` names, from their view
    or gathered into it; with no view key, every row in place), "walk" (``want`` candidates of
    the whole graph, filtered afterwards) or "filter graph" (``want`` of ``filter_graph``); ``count``
    rows match; ``cost`` in rows gathered and scanned; ``build``: the strand should build this
    filter's graph (``key``) in the background."""

    kind: str
    count: int
    want: int
    cost: float
    key: bytes | None
    view_key: bytes | None
    filter_graph: FilterGraph | None = None
    build: bool = False


def graph_plan(
    graph: Graph,
    window: np.ndarray,
    k: int,
    ef: int,
    remember: bool = True,
    inputs: tuple[int, bytes | None] | None = None,
) -> Plan | None:
    """How a graph honours a filter (``window``: its rows' mask from its first label), or None
    when no row matches. A filter keeping more rows than a view may hold (a quarter of the
    graph's) is scanned in place: reading every row in order costs less than gathering that many.
    Without ``remember`` (an estimate) the filter is not counted as seen by the view table nor
    towards its filter graph. ``inputs``: ``window_inputs`` of this window, when known."""
    count, key = inputs if inputs is not None else window_inputs(graph, window)
    if count == 0:
        return None
    want, walk_cost = walk_plan(count, graph.live, k, ef)
    views, fgraphs = graph.views, graph.fgraphs
    view_key = key if views.fits(count) else None
    view = views.get(view_key) if view_key is not None else None
    if view is not None:
        scan_cost = VIEW_COST * count
    elif view_key is None:
        scan_cost = VIEW_COST * len(graph.labels)
    else:
        scan_cost = count
    best = min(scan_cost, walk_cost)
    build = False
    if key is not None and fgraphs.fits(count):
        graph_want, graph_cost = filter_graph_plan(count, graph.live, k, ef)
        built = fgraphs.get(key)
        if built is not None and graph_cost < best:
            return Plan("filter graph", count, graph_want, graph_cost, key, view_key, built)
        # Worth a build only when it would cost at most FILTER_GRAPH_GAIN of the cheapest other plan
        cheapest = min(best, VIEW_COST * count) if view_key is not None else best
        build = built is None and remember and graph_cost <= FILTER_GRAPH_GAIN * cheapest and fgraphs.count(key, count)
    if scan_cost <= walk_cost:
        return Plan("scan", count, want, scan_cost, key, view_key, build=build)
    seen = views.repeated if remember else views.seen
    if view is None and view_key is not None and VIEW_COST * count <= walk_cost and seen(view_key):
        # the walk costs more than the view would: gather the rows now, scan the view from the next search on
        return Plan("scan", count, want, scan_cost, key, view_key, build=build)
    return Plan("walk", count, want, walk_cost, key, view_key, build=build)


def window_inputs(graph: Graph, window: np.ndarray) -> tuple[int, bytes | None]:
    """What a plan reads of a filter's window over a graph: how many rows match, and the filter's
    key (for its view or filter graph; None when it fits neither)."""
    count = int(np.count_nonzero(window))
    views, fgraphs = graph.views, graph.fgraphs
    return count, views.key(window) if count and (views.fits(count) or fgraphs.fits(count)) else None


class FilterInputs:
    """One filter's plan inputs in one strand: its mask ANDed with the strand's present labels
    (``anded``, read-only) and, per graph, its window with ``window_inputs``. The strand keeps the
    last one it made for a read-only mask (the shard keeps a filter's mask, read-only, until the
    next write: index/shard/indexes.py) while its vectors and graphs stay the same (``version``),
    so a repeated filter's search, and the server's estimate before it, plan without work
    proportional to the collection (a million labels ANDed, counted and packed: about
    0.16 ms a plan here, and a filtered search plans twice)."""

    __slots__ = ("_windows", "allowed", "anded", "version")

    def __init__(self, allowed: np.ndarray, present: np.ndarray, version: int) -> None:
        self.allowed = allowed
        self.version = version
        size = min(len(allowed), len(present))  # labels past either mask's end are in neither
        self.anded = allowed[:size] & present[:size]
        self.anded.flags.writeable = False
        self._windows: dict[Graph, tuple[np.ndarray, tuple[int, bytes | None]]] = {}  # by identity

    def holds(self, allowed: np.ndarray, version: int) -> bool:
        """Whether these are the inputs of ``allowed`` (the same array) at ``version``."""
        return self.allowed is allowed and self.version == version

    def window(self, graph: Graph) -> tuple[np.ndarray, tuple[int, bytes | None]]:
        """The window of ``graph`` (from its first label) and its ``window_inputs``."""
        found = self._windows.get(graph)
        if found is None:
            window = self.anded[graph.first : graph.top + 1]
            found = self._windows[graph] = (window, window_inputs(graph, window))
        return found


def filter_graph_plan(count: int, live: int, k: int, ef: int) -> tuple[int, float]:
    """A walk of a filter graph of ``count`` rows (of a graph of ``live``): the candidates it asks
    for, and what it costs (WALK_COST a candidate: a smaller graph walks no faster a candidate)."""
    want = min(count, math.ceil(filter_graph_beam(count / live) * max(k, ef)))
    return want, WALK_COST * want


def filter_graph_beam(share: float) -> float:
    """How many times ef a filter graph's walk asks for: the graph of a filter keeping ``share``
    of the set is sparser in the set's noise, so its walk is rougher at the same beam. On the
    shared 100,000 x 384 set (M 16, ef_construction 200), recall@10 inside the filter at ef 64 /
    128: 30% 0.957-0.970 / 0.982, 20% 0.937 / 0.955, 10% 0.844 / 0.909 (docs/benchmarks.md,
    "Filter graphs"): 1.25 at 30% (ef 80), 2.3 at 20%, 1 from 40% up, 4 at most (at 10% the
    walk then costs more than the view scan, so no graph is built)."""
    return min(4.0, max(1.0, 1.25 * (0.3 / share) ** 1.5))


def walk_plan(count: int, live: int, k: int, ef: int) -> tuple[int, float]:
    """A filtered walk over a graph of ``live`` rows, ``count`` of them matching: the candidates it
    asks for, and what it costs (WALK_COST a candidate, in rows gathered and scanned)."""
    share = count / live
    beam = max(k, ef)
    want = min(live, math.ceil(oversample(share) * beam / share))
    return want, WALK_COST * want


def oversample(share: float) -> float:
    """How many times ef / share candidates a filtered walk over a graph asks for when the filter
    keeps ``share`` of it: E[matching candidates] = this x ef, ef at least (fewer, and a small ef
    lost recall: the k best matches are then about all the walk finds). The walk is exact near
    the query and rougher deeper down, and a rarer filter reaches deeper (its 10th match lies
    near rank 10 / share): on the shared 100,000 x 384 set at ef 64, factor 1 held recall@10 >=
    0.97 from 30% up but 0.94 at 20%, where 1.5 held 0.95 (docs/benchmarks.md, "Filtered search:
    filter views and a leaner walk")."""
    return min(3.0, max(1.0, 0.3 / share))
