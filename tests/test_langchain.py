"""BraidVectorStore (service/integrations/langchain.py) against a real ``braid serve``: LangChain's
own standard suite (langchain-tests' VectorStoreIntegrationTests, sync and async, unmodified) with
its deterministic fake embeddings sent as client-side vectors, then what the suite does not cover:
metadata filters, hybrid and BM25 search, MMR, and the server's own encoder with no Embeddings."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from langchain_core.documents import Document
from langchain_tests.integration_tests.vectorstores import VectorStoreIntegrationTests

from braid.integrations.langchain import BraidVectorStore, to_filter
from braid.integrations.schema import collection_schema
from braid.v1 import braid_pb2 as pb

from .conftest import ChildServer

_names = itertools.count()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[ChildServer]:
    """One ``braid serve`` for the module (with the built-in models, for the encoder test)."""
    srv = ChildServer(tmp_path_factory.mktemp("langchain") / "data", "--models-dir", str(models_dir))
    yield srv
    srv.stop()


def _store(server: ChildServer, **options: object) -> BraidVectorStore:
    return BraidVectorStore(f"lc{next(_names)}", address=f"127.0.0.1:{server.port}", **options)  # type: ignore[arg-type]


class TestBraidStandard(VectorStoreIntegrationTests):
    @pytest.fixture
    def vectorstore(self, server: ChildServer) -> Iterator[BraidVectorStore]:
        """An empty store on a fresh collection, deleted after the test."""
        store = _store(server, embedding=self.get_embeddings())
        store.ensure_collection()
        try:
            yield store
        finally:
            store.delete_collection()
            store.close()


# ------------------------------------------------------------ beyond the suite

DOCS = [
    Document(id="a", page_content="braid fuses bm25 and dense vectors", metadata={"lang": "en", "n": 1, "tags": ["x"]}),
    Document(id="b", page_content="the river flows past the old mill", metadata={"lang": "de", "n": 2, "tags": ["y"]}),
    Document(id="c", page_content="hybrid search with reciprocal rank", metadata={"lang": "en", "n": 3}),
    Document(
        id="d", page_content="a quiet afternoon by the river", metadata={"lang": "fr", "n": 4, "tags": ["x", "y"]}
    ),
]


@pytest.fixture
def filled(server: ChildServer) -> Iterator[BraidVectorStore]:
    store = _store(server, embedding=VectorStoreIntegrationTests.get_embeddings())
    store.add_documents(DOCS)
    yield store
    store.delete_collection()
    store.close()


def _ids(docs: list[Document]) -> list[str]:
    return sorted(doc.id or "" for doc in docs)


def test_dict_filters_select_by_metadata(filled: BraidVectorStore) -> None:
    cases = {
        "{'lang': 'en'}": ({"lang": "en"}, ["a", "c"]),
        "$ne": ({"lang": {"$ne": "en"}}, ["b", "d"]),
        "$in": ({"lang": {"$in": ["de", "fr"]}}, ["b", "d"]),
        "$nin": ({"lang": {"$nin": ["de", "fr"]}}, ["a", "c"]),
        "range": ({"n": {"$gt": 1, "$lte": 3}}, ["b", "c"]),
        "list membership": ({"tags": "x"}, ["a", "d"]),
        "$or": ({"$or": [{"lang": "de"}, {"n": {"$gte": 4}}]}, ["b", "d"]),
        "$and": ({"$and": [{"lang": "en"}, {"n": {"$lt": 3}}]}, ["a"]),
        "$exists": ({"tags": {"$exists": False}}, ["c"]),
        "$not": ({"$not": {"lang": "en"}}, ["b", "d"]),
    }
    for name, (spec, want) in cases.items():
        assert _ids(filled.similarity_search("river", k=10, filter=spec)) == want, name
    assert _ids(asyncio.run(filled.asimilarity_search("river", k=10, filter={"lang": "en"}))) == ["a", "c"]
    filled.delete(filter={"lang": "de"})
    assert filled.get_by_ids(["a", "b"]) == [DOCS[0]]


def test_an_operator_braid_cannot_express_is_a_value_error_naming_it() -> None:
    for spec, named in (
        ({"lang": {"$like": "e%"}}, "$like"),
        ({"$nor": [{"lang": "en"}]}, "$nor"),
        ({"n": {"$gt": "3"}}, "$gt"),
        ({"lang": ["en", "de"]}, "$in"),
    ):
        with pytest.raises(ValueError, match=named.replace("$", r"\$")):
            to_filter(spec)
    assert to_filter({"lang": "en"}) == pb.Filter(
        must=[pb.Condition(match=pb.Match(field="lang", value=pb.Value(keyword="en")))]
    )


def test_bm25_and_hybrid_search_types(filled: BraidVectorStore) -> None:
    # The fake embeddings rank at random; BM25 finds the only documents with "river".
    assert _ids(filled.similarity_search("river", k=2, search_type="bm25")) == ["b", "d"]
    hybrid = filled.similarity_search_with_score("river mill", k=4, search_type="hybrid")
    assert hybrid[0][0] == DOCS[1]  # both words: top of BM25, and fused first
    retriever = filled.as_retriever(search_kwargs={"k": 1, "search_type": "bm25"})
    assert [doc.id for doc in retriever.invoke("mill")] == ["b"]
    assert asyncio.run(filled.asimilarity_search_with_score("river mill", k=4, search_type="hybrid")) == hybrid
    with pytest.raises(ValueError, match="search_type"):
        filled.similarity_search("river", search_type="fuzzy")


def test_mmr_trades_relevance_for_diversity(server: ChildServer) -> None:
    store = _store(server, embedding=VectorStoreIntegrationTests.get_embeddings())
    try:
        # Two exact copies of the query's vector (same text) and one other document.
        store.add_texts(["alpha", "alpha", "omega"], ids=["1", "2", "3"])
        vector = store.embedding.embed_query("alpha")  # type: ignore[union-attr]
        assert sorted(d.id or "" for d in store.similarity_search_by_vector(vector, k=2)) == ["1", "2"]
        diverse = store.max_marginal_relevance_search("alpha", k=2, fetch_k=3, lambda_mult=0.1)
        assert {diverse[0].id, diverse[1].id} != {"1", "2"} and diverse[1].id == "3"
        by_vector = asyncio.run(store.amax_marginal_relevance_search_by_vector(vector, k=2, fetch_k=3, lambda_mult=0.1))
        assert by_vector[1].id == "3"
        # A second event loop (asyncio.run makes one each time) gets a client of its own.
        assert asyncio.run(store.aget_by_ids(["3"])) == [Document(id="3", page_content="omega", metadata={})]
    finally:
        store.delete_collection()
        store.close()


def test_server_side_encoder_needs_no_embeddings(server: ChildServer) -> None:
    store = BraidVectorStore.from_texts(
        ["the cat sat on the mat", "stock markets fell sharply today", "a kitten naps in the sun"],
        metadatas=[{"k": 1}, {"k": 2}, {"k": 3}],
        ids=["cat", "stocks", "kitten"],
        collection=f"lc{next(_names)}",
        address=f"127.0.0.1:{server.port}",
        encoder_model="all-minilm-l6-v2",
    )
    try:
        assert store.embedding is None
        assert store.similarity_search("finance and shares", k=1)[0].id == "stocks"
        top = store.similarity_search_with_score("a small cat sleeping", k=2, search_type="hybrid")
        assert {doc.id for doc, _ in top} == {"cat", "kitten"}
        assert [d.id for d in store.max_marginal_relevance_search("kitten", k=1)] == ["kitten"]
    finally:
        store.delete_collection()
        store.close()


def test_the_stores_clients_and_collection_errors(server: ChildServer) -> None:
    embedding = VectorStoreIntegrationTests.get_embeddings()
    store = _store(server, embedding=embedding, create_collection=False)
    with pytest.raises(grpc.RpcError) as err:
        store.similarity_search("x")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # A store on a given client leaves it open on close; one without the dense field says so.
    shared = BraidVectorStore(
        store.collection, embedding, client=server.client, address=store.address, dense_field="vec"
    )
    try:
        shared.client.create_collection(store.collection, collection_schema("text", "emb", 6))
        shared.close()
        for search in (lambda: shared.similarity_search("x"), lambda: asyncio.run(shared.asimilarity_search("x"))):
            with pytest.raises(ValueError, match=f"collection '{store.collection}' has no dense field 'vec'"):
                search()
        with pytest.raises(ValueError, match=r"unknown search argument\(s\): colour"):
            store.similarity_search("x", colour="red")
        assert store.similarity_search("x") == []
    finally:
        server.client.delete_collection(store.collection)
        store.close()
