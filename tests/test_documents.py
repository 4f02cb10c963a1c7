"""Document writes and reads through the gRPC API: round trips, replace, delete, and bad input."""

from __future__ import annotations

import datetime as dt

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from braid.service.client import dense_vector
from braid.v1 import braid_pb2 as pb

from .conftest import random_vectors, rpc_error, schema

PAYLOAD = {"lang": pb.KEYWORD, "year": pb.INT, "price": pb.FLOAT, "draft": pb.BOOL, "at": pb.DATETIME}


@pytest.fixture
def docs(braid):
    braid.client.create_collection("docs", schema(dim=4, payload=PAYLOAD))
    return braid


def doc(i: int, vec=None, **payload) -> dict:  # type: ignore[no-untyped-def]
    return {
        "id": f"d{i}",
        "text": {"title": f"title {i}", "body": f"body words number{i}"},
        "dense": {"emb": vec if vec is not None else np.full(4, i + 1.0, np.float32)},
        "sparse": {"splade": {f"tok{i}": 1.0, "shared": 0.5}},
        "payload": payload,
    }


def test_upsert_get_count_round_trip(docs):
    when = dt.datetime(2024, 5, 1, 12, 30, tzinfo=dt.UTC)
    c = docs.client
    assert c.upsert("docs", [doc(1, lang="en", year=2020, price=9.5, draft=False, at=when), doc(2, lang="de")]) == 2
    assert c.count("docs") == 2
    got = c.get("docs", ["d2", "missing", "d1"], include_vectors=True)
    assert [d.id for d in got] == ["d2", "d1"]
    d1 = got[1]
    assert d1.text == {"title": "title 1", "body": "body words number1"}
    assert d1.payload["lang"].keyword == "en"
    assert d1.payload["year"].int == 2020
    assert d1.payload["price"].float == 9.5
    assert d1.payload["draft"].bool is False
    assert d1.payload["at"].datetime.ToDatetime(tzinfo=dt.UTC) == when
    assert dict(zip(d1.sparse["splade"].tokens, d1.sparse["splade"].values, strict=True)) == {
        "tok1": 1.0,
        "shared": 0.5,
    }
    vec = np.frombuffer(d1.dense["emb"].packed, "<f4")
    np.testing.assert_allclose(vec, np.full(4, 0.5), rtol=1e-6)  # cosine fields come back unit-normalized
    assert set(got[0].payload) == {"lang"}
    assert c.get("docs", ["d1"])[0].dense == {}  # vectors only on request


def test_repeated_floats_and_packed_vectors_are_the_same(docs):
    c = docs.client
    vec = [0.1, 0.2, 0.3, 0.4]
    c.stub.Upsert(
        pb.UpsertRequest(collection="docs", documents=[pb.Document(id="a", dense={"emb": pb.DenseVector(values=vec)})])
    )
    c.upsert("docs", [{"id": "b", "dense": {"emb": vec}}])
    hits = c.search("docs", dense=("emb", vec), limit=2)
    assert {h.id for h in hits} == {"a", "b"}
    assert hits[0].score == pytest.approx(1.0, abs=1e-5) and hits[1].score == pytest.approx(1.0, abs=1e-5)


def test_integer_sparse_indices_round_trip(docs):
    docs.client.upsert("docs", [{"id": "s", "sparse": {"splade": {7: 0.5, 4_000_000_000: 2.0}}}])
    got = docs.client.get("docs", ["s"])[0].sparse["splade"]
    assert dict(zip(got.indices, got.values, strict=True)) == {7: 0.5, 4_000_000_000: 2.0}


def test_replace_is_visible_in_every_strand(docs):
    c = docs.client
    c.upsert("docs", [doc(1, lang="en"), doc(2, lang="en")])
    replacement = {
        "id": "d1",
        "text": {"body": "completely different zebra"},
        "dense": {"emb": [-1.0, -1.0, -1.0, -1.0]},
        "sparse": {"splade": {"zebra": 3.0}},
        "payload": {"lang": "fr"},
    }
    c.upsert("docs", [replacement])
    assert c.count("docs") == 2
    assert c.search("docs", bm25="number1") == []
    assert [h.id for h in c.search("docs", bm25="zebra")] == ["d1"]
    assert [h.id for h in c.search("docs", sparse=("splade", {"tok1": 1.0}))] == []
    assert [h.id for h in c.search("docs", sparse=("splade", {"zebra": 1.0}))] == ["d1"]
    dense_hits = c.search("docs", dense=("emb", [1, 1, 1, 1]), limit=5)
    assert [h.id for h in dense_hits] == ["d2", "d1"]  # d1 now points the other way
    assert dense_hits[1].score == pytest.approx(-1.0, abs=1e-5)
    only_en = pb.Filter(must=[pb.Condition(match=pb.Match(field="lang", value=pb.Value(keyword="en")))])
    assert c.count("docs", only_en) == 1
    assert c.get("docs", ["d1"])[0].payload["lang"].keyword == "fr"
    assert "title" not in c.get("docs", ["d1"])[0].text  # a replace drops fields the new version lacks


def test_same_id_twice_in_one_batch_keeps_the_last(docs):
    c = docs.client
    first, second = doc(1, lang="en"), doc(1, lang="de")
    assert c.upsert("docs", [first, second]) == 1
    assert c.count("docs") == 1
    assert c.get("docs", ["d1"])[0].payload["lang"].keyword == "de"


def test_delete_is_visible_in_every_strand(docs):
    c = docs.client
    c.upsert("docs", [doc(i, lang="en" if i % 2 else "de", year=2000 + i) for i in range(10)])
    assert c.delete("docs", ids=["d1", "d3", "nope"]) == 2
    for strand in ({"bm25": "number1"}, {"sparse": ("splade", {"tok3": 1.0})}):
        assert [h.id for h in c.search("docs", **strand)] == []
    ids = {h.id for h in c.search("docs", dense=("emb", [1, 1, 1, 1]), limit=100)}
    assert ids == {f"d{i}" for i in range(10)} - {"d1", "d3"}
    old = pb.Filter(must=[pb.Condition(range=pb.Range(field="year", lt=pb.Value(int=2005)))])
    assert c.delete("docs", filter=old) == 3  # d0, d2, d4
    assert c.count("docs") == 5
    assert {d.id for d in c.get("docs", [f"d{i}" for i in range(10)])} == {"d5", "d6", "d7", "d8", "d9"}
    assert [h.id for h in c.search("docs", bm25="body", limit=100)].__len__() == 5


def test_count_with_filter(docs):
    c = docs.client
    c.upsert("docs", [doc(i, lang=["en", "de", "fr"][i % 3], year=2000 + i) for i in range(30)])
    lang = pb.Filter(
        must=[pb.Condition(any=pb.MatchAny(field="lang", values=[pb.Value(keyword="en"), pb.Value(keyword="fr")]))]
    )
    assert c.count("docs", lang) == 20
    no_year = pb.Filter(must_not=[pb.Condition(exists=pb.Exists(field="year"))])
    assert c.count("docs", no_year) == 0


# ----------------------------------------------------------------- bad input


def upsert_error(braid, *documents: pb.Document) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    return rpc_error(lambda: braid.stub.Upsert(pb.UpsertRequest(collection="docs", documents=list(documents))))


@pytest.mark.parametrize(
    ("document", "code", "needle"),
    [
        (pb.Document(id=""), grpc.StatusCode.INVALID_ARGUMENT, "documents[1].id"),
        (pb.Document(id="x" * 600), grpc.StatusCode.INVALID_ARGUMENT, "documents[1].id"),
        (
            pb.Document(id="a", dense={"emb": pb.DenseVector(values=[1, 2, 3])}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "expected dim 4, got 3",
        ),
        (
            pb.Document(id="a", dense={"emb": pb.DenseVector(values=[1, float("nan"), 3, 4])}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].dense.emb",
        ),
        (
            pb.Document(id="a", dense={"emb": pb.DenseVector(values=[1, float("inf"), 3, 4])}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "NaN or infinity",
        ),
        (
            pb.Document(id="a", dense={"emb": pb.DenseVector(packed=b"\x00" * 7)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "multiple of 4",
        ),
        (
            pb.Document(id="a", dense={"other": pb.DenseVector(values=[1, 2, 3, 4])}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].dense.other",
        ),
        (
            pb.Document(id="a", dense={"emb": pb.DenseVector(values=[1, 3e38, 3e38, 4])}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "scores would overflow",
        ),
        (
            pb.Document(id="a", sparse={"splade": pb.SparseVector(indices=[1], values=[1e30])}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].sparse.splade: weights must be within",
        ),
        (pb.Document(id="a", text={"nope": "x"}), grpc.StatusCode.INVALID_ARGUMENT, "documents[1].text.nope"),
        (
            pb.Document(id="a", sparse={"splade": pb.SparseVector(indices=[1, 2], values=[1.0])}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].sparse.splade",
        ),
        (
            pb.Document(id="a", payload={"year": pb.Value(keyword="1999")}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].payload.year",
        ),
        (
            pb.Document(id="a", payload={"unknown": pb.Value(int=1)}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].payload.unknown",
        ),
        (
            pb.Document(id="a", payload={"lang": pb.Value()}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "documents[1].payload.lang",
        ),
    ],
)
def test_bad_upsert_applies_nothing(docs, document, code, needle):
    good = pb.Document(id="good", dense={"emb": dense_vector([1, 2, 3, 4])})
    err = upsert_error(docs, good, document)
    assert err.code() == code
    assert needle in err.details()
    assert docs.client.count("docs") == 0  # the good document in the same batch was not applied


def test_batch_over_the_limit_is_resource_exhausted(tmp_path):
    from .conftest import start_in_process, stop_in_process

    server, running = start_in_process(tmp_path / "d", max_batch=5)
    try:
        running.client.create_collection("docs", schema(dim=4))
        err = rpc_error(lambda: running.client.upsert("docs", [{"id": str(i)} for i in range(6)]))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "documents" in err.details()
    finally:
        stop_in_process(server, running)


def test_oversized_message_is_resource_exhausted(tmp_path):
    from .conftest import start_in_process, stop_in_process

    server, running = start_in_process(tmp_path / "d", max_message_bytes=64 * 1024)
    try:
        running.client.create_collection("docs", schema(dim=4))
        big = [{"id": str(i), "text": {"body": "x" * 1000}} for i in range(100)]
        assert rpc_error(lambda: running.client.upsert("docs", big)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert running.client.count("docs") == 0
    finally:
        stop_in_process(server, running)


def test_bad_delete_get_count_requests(docs):
    stub = docs.stub
    cases = [
        (lambda: stub.Delete(pb.DeleteRequest(collection="docs")), grpc.StatusCode.INVALID_ARGUMENT, "ids"),
        (
            lambda: stub.Delete(
                pb.DeleteRequest(
                    collection="docs", ids=["a"], filter=pb.Filter(must=[pb.Condition(exists=pb.Exists(field="lang"))])
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "ids",
        ),
        (
            lambda: stub.Delete(
                pb.DeleteRequest(
                    collection="docs", filter=pb.Filter(must=[pb.Condition(exists=pb.Exists(field="z..z"))])
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "z..z",  # an undeclared field is a metadata path: this one has an empty key
        ),
        (
            lambda: stub.Count(
                pb.CountRequest(
                    collection="docs",
                    filter=pb.Filter(must=[pb.Condition(range=pb.Range(field="lang", gt=pb.Value(int=1)))]),
                )
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "lang",
        ),
        (
            lambda: stub.Count(pb.CountRequest(collection="docs", filter=pb.Filter(must=[pb.Condition()]))),
            grpc.StatusCode.INVALID_ARGUMENT,
            "filter.must[0]",
        ),
    ]
    for call, code, needle in cases:
        err = rpc_error(call)
        assert err.code() == code, err.details()
        assert needle in err.details()


def test_bulk_upsert_streams_batches(docs):
    vectors = random_vectors(1000, 4)
    summary = docs.client.bulk_upsert(
        "docs", ({"id": f"b{i}", "dense": {"emb": vectors[i]}} for i in range(1000)), batch_size=128
    )
    assert (summary.upserted, summary.batches) == (1000, 8)
    assert docs.client.count("docs") == 1000


def test_bulk_upsert_bad_batch_reports_what_was_acknowledged(docs):
    def batches():  # type: ignore[no-untyped-def]
        yield pb.UpsertRequest(collection="docs", documents=[pb.Document(id="a"), pb.Document(id="b")])
        yield pb.UpsertRequest(
            collection="docs", documents=[pb.Document(id="c", payload={"year": pb.Value(bool=True)})]
        )

    err = rpc_error(lambda: docs.stub.BulkUpsert(batches()))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "batch 1" in err.details() and "2 documents" in err.details()
    assert docs.client.count("docs") == 2


def test_bad_get_requests(tmp_path):
    from .conftest import start_in_process, stop_in_process

    server, running = start_in_process(tmp_path / "d", max_batch=3)
    try:
        running.client.create_collection("docs", schema(dim=4))
        stub = running.stub
        err = rpc_error(lambda: stub.Get(pb.GetRequest(collection="docs", ids=["a", ""])))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "ids[1]" in err.details()
        err = rpc_error(lambda: stub.Get(pb.GetRequest(collection="docs", ids=["a", "b", "c", "d"])))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "ids" in err.details()
        err = rpc_error(lambda: stub.Delete(pb.DeleteRequest(collection="docs", ids=["a", "b", "c", "d"])))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        search = pb.SearchRequest(collection="docs", queries=[pb.SubQuery(bm25=pb.Bm25Query(text="x"))])
        err = rpc_error(lambda: stub.BatchSearch(pb.BatchSearchRequest(searches=[search] * 4)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "searches" in err.details()
        assert stub.Get(pb.GetRequest(collection="docs")).documents == []
    finally:
        stop_in_process(server, running)


def test_empty_sparse_vector_round_trips(docs):
    docs.stub.Upsert(
        pb.UpsertRequest(collection="docs", documents=[pb.Document(id="z", sparse={"splade": pb.SparseVector()})])
    )
    got = docs.client.get("docs", ["z"])[0]
    assert list(got.sparse["splade"].values) == []


def test_out_of_range_timestamp_is_invalid_argument(docs):
    bad = pb.Value()
    bad.datetime.seconds = 10**12
    err = upsert_error(docs, pb.Document(id="a", payload={"at": bad}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "documents[0].payload.at" in err.details()


@pytest.mark.parametrize(("bound", "expected"), [("gt", {"b"}), ("gte", {"b"}), ("lt", {"a"}), ("lte", {"a"})])
def test_datetime_range_bounds_between_two_microseconds(docs, bound, expected):
    """Stored datetimes are whole microseconds; a bound at 10.5 us splits the docs at 10 us and 11 us."""
    for doc_id, micros in (("a", 10), ("b", 11)):
        at = Timestamp()
        at.FromMicroseconds(micros)
        docs.stub.Upsert(
            pb.UpsertRequest(
                collection="docs",
                documents=[
                    pb.Document(
                        id=doc_id, payload={"at": pb.Value(datetime=at)}, dense={"emb": dense_vector([1, 2, 3, 4])}
                    )
                ],
            )
        )
    half = pb.Value(datetime=Timestamp(seconds=0, nanos=10_500))
    flt = pb.Filter(must=[pb.Condition(range=pb.Range(field="at", **{bound: half}))])
    hits = docs.stub.Search(
        pb.SearchRequest(
            collection="docs",
            filter=flt,
            limit=10,
            queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector([1, 2, 3, 4])))],
        )
    ).hits
    assert {h.id for h in hits} == expected
