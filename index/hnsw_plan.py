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

The cheapest wins; a filter seen before whose walk costs more than its view would gets the
view made now (the gather once, then view scans). Both scans are exact; the walk keeps
recall@10 inside the filter >= 0.95 (``oversample``).

Every name here is looked up at call time (the strand reads ``hnsw_plan.VIEW_COST``, not a
copy), so tests and benchmarks set the costs on this module.
"""

from __future__ import annotations

import math

import numpy as np

from .hnsw_parts import Graph

WALK_COST = (
    14.0  # a graph walk asking for n candidates costs about as much as gathering and scanning WALK_COST x n rows
)
VIEW_COST = 0.25  # scanning a contiguous filter view costs this much a row, against gathering the rows first


def graph_plan(
    graph: Graph, window: np.ndarray, k: int, ef: int, remember: bool = True
) -> tuple[bool, int, int, float, bytes | None] | None:
    """How a graph honours a filter (``window``: its rows' mask from its first label), or None
    when no row matches: (scan?, the rows matching, the walk's candidates, the cost, the filter
    view's key). A filter keeping more rows than a view may hold (a quarter of the graph's) is
    scanned in place: reading every row in order costs less than gathering that many. Without
    ``remember`` (an estimate) the filter is not counted as seen by the view table."""
    count = int(np.count_nonzero(window))
    if count == 0:
        return None
    want, walk_cost = walk_plan(count, graph.live, k, ef)
    key = graph.views.key(window) if graph.views.fits(count) else None
    view = graph.views.get(key) if key is not None else None
    if view is not None:
        scan_cost = VIEW_COST * count
    elif key is None:
        scan_cost = VIEW_COST * len(graph.labels)
    else:
        scan_cost = count
    if scan_cost <= walk_cost:
        return True, count, want, scan_cost, key
    seen = graph.views.repeated if remember else graph.views.seen
    if view is None and key is not None and VIEW_COST * count <= walk_cost and seen(key):
        # the walk costs more than the view would: gather the rows now, scan the view from the next search on
        return True, count, want, scan_cost, key
    return False, count, want, walk_cost, key


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
