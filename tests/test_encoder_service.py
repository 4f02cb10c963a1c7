"""Encoders through the gRPC API: text-only upserts fill vectors, text queries are encoded, errors are clear."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.encoders.registry import ModelStore
from braid.service.client import document
from braid.v1 import braid_pb2 as pb

from .conftest import Running, rpc_error, start_in_process, stop_in_process

DENSE = "all-minilm-l6-v2"
SPARSE = "minilm-tied-splade"

DOCS = {
    "bread": "A recipe for sourdough bread: flour, water, salt and a starter, baked in a hot oven.",
    "brakes": "How to replace worn brake pads on a car and bleed the hydraulic brake lines.",
    "python": "Python list comprehensions build a new list from an iterable in one expression.",
    "whales": "Blue whales are the largest animals ever known; they feed on krill in cold oceans.",
    "tax": "Filing your income tax return: deductions, credits and the deadline in April.",
    "guitar": "Tuning a six-string guitar to standard pitch E A D G B E by ear or with a tuner.",
}
QUERIES = {
    "bread": "how do I bake a loaf at home",
    "brakes": "my car squeaks when I stop, fix it",
    "python": "building lists concisely in a programming language",
    "whales": "biggest creature in the sea",
    "tax": "when is my IRS paperwork due",
    "guitar": "getting the strings of my instrument in tune",
}


@pytest.fixture
def server(tmp_path: Path, models_dir: Path) -> Iterator[Running]:
    srv, running = start_in_process(tmp_path / "data", models_dir=models_dir)
    running.server = srv  # type: ignore[attr-defined]
    yield running
    stop_in_process(srv, running)


def encoded_schema(precision: str = "fp32", query_mode: str = "model", dim: int = 0) -> pb.Schema:
    return pb.Schema(
        text_fields=[pb.TextField(name="title"), pb.TextField(name="body")],
        dense_fields=[
            pb.DenseVectorField(
                name="emb",
                dim=dim,
                metric=pb.COSINE,
                encoder=pb.Encoder(model=DENSE, source_fields=["body"], precision=precision),
            )
        ],
        sparse_fields=[
            pb.SparseVectorField(
                name="terms",
                encoder=pb.Encoder(model=SPARSE, source_fields=["title", "body"], query_mode=query_mode, top_k=64),
            )
        ],
    )


def fill(braid: Running, name: str = "docs") -> None:
    braid.client.upsert(name, [{"id": k, "text": {"body": v}} for k, v in DOCS.items()])


def top(braid: Running, **search: object) -> str:
    return braid.client.search("docs", limit=3, **search)[0].id  # type: ignore[arg-type]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_text_in_semantically_right_document_out(server: Running, precision: str) -> None:
    info = server.client.create_collection("docs", encoded_schema(precision))
    assert info.schema.dense_fields[0].dim == 384  # taken from the model
    assert info.schema.dense_fields[0].encoder.precision == precision
    fill(server)
    for expected, query in QUERIES.items():
        assert top(server, dense=("emb", query)) == expected, query


def test_stored_vectors_are_the_models_embeddings(server: Running, models_dir: Path) -> None:
    server.client.create_collection("docs", encoded_schema())
    fill(server)
    (doc,) = server.client.get("docs", ["whales"], include_vectors=True)
    stored = np.frombuffer(doc.dense["emb"].packed, "<f4")
    expected = ModelStore(models_dir).encoder(DENSE).encode([DOCS["whales"]])[0]
    assert float(stored @ expected) >= 0.9999
    assert doc.sparse["terms"].indices and len(doc.sparse["terms"].indices) <= 64


def test_a_vector_the_client_sends_is_kept(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    own = np.zeros(384, np.float32)
    own[7] = 1.0
    server.client.upsert("docs", [{"id": "mine", "text": {"body": "some text"}, "dense": {"emb": own}}])
    (doc,) = server.client.get("docs", ["mine"], include_vectors=True)
    assert np.frombuffer(doc.dense["emb"].packed, "<f4")[7] == pytest.approx(1.0)


@pytest.mark.parametrize("query_mode", ["model", "idf"])
def test_sparse_text_queries(server: Running, query_mode: str) -> None:
    server.client.create_collection("docs", encoded_schema(query_mode=query_mode))
    fill(server)
    assert top(server, sparse=("terms", "sourdough bread oven")) == "bread"
    assert top(server, sparse=("terms", "guitar tuner")) == "guitar"
    assert server.client.search("docs", sparse=("terms", "zzzzqqq")) == [] or query_mode == "model"


def test_inference_free_queries_never_run_the_model(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema(query_mode="idf"))
    fill(server)
    server.client.search("docs", sparse=("terms", "krill in cold oceans"))
    encoding = server.server.encoding  # type: ignore[attr-defined]
    assert (SPARSE, "fp32") not in encoding._batchers


def test_hybrid_bm25_plus_dense_text(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    fill(server)
    hits = server.client.search("docs", bm25="guitar", dense=("emb", "tuning a stringed instrument"), explain=True)
    assert hits[0].id == "guitar"
    assert {e.query for e in hits[0].explain} == {"bm25", "dense:emb"}


def test_batch_search_with_text_equals_single_searches(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    fill(server)
    searches = [
        pb.SearchRequest(collection="docs", limit=3, queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", text=q))])
        for q in QUERIES.values()
    ]
    mixed = [
        pb.SearchRequest(
            collection="docs",
            limit=3,
            queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", text=q)), pb.SubQuery(bm25=pb.Bm25Query(text=q))],
        )
        for q in QUERIES.values()
    ]
    for batch in (searches, mixed):
        results = server.stub.BatchSearch(pb.BatchSearchRequest(searches=batch)).results
        singles = [server.stub.Search(s) for s in batch]
        assert [[h.id for h in r.hits] for r in results] == [[h.id for h in r.hits] for r in singles]
    assert [r.hits[0].id for r in server.stub.BatchSearch(pb.BatchSearchRequest(searches=searches)).results] == list(
        QUERIES
    )


def test_concurrent_text_searches_share_model_calls(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    fill(server)
    server.client.search("docs", dense=("emb", "warm up"))
    batcher = server.server.encoding._batchers[(DENSE, "fp32")]  # type: ignore[attr-defined]
    calls_before = batcher.calls
    barrier = threading.Barrier(32)
    answers: dict[int, str] = {}
    keys = list(QUERIES)

    def client(i: int) -> None:
        barrier.wait()
        answers[i] = top(server, dense=("emb", QUERIES[keys[i % len(keys)]]))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == {i: keys[i % len(keys)] for i in range(32)}
    assert batcher.calls - calls_before < 32


def test_encoder_fields_survive_a_kill(child_server, models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BRAID_MODELS_DIR", str(models_dir))
    first = child_server()
    first.client.create_collection("docs", encoded_schema())
    fill(first)  # type: ignore[arg-type]
    first.kill()
    second = child_server(first.data_dir)
    assert second.client.get_collection("docs").schema.dense_fields[0].encoder.model == DENSE
    assert top(second, dense=("emb", QUERIES["whales"])) == "whales"  # type: ignore[arg-type]
    assert top(second, sparse=("terms", "brake pads")) == "brakes"  # type: ignore[arg-type]
    second.stop()


# ------------------------------------------------------------------ errors


def schema_with(**encoder: object) -> pb.Schema:
    fields = {"model": DENSE, "source_fields": ["body"], **encoder}
    dim = fields.pop("dim", 0)
    return pb.Schema(
        text_fields=[pb.TextField(name="body")],
        dense_fields=[pb.DenseVectorField(name="emb", dim=dim, metric=pb.COSINE, encoder=pb.Encoder(**fields))],  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    ("encoder", "code", "words"),
    [
        ({"model": "no-such-model"}, grpc.StatusCode.NOT_FOUND, "schema.dense_fields[0].encoder.model"),
        ({"model": SPARSE}, grpc.StatusCode.INVALID_ARGUMENT, "is a sparse model, not dense"),
        ({"dim": 128}, grpc.StatusCode.INVALID_ARGUMENT, "expected dim 384, got 128"),
        ({"source_fields": ["title"]}, grpc.StatusCode.INVALID_ARGUMENT, "'title' is not a text field"),
        ({"source_fields": []}, grpc.StatusCode.INVALID_ARGUMENT, "encoder.source_fields"),
        ({"precision": "fp8"}, grpc.StatusCode.INVALID_ARGUMENT, "encoder.precision"),
        ({"query_mode": "idf"}, grpc.StatusCode.INVALID_ARGUMENT, "only sparse fields have a query mode"),
    ],
)
def test_bad_encoder_schemas(server: Running, encoder: dict, code: grpc.StatusCode, words: str) -> None:
    err = rpc_error(lambda: server.client.create_collection("bad", schema_with(**encoder)))
    assert err.code() == code and words in err.details(), err.details()
    assert server.client.list_collections() == []


def test_a_model_that_is_not_exported_names_the_command(tmp_path: Path) -> None:
    srv, running = start_in_process(tmp_path / "data", models_dir=tmp_path / "empty-models")
    try:
        err = rpc_error(lambda: running.client.create_collection("docs", schema_with()))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert f"braid models export {DENSE} --models-dir" in err.details()
    finally:
        stop_in_process(srv, running)


def test_bad_text_queries(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    plain = pb.Schema(dense_fields=[pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE)])
    server.client.create_collection("plain", plain)
    fill(server)

    def search(collection: str, sub: pb.SubQuery) -> grpc.RpcError:
        return rpc_error(lambda: server.stub.Search(pb.SearchRequest(collection=collection, queries=[sub])))

    cases = [
        ("plain", pb.SubQuery(dense=pb.DenseQuery(field="v", text="hi")), "field 'v' has no encoder"),
        ("docs", pb.SubQuery(dense=pb.DenseQuery(field="nope", text="hi")), "unknown dense field 'nope'"),
        (
            "docs",
            pb.SubQuery(dense=pb.DenseQuery(field="emb", text="  ")),
            "queries[0].dense.text: query text is empty",
        ),
        (
            "docs",
            pb.SubQuery(dense=pb.DenseQuery(field="emb", text="hi", vector=pb.DenseVector(values=[1.0] * 384))),
            "set vector or text, not both",
        ),
        (
            "docs",
            pb.SubQuery(sparse=pb.SparseQuery(field="terms", text="x" * (1 << 20 + 1))),
            "queries[0].sparse.text: query is 2097152 bytes, more than the maximum of 65536",
        ),
    ]
    for collection, sub, words in cases:
        err = search(collection, sub)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()


def test_text_over_the_limit_is_rejected_and_nothing_is_written(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    docs = [
        document({"id": "ok", "text": {"body": "fine"}}),
        document({"id": "big", "text": {"title": "t" * 600_000, "body": "b" * 600_000}}),
    ]
    err = rpc_error(lambda: server.stub.Upsert(pb.UpsertRequest(collection="docs", documents=docs)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "documents[1].text" in err.details()
    assert server.client.count("docs") == 0


def test_encoding_does_not_block_other_rpcs(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    fill(server)
    long_docs = [
        {"id": f"long{i}", "text": {"body": f"paragraph {i} " + "words of a long document " * 60}} for i in range(32)
    ]
    writer = threading.Thread(target=lambda: server.client.upsert("docs", long_docs))
    writer.start()
    answered_while_encoding = 0
    while writer.is_alive():
        server.client.count("docs")
        assert top(server, bm25="sourdough") == "bread"
        if writer.is_alive():
            answered_while_encoding += 1
        writer.join(timeout=0.05)
    assert answered_while_encoding >= 3
    assert server.client.count("docs") == len(DOCS) + len(long_docs)


def test_a_bad_text_in_a_batch_search_is_named_by_its_index(server: Running) -> None:
    server.client.create_collection("docs", encoded_schema())
    searches = [
        pb.SearchRequest(collection="docs", queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", text=text))])
        for text in ("fine", "also fine", "   ")
    ]
    err = rpc_error(lambda: server.stub.BatchSearch(pb.BatchSearchRequest(searches=searches)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "searches[2].queries[0].dense.text: query text is empty" in err.details()
