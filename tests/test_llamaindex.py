"""BraidVectorStore (service/integrations/llamaindex.py) against a real server with the real ONNX
encoder: a VectorStoreIndex built from Documents and queried through retrievers (DEFAULT, HYBRID
with alpha, TEXT_SEARCH) with no embed model, every metadata filter operator braid.v1 can express
(and the error for one it cannot), delete by ref_doc_id, the async methods, and client-side
embeddings for a collection without an encoder. Nothing may leave the machine: llama-index's
defaults (tiktoken's vocabulary, OpenAI embeddings) would, so a guard fails any such connection."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from llama_index.core import Document, Settings, StorageContext, VectorStoreIndex
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from braid.integrations.llamaindex import BraidVectorStore, to_filter

from .conftest import Running, start_in_process, stop_in_process

MODEL = "all-minilm-l6-v2"
_names = itertools.count()
LOOPBACK = ("127.0.0.1", "::1", "localhost")


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python-level connections and lookups beyond loopback fail the test (gRPC's own C sockets,
    loopback only here, are not Python's)."""
    connect, lookup = socket.socket.connect, socket.getaddrinfo

    def guarded_connect(sock: socket.socket, address: object) -> None:
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise AssertionError(f"a connection to {address} left the machine")
        connect(sock, address)

    def guarded_lookup(host: object, *args: object, **kwargs: object) -> object:
        if host not in (*LOOPBACK, None):
            raise AssertionError(f"a name lookup of {host!r} left the machine")
        return lookup(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_lookup)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Running]:
    srv, running = start_in_process(tmp_path_factory.mktemp("llamaindex") / "data", models_dir=models_dir)
    yield running
    stop_in_process(srv, running)


@pytest.fixture(scope="module")
def no_embed_model() -> Iterator[None]:
    """LlamaIndex's documented switch for no embed model (its MockEmbedding); restored after."""
    saved = Settings._embed_model
    Settings.embed_model = None
    yield
    Settings._embed_model = saved


def _store(server: Running, **options: object) -> BraidVectorStore:
    return BraidVectorStore(f"li{next(_names)}", address=f"127.0.0.1:{server.port}", **options)  # type: ignore[arg-type]


DOCS = [
    Document(id_="cat", text="the cat sat on the mat", metadata={"lang": "en", "n": 1, "tags": ["pet", "x"]}),
    Document(id_="stocks", text="stock markets fell sharply today", metadata={"lang": "de", "n": 2, "tags": ["y"]}),
    Document(id_="kitten", text="a kitten naps in the sun", metadata={"lang": "en", "n": 3, "tags": ["pet"]}),
    Document(id_="e42", text="error E42 means the sensor lost power", metadata={"lang": "fr", "n": 4}),
]


@pytest.fixture(scope="module")
def index(server: Running, no_embed_model: None) -> Iterator[VectorStoreIndex]:
    """DOCS through a VectorStoreIndex (one node each; a whitespace tokenizer, not tiktoken's download)."""
    store = _store(server, encoder_model=MODEL)
    built = VectorStoreIndex.from_documents(
        DOCS,
        storage_context=StorageContext.from_defaults(vector_store=store),
        transformations=[SentenceSplitter(chunk_size=64, chunk_overlap=0, tokenizer=str.split)],
    )
    yield built
    store.delete_collection()
    store.close()


def _refs(index: VectorStoreIndex, query: str, k: int = 4, **options: object) -> list[str]:
    return [hit.node.ref_doc_id or "" for hit in index.as_retriever(similarity_top_k=k, **options).retrieve(query)]


def test_a_vector_store_index_retrieves_with_the_servers_encoder(index: VectorStoreIndex, server: Running) -> None:
    store: BraidVectorStore = index.vector_store  # type: ignore[assignment]
    assert store.is_embedding_query is False  # the retriever sends text, no embed model needed
    top = index.as_retriever(similarity_top_k=1).retrieve("finance and shares")
    assert len(top) == 1
    node = top[0].node
    # The node round-trips: text, metadata, its source document, its id.
    assert (node.get_content(), node.metadata, node.ref_doc_id) == (DOCS[1].text, DOCS[1].metadata, "stocks")
    assert node.relationships[NodeRelationship.SOURCE].node_id == "stocks"
    assert store.get_nodes([node.node_id]) == [node]
    assert set(_refs(index, "a small cat sleeping", k=2)) == {"kitten", "cat"}

    # BM25 alone finds the one document with the code; the dense strand ranks every document.
    assert _refs(index, "E42", vector_store_query_mode="text_search") == ["e42"]
    assert _refs(index, "E42", vector_store_query_mode="sparse") == ["e42"]
    assert _refs(index, "mat", vector_store_query_mode="text_search") == ["cat"]
    # HYBRID: BM25's one hit first, the dense strand's others after it.
    hybrid = _refs(index, "mat", vector_store_query_mode="hybrid")
    assert hybrid[0] == "cat" and sorted(hybrid) == ["cat", "e42", "kitten", "stocks"]

    # alpha is the dense strand's weight, 1 - alpha BM25's: the raw client's search with those weights.
    def scores(alpha: float) -> list[tuple[str, float]]:
        found = index.as_retriever(similarity_top_k=4, vector_store_query_mode="hybrid", alpha=alpha).retrieve("mat")
        return [(hit.node.node_id, round(hit.score or 0, 5)) for hit in found]

    def raw(weights: dict[str, float]) -> list[tuple[str, float]]:
        hits = server.client.search(store.collection, dense=("emb", "mat"), bm25="mat", weights=weights, limit=4)
        return [(hit.id, round(hit.score, 5)) for hit in hits]

    assert scores(0.2) == raw({"dense": 0.2, "bm25": 0.8}) != scores(0.8) == raw({"dense": 0.8, "bm25": 0.2})
    assert _refs(index, "mat", vector_store_query_mode="hybrid", alpha=0.0) == ["cat"]  # BM25 alone
    assert _refs(index, "mat", vector_store_query_mode="hybrid", alpha=1.0) == _refs(index, "mat")  # dense alone


F, Op = MetadataFilter, FilterOperator


def _filtered(index: VectorStoreIndex, filters: MetadataFilters) -> list[str]:
    return sorted(_refs(index, "pets and power", filters=filters))


def test_metadata_filters_each_operator(index: VectorStoreIndex) -> None:
    cases = {
        Op.EQ: (F(key="lang", value="en"), ["cat", "kitten"]),
        Op.NE: (F(key="lang", value="en", operator=Op.NE), ["e42", "stocks"]),
        Op.GT: (F(key="n", value=2, operator=Op.GT), ["e42", "kitten"]),
        Op.GTE: (F(key="n", value=2, operator=Op.GTE), ["e42", "kitten", "stocks"]),
        Op.LT: (F(key="n", value=2.5, operator=Op.LT), ["cat", "stocks"]),
        Op.LTE: (F(key="n", value=1, operator=Op.LTE), ["cat"]),
        Op.IN: (F(key="lang", value=["de", "fr"], operator=Op.IN), ["e42", "stocks"]),
        Op.NIN: (F(key="lang", value=["de", "fr"], operator=Op.NIN), ["cat", "kitten"]),
        Op.ANY: (F(key="tags", value=["x", "y"], operator=Op.ANY), ["cat", "stocks"]),
        Op.ALL: (F(key="tags", value=["pet", "x"], operator=Op.ALL), ["cat"]),
        Op.CONTAINS: (F(key="tags", value="pet", operator=Op.CONTAINS), ["cat", "kitten"]),
    }
    for op, (one, want) in cases.items():
        assert _filtered(index, MetadataFilters(filters=[one])) == want, op
    en, small = F(key="lang", value="en"), F(key="n", value=2, operator=Op.LTE)
    assert _filtered(index, MetadataFilters(filters=[en, small])) == ["cat"]
    assert _filtered(index, MetadataFilters(filters=[en, small], condition=FilterCondition.OR)) == [
        "cat",
        "kitten",
        "stocks",
    ]
    # NOT: none of them holds (an NE inside negates to its EQ).
    not_en = F(key="lang", value="en", operator=Op.NE)
    assert _filtered(index, MetadataFilters(filters=[small, not_en], condition=FilterCondition.NOT)) == ["kitten"]
    nested = MetadataFilters(
        filters=[F(key="lang", value="fr"), MetadataFilters(filters=[en, small])], condition=FilterCondition.OR
    )
    assert _filtered(index, nested) == ["cat", "e42"]
    assert sorted(_refs(index, "pets", doc_ids=["cat", "e42"])) == ["cat", "e42"]  # by ref_doc_id

    for op in (Op.TEXT_MATCH, Op.TEXT_MATCH_INSENSITIVE, Op.IS_EMPTY):
        with pytest.raises(ValueError, match=rf"FilterOperator\.{op.name} .*no braid\.v1 Filter equivalent"):
            _filtered(index, MetadataFilters(filters=[F(key="lang", value="en", operator=op)]))
    with pytest.raises(ValueError, match=r"FilterOperator\.GT .*takes a number"):
        to_filter(MetadataFilters(filters=[F(key="lang", value="en", operator=Op.GT)]))


def test_delete_by_ref_doc_id_and_nodes(server: Running, no_embed_model: None) -> None:
    store = _store(server, encoder_model=MODEL)
    try:
        index = VectorStoreIndex.from_vector_store(store)
        a = TextNode(id_="a1", text="alpine lakes in summer", relationships=_source("A"), metadata={"p": 1})
        b = TextNode(id_="a2", text="alpine meadows in spring", relationships=_source("A"), metadata={"p": 2})
        c = TextNode(id_="b1", text="alpine huts in winter", relationships=_source("B"), metadata={"p": 3})
        index.insert_nodes([a, b, c])
        assert _refs(index, "alpine", vector_store_query_mode="text_search") != []
        index.delete_ref_doc("A")  # the store's delete(ref_doc_id): both of A's nodes
        assert [n.node_id for n in store.get_nodes(["a1", "a2", "b1"])] == ["b1"]
        store.add([a, b])
        store.delete_nodes(["a1"])
        store.delete_nodes(filters=MetadataFilters(filters=[F(key="p", value=3)]))
        assert [n.node_id for n in store.get_nodes(["a1", "a2", "b1"])] == ["a2"]
        store.clear()
        assert store.get_nodes(["a2"]) == [] and server.client.count(store.collection) == 0
        with pytest.raises(ValueError, match="no scan by filter"):
            store.get_nodes(filters=MetadataFilters(filters=[F(key="p", value=3)]))
    finally:
        store.delete_collection()
        store.close()


def _source(ref: str) -> dict[NodeRelationship, RelatedNodeInfo]:
    return {NodeRelationship.SOURCE: RelatedNodeInfo(node_id=ref)}


def test_async_methods(server: Running, no_embed_model: None) -> None:
    store = _store(server, encoder_model=MODEL)
    nodes = [
        TextNode(id_="r1", text="rivers flow to the sea", relationships=_source("R"), metadata={"k": "w"}),
        TextNode(id_="r2", text="glaciers carve valleys", relationships=_source("R"), metadata={"k": "i"}),
        TextNode(id_="m1", text="markets open at nine", relationships=_source("M"), metadata={"k": "f"}),
    ]

    async def run() -> None:
        assert await store.async_add(nodes) == ["r1", "r2", "m1"]
        index = VectorStoreIndex.from_vector_store(store)
        found = await index.as_retriever(similarity_top_k=1).aretrieve("stock exchange trading hours")
        assert [hit.node.node_id for hit in found] == ["m1"] and found[0].node.ref_doc_id == "M"
        hybrid = index.as_retriever(similarity_top_k=3, vector_store_query_mode="hybrid", alpha=0.5)
        assert [hit.node.node_id for hit in await hybrid.aretrieve("glaciers")][:1] == ["r2"]
        text = index.as_retriever(similarity_top_k=3, vector_store_query_mode="text_search")
        assert [hit.node.node_id for hit in await text.aretrieve("rivers")] == ["r1"]
        await store.adelete("R")
        assert [n.node_id for n in await store.aget_nodes(["r1", "r2", "m1"])] == ["m1"]
        await store.async_add(nodes[:2])
        await store.adelete_nodes(filters=MetadataFilters(filters=[F(key="k", value="i")]))
        await store.adelete_nodes(["m1"])
        assert [n.node_id for n in await store.aget_nodes(["r1", "r2", "m1"])] == ["r1"]
        await store.aclear()
        assert await store.aget_nodes(["r1"]) == []
        await store.aclose()

    try:
        asyncio.run(run())
    finally:
        store.delete_collection()
        store.close()


def test_client_side_embeddings_without_an_encoder(server: Running) -> None:
    store = _store(server)  # no collection yet: made from the first nodes' embeddings (dim 3)
    try:
        assert store.is_embedding_query is True
        store.add(
            [
                TextNode(id_="x", text="east wind", embedding=[1.0, 0.0, 0.0]),
                TextNode(id_="y", text="west wind", embedding=[0.0, 1.0, 0.0]),
            ]
        )
        dense = store.query(VectorStoreQuery(query_embedding=[0.1, 0.9, 0.0], similarity_top_k=1))
        assert dense.ids == ["y"] and dense.nodes[0].get_content() == "west wind"  # type: ignore[index]
        bm25 = store.query(VectorStoreQuery(query_str="east", mode=VectorStoreQueryMode.TEXT_SEARCH))
        assert bm25.ids == ["x"]
        with pytest.raises(ValueError, match="node 'z' has no embedding"):
            store.add([TextNode(id_="z", text="no vector")])
        with pytest.raises(ValueError, match="query_embedding is needed"):
            store.query(VectorStoreQuery(query_str="wind"))
        with pytest.raises(ValueError, match="'mmr' is not supported"):
            store.query(VectorStoreQuery(query_embedding=[1, 0, 0], mode=VectorStoreQueryMode.MMR))
        with pytest.raises(ValueError, match="alpha must be within"):
            store.query(VectorStoreQuery(query_embedding=[1, 0, 0], query_str="w", mode="hybrid", alpha=1.5))
    finally:
        store.delete_collection()
        store.close()


def test_the_stores_clients_and_collection_errors(server: Running, no_embed_model: None) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _store(server, create_collection=False)  # asks the server whether the field has an encoder
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    store = _store(server, encoder_model=MODEL)
    try:
        store.add([TextNode(id_="n", text="north wind")])
        with pytest.raises(ValueError, match=f"collection '{store.collection}' has no dense field 'vec'"):
            BraidVectorStore(store.collection, address=f"127.0.0.1:{server.port}", dense_field="vec")
        with pytest.raises(ValueError, match=r"unknown query argument\(s\): colour"):
            store.query(VectorStoreQuery(query_str="north"), colour="red")
        # Each event loop (asyncio.run makes one) gets an async client of its own.
        for _ in range(2):
            assert [n.node_id for n in asyncio.run(store.aget_nodes(["n"]))] == ["n"]
        # A store on a given client leaves it open on close.
        BraidVectorStore(store.collection, client=server.client, encoder_model=MODEL).close()
        assert server.client.count(store.collection) == 1
    finally:
        store.delete_collection()
        store.close()
