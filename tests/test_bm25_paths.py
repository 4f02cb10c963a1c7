"""BM25's fast paths answer as the general ones do.

- Quick searches: a plain BM25 Search on a one-shard collection whose terms have few
  postings runs on the event loop while no worker is busy (service/rpcs.py
  ``BraidRpcs.quick``), with the hits a worker gives.
- The DFS phase (index/collection.py): several shards score every query, over several
  fields, with boosts, repeated words and terms only one shard holds, as one shard does.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.index.query import SearchResult
from braid.index.schema import Analyzer, TextFieldSpec
from braid.index.text import TextIndex
from braid.service import convert
from braid.service import rpcs as rpcs_module
from braid.v1 import braid_pb2 as pb

from .conftest import start_in_process, stop_in_process

VOCABULARY = [f"w{i}" for i in range(80)]
FIELDS = pb.Schema(text_fields=[pb.TextField(name="title"), pb.TextField(name="body")])


def _documents(n: int, seed: int) -> list[dict]:
    """Every title has 3 words and every body 8 (tantivy's average field length stays per shard,
    so only equal lengths make shards score exactly as one shard), Zipf-like word frequencies;
    one document holds a word no other has."""
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, len(VOCABULARY) + 1)
    weights /= weights.sum()

    def words(k: int) -> str:
        return " ".join(rng.choice(VOCABULARY, k, p=weights))

    docs = [{"id": f"d{i}", "text": {"title": words(3), "body": words(8)}} for i in range(n)]
    docs[0]["text"]["body"] = "onlyhere " + words(7)
    return docs


def _request(collection: str, *queries: pb.SubQuery, **kw: object) -> pb.SearchRequest:
    return pb.SearchRequest(collection=collection, queries=list(queries), **kw)


def _bm25(text: str, **kw: object) -> pb.SubQuery:
    return pb.SubQuery(bm25=pb.Bm25Query(text=text, **kw))  # type: ignore[arg-type]


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    server, running = start_in_process(tmp_path / "data")
    docs = _documents(600, seed=21)
    for name, shards in (("one", 1), ("two", 2), ("three", 3)):
        running.client.create_collection(name, FIELDS, shards=shards)
        running.client.bulk_upsert(name, docs, batch_size=150)
    yield server, running
    stop_in_process(server, running)


def test_a_plain_bm25_search_with_few_postings_is_quick(server, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    server, running = server
    rpcs = server.handlers.rpcs
    plain = _request("one", _bm25("w3 w17 onlyhere"), limit=10)
    assert rpcs.quick(plain)
    assert rpcs.quick(_request("one", _bm25("w3", fields=["title"], boosts={"title": 2.0})))
    assert not rpcs.quick(_request("two", _bm25("w3")))  # several shards fan out to threads anyway
    assert not rpcs.quick(_request("one", _bm25("w3"), limit=rpcs_module.QUICK_MAX_LIMIT + 1))
    assert not rpcs.quick(_request("one", _bm25("w3 " * rpcs_module.QUICK_MAX_QUERY_CHARS)))
    assert not rpcs.quick(_request("one", _bm25("w3"), _bm25("w4")))
    assert not rpcs.quick(_request("one", _bm25("w3"), text_fields=["title"]))
    match = pb.Condition(match=pb.Match(field="title", value=pb.Value(keyword="x")))
    assert not rpcs.quick(_request("one", _bm25("w3"), filter=pb.Filter(must=[match])))
    assert not rpcs.quick(_request("nothing", _bm25("w3")))
    # An unknown field is not quick; the worker answers it, naming the field.
    unknown = _request("one", _bm25("w3", fields=["nope"]))
    assert not rpcs.quick(unknown)
    with pytest.raises(grpc.RpcError) as info:
        running.stub.Search(unknown)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "nope" in info.value.details()
    # The bound is the postings tantivy may read: the terms' document frequencies summed.
    text = server.catalog.get("one").shards[0].text
    postings = text.postings("w3 w17 onlyhere", ["title", "body"])
    assert postings == sum(text.term_stats([(f, t) for f in ("title", "body") for t in ("w3", "w17", "onlyhere")])[0])
    monkeypatch.setattr(rpcs_module, "QUICK_MAX_POSTINGS", postings - 1)
    assert not rpcs.quick(plain)
    monkeypatch.setattr(rpcs_module, "QUICK_MAX_POSTINGS", postings)
    assert rpcs.quick(plain)


def test_quick_bm25_searches_answer_as_a_worker_does(server) -> None:  # type: ignore[no-untyped-def]
    server, running = server
    requests = [
        _request("one", _bm25(text), limit=limit)
        for text, limit in (("w1 w2", 10), ("w5 w5 w30 onlyhere", 25), ("w79", 3), ("!!!", 10), ("w0", 100))
    ]
    assert all(server.handlers.rpcs.quick(r) for r in requests)
    on_loop = [running.stub.Search(r) for r in requests]  # no worker busy: the event loop answers
    release = threading.Event()
    busy = server.admission._submit(release.wait, None)  # one worker busy: every search takes a worker
    try:
        assert server.admission.outstanding == 1
        on_worker = [running.stub.Search(r) for r in requests]
    finally:
        release.set()
        busy.result(timeout=30)
    assert [[(h.id, h.score) for h in r.hits] for r in on_loop] == [
        [(h.id, h.score) for h in r.hits] for r in on_worker
    ]
    assert [len(r.hits) for r in on_loop] == [10, 25, 3, 0, 100]


def _scores(running, collection: str, request: pb.SearchRequest) -> dict[str, float]:  # type: ignore[no-untyped-def]
    request.collection = collection
    return {h.id: h.score for h in running.stub.Search(request).hits}


@pytest.mark.parametrize("collection", ["two", "three"])
def test_bm25_on_several_shards_scores_as_one_shard(server, collection: str) -> None:  # type: ignore[no-untyped-def]
    """Fields, boosts, repeated words, a word one shard alone holds, and two BM25 strands fused."""
    _, running = server
    rng = np.random.default_rng(3)
    requests = [
        _request("", _bm25("onlyhere w1"), limit=40),
        _request("", _bm25("w2 w2 w9 w40", boosts={"title": 2.5}), limit=40),
        _request("", _bm25("w4 w11", fields=["title"]), limit=40),
        _request("", _bm25("w7 w7 w7 w60", fields=["body"], boosts={"body": 0.5}), limit=40),
        _request("", _bm25("w3 w8", fields=["title"]), _bm25("w8 w21", fields=["body"]), limit=40),
    ]
    requests += [_request("", _bm25(" ".join(rng.choice(VOCABULARY, 4))), limit=40) for _ in range(10)]
    for request in requests:
        one = _scores(running, "one", request)
        many = _scores(running, collection, request)
        assert one, request
        assert np.allclose(sorted(one.values()), sorted(many.values()), rtol=1e-5), request
        # equal scores may come in another order (ties break by shard-local keys); each id scores the same
        assert all(math.isclose(one[d], many[d], rel_tol=1e-5) for d in one.keys() & many.keys()), request
        lowest = min(one.values())
        assert {d for d, v in one.items() if v > lowest * 1.00001} <= many.keys(), request


def test_scores_past_float32_are_clipped_on_the_wire() -> None:
    big = float(np.finfo(np.float32).max)
    result = SearchResult(ids=list("abcde"), scores=np.array([math.inf, 1e39, 2.5, -1e39, -math.inf]))
    assert [h.score for h in convert.result_to_proto(result, {}).hits] == pytest.approx([big, big, 2.5, -big, -big])
    nan = convert.result_to_proto(SearchResult(ids=["a", "b"], scores=np.array([1.0, math.nan])), {})
    assert nan.hits[0].score == 1.0 and math.isnan(nan.hits[1].score)


def test_hits_past_the_mask_are_left_out_and_ties_break_by_label(tmp_path: Path) -> None:
    """TextIndex.search on its own: labels written after the mask was taken are not allowed, equal
    scores come in label order, and a filtered search gives the top k allowed hits."""
    index = TextIndex(tmp_path / "text", (TextFieldSpec("body", Analyzer.DEFAULT),))
    try:
        for label in range(8):
            index.add(label, {"body": "same words" if label % 2 else "same other words here"})
        index.commit()
        query = index.parse("same", ["body"], {})
        labels, scores = index.search(query, 10, np.ones(5, bool), 5, filtered=False)  # labels 5..7 are newer
        assert labels.tolist() == [1, 3, 0, 2, 4] and scores[0] == scores[1] > scores[2] == scores[4]
        allowed = np.zeros(8, bool)
        allowed[[2, 6, 7]] = True
        labels, _ = index.search(query, 2, allowed, 3, filtered=True)
        assert labels.tolist() == [7, 2]
    finally:
        index.close()
