"""The filter planner of the HNSW strand (index/hnsw_plan.py, index/hnsw_strand.py) and its filter views
(index/hnsw_views.py): every plan answers right.

The exact plans (a scan of the rows gathered, a scan of a filter view made by an earlier search)
give brute force's answer, on a graph whose labels run without a gap and on one with gaps (a
compaction); a view never answers for another filter, nor after a delete; views stay within their
budget; a filtered batch answers as its queries one by one; the walk keeps recall@10 >= 0.95
(fixed seed); and a shard's must / should / must_not filter, planned every way, matches brute force.
The planner's cost constants are set per test to force one plan (index/hnsw_plan.py's module
constants, as tests/test_hnsw_segments.py shrinks the block size). Real hnswlib graphs and a real shard.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.index import hnsw_plan, hnsw_strand, hnsw_tiers
from braid.index.filters import Filter, Match, Range
from braid.index.hnsw_views import Views
from braid.index.records import DocumentWrite
from braid.index.schema import Metric, PayloadFieldSpec, PayloadType, Schema
from braid.index.shard import Shard
from braid.service import convert
from braid.service import rpcs as rpcs_module
from braid.v1 import braid_pb2 as pb

from .conftest import random_vectors, start_in_process, stop_in_process
from .test_hnsw_segments import DIM, _Fill, _spec, _truth

N = 4000


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hnsw_strand, "SEAL_ROWS", 256)
    monkeypatch.setattr(hnsw_strand, "MAX_PENDING_ROWS", 1024)
    monkeypatch.setattr(hnsw_tiers, "TIER_UNIT", 512)
    monkeypatch.setattr(hnsw_strand, "IDLE_MERGE_S", 0.1)


def _plan(monkeypatch: pytest.MonkeyPatch, plan: str) -> None:
    """Costs that make the planner pick ``plan`` for every filter of these tests."""
    walk_cost, view_cost = {"scan": (1e9, 0.25), "walk": (1e-9, 1e9), "view on repeat": (1e-3, 1e-9)}[plan]
    monkeypatch.setattr(hnsw_plan, "WALK_COST", walk_cost)
    monkeypatch.setattr(hnsw_plan, "VIEW_COST", view_cost)


def _one_graph(gaps: bool) -> _Fill:
    """N vectors in one graph; with ``gaps``, a third of them deleted and compacted away."""
    fill = _Fill(Metric.COSINE, N, seed=21)
    for _ in range(N // 1000):
        fill.add(1000)
    if gaps:
        fill.remove(list(range(0, N, 3)))
    assert fill.strand.wait_merged(120, settled=True)
    [graph] = fill.strand._graphs
    assert graph.dense is not gaps and graph.dead == 0
    return fill


def _exact(fill: _Fill, allowed: np.ndarray, queries: np.ndarray) -> None:
    live = np.flatnonzero(fill.live & allowed)
    for query in queries:
        assert fill.search(query, 10, ef=16, allowed=allowed) == _truth(fill.vectors, live, query, 10, Metric.COSINE)


@pytest.mark.parametrize("gaps", [False, True], ids=["labels without gaps", "labels with gaps"])
def test_scans_and_views_answer_as_brute_force(small_blocks: None, monkeypatch: pytest.MonkeyPatch, gaps: bool) -> None:
    """A scan gathers the filter's rows and keeps them as a view; the next search scans the view:
    both are brute force's answer, and a second filter keeping as many rows is not answered from
    the first one's view."""
    _plan(monkeypatch, "scan")
    fill = _one_graph(gaps)
    [graph] = fill.strand._graphs
    rng = np.random.default_rng(5)
    first = rng.random(N) < 0.05
    second = np.roll(first, 1)  # as many rows, other ones
    queries = random_vectors(8, DIM, seed=6)
    _exact(fill, first, queries[:1])  # a miss: gathered, then kept
    kept = int(np.count_nonzero(first & fill.live))
    assert graph.views.rows == kept, "the scan's rows were not kept as a view"
    _exact(fill, first, queries)  # hits
    assert graph.views.rows == kept
    _exact(fill, second, queries)
    assert graph.views.rows == kept + int(np.count_nonzero(second & fill.live))
    fill.strand.close()


def test_a_delete_is_never_answered_from_a_view(small_blocks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The view of a filter holds the rows live when it was made: after a delete, the same filter
    (the same mask from the caller) must neither return the deleted label nor miss the next one."""
    _plan(monkeypatch, "scan")
    fill = _one_graph(gaps=False)
    allowed = np.random.default_rng(8).random(N) < 0.1
    query = random_vectors(1, DIM, seed=9)[0]
    top = fill.search(query, 10, ef=16, allowed=allowed)
    assert fill.search(query, 10, ef=16, allowed=allowed) == top  # from the view
    fill.remove(top[:3])
    _exact(fill, allowed, query[None, :])
    assert not set(top[:3]) & set(fill.search(query, 10, ef=16, allowed=allowed))
    fill.strand.close()


def test_a_repeated_filter_gets_a_view_when_its_walk_costs_more(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where a walk costs less than gathering the rows but more than scanning them contiguous, the
    first search walks, the second makes the view, later ones scan it: those answer exactly."""
    _plan(monkeypatch, "view on repeat")
    fill = _one_graph(gaps=True)
    [graph] = fill.strand._graphs
    allowed = np.random.default_rng(10).random(N) < 0.2
    queries = random_vectors(6, DIM, seed=11)
    fill.search(queries[0], 10, ef=16, allowed=allowed)
    assert graph.views.rows == 0, "a filter seen once should walk"
    _exact(fill, allowed, queries)
    assert graph.views.rows == int(np.count_nonzero(allowed & fill.live))
    fill.strand.close()


def test_views_stay_within_their_budget() -> None:
    views = Views(budget=100)
    rows = np.zeros((40, DIM), np.float32)
    for i in range(10):
        views.put(bytes([i]), np.arange(40), rows)
        assert views.rows <= 100
    assert views.get(bytes([9])) is not None and views.get(bytes([0])) is None  # least recently used first
    views.put(b"big", np.arange(101), np.zeros((101, DIM), np.float32))
    assert views.get(b"big") is None


@pytest.mark.parametrize("plan", ["scan", "walk"])
def test_a_filtered_batch_answers_as_its_queries_one_by_one(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch, plan: str
) -> None:
    _plan(monkeypatch, plan)
    fill = _one_graph(gaps=True)
    allowed = np.random.default_rng(12).random(N) < 0.3
    queries = random_vectors(20, DIM, seed=13)
    with fill.lock.read():
        batch = fill.strand.search(queries, 10, 64, allowed)
        alone = [fill.strand.search(q[None, :], 10, 64, allowed)[0] for q in queries]
    for (labels, scores), (one_labels, one_scores) in zip(batch, alone, strict=True):
        assert labels.tolist() == one_labels.tolist() and scores.tobytes() == one_scores.tobytes()
    fill.strand.close()


@pytest.mark.parametrize("share", [0.3, 0.5, 0.9])
def test_walks_keep_recall_inside_the_filter(small_blocks: None, monkeypatch: pytest.MonkeyPatch, share: float) -> None:
    """The walk asks for oversample(share) x ef / share candidates: recall@10 >= 0.95 inside the
    filter (seeded), and never a row outside it."""
    _plan(monkeypatch, "walk")
    fill = _one_graph(gaps=True)
    allowed = np.random.default_rng(14).random(N) < share
    live = np.flatnonzero(fill.live & allowed)
    found = 0
    queries = random_vectors(40, DIM, seed=15)
    for query in queries:
        got = fill.search(query, 10, ef=64, allowed=allowed)
        assert set(got) <= set(live.tolist()) and len(got) == 10
        found += len(set(got) & set(_truth(fill.vectors, live, query, 10, Metric.COSINE)))
    assert found / (10 * len(queries)) >= 0.95
    assert fill.strand._graphs[0].views.rows == 0
    fill.strand.close()


def tagged_shard(tmp_path: Path, values: list[str], seed: int) -> tuple[Shard, np.ndarray, np.ndarray, np.ndarray]:
    """A real shard of N documents in one settled graph: vector, keyword "tag" (one of ``values``)
    and int "r" in [0, 1000); returns it with the vectors, tags and r by document id."""
    schema = Schema(
        dense_fields=[_spec()],
        payload_fields=[PayloadFieldSpec("tag", PayloadType.KEYWORD), PayloadFieldSpec("r", PayloadType.INT)],
    )
    rng = np.random.default_rng(seed)
    vectors = random_vectors(N, DIM, seed=seed + 1)
    tags = rng.choice(values, N)
    r = rng.integers(0, 1000, N)
    shard = Shard.open(tmp_path / "s", schema, 0)
    docs = [
        DocumentWrite(id=str(i), dense={"emb": vectors[i]}, payload={"tag": str(tags[i]), "r": int(r[i])})
        for i in range(N)
    ]
    for start in range(0, N, 1000):
        shard.upsert(docs[start : start + 1000])
    assert shard.wait_merged(120, settled=True)
    return shard, vectors, tags, r


def test_a_shard_filter_matches_brute_force_under_every_plan(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """must / should / must_not over a keyword and an int field, through the shard's mask: each
    plan returns only matching documents, and the exact plans exactly the best ones."""
    shard, vectors, tags, r = tagged_shard(tmp_path, ["a", "b", "c", "d"], seed=16)
    flt = Filter(
        must=(Range("r", gte=100, lt=500),),
        should=(Match("tag", "a"), Match("tag", "b")),
        must_not=(Range("r", gte=300, lt=350),),
    )
    match = (r >= 100) & (r < 500) & np.isin(tags, ["a", "b"]) & ~((r >= 300) & (r < 350))
    live = np.flatnonzero(match)
    queries = random_vectors(10, DIM, seed=18)
    assert len(live) <= shard.dense["emb"]._graphs[0].views.budget  # (the plans that make a view can)
    for plan in ("walk", "view on repeat", "scan"):
        _plan(monkeypatch, plan)
        for attempt in range(2):  # "view on repeat" walks the first time, then makes the view
            with shard.read():
                mask, count = shard.allowed(flt)
                assert count == len(live)
                hits = shard.dense["emb"].search(queries, 10, 16, mask)
            for query, (labels, _) in zip(queries, hits, strict=True):
                ids = [int(i) for i in shard.ids_of(labels)]
                assert set(ids) <= set(live.tolist()), plan
                if plan == "scan" or (plan == "view on repeat" and attempt == 1):
                    assert ids == _truth(vectors, live, query, 10, Metric.COSINE), plan
    shard.close()


def test_concurrent_searches_share_and_evict_views_and_stay_exact(
    small_blocks: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four threads search six filters at once while their views are made and evicted (a budget
    of about two views): every answer is brute force's."""
    _plan(monkeypatch, "scan")
    fill = _one_graph(gaps=False)
    [graph] = fill.strand._graphs
    rng = np.random.default_rng(19)
    filters = [rng.random(N) < 0.05 for _ in range(6)]
    graph.views = Views(int(0.11 * N))
    queries = random_vectors(6, DIM, seed=20)
    truths = [
        [_truth(fill.vectors, np.flatnonzero(fill.live & f), q, 10, Metric.COSINE) for q in queries] for f in filters
    ]
    wrong: list[str] = []

    def run(seed: int) -> None:
        order = np.random.default_rng(seed)
        for _ in range(30):
            f, q = int(order.integers(6)), int(order.integers(6))
            if fill.search(queries[q], 10, ef=16, allowed=filters[f]) != truths[f][q]:
                wrong.append(f"filter {f} query {q}")

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not wrong, wrong[:5]
    assert 0 < graph.views.rows <= graph.views.budget
    fill.strand.close()


Request = Callable[..., pb.SearchRequest]


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[object, object, Request]]:
    """A real server with a 2-shard collection: 2,000 vectors, 1% of them tagged "rare"; and a
    maker of dense searches by vector filtered on a tag."""
    server, running = start_in_process(tmp_path / "data")
    schema = pb.Schema(
        dense_fields=[pb.DenseVectorField(name="emb", dim=DIM, metric=pb.COSINE)],
        payload_fields=[pb.PayloadField(name="tag", type=pb.KEYWORD), pb.PayloadField(name="n", type=pb.INT)],
    )
    running.client.create_collection("docs", schema, shards=2)
    vectors = random_vectors(2000, DIM, 5)
    docs = [
        {"id": f"d{i}", "dense": {"emb": vectors[i]}, "payload": {"tag": "rare" if i % 100 == 0 else "common"}}
        for i in range(len(vectors))
    ]
    running.client.bulk_upsert("docs", docs, batch_size=500)

    def request(tag: str | None, field: str = "tag", row: int = 7, **kw: object) -> pb.SearchRequest:
        message = pb.SearchRequest(collection="docs", limit=10, **kw)  # type: ignore[arg-type]
        message.queries.add().dense.field = "emb"
        message.queries[0].dense.vector.packed = np.asarray(vectors[row], "<f4").tobytes()
        if tag is not None:
            message.filter.must.add().match.CopyFrom(pb.Match(field=field, value=pb.Value(keyword=tag)))
        return message

    yield server, running, request
    stop_in_process(server, running)


def _hits(response: pb.SearchResponse) -> list[tuple[str, float]]:
    return [(hit.id, hit.score) for hit in response.hits]


def test_a_cheap_filtered_search_runs_on_the_event_loop_and_answers_as_a_worker(served) -> None:  # type: ignore[no-untyped-def]
    """service/rpcs.py ``quick``: a filtered dense search its planner prices within
    QUICK_MAX_FILTER_COST runs on the event loop while no worker is busy; a dearer one, a
    metadata path or a bad filter takes a worker; both give the same hits."""
    server, running, request = served
    rpcs = server.handlers.rpcs
    rare, common = request("rare"), request("common")
    assert rpcs.quick(request(None)) and rpcs.quick(rare)  # 20 matching rows: a scan of 20 rows
    flt = convert.filter_from_proto(common.filter)
    cost = sum(shard.dense_filter_cost("emb", flt, 10, 0) for shard in server.catalog.get("docs").shards)
    assert cost > 0
    assert rpcs.quick(common) is (cost <= rpcs_module.QUICK_MAX_FILTER_COST)
    # A metadata path (its column may need a scan of every document first) takes a worker.
    assert not rpcs.quick(request("rare", field="source"))
    wrong_type = request("rare", field="n")  # a keyword for an int field: the worker names it
    assert not rpcs.quick(wrong_type)
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Search(wrong_type)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "filter.must[0].match.n:" in info.value.details()
    on_loop = [running.stub.Search(r) for r in (rare, common)]
    release = threading.Event()
    busy = server.admission._submit(release.wait, None)  # one worker busy: every search takes a worker
    try:
        on_worker = [running.stub.Search(r) for r in (rare, common)]
    finally:
        release.set()
        busy.result(timeout=30)
    assert [_hits(r) for r in on_loop] == [_hits(r) for r in on_worker]
    assert len(on_loop[0].hits) == 10 and all(int(hit.id[1:]) % 100 == 0 for hit in on_loop[0].hits)


def test_filtered_dense_searches_and_batches_answer_as_the_general_path(served, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A filtered dense search by vector skips plan building (Search), and a BatchSearch of such
    searches under one filter is one batched call; both give the hits of the general path (the
    same search with a strand depth, which takes the plan path), bit for bit."""
    server, running, request = served
    collection, batched = server.catalog.get("docs"), []
    search_dense_batch = collection.search_dense_batch

    def counted(field, vectors, *args, **kwargs):  # type: ignore[no-untyped-def]
        batched.append(len(vectors))
        return search_dense_batch(field, vectors, *args, **kwargs)

    monkeypatch.setattr(collection, "search_dense_batch", counted)
    for tag in ("rare", "common"):
        rows = [3, 7, 11, 500, 1999]
        fast = [running.stub.Search(request(tag, row=row)) for row in rows]
        general = []
        for row in rows:
            message = request(tag, row=row)
            message.queries[0].depth = 10  # what the window gives a single strand anyway: the plan path
            general.append(running.stub.Search(message))
        assert [_hits(r) for r in fast] == [_hits(r) for r in general]
        assert batched == [1] * len(rows)  # the fast searches took the dense path, the general ones did not
        batch = running.stub.BatchSearch(pb.BatchSearchRequest(searches=[request(tag, row=row) for row in rows]))
        assert [_hits(r) for r in batch.results] == [_hits(r) for r in general]
        assert batched[len(rows) :] == [len(rows)]  # one batched call
        batched.clear()
    assert not any(int(hit.id[1:]) % 100 == 0 for hit in fast[0].hits)  # "common": none of the rare ones
    mixed = pb.BatchSearchRequest(searches=[request("rare", row=3), request("common", row=3)])
    answers = running.stub.BatchSearch(mixed).results  # two filters: searched one by one
    assert _hits(answers[0]) == _hits(running.stub.Search(request("rare", row=3)))
    assert _hits(answers[1]) == _hits(running.stub.Search(request("common", row=3)))
    bad = pb.BatchSearchRequest(searches=[request("rare", field="n"), request("rare", field="n")])
    with pytest.raises(grpc.RpcError) as info:
        running.stub.BatchSearch(bad)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "searches[0].filter.must[0].match.n:" in info.value.details(), info.value.details()
