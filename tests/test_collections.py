"""Collection lifecycle through the gRPC API, and its error codes."""

from __future__ import annotations

import grpc
import pytest

from braid.v1 import braid_pb2 as pb

from .conftest import rpc_error, schema, status_of


def test_create_get_list_delete_round_trip(braid):
    info = braid.client.create_collection("docs", schema(dim=4, payload={"lang": pb.KEYWORD}), shards=2)
    assert (info.name, info.shards, info.documents) == ("docs", 2, 0)
    assert info.schema.dense_fields[0].dim == 4
    assert info.schema.dense_fields[0].hnsw.m == 16
    assert info.schema.payload_fields[0].type == pb.KEYWORD
    assert info.created_at.seconds > 0

    braid.client.create_collection("alpha", schema(dim=4))
    assert [c.name for c in braid.client.list_collections()] == ["alpha", "docs"]
    got = braid.client.get_collection("docs")
    assert got.schema == info.schema

    braid.client.delete_collection("docs")
    assert [c.name for c in braid.client.list_collections()] == ["alpha"]
    assert status_of(lambda: braid.client.get_collection("docs")) == grpc.StatusCode.NOT_FOUND


def test_defaults_fill_in_unset_schema_values(braid):
    info = braid.client.create_collection(
        "d",
        pb.Schema(
            dense_fields=[pb.DenseVectorField(name="v", dim=3, metric=pb.COSINE)], text_fields=[pb.TextField(name="t")]
        ),
    )
    field = info.schema.dense_fields[0]
    assert field.metric == pb.COSINE
    assert (field.hnsw.m, field.hnsw.ef_construction, field.hnsw.ef_search) == (16, 200, 64)
    assert info.schema.text_fields[0].analyzer == "default"
    assert info.shards == 1


def test_duplicate_is_already_exists(braid):
    braid.client.create_collection("docs", schema())
    err = rpc_error(lambda: braid.client.create_collection("docs", schema()))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "docs" in err.details()


@pytest.mark.parametrize(
    ("name", "bad_schema", "needle"),
    [
        ("Bad Name", schema(), "name"),
        ("x" * 65, schema(), "name"),
        ("", schema(), "name"),
        ("ok", pb.Schema(), "schema"),
        ("ok", pb.Schema(dense_fields=[pb.DenseVectorField(name="v", dim=0, metric=pb.COSINE)]), "dim"),
        (
            "ok",
            pb.Schema(dense_fields=[pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE, hnsw=pb.HnswParams(m=1))]),
            "hnsw.m",
        ),
        ("ok", pb.Schema(text_fields=[pb.TextField(name="t", analyzer="klingon")]), "analyzer"),
        ("ok", pb.Schema(text_fields=[pb.TextField(name="t"), pb.TextField(name="t")]), "duplicate"),
        ("ok", pb.Schema(text_fields=[pb.TextField(name="t")], payload_fields=[pb.PayloadField(name="p")]), "type"),
        ("ok", pb.Schema(text_fields=[pb.TextField(name="bad name")]), "name"),
    ],
)
def test_bad_collection_requests_are_invalid_argument(braid, name, bad_schema, needle):
    err = rpc_error(lambda: braid.client.create_collection(name, bad_schema))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()
    assert braid.client.list_collections() == []


def test_shard_count_limits(braid):
    err = rpc_error(lambda: braid.client.create_collection("s", schema(), shards=1000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shards" in err.details()


def test_unknown_collection_is_not_found_for_every_rpc(braid):
    stub = braid.stub
    calls = [
        lambda: stub.GetCollection(pb.GetCollectionRequest(name="nope")),
        lambda: stub.DeleteCollection(pb.DeleteCollectionRequest(name="nope")),
        lambda: stub.Upsert(pb.UpsertRequest(collection="nope", documents=[pb.Document(id="a")])),
        lambda: stub.BulkUpsert(iter([pb.UpsertRequest(collection="nope", documents=[pb.Document(id="a")])])),
        lambda: stub.Delete(pb.DeleteRequest(collection="nope", ids=["a"])),
        lambda: stub.Get(pb.GetRequest(collection="nope", ids=["a"])),
        lambda: stub.Count(pb.CountRequest(collection="nope")),
        lambda: stub.Flush(pb.FlushRequest(collection="nope")),
        lambda: stub.Search(pb.SearchRequest(collection="nope", queries=[pb.SubQuery(bm25=pb.Bm25Query(text="x"))])),
        lambda: stub.BatchSearch(
            pb.BatchSearchRequest(
                searches=[pb.SearchRequest(collection="nope", queries=[pb.SubQuery(bm25=pb.Bm25Query(text="x"))])]
            )
        ),
    ]
    for call in calls:
        err = rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
        assert "nope" in err.details()


def test_collections_survive_restart(tmp_path):
    from .conftest import start_in_process, stop_in_process

    server, running = start_in_process(tmp_path / "d")
    running.client.create_collection("keep", schema(dim=4), shards=3)
    running.client.create_collection("gone", schema(dim=4))
    running.client.delete_collection("gone")
    stop_in_process(server, running)

    server, running = start_in_process(tmp_path / "d")
    try:
        infos = running.client.list_collections()
        assert [(c.name, c.shards) for c in infos] == [("keep", 3)]
    finally:
        stop_in_process(server, running)


def test_reserved_field_names_are_rejected_and_nothing_is_left_behind(braid):
    bad = pb.Schema(text_fields=[pb.TextField(name="_label")])
    err = rpc_error(lambda: braid.client.create_collection("lab", bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "_label" in err.details()
    braid.client.create_collection("lab", schema())  # the name is still free
    assert [c.name for c in braid.client.list_collections()] == ["lab"]
