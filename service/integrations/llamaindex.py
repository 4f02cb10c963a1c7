"""Braid as a LlamaIndex vector store: ``from braid.integrations.llamaindex import BraidVectorStore``.

Owns the mapping between LlamaIndex's nodes, queries and metadata filters and braid.v1; the calls
go through BraidClient (sync methods) and AsyncBraidClient (``async_add``, ``aquery``, ...,
native grpc.aio on the running loop).

The collection (made on the first ``add`` when missing, with ``collection_schema``, or an existing
one with the same field names) holds a node as:

- its text (``get_content(MetadataMode.NONE)``) in the text field ``text_field``: BM25 indexes it,
  Search returns it;
- its vector in the dense field ``dense_field``: encoded by the server from the text when that
  field has an encoder (the node's ``embedding`` is then ignored: a VectorStoreIndex computes one
  with its embed model, a MockEmbedding when it has none, and the server's model is the one the
  queries meet), else the node's ``embedding``, required;
- LlamaIndex's usual metadata dict (``node_to_metadata_dict``) as Braid's schemaless metadata:
  the node's own metadata keys at the top (filters apply to them), ``ref_doc_id``/``doc_id``/
  ``document_id`` (delete by ref_doc_id filters on it), and ``_node_content``/``_node_type``, the
  node without text or embedding as JSON, from which a hit becomes the same node again
  (id, metadata, relationships, templates);
- the node id as the Braid document id (adding it again replaces the node).

With a server-side encoder the store sets ``is_embedding_query = False``: a retriever sends the
query text and needs no embed model. Query modes: DEFAULT (the dense strand), HYBRID (BM25 and
dense fused by the server; ``alpha`` is the dense strand's weight and 1 - alpha BM25's, alpha None
the server's default fusion of equal weights), TEXT_SEARCH and SPARSE (BM25 alone). Filters:
``to_filter`` (the operator table in docs/integrations.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode, ImageNode, IndexNode, MetadataMode, Node, TextNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
    VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from braid.integrations.clients import ClientMethods, StoreClients, dense_field, search_options
from braid.integrations.schema import METRICS, collection_schema
from braid.service.aio import AsyncBraidClient
from braid.service.client import BraidClient
from braid.service.messages import metadata_of, value
from braid.v1 import braid_pb2 as pb

# The metadata key that names a node's source document (node_to_metadata_dict writes it).
REF_DOC_KEY = "ref_doc_id"
# Node classes that metadata_dict_to_node reads its own way (every other type is read as a TextNode).
_OTHER_NODE_TYPES = frozenset(cls.class_name() for cls in (Node, IndexNode, ImageNode))
MODES = (
    VectorStoreQueryMode.DEFAULT,
    VectorStoreQueryMode.HYBRID,
    VectorStoreQueryMode.TEXT_SEARCH,
    VectorStoreQueryMode.SPARSE,
)

# ----------------------------------------------------------------- filters

_RANGE = {FilterOperator.GT: "gt", FilterOperator.GTE: "gte", FilterOperator.LT: "lt", FilterOperator.LTE: "lte"}
# The ones braid.v1 Filter cannot express, and why (the error says it).
_UNSUPPORTED = {
    FilterOperator.TEXT_MATCH: "Braid filters compare whole values, not substrings",
    FilterOperator.TEXT_MATCH_INSENSITIVE: "Braid filters compare whole values, not substrings",
    FilterOperator.IS_EMPTY: "Braid's Exists cannot tell an empty list from a non-empty one",
}
SUPPORTED_OPERATORS = tuple(op for op in FilterOperator if op not in _UNSUPPORTED)


def _operator_name(op: FilterOperator) -> str:
    return f"FilterOperator.{op.name} ({op.value!r})"


def _scalar(f: MetadataFilter, item: Any) -> pb.Value:
    if isinstance(item, bool | int | float | str):
        return value(item)
    raise ValueError(
        f"filter on {f.key!r}: {_operator_name(f.operator)} takes a string or number, got {type(item).__name__}"
    )


def _values(f: MetadataFilter) -> list[pb.Value]:
    if not isinstance(f.value, list) or not f.value:
        raise ValueError(f"filter on {f.key!r}: {_operator_name(f.operator)} takes a non-empty list")
    return [_scalar(f, item) for item in f.value]


def _condition(f: MetadataFilter) -> tuple[str, pb.Condition]:
    """One llama-index filter as ("must" | "must_not", condition)."""
    op, key = f.operator, f.key
    if op in _UNSUPPORTED:
        supported = ", ".join(o.name for o in SUPPORTED_OPERATORS)
        raise ValueError(
            f"filter on {key!r}: {_operator_name(op)} has no braid.v1 Filter equivalent ({_UNSUPPORTED[op]}); "
            f"supported: {supported}"
        )
    if op in (FilterOperator.EQ, FilterOperator.NE, FilterOperator.CONTAINS):
        # A list in the metadata matches when an element does: EQ on a list and CONTAINS are membership.
        cond = pb.Condition(match=pb.Match(field=key, value=_scalar(f, f.value)))
        return ("must_not" if op == FilterOperator.NE else "must", cond)
    if op in _RANGE:
        if isinstance(f.value, bool) or not isinstance(f.value, int | float):
            raise ValueError(f"filter on {key!r}: {_operator_name(op)} takes a number, got {type(f.value).__name__}")
        bound = pb.Range(field=key)
        getattr(bound, _RANGE[op]).CopyFrom(value(f.value))
        return "must", pb.Condition(range=bound)
    if op in (FilterOperator.IN, FilterOperator.NIN, FilterOperator.ANY):
        # IN: the value is one of them; ANY: the list holds one of them. Braid's MatchAny is both.
        cond = pb.Condition(any=pb.MatchAny(field=key, values=_values(f)))
        return ("must_not" if op == FilterOperator.NIN else "must", cond)
    if op == FilterOperator.ALL:  # the list holds every one of them: a membership match each
        matches = [pb.Condition(match=pb.Match(field=key, value=v)) for v in _values(f)]
        return "must", pb.Condition(filter=pb.Filter(must=matches))
    raise ValueError(f"filter on {key!r}: unknown operator {op!r}")


def to_filter(filters: MetadataFilters | pb.Filter | None) -> pb.Filter | None:
    """llama-index MetadataFilters as a braid.v1 Filter (a Filter is passed through).

    Conditions: AND (all hold), OR (one holds), NOT (none holds, as llama-index's own
    SimpleVectorStore reads it); nested MetadataFilters nest. Operators: EQ, NE, GT, GTE, LT, LTE
    (numbers), IN, NIN, ANY, ALL, CONTAINS; keys are metadata keys (dotted paths reach into nested
    objects; a list in the metadata matches when an element does). TEXT_MATCH,
    TEXT_MATCH_INSENSITIVE and IS_EMPTY are a ValueError naming them.
    """
    if filters is None or isinstance(filters, pb.Filter):
        return filters
    out = pb.Filter()
    if not filters.filters:
        return out
    clauses: list[tuple[str, pb.Condition]] = []
    for item in filters.filters:
        if isinstance(item, MetadataFilters):
            clauses.append(("must", pb.Condition(filter=to_filter(item))))
        else:
            clauses.append(_condition(item))
    condition = filters.condition or FilterCondition.AND
    if condition == FilterCondition.AND:
        for clause, cond in clauses:
            getattr(out, clause).append(cond)
    elif condition in (FilterCondition.OR, FilterCondition.NOT):
        # Each part as a filter of its own (an NE is a must_not inside it), then one of them / none.
        parts = [_wrap(clause, cond) for clause, cond in clauses]
        (out.should if condition == FilterCondition.OR else out.must_not).extend(parts)
    else:
        raise ValueError(f"filters: unknown condition {condition!r}; valid: and, or, not")
    return out


def _wrap(clause: str, cond: pb.Condition) -> pb.Condition:
    if clause == "must":
        return cond
    return pb.Condition(filter=pb.Filter(must_not=[cond]))


def _and(*filters: pb.Filter | None) -> pb.Filter | None:
    given = [f for f in filters if f is not None and f.ByteSize()]
    if len(given) <= 1:
        return given[0] if given else None
    return pb.Filter(must=[pb.Condition(filter=f) for f in given])


def _ref_doc(ref_doc_ids: Sequence[str]) -> pb.Filter:
    values = [pb.Value(keyword=str(i)) for i in ref_doc_ids]
    return pb.Filter(must=[pb.Condition(any=pb.MatchAny(field=REF_DOC_KEY, values=values))])


# Matches every document: clear() deletes by it (Delete takes ids or a non-empty filter).
_EVERYTHING = pb.Filter(
    should=[
        pb.Condition(exists=pb.Exists(field="_node_type")),
        pb.Condition(filter=pb.Filter(must_not=[pb.Condition(exists=pb.Exists(field="_node_type"))])),
    ]
)

# ------------------------------------------------------------------ store


class BraidVectorStore(ClientMethods, BasePydanticVectorStore):
    """A Braid collection as a LlamaIndex vector store (module doc).

    Args:
        collection: the collection (or alias) name.
        address, timeout and ``client_options`` (tls_ca, tls_cert, tls_key, api_key,
            server_name): for the clients this store makes; or pass ``client`` /
            ``async_client`` made elsewhere.
        text_field, dense_field: the fields that hold a node's text and its vector.
        encoder_model: a missing collection is made with this server-side encoder (no embed
            model needed); None: with the dimension of the first nodes' embeddings.
        metric: of a collection this store makes.
        fusion, weights: HYBRID's fusion (a name as BraidClient.search takes, or a braid.v1
            Fusion) and per-strand weights when the query has no ``alpha``; None: the server's default.
        create_collection: make the collection on the first add when it is missing.

    Without ``encoder_model`` the constructor asks the server (GetCollection) whether the
    collection's dense field has an encoder, to set ``is_embedding_query``.
    """

    stores_text: bool = True
    flat_metadata: bool = False
    is_embedding_query: bool = True

    collection: str
    address: str = "127.0.0.1:50051"
    timeout: float = 60.0
    text_field: str = "text"
    dense_field: str = "emb"
    encoder_model: str | None = None
    metric: str = "cosine"
    fusion: Any = None
    weights: dict[str, float] | None = None
    create_collection: bool = True

    _clients: StoreClients = PrivateAttr()
    _encoded: bool | None = PrivateAttr(default=None)  # the dense field has a server-side encoder (once known)

    def __init__(
        self,
        collection: str,
        *,
        address: str = "127.0.0.1:50051",
        client: BraidClient | None = None,
        async_client: AsyncBraidClient | None = None,
        timeout: float = 60.0,
        text_field: str = "text",
        dense_field: str = "emb",
        encoder_model: str | None = None,
        metric: str = "cosine",
        fusion: pb.Fusion | str | None = None,
        weights: dict[str, float] | None = None,
        create_collection: bool = True,
        **client_options: Any,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"metric: unknown value {metric!r}; valid: {', '.join(METRICS)}")
        super().__init__(
            collection=collection,
            address=address,
            timeout=timeout,
            text_field=text_field,
            dense_field=dense_field,
            encoder_model=encoder_model,
            metric=metric,
            fusion=fusion,
            weights=dict(weights) if weights else None,
            create_collection=create_collection,
            # A server-side encoder to be: queries go as text (confirmed or corrected by _learn).
            is_embedding_query=encoder_model is None,
        )
        self._clients = StoreClients(address, timeout, client, async_client, client_options)
        if encoder_model is None:
            self._known()

    @classmethod
    def class_name(cls) -> str:
        return "BraidVectorStore"

    # ------------------------------------------------------------- collection

    def _learn(self, info: pb.CollectionInfo) -> None:
        self._encoded = bool(dense_field(info, self.collection, self.dense_field).encoder.model)
        self.is_embedding_query = not self._encoded

    def _known(self) -> bool:
        """Whether the collection exists (and what it is, learnt once); False when missing."""
        return self._encoded is not None or self._clients.learn(self.collection, self.create_collection, self._learn)

    async def _aknown(self) -> bool:
        return self._encoded is not None or await self._clients.alearn(
            self.collection, self.create_collection, self._learn
        )

    def _schema(self, nodes: Sequence[BaseNode]) -> pb.Schema:
        dim = 0
        if self.encoder_model is None:
            dim = len(self._embedding(nodes[0]))
        return collection_schema(self.text_field, self.dense_field, dim, self.metric, self.encoder_model)

    def _missing(self) -> ValueError:
        return ValueError(f"collection {self.collection!r} does not exist (yet): add nodes first")

    # ----------------------------------------------------------------- writes

    @staticmethod
    def _embedding(node: BaseNode) -> list[float]:
        if node.embedding is None:
            raise ValueError(
                f"node {node.node_id!r} has no embedding and the collection's dense field has no "
                "server-side encoder: embed the nodes (an embed model) or use encoder_model="
            )
        return node.embedding

    def _documents(self, nodes: Sequence[BaseNode]) -> list[dict[str, Any]]:
        docs = []
        for node in nodes:
            doc: dict[str, Any] = {
                "id": node.node_id,
                "text": {self.text_field: node.get_content(metadata_mode=MetadataMode.NONE)},
                "metadata": node_to_metadata_dict(node, remove_text=True, flat_metadata=False),
            }
            if not self._encoded:  # with an encoder the server's model makes the vector from the text
                doc["dense"] = {self.dense_field: self._embedding(node)}
            docs.append(doc)
        return docs

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Upsert ``nodes`` (an existing node id is replaced); returns their ids."""
        if not nodes:
            return []
        if not self._known():
            self._learn(self._clients.create(self.collection, self._schema(nodes)))
        docs = self._documents(nodes)
        self._clients.upsert(self.collection, docs)
        return [doc["id"] for doc in docs]

    async def async_add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        if not nodes:
            return []
        if not await self._aknown():
            self._learn(await self._clients.acreate(self.collection, self._schema(nodes)))
        docs = self._documents(nodes)
        await self._clients.aupsert(self.collection, docs)
        return [doc["id"] for doc in docs]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document ``ref_doc_id`` (none: no error)."""
        if self._known():
            self.client.delete(self.collection, filter=_ref_doc([ref_doc_id]))

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        if await self._aknown():
            await self.async_client.delete(self.collection, filter=_ref_doc([ref_doc_id]))

    @staticmethod
    def _delete_args(node_ids: list[str] | None, filters: MetadataFilters | None) -> dict[str, Any] | None:
        if node_ids is None and filters is None:
            raise ValueError("delete_nodes needs node_ids or filters (clear() deletes every node)")
        if node_ids is not None and filters is not None:
            raise ValueError("delete_nodes takes node_ids or filters, not both (Braid's Delete takes one)")
        if node_ids is not None:
            return {"ids": [str(i) for i in node_ids]} if node_ids else None
        where = to_filter(filters)
        if where is None or not where.ByteSize():
            raise ValueError("delete_nodes: the filters are empty (clear() deletes every node)")
        return {"filter": where}

    def delete_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None, **delete_kwargs: Any
    ) -> None:
        """Delete the nodes of ``node_ids`` (missing ones are no error) or those ``filters`` select."""
        args = self._delete_args(node_ids, filters)
        if args is not None and self._known():
            self.client.delete(self.collection, **args)

    async def adelete_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None, **delete_kwargs: Any
    ) -> None:
        args = self._delete_args(node_ids, filters)
        if args is not None and await self._aknown():
            await self.async_client.delete(self.collection, **args)

    def clear(self) -> None:
        """Delete every document of the collection (the collection and its schema stay)."""
        if self._known():
            self.client.delete(self.collection, filter=_EVERYTHING)

    async def aclear(self) -> None:
        if await self._aknown():
            await self.async_client.delete(self.collection, filter=_EVERYTHING)

    def delete_collection(self) -> None:
        self.client.delete_collection(self.collection)
        self._encoded = None

    # ------------------------------------------------------------------ reads

    def _node(self, msg: pb.Hit | pb.Document) -> BaseNode:
        text = msg.text.get(self.text_field, "")
        metadata = metadata_of(msg)
        content = metadata.get("_node_content")
        if isinstance(content, str) and metadata.get("_node_type") not in _OTHER_NODE_TYPES:
            # metadata_dict_to_node's TextNode case with the text validated in the same pass
            # (not set after): one pydantic validation a hit, most of what this adapter costs.
            return TextNode.from_json(content, text=text)
        if content is not None:
            return metadata_dict_to_node(metadata, text)
        # Written by something else than LlamaIndex: a text node of what is there.
        return TextNode(id_=msg.id, text=text, metadata=metadata)

    @staticmethod
    def _get_ids(node_ids: list[str] | None, filters: MetadataFilters | None) -> list[str]:
        if filters is not None:
            raise ValueError("get_nodes: Braid reads documents by id only (it has no scan by filter); give node_ids")
        if node_ids is None:
            raise ValueError("get_nodes needs node_ids")
        return [str(i) for i in node_ids]

    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        """The nodes of ``node_ids`` that exist, in that order."""
        ids = self._get_ids(node_ids, filters)
        if not ids or not self._known():
            return []
        return [self._node(doc) for doc in self.client.get(self.collection, ids)]

    async def aget_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        ids = self._get_ids(node_ids, filters)
        if not ids or not await self._aknown():
            return []
        return [self._node(doc) for doc in await self.async_client.get(self.collection, ids)]

    def _dense(self, query: VectorStoreQuery) -> tuple[str, Any]:
        # With the field's own encoder the query text goes as it is; else the query's embedding.
        if self._encoded and query.query_str:
            return self.dense_field, query.query_str
        if query.query_embedding is None:
            raise ValueError(
                "query_embedding is needed: the collection's dense field has no server-side encoder "
                "(give the index an embed model)"
            )
        return self.dense_field, list(query.query_embedding)

    def _bm25(self, query: VectorStoreQuery) -> str:
        if not query.query_str:
            raise ValueError(f"query mode {query.mode.value!r} needs query_str (BM25 searches text)")
        return query.query_str

    def _search_args(self, query: VectorStoreQuery, kwargs: dict[str, Any]) -> dict[str, Any]:
        """BraidClient.search's arguments for one VectorStoreQuery."""
        mode = VectorStoreQueryMode(query.mode)
        if mode not in MODES:
            raise ValueError(
                f"query mode {mode.value!r} is not supported by Braid; valid: {', '.join(m.value for m in MODES)}"
            )
        if query.node_ids:
            raise ValueError("query node_ids: Braid cannot restrict a search to ids; filter on metadata instead")
        where = _and(to_filter(query.filters), _ref_doc(query.doc_ids) if query.doc_ids else None)
        args: dict[str, Any] = {
            "limit": query.similarity_top_k,
            "filter": where,
            "text_fields": [self.text_field],
            "include_payload": True,
        }
        alpha = query.alpha
        if mode == VectorStoreQueryMode.HYBRID and alpha is not None and not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be within [0, 1] (the dense strand's weight), got {alpha}")
        if mode in (VectorStoreQueryMode.TEXT_SEARCH, VectorStoreQueryMode.SPARSE) or (
            mode == VectorStoreQueryMode.HYBRID and alpha == 0
        ):
            args["bm25"] = self._bm25(query)
            if mode == VectorStoreQueryMode.SPARSE and query.sparse_top_k:
                args["limit"] = query.sparse_top_k
        elif mode == VectorStoreQueryMode.DEFAULT or alpha == 1:
            args["dense"] = self._dense(query)
        else:  # HYBRID: both strands, fused by the server
            args["dense"] = self._dense(query)
            args["bm25"] = self._bm25(query)
            args["fusion"] = kwargs.pop("fusion", self.fusion)
            weights = kwargs.pop("weights", self.weights)
            if alpha is not None:  # alpha * dense + (1 - alpha) * BM25, on the fusion's normalized scores
                weights = {"dense": alpha, "bm25": 1 - alpha}
            args["weights"] = weights
            if query.hybrid_top_k:
                args["limit"] = query.hybrid_top_k
            if query.sparse_top_k:
                args["depth"] = {"bm25": query.sparse_top_k}
        if mode == VectorStoreQueryMode.HYBRID and alpha in (0, 1):
            args["limit"] = query.hybrid_top_k or query.similarity_top_k
        return search_options(args, kwargs, "query")

    def _result(self, hits: list[pb.Hit]) -> VectorStoreQueryResult:
        return VectorStoreQueryResult(
            nodes=[self._node(hit) for hit in hits],
            similarities=[hit.score for hit in hits],
            ids=[hit.id for hit in hits],
        )

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """One search: the query's mode, filters, doc_ids and top-k as braid.v1 SearchRequest.
        Scores are Braid's: cosine similarity (DEFAULT on a cosine field), BM25, or the fused score.
        ``kwargs`` (a retriever's ``vector_store_kwargs``): fusion, weights, depth,
        score_threshold, timeout."""
        if not self._known():
            raise self._missing()
        return self._result(self.client.search(self.collection, **self._search_args(query, dict(kwargs))))

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        if not await self._aknown():
            raise self._missing()
        args = self._search_args(query, dict(kwargs))
        return self._result(await self.async_client.search(self.collection, **args))
