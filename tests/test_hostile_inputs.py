"""What a hostile or careless client can send, and the answers it gets.

Races of DeleteCollection (and shutdown) with every other call, names that only look
valid, out-of-range weights, oversized queries and responses, unknown enum numbers and
deeply nested filters: each gets a clear error code, never INTERNAL.
"""

from __future__ import annotations

import math
import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.index.catalog import Catalog
from braid.index.errors import InvalidArgument, NotFound, ResourceExhausted, Unavailable
from braid.index.query import Bm25Query, SearchPlan, SearchResult, SubQuery
from braid.index.records import DocumentWrite, SparseValue
from braid.index.schema import (
    DenseFieldSpec,
    EncoderSpec,
    Metric,
    PayloadFieldSpec,
    PayloadType,
    Schema,
    TextFieldSpec,
)
from braid.index.validate import MAX_QUERY_TERMS, MAX_SUB_QUERIES, MAX_WEIGHT, Limits
from braid.service import convert
from braid.service.client import dense_vector
from braid.v1 import braid_pb2 as pb

from .conftest import rpc_error, schema

# ------------------------------------------------------- DeleteCollection races

ROUNDS = 25
GONE = {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE}


def _race_docs(worker: int, n: int) -> list[dict]:
    rng = np.random.default_rng(worker * 1000 + n)
    return [
        {
            "id": f"w{worker}-{n}-{j}",
            "text": {"title": f"race word{j}", "body": "common text"},
            "dense": {"emb": rng.standard_normal(4)},
            "payload": {"n": n},
        }
        for j in range(4)
    ]


def test_delete_collection_racing_reads_and_writes_answers_not_found(braid):
    client = braid.client
    codes: list[grpc.StatusCode] = []
    internal: list[str] = []

    def work(worker: int, stop: threading.Event) -> None:
        rng = np.random.default_rng(worker)
        n = 0
        while not stop.is_set():
            n += 1
            op = (worker + n) % 6
            try:
                if op == 0:
                    client.upsert("race", _race_docs(worker, n))
                elif op == 1:
                    client.search("race", bm25="race common", text_fields=["title"], include_payload=True)
                elif op == 2:
                    client.search("race", dense=("emb", rng.standard_normal(4)), bm25="common", limit=5)
                elif op == 3:
                    client.get("race", [f"w{worker}-{n - 1}-0", "nope"], include_vectors=True)
                elif op == 4:
                    client.count("race")
                else:
                    client.delete("race", ids=[f"w{worker}-{n - 2}-1"])
            except grpc.RpcError as err:
                codes.append(err.code())
                if err.code() not in GONE:
                    internal.append(f"{err.code()}: {err.details()}")
                return  # the collection is gone (or the call failed): this round is over for this worker

    rounds = random.Random(7)
    for _ in range(ROUNDS):
        client.create_collection("race", schema(dim=4, payload={"n": pb.INT}, sparse=False), shards=2)
        client.upsert("race", _race_docs(99, 0))
        stop = threading.Event()
        threads = [threading.Thread(target=work, args=(w, stop)) for w in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(rounds.uniform(0.0, 0.05))
        client.delete_collection("race")
        deadline = time.monotonic() + 5
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        stop.set()
        for thread in threads:
            thread.join()
    assert not internal, internal[:5]
    assert set(codes) <= GONE


def _catalog_schema() -> Schema:
    return Schema(
        text_fields=(TextFieldSpec("body"),),
        dense_fields=(DenseFieldSpec("emb", 4, Metric.COSINE),),
        payload_fields=(PayloadFieldSpec("batch", PayloadType.INT),),
    )


def _batch(batch: int) -> list[DocumentWrite]:
    rng = np.random.default_rng(batch)
    return [
        DocumentWrite(
            id=f"b{batch}-{j}",
            text={"body": f"batch {batch} doc {j}"},
            dense={"emb": rng.standard_normal(4).astype(np.float32)},
            payload={"batch": batch},
        )
        for j in range(12)
    ]


def _close_during_writes(data: Path, delay: float) -> None:
    catalog = Catalog(data)
    collection = catalog.create("docs", _catalog_schema(), shards=3)
    attempted: set[int] = set()
    acknowledged: set[int] = set()
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        for k in range(1000):
            batch = worker * 1000 + k
            attempted.add(batch)
            try:
                collection.upsert(_batch(batch))
                collection.search(SearchPlan([SubQuery(Bm25Query("batch doc"))], text_fields=["body"]))
            except BaseException as err:
                errors.append(err)
                return
            acknowledged.add(batch)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(delay)
    catalog.close()
    for thread in threads:
        thread.join()
    assert errors and all(isinstance(err, Unavailable) for err in errors), [repr(e) for e in errors[:3]]
    with pytest.raises(Unavailable):
        catalog.get("docs")

    reopened = Catalog(data)
    try:
        docs = reopened.get("docs")
        present = {batch: len(docs.get([doc.id for doc in _batch(batch)])) for batch in attempted}
        assert set(present.values()) <= {0, 12}, present
        assert all(present[batch] == 12 for batch in acknowledged)
        assert docs.count() == sum(present.values())
    finally:
        reopened.close()


def test_catalog_close_racing_writes_applies_each_batch_whole_or_not_at_all(tmp_path: Path):
    """Shutdown while writes run: every write completes before the close or fails with Unavailable;
    after reopening, each batch (spread over 3 shards) is there in full or not at all."""
    for round_ in range(5):
        _close_during_writes(tmp_path / f"r{round_}", 0.02 + 0.02 * round_)


def test_closed_collection_answers_the_close_error(tmp_path: Path):
    catalog = Catalog(tmp_path)
    collection = catalog.create("docs", _catalog_schema())
    collection.upsert(_batch(0))
    catalog.delete("docs")
    for call in (
        lambda: collection.upsert(_batch(1)),
        lambda: collection.search(SearchPlan([SubQuery(Bm25Query("batch"))])),
        lambda: collection.get(["b0-0"]),
        lambda: collection.count(),
        lambda: collection.delete_ids(["b0-0"]),
        lambda: collection.flush(),
    ):
        with pytest.raises(NotFound, match="'docs'"):
            call()
    catalog.close()


def _shard_close_during_writes(directory: Path, delay: float) -> None:
    from braid.index.shard import Shard

    shard = Shard.open(directory, _catalog_schema(), 0)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        for k in range(1000):
            try:
                shard.upsert(_batch(worker * 1000 + k))
                if k % 7 == 0:
                    shard.flush()
                shard.count(None)
            except BaseException as err:
                errors.append(err)
                return

    threads = [threading.Thread(target=write, args=(w,)) for w in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(delay)
    shard.close(NotFound("collection 'docs' does not exist (it was deleted)"))
    for thread in threads:
        thread.join()
    assert errors and all(isinstance(err, NotFound) for err in errors), [repr(e) for e in errors[:3]]
    with pytest.raises(NotFound):
        shard.count(None)
    shard.close()  # a second close does nothing


def test_shard_close_racing_writes_and_flushes(tmp_path: Path):
    """The shard's own gate: writes and flushes either finish before the close or get its error."""
    for round_ in range(5):
        _shard_close_during_writes(tmp_path / f"s{round_}", 0.01 * round_)


# ------------------------------------------------------------------ names


@pytest.mark.parametrize("name", ["abc\n", "abc\r\n", "\nabc"])
def test_collection_name_with_a_newline_is_rejected(braid, name):
    err = rpc_error(lambda: braid.client.create_collection(name, schema()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("name:")


def test_field_name_with_a_trailing_newline_is_rejected(braid):
    bad = pb.Schema(text_fields=[pb.TextField(name="title\n")])
    err = rpc_error(lambda: braid.client.create_collection("docs", bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "schema.text_fields.name" in err.details()


def test_model_name_with_a_trailing_newline_is_rejected():
    encoder = EncoderSpec("all-minilm-l6-v2\n", ("body",))
    bad = Schema(text_fields=(TextFieldSpec("body"),), dense_fields=(DenseFieldSpec("emb", 4, encoder=encoder),))
    with pytest.raises(InvalidArgument, match=r"encoder\.model"):
        bad.validate()


# -------------------------------------------------------- weights and scores


def _fused_request(weights: list[float]) -> pb.SearchRequest:
    request = pb.SearchRequest(collection="docs", limit=5)
    request.queries.add(bm25=pb.Bm25Query(text="alpha"), weight=weights[0])
    request.queries.add(dense=pb.DenseQuery(field="emb", vector=dense_vector(np.ones(4))), weight=weights[1])
    return request


def _small_collection(braid) -> None:  # type: ignore[no-untyped-def]
    braid.client.create_collection("docs", schema(dim=4, sparse=False))
    rng = np.random.default_rng(0)
    braid.client.upsert(
        "docs",
        [{"id": f"d{i}", "text": {"title": f"alpha {i}"}, "dense": {"emb": rng.standard_normal(4)}} for i in range(5)],
    )


@pytest.mark.parametrize("weight", [3e38, 1.5e6, -1.0])
def test_fusion_weight_out_of_range_is_rejected(braid, weight):
    _small_collection(braid)
    err = rpc_error(lambda: braid.stub.Search(_fused_request([1.0, weight])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("queries[1].weight:")
    assert f"{MAX_WEIGHT:g}" in err.details()


def test_weights_within_range_still_work(braid):
    _small_collection(braid)
    hits = braid.stub.Search(_fused_request([MAX_WEIGHT, 1e-30])).hits
    assert len(hits) == 5 and all(math.isfinite(h.score) for h in hits)


@pytest.mark.parametrize("boost", [3e38, float("inf"), 2e6])
def test_bm25_boost_out_of_range_is_rejected(braid, boost):
    _small_collection(braid)
    request = pb.SearchRequest(collection="docs")
    request.queries.add(bm25=pb.Bm25Query(text="alpha", boosts={"title": boost}))
    err = rpc_error(lambda: braid.stub.Search(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("queries[0].bm25.boosts.title:")


def test_scores_stay_finite_at_the_extremes(braid):
    """The largest vectors and weights Braid accepts: fused scores overflow float32 unless clipped."""
    dim = 512
    braid.client.create_collection("big", schema(dim=dim, metric=pb.DOT, text=False, sparse=False))
    big = np.full(dim, 1e15, np.float32)
    braid.client.upsert("big", [{"id": "a", "dense": {"emb": big}}, {"id": "b", "dense": {"emb": big / 2}}])
    request = pb.SearchRequest(collection="big", explain=True)
    request.fusion.weighted.normalization = pb.NONE
    for _ in range(2):
        request.queries.add(dense=pb.DenseQuery(field="emb", vector=dense_vector(big)), weight=MAX_WEIGHT)
    hits = braid.stub.Search(request).hits
    assert [h.id for h in hits] == ["a", "b"]
    assert all(math.isfinite(h.score) for h in hits)
    single = pb.SearchRequest(collection="big", queries=[request.queries[0]], score_threshold=4e32)
    assert [h.id for h in braid.stub.Search(single).hits] == ["a"]


def test_sparse_query_weights_must_be_finite_and_bounded(braid):
    braid.client.create_collection("docs", schema(dim=4))
    for weight in (float("inf"), 3e38):
        request = pb.SearchRequest(collection="docs")
        request.queries.add(
            sparse=pb.SparseQuery(field="splade", vector=pb.SparseVector(tokens=["a"], values=[weight]))
        )
        err = rpc_error(lambda request=request: braid.stub.Search(request))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("queries[0].sparse.vector:")


# ---------------------------------------------------------------- query size


def test_bm25_query_over_max_query_bytes_is_rejected_before_analysis(braid, monkeypatch):
    from braid.index.text import TextIndex

    _small_collection(braid)
    limit = Limits().max_query_bytes

    def parse(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("the query was analyzed")

    monkeypatch.setattr(TextIndex, "parse", parse)
    request = pb.SearchRequest(collection="docs")
    request.queries.add(bm25=pb.Bm25Query(text="é" * (limit // 2) + "x"))
    err = rpc_error(lambda: braid.stub.Search(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"queries[0].bm25.text: query is {limit + 1} bytes, more than the maximum of {limit}"


def test_bm25_query_at_max_query_bytes_is_accepted(braid):
    _small_collection(braid)
    limit = Limits().max_query_bytes
    text = ("alpha " * limit)[:limit]
    request = pb.SearchRequest(collection="docs")
    request.queries.add(bm25=pb.Bm25Query(text=text))
    assert len(braid.stub.Search(request).hits) == 5


def test_encoded_query_texts_over_max_query_bytes_are_rejected_before_encoding(tmp_path: Path):
    from braid.service.encoding import Encoding

    encoder = EncoderSpec("no-such-model", ("body",))
    catalog = Catalog(tmp_path / "data", Limits(max_query_bytes=100))
    collection = catalog.create(
        "docs",
        Schema(
            text_fields=(TextFieldSpec("body"),),
            dense_fields=(DenseFieldSpec("emb", 4, encoder=encoder),),
        ),
    )
    encoding = Encoding(tmp_path / "models", None, 8, 0.001)
    try:
        text = "word " * 21
        plan = convert.plan_from_proto(
            pb.SearchRequest(queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", text=text))])
        )
        with pytest.raises(InvalidArgument) as info:
            encoding.fill_plans([(collection, plan, "searches[2].")])
        assert str(info.value) == "searches[2].queries[0].dense.text: query is 105 bytes, more than the maximum of 100"
        with pytest.raises(InvalidArgument, match=r"^queries\[0\]\.dense\.text: query is 105 bytes"):
            encoding.dense_texts(collection, "emb", [text], ["queries[0].dense"])
        # a batch: the oversized BM25 text of the second search refuses it before the first is encoded
        fine = convert.plan_from_proto(
            pb.SearchRequest(queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", text="hi"))])
        )
        big = convert.plan_from_proto(pb.SearchRequest(queries=[pb.SubQuery(bm25=pb.Bm25Query(text=text))]))
        with pytest.raises(InvalidArgument, match=r"^searches\[1\]\.queries\[0\]\.bm25\.text: query is 105 bytes"):
            encoding.fill_plans([(collection, fine, "searches[0]."), (collection, big, "searches[1].")])
    finally:
        encoding.close()
        catalog.close()


def test_too_many_sub_queries_are_rejected(braid):
    _small_collection(braid)
    request = pb.SearchRequest(collection="docs")
    for _ in range(MAX_SUB_QUERIES + 1):
        request.queries.add(bm25=pb.Bm25Query(text="alpha"))
    err = rpc_error(lambda: braid.stub.Search(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"queries: {MAX_SUB_QUERIES + 1} sub-queries, more than the maximum of {MAX_SUB_QUERIES}"
    del request.queries[-1]
    assert braid.stub.Search(request).hits


def test_too_many_distinct_bm25_terms_are_rejected(braid):
    _small_collection(braid)
    request = pb.SearchRequest(collection="docs")
    request.queries.add(bm25=pb.Bm25Query(text=" ".join(f"t{i}" for i in range(MAX_QUERY_TERMS + 1))))
    err = rpc_error(lambda: braid.stub.Search(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"queries[0].bm25.text: {MAX_QUERY_TERMS + 1} distinct terms")
    request.queries[0].bm25.text = " ".join(["alpha"] * 5000 + [f"t{i}" for i in range(MAX_QUERY_TERMS - 1)])
    assert len(braid.stub.Search(request).hits) == 5


# ------------------------------------------------------------ response size


class _CountingList(list):
    """A list that records the highest index read."""

    highest = -1

    def __getitem__(self, index):  # type: ignore[no-untyped-def]
        self.highest = max(self.highest, index)
        return super().__getitem__(index)


def _big_result(n: int) -> SearchResult:
    return SearchResult(
        ids=[f"doc{i}" for i in range(n)],
        scores=np.linspace(1.0, 0.0, n),
        payloads=[{"lang": "en"} for _ in range(n)],
        texts=_CountingList({"body": "x" * 1000} for _ in range(n)),
    )


def test_result_to_proto_stops_once_past_max_bytes():
    types = {"lang": PayloadType.KEYWORD}
    result = _big_result(1000)
    with pytest.raises(ResourceExhausted) as info:
        convert.result_to_proto(result, types, max_bytes=10_000)
    message = str(info.value)
    assert "would exceed 10000 bytes" in message
    assert "limit" in message and "payload_fields" in message and "text_fields" in message
    assert result.texts.highest < 20  # stopped early, not after building all 1000 hits
    full = convert.result_to_proto(_big_result(1000), types)
    assert len(full.hits) == 1000
    assert convert.result_to_proto(_big_result(1000), types, max_bytes=full.ByteSize()) == full  # exact sizes
    with pytest.raises(ResourceExhausted):
        convert.result_to_proto(_big_result(1000), types, max_bytes=full.ByteSize() - 1)


def test_result_to_proto_checks_the_ids_only_path_too():
    result = SearchResult(ids=[f"{i:0500d}" for i in range(100)], scores=np.zeros(100))
    with pytest.raises(ResourceExhausted, match="would exceed 1000 bytes"):
        convert.result_to_proto(result, {}, max_bytes=1000)
    assert len(convert.result_to_proto(result, {}, max_bytes=1 << 20).hits) == 100


def test_documents_to_proto_stops_once_past_max_bytes():
    def doc(i: int) -> dict:
        return {
            "id": f"d{i}",
            "text": {"body": "y" * 100},
            "payload": {"lang": "en"},
            "dense": {"emb": np.ones(1024, np.float32)},
            "sparse": {"s": SparseValue(values=np.ones(2, np.float32), indices=np.arange(2, dtype=np.uint32))},
        }

    types = {"lang": PayloadType.KEYWORD}
    built: list[int] = []

    def lazy():  # type: ignore[no-untyped-def]
        for i in range(100):
            built.append(i)
            yield doc(i)

    with pytest.raises(ResourceExhausted) as info:
        convert.documents_to_proto(lazy(), types, max_bytes=20_000)  # type: ignore[arg-type]
    assert "would exceed 20000 bytes" in str(info.value) and "include_vectors" in str(info.value)
    assert len(built) < 10  # each document is about 4 KiB: it stopped at the fifth or so
    full = convert.documents_to_proto([doc(i) for i in range(100)], types)
    assert [d.id for d in full] == [f"d{i}" for i in range(100)]
    assert full == [convert.document_to_proto(doc(i), types) for i in range(100)]
    size = pb.GetResponse(documents=full).ByteSize()
    assert convert.documents_to_proto([doc(i) for i in range(100)], types, max_bytes=size) == full
    with pytest.raises(ResourceExhausted):
        convert.documents_to_proto([doc(i) for i in range(100)], types, max_bytes=size - 1)


# -------------------------------------------------------------------- enums


@pytest.mark.parametrize("metric", [pb.METRIC_UNSPECIFIED, 99])
def test_dense_field_metric_is_required(braid, metric):
    field = pb.DenseVectorField(name="v", dim=4, metric=metric)
    err = rpc_error(lambda: braid.client.create_collection("docs", pb.Schema(dense_fields=[field])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("schema.dense_fields[0].metric:")
    assert "COSINE, DOT, L2" in err.details()


def test_unknown_payload_type_is_rejected(braid):
    bad = pb.Schema(text_fields=[pb.TextField(name="t")], payload_fields=[pb.PayloadField(name="p", type=42)])
    err = rpc_error(lambda: braid.client.create_collection("docs", bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("schema.payload_fields[0].type:")
    assert "42" in err.details() and "KEYWORD" in err.details()


def test_unknown_normalization_is_rejected(braid):
    _small_collection(braid)
    request = _fused_request([1.0, 1.0])
    request.fusion.weighted.normalization = 77
    err = rpc_error(lambda: braid.stub.Search(request))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("fusion.weighted.normalization:")
    assert "77" in err.details() and "Z_SCORE" in err.details()
    request.fusion.weighted.normalization = pb.NORMALIZATION_UNSPECIFIED  # still means MIN_MAX
    assert len(braid.stub.Search(request).hits) == 5


# ------------------------------------------------------------------ filters


def _nested(levels: int) -> pb.Filter:
    flt = pb.Filter(must=[pb.Condition(exists=pb.Exists(field="n"))])
    for _ in range(levels - 1):
        flt = pb.Filter(must=[pb.Condition(filter=flt)])
    return flt


def test_filters_nested_too_deep_get_braids_own_error(braid):
    from braid.index.payload import MAX_FILTER_DEPTH

    # protobuf's decoder itself refuses messages nested about 100 deep: Braid's limit must be reachable
    deepest = pb.BatchSearchRequest()
    deepest.searches.add(collection="docs").filter.CopyFrom(_nested(MAX_FILTER_DEPTH + 1))
    pb.BatchSearchRequest.FromString(deepest.SerializeToString())

    braid.client.create_collection("docs", schema(dim=4, payload={"n": pb.INT}, sparse=False))
    braid.client.upsert("docs", [{"id": "a", "text": {"title": "alpha"}, "payload": {"n": 1}}])
    assert braid.client.count("docs", filter=_nested(MAX_FILTER_DEPTH)) == 1
    assert len(braid.client.search("docs", bm25="alpha", filter=_nested(MAX_FILTER_DEPTH))) == 1
    for call in (
        lambda: braid.client.count("docs", filter=_nested(MAX_FILTER_DEPTH + 1)),
        lambda: braid.client.search("docs", bm25="alpha", filter=_nested(MAX_FILTER_DEPTH + 1)),
        lambda: braid.client.delete("docs", filter=_nested(MAX_FILTER_DEPTH + 1)),
    ):
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("filter")
        assert f"filters nest deeper than {MAX_FILTER_DEPTH} levels" in err.details()
