"""Filter graphs (index/hnsw_filter_graphs.py): a repeated filter's own HNSW graph, built in the background.

A filter planned BUILD_AFTER times gets its graph; searches then walk it and keep recall@10 >=
0.95 inside the filter, never a row outside it, alone and from several threads while the build
runs; a delete of one of the filter's rows changes its key (the old graph is never asked again),
a delete outside it does not; the budget keeps a graph in use against a newcomer and lets an idle
one go; closing the strand mid-build abandons the build; and a shard's must / should / must_not
filter is answered from its graph. The planner's constants are set per test (the tests' graphs are
small: a scan would be cheaper there). Real hnswlib graphs and a real shard.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import hnswlib
import numpy as np
import pytest

from braid.index import hnsw_filter_builder, hnsw_filter_graphs, hnsw_plan
from braid.index.filters import Filter, Match, Range
from braid.index.hnsw_filter_builder import FilterGraphBuilder
from braid.index.hnsw_filter_graphs import FilterGraph, FilterGraphs
from braid.index.schema import Metric

from .conftest import random_vectors
from .test_filter_planner import N, _one_graph, small_blocks, tagged_shard  # noqa: F401
from .test_hnsw_segments import DIM, _Fill, _truth

BUILT_S = 60.0  # deadline for a background build (under a second on an idle machine)


@pytest.fixture
def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Filter graphs for these small graphs: from 300 rows, after 3 plans; no scans (a walk or a
    filter graph is then every plan)."""
    monkeypatch.setattr(hnsw_filter_graphs, "MIN_ROWS", 300)
    monkeypatch.setattr(hnsw_filter_graphs, "BUILD_AFTER", 3)
    monkeypatch.setattr(hnsw_plan, "VIEW_COST", 1e9)


def _wait_built(graphs: FilterGraphs, count: int) -> None:
    deadline = time.monotonic() + BUILT_S
    while len(graphs) < count:
        assert time.monotonic() < deadline, f"{len(graphs)} filter graphs built, {count} expected"
        time.sleep(0.01)


def _kind(fill: _Fill, allowed: np.ndarray) -> str:
    [graph] = fill.strand._graphs
    window, known = fill.strand._filter_inputs(allowed).window(graph)
    plan = hnsw_plan.graph_plan(graph, window, 10, 64, remember=False, inputs=known)
    assert plan is not None
    return plan.kind


def _recall(fill: _Fill, allowed: np.ndarray, queries: np.ndarray) -> float:
    live = np.flatnonzero(fill.live & allowed)
    found = 0
    for query in queries:
        got = fill.search(query, 10, ef=64, allowed=allowed)
        assert set(got) <= set(live.tolist()) and len(got) == 10, "a hit outside the filter, or a short answer"
        found += len(set(got) & set(_truth(fill.vectors, live, query, 10, Metric.COSINE)))
    return found / (10 * len(queries))


def test_a_repeated_filter_gets_its_own_graph(small_blocks: None, eager: None) -> None:  # noqa: F811
    """Three plans of a filter keeping 30% ask for its graph; searches then walk it: recall@10 >=
    0.95 inside the filter, every hit a match, and the strand's memory counts it."""
    fill = _one_graph(gaps=True)
    [graph] = fill.strand._graphs
    allowed = np.random.default_rng(30).random(N) < 0.3
    queries = random_vectors(40, DIM, seed=31)
    before = fill.strand.memory_bytes()
    for query in queries[:2]:
        fill.search(query, 10, ef=64, allowed=allowed)
    assert not graph.fgraphs._asked and _kind(fill, allowed) == "walk"  # two plans: nothing asked yet
    fill.search(queries[2], 10, ef=64, allowed=allowed)
    _wait_built(graph.fgraphs, 1)
    assert _kind(fill, allowed) == "filter graph"
    assert _recall(fill, allowed, queries) >= 0.95
    assert fill.strand.memory_bytes() >= before + graph.fgraphs.nbytes > before
    assert fill.strand.stats.outcomes.get(("hnsw-filter-graph", "ok")) == 1
    fill.strand.close()


def test_searches_during_the_build_stay_inside_the_filter(small_blocks: None, eager: None) -> None:  # noqa: F811
    """Four threads search one filter over and over while its graph is built and put in: every
    answer holds ten matching rows; at the end the graph answers."""
    fill = _one_graph(gaps=False)
    [graph] = fill.strand._graphs
    allowed = np.random.default_rng(32).random(N) < 0.25
    live = set(np.flatnonzero(allowed).tolist())
    queries = random_vectors(8, DIM, seed=33)
    wrong: list[str] = []
    stop = time.monotonic() + BUILT_S

    def run(seed: int) -> None:
        order = np.random.default_rng(seed)
        while time.monotonic() < stop:
            got = fill.search(queries[int(order.integers(8))], 10, ef=64, allowed=allowed)
            if len(got) != 10 or not set(got) <= live:
                wrong.append(str(got))
            if len(graph.fgraphs) and _kind(fill, allowed) == "filter graph":
                return

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, wrong[:3]
    assert len(graph.fgraphs) == 1 and _kind(fill, allowed) == "filter graph"
    fill.strand.close()


def test_a_delete_inside_the_filter_retires_its_graph(small_blocks: None, eager: None) -> None:  # noqa: F811
    """A filter graph holds the rows live when it was built: a delete of a row outside the filter
    keeps it in use; a delete of one of its rows changes the filter's key, so the deleted label
    never comes back and the answers stay right."""
    fill = _one_graph(gaps=False)
    [graph] = fill.strand._graphs
    allowed = np.random.default_rng(34).random(N) < 0.3
    queries = random_vectors(20, DIM, seed=35)
    for query in queries[:3]:
        fill.search(query, 10, ef=64, allowed=allowed)
    _wait_built(graph.fgraphs, 1)
    fill.remove([int(np.flatnonzero(~allowed)[0])])
    assert _kind(fill, allowed) == "filter graph"
    top = fill.search(queries[0], 10, ef=64, allowed=allowed)
    fill.remove(top[:3])
    assert _kind(fill, allowed) == "walk"
    assert not set(top[:3]) & set(fill.search(queries[0], 10, ef=64, allowed=allowed))
    assert _recall(fill, allowed, queries) >= 0.95
    fill.strand.close()


def _small_graph(rows: int) -> FilterGraph:
    index = hnswlib.Index(space="ip", dim=4)
    index.init_index(max_elements=1)
    return FilterGraph(index, rows, rows * 100)


def test_a_filter_graph_in_use_keeps_its_room(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two filters whose graphs do not fit together: while the first is in use the second is never
    due (no build that would only evict a graph in use); once the first is idle, the second is
    built and the first dropped. A graph larger than the budget is never due."""
    monkeypatch.setattr(hnsw_filter_graphs, "MIN_ROWS", 10)
    monkeypatch.setattr(hnsw_filter_graphs, "BUILD_AFTER", 2)
    graphs = FilterGraphs(budget=100)
    assert not graphs.count(b"a", 60) and graphs.count(b"a", 60)  # due at the second plan, once
    assert not graphs.count(b"a", 60)  # asked already
    assert graphs.put(b"a", _small_graph(60)) and graphs.rows == 60
    for _ in range(5):
        assert not graphs.count(b"b", 60)
    assert not graphs.put(b"b", _small_graph(60)) and graphs.get(b"a") is not None
    assert not graphs.count(b"big", 101) and not graphs.count(b"big", 101)
    monkeypatch.setattr(hnsw_filter_graphs, "IDLE_S", 0.0)
    assert graphs.count(b"b", 60)
    assert graphs.put(b"b", _small_graph(60))
    assert graphs.get(b"a") is None and graphs.get(b"b") is not None and graphs.rows == 60


def _hold_builds(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Each filter graph build waits, once its builder took it, until ``release`` is set; ``started``
    is set as the first one waits."""
    started, release = threading.Event(), threading.Event()
    build = FilterGraphBuilder.build

    def held(self: FilterGraphBuilder, *args: object) -> bool:
        started.set()
        assert release.wait(BUILT_S)
        return build(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(FilterGraphBuilder, "build", held)
    return started, release


def test_closing_mid_build_abandons_it(
    small_blocks: None,  # noqa: F811
    eager: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The strand closes while a build waits to start its first chunk: close returns, the build
    stops with nothing kept, and the filter may be asked again."""
    fill = _one_graph(gaps=False)
    [graph] = fill.strand._graphs
    started, release = _hold_builds(monkeypatch)
    allowed = np.random.default_rng(36).random(N) < 0.3
    for query in random_vectors(3, DIM, seed=37):
        fill.search(query, 10, ef=64, allowed=allowed)
    assert started.wait(BUILT_S)
    closer = threading.Thread(target=fill.strand.close)
    closer.start()
    deadline = time.monotonic() + BUILT_S
    while not fill.strand._closing:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    release.set()
    closer.join(BUILT_S)
    assert not closer.is_alive(), "close did not return"
    assert len(graph.fgraphs) == 0 and not graph.fgraphs._asked
    assert fill.strand.stats.outcomes.get(("hnsw-filter-graph", "cancelled")) == 1


def test_a_shard_filter_is_answered_from_its_graph(
    small_blocks: None,  # noqa: F811
    eager: None,
    tmp_path: Path,
) -> None:
    """must / should / must_not over a keyword and an int field, through the shard's mask: once the
    filter's graph is built, its answers hold only matching documents and recall@10 >= 0.95."""
    shard, vectors, tags, r = tagged_shard(tmp_path, ["a", "b", "c"], seed=38)
    flt = Filter(
        must=(Range("r", lt=480),),
        should=(Match("tag", "a"), Match("tag", "b")),
        must_not=(Range("r", gte=300, lt=320),),
    )  # about 30%
    live = np.flatnonzero((r < 480) & np.isin(tags, ["a", "b"]) & ~((r >= 300) & (r < 320)))
    strand = shard.dense["emb"]
    [graph] = strand._graphs
    queries = random_vectors(40, DIM, seed=40)
    found = 0
    for i, query in enumerate(queries):
        if i == 3:
            _wait_built(graph.fgraphs, 1)
        with shard.read():
            mask, count = shard.allowed(flt)
            assert count == len(live)
            [(labels, _)] = strand.search(query[None, :], 10, 64, mask)
        ids = [int(i) for i in shard.ids_of(labels)]
        assert set(ids) <= set(live.tolist()) and len(ids) == 10
        if i >= 3:
            found += len(set(ids) & set(_truth(vectors, live, query, 10, Metric.COSINE)))
    assert found / (10 * (len(queries) - 3)) >= 0.95
    shard.close()


def test_many_filters_at_once_stay_within_the_queue_and_the_budget(
    small_blocks: None,  # noqa: F811
    eager: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Six filters of 30% come due while the builder is busy: at most FILTER_GRAPH_QUEUE wait, the
    rest are given up (they may be asked again); once it runs, the graphs kept fit the budget (a
    graph's rows), and the builds that find no room left are not made and are given up too."""
    fill = _one_graph(gaps=False)
    [graph] = fill.strand._graphs
    started, release = _hold_builds(monkeypatch)
    rng = np.random.default_rng(41)
    filters = [rng.random(N) < 0.3 for _ in range(6)]
    queries = random_vectors(3, DIM, seed=42)
    for i, allowed in enumerate(filters):
        for query in queries:
            fill.search(query, 10, ef=64, allowed=allowed)
        if i == 0:  # the builder holds the first before the others come due
            assert started.wait(BUILT_S)
    assert fill.strand._filter_graphs.waiting() == hnsw_filter_builder.QUEUE  # one building, four waiting
    assert len(graph.fgraphs._asked) == 1 + hnsw_filter_builder.QUEUE  # the sixth was given up
    release.set()
    deadline = time.monotonic() + BUILT_S
    while fill.strand._filter_graphs.busy():
        assert time.monotonic() < deadline, "the builder did not finish"
        time.sleep(0.01)
    # 1,170-1,230 rows each against a budget of 4,000: three fit, the last two found no room
    assert len(graph.fgraphs) == 3 and graph.fgraphs.rows <= graph.fgraphs.budget
    assert not graph.fgraphs._asked
    outcomes = fill.strand.stats.outcomes
    assert outcomes.get(("hnsw-filter-graph", "ok")) == 3 and outcomes.get(("hnsw-filter-graph", "cancelled")) == 2
    fill.strand.close()
