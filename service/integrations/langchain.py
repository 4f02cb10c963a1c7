"""Braid as a LangChain ``VectorStore``: ``from braid.integrations.langchain import BraidVectorStore``.

Owns the mapping between LangChain's documents, queries and filters and braid.v1; the calls go
through BraidClient (sync methods) and AsyncBraidClient (the ``a*`` methods, native grpc.aio).

The collection (made by ``ensure_collection`` when missing, or an existing one with the same
field names) holds a LangChain ``Document`` as:

- ``page_content`` in the text field ``text_field`` (BM25 indexes it, Get and Search return it),
- its vector in the dense field ``dense_field``: encoded by the server when that field has an
  encoder (no LangChain ``Embeddings`` needed), else the ``embedding``'s vectors sent by the client,
- ``metadata`` as Braid's schemaless metadata (a JSON object, returned exactly; filters apply to it),
- ``id`` as the Braid document id (a uuid4 when none is given).

``search_type``: "similarity" (the dense strand, the default), "hybrid" (BM25 and dense fused by
the server, its default fusion unless ``fusion``/``weights`` say otherwise) or "bm25"; set on the
store or per call (``similarity_search(q, search_type="hybrid")``, which a retriever's
``search_kwargs`` can carry). Filters are LangChain's dict form, translated by ``to_filter``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from braid.integrations.clients import ClientMethods, StoreClients, dense_field, search_options
from braid.integrations.schema import METRICS, collection_schema
from braid.service.aio import AsyncBraidClient
from braid.service.client import BraidClient
from braid.service.messages import metadata_of, value
from braid.v1 import braid_pb2 as pb

SEARCH_TYPES = ("similarity", "hybrid", "bm25")

# ----------------------------------------------------------------- filters

_RANGE = {"$gt": "gt", "$gte": "gte", "$lt": "lt", "$lte": "lte"}
_OPERATORS = ("$eq", "$ne", "$in", "$nin", "$exists", *_RANGE)


def _scalar(key: str, op: str, item: Any) -> pb.Value:
    # Match/MatchAny/Range compare keywords, numbers and bools; anything else cannot be a Braid Value.
    if isinstance(item, bool | int | float | str):
        return value(item)
    raise ValueError(f"filter: {key!r} {op} takes a string, number or bool, got {type(item).__name__}")


def _field(key: str, spec: Any) -> list[tuple[str, pb.Condition]]:
    """The (clause, condition) pairs of one field's spec, clause being "must" or "must_not"."""
    if not isinstance(spec, Mapping):
        if isinstance(spec, list | tuple):
            raise ValueError(f"filter: {key!r} is given a list; use {{'$in': [...]}} for membership")
        return [("must", pb.Condition(match=pb.Match(field=key, value=_scalar(key, "$eq", spec))))]
    out: list[tuple[str, pb.Condition]] = []
    for op, operand in spec.items():
        if op in ("$eq", "$ne"):
            cond = pb.Condition(match=pb.Match(field=key, value=_scalar(key, op, operand)))
            out.append(("must" if op == "$eq" else "must_not", cond))
        elif op in ("$in", "$nin"):
            if not isinstance(operand, list | tuple | set):
                raise ValueError(f"filter: {key!r} {op} takes a list, got {type(operand).__name__}")
            values = [_scalar(key, op, item) for item in operand]
            out.append(("must" if op == "$in" else "must_not", pb.Condition(any=pb.MatchAny(field=key, values=values))))
        elif op in _RANGE:
            if isinstance(operand, bool) or not isinstance(operand, int | float):
                raise ValueError(f"filter: {key!r} {op} takes a number, got {type(operand).__name__}")
            bound = pb.Range(field=key)
            getattr(bound, _RANGE[op]).CopyFrom(value(operand))
            out.append(("must", pb.Condition(range=bound)))
        elif op == "$exists":
            out.append(("must" if operand else "must_not", pb.Condition(exists=pb.Exists(field=key))))
        else:
            raise ValueError(
                f"filter: operator {op!r} (on {key!r}) has no braid.v1 Filter equivalent; "
                f"supported: {', '.join(_OPERATORS)}, $and, $or, $not"
            )
    return out


def to_filter(spec: Mapping[str, Any] | pb.Filter | None) -> pb.Filter | None:
    """A LangChain dict filter as a braid.v1 Filter (a Filter is passed through).

    ``{"key": value}`` is equality; ``{"key": {"$op": operand}}`` with $eq, $ne, $in, $nin, $gt,
    $gte, $lt, $lte, $exists; ``{"$and": [...]}``, ``{"$or": [...]}``, ``{"$not": {...}}``; several
    keys in one dict must all hold. Keys are metadata keys (dotted paths reach into nested
    objects; a list in the metadata matches when any element does). Any other operator is a
    ValueError naming it.
    """
    if spec is None or isinstance(spec, pb.Filter):
        return spec
    if not isinstance(spec, Mapping):
        raise ValueError(f"filter must be a dict, got {type(spec).__name__}")
    out = pb.Filter()
    for key, item in spec.items():
        if key in ("$and", "$or"):
            if not isinstance(item, list | tuple) or not item:
                raise ValueError(f"filter: {key} takes a non-empty list of filters")
            nested = [pb.Condition(filter=to_filter(part)) for part in item]
            if key == "$and":
                out.must.extend(nested)
            else:  # a should clause of its own, so it combines with the other keys by AND
                out.must.add(filter=pb.Filter(should=nested))
        elif key == "$not":
            out.must_not.add(filter=to_filter(item))
        elif key.startswith("$"):
            raise ValueError(
                f"filter: operator {key!r} has no braid.v1 Filter equivalent; supported at the top: $and, $or, $not"
            )
        else:
            for clause, condition in _field(key, item):
                getattr(out, clause).append(condition)
    return out


# -------------------------------------------------------------------- MMR


def _mmr(query_sims: np.ndarray, vectors: np.ndarray, k: int, lambda_mult: float) -> list[int]:
    """Maximal marginal relevance over candidates: ``query_sims`` their similarity to the query,
    ``vectors`` theirs (cosine similarity between candidates, as LangChain's own MMR)."""
    if not len(query_sims) or k <= 0:
        return []
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit = vectors / np.where(norms == 0, 1, norms)
    between = unit @ unit.T
    chosen = [int(np.argmax(query_sims))]
    while len(chosen) < min(k, len(query_sims)):
        redundancy = between[:, chosen].max(axis=1)
        scores = lambda_mult * query_sims - (1 - lambda_mult) * redundancy
        scores[chosen] = -np.inf
        chosen.append(int(np.argmax(scores)))
    return chosen


def _cosine(query: Sequence[float], vectors: np.ndarray) -> np.ndarray:
    q = np.asarray(query, dtype=np.float32)
    q = q / (np.linalg.norm(q) or 1)
    norms = np.linalg.norm(vectors, axis=1)
    return (vectors @ q) / np.where(norms == 0, 1, norms)


# ------------------------------------------------------------------ store


class BraidVectorStore(ClientMethods, VectorStore):
    """A Braid collection as a LangChain vector store (module doc).

    Args:
        collection: the collection (or alias) name.
        embedding: LangChain embeddings for the documents and queries; not needed when the
            collection's dense field has a server-side encoder.
        address, timeout and ``client_options`` (tls_ca, tls_cert, tls_key, api_key,
            server_name): for the clients this store makes; or pass ``client`` /
            ``async_client`` made elsewhere.
        text_field, dense_field: the fields that hold page_content and the vector.
        search_type: "similarity", "hybrid" or "bm25" (a call's ``search_type=`` overrides it).
        fusion, weights: the hybrid fusion (a name as BraidClient.search takes, or a braid.v1
            Fusion) and per-strand weights ({"bm25": 0.3, "dense": 1.0}); None: the server's default.
        encoder_model, metric: how ``ensure_collection`` makes a missing collection.
        create_collection: make the collection on the first write when it is missing.
    """

    def __init__(
        self,
        collection: str,
        embedding: Embeddings | None = None,
        *,
        address: str = "127.0.0.1:50051",
        client: BraidClient | None = None,
        async_client: AsyncBraidClient | None = None,
        timeout: float = 60.0,
        text_field: str = "text",
        dense_field: str = "emb",
        search_type: str = "similarity",
        fusion: pb.Fusion | str | None = None,
        weights: Mapping[str, float] | None = None,
        encoder_model: str | None = None,
        metric: str = "cosine",
        create_collection: bool = True,
        **client_options: Any,
    ) -> None:
        if search_type not in SEARCH_TYPES:
            raise ValueError(f"search_type: unknown value {search_type!r}; valid: {', '.join(SEARCH_TYPES)}")
        if metric not in METRICS:
            raise ValueError(f"metric: unknown value {metric!r}; valid: {', '.join(METRICS)}")
        self.collection = collection
        self.embedding = embedding
        self.address = address
        self.timeout = timeout
        self.client_options = client_options
        self._clients = StoreClients(address, timeout, client, async_client, client_options)
        self.text_field = text_field
        self.dense_field = dense_field
        self.search_type = search_type
        self.fusion = fusion
        self.weights = dict(weights) if weights else None
        self.encoder_model = encoder_model
        self.metric = metric
        self.create_collection = create_collection
        self._encoded: bool | None = None  # whether the dense field has a server-side encoder (once known)
        self._collection_metric: int | None = None

    @property
    def embeddings(self) -> Embeddings | None:
        return self.embedding

    # ------------------------------------------------------------- collection

    def _learn(self, info: pb.CollectionInfo) -> None:
        field = dense_field(info, self.collection, self.dense_field)
        self._encoded = bool(field.encoder.model)
        self._collection_metric = field.metric
        if not self._encoded and self.embedding is None:
            raise ValueError(f"dense field {self.dense_field!r} of {self.collection!r} has no encoder: give embedding=")

    def _schema(self, dim: int) -> pb.Schema:
        if self.encoder_model is None and self.embedding is None:
            raise ValueError("to create the collection give embedding= or encoder_model=")
        return collection_schema(self.text_field, self.dense_field, dim, self.metric, self.encoder_model)

    def ensure_collection(self, dim: int | None = None) -> None:
        """Create the collection when missing (dim: of the embeddings, probed when not given)."""
        info = self._clients.info(self.collection, missing_ok=True)
        if info is None:
            if dim is None and self.encoder_model is None and self.embedding is not None:
                dim = len(self.embedding.embed_query("dimension"))
            info = self._clients.create(self.collection, self._schema(dim or 0))
        self._learn(info)

    async def aensure_collection(self, dim: int | None = None) -> None:
        info = await self._clients.ainfo(self.collection, missing_ok=True)
        if info is None:
            if dim is None and self.encoder_model is None and self.embedding is not None:
                dim = len(await self.embedding.aembed_query("dimension"))
            info = await self._clients.acreate(self.collection, self._schema(dim or 0))
        self._learn(info)

    def _known(self) -> bool:
        """Whether the collection exists (and what it is, learnt once); False when missing."""
        return self._encoded is not None or self._clients.learn(self.collection, self.create_collection, self._learn)

    async def _aknown(self) -> bool:
        return self._encoded is not None or await self._clients.alearn(
            self.collection, self.create_collection, self._learn
        )

    # ----------------------------------------------------------------- writes

    @staticmethod
    def _ids(texts: list[str], metadatas: list[dict] | None, ids: Sequence[str | None] | None) -> list[str]:
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"metadatas: {len(metadatas)} given for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"ids: {len(ids)} given for {len(texts)} texts")
        return [str(i) if i is not None else str(uuid.uuid4()) for i in (ids or [None] * len(texts))]

    def _docs(
        self, texts: list[str], metadatas: list[dict] | None, ids: list[str], vectors: list[list[float]] | None
    ) -> list[dict[str, Any]]:
        docs = []
        for i, text in enumerate(texts):
            doc: dict[str, Any] = {"id": ids[i], "text": {self.text_field: text}}
            doc["metadata"] = dict(metadatas[i]) if metadatas is not None and metadatas[i] is not None else {}
            if vectors is not None:
                doc["dense"] = {self.dense_field: vectors[i]}
            docs.append(doc)
        return docs

    def _client_vectors(self, known: bool) -> bool:
        """Whether documents carry vectors from the Embeddings: unless the (existing or to-be-made)
        dense field has a server-side encoder."""
        return (not self._encoded) if known else (self.encoder_model is None)

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Upsert ``texts`` (an existing id is replaced); returns their ids."""
        texts = list(texts)
        ids = self._ids(texts, metadatas, ids)
        if not texts:
            return []
        known = self._known()
        vectors = self._embedding().embed_documents(texts) if self._client_vectors(known) else None
        if not known:
            self.ensure_collection(len(vectors[0]) if vectors else None)
        self._clients.upsert(self.collection, self._docs(texts, metadatas, ids, vectors))
        return ids

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        texts = list(texts)
        ids = self._ids(texts, metadatas, ids)
        if not texts:
            return []
        known = await self._aknown()
        vectors = await self._embedding().aembed_documents(texts) if self._client_vectors(known) else None
        if not known:
            await self.aensure_collection(len(vectors[0]) if vectors else None)
        await self._clients.aupsert(self.collection, self._docs(texts, metadatas, ids, vectors))
        return ids

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        ids = kwargs.pop("ids", None) or [doc.id for doc in documents]
        texts = [doc.page_content for doc in documents]
        return self.add_texts(texts, [doc.metadata for doc in documents], ids=ids, **kwargs)

    async def aadd_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        ids = kwargs.pop("ids", None) or [doc.id for doc in documents]
        texts = [doc.page_content for doc in documents]
        return await self.aadd_texts(texts, [doc.metadata for doc in documents], ids=ids, **kwargs)

    @staticmethod
    def _delete_args(ids: list[str] | None, filter: Any) -> dict[str, Any]:
        if ids is None and filter is None:
            raise ValueError("delete needs ids or a filter (deleting a whole collection is delete_collection)")
        if ids is not None and filter is not None:
            raise ValueError("delete takes ids or a filter, not both")
        return {"ids": [str(i) for i in ids]} if ids is not None else {"filter": to_filter(filter)}

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete by ids (missing ones are no error) or by ``filter=`` (a dict filter)."""
        args = self._delete_args(ids, kwargs.get("filter"))
        if args.get("ids") == []:
            return True
        self.client.delete(self.collection, **args)
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        args = self._delete_args(ids, kwargs.get("filter"))
        if args.get("ids") == []:
            return True
        await self.async_client.delete(self.collection, **args)
        return True

    def delete_collection(self) -> None:
        self.client.delete_collection(self.collection)
        self._encoded = None

    async def adelete_collection(self) -> None:
        await self.async_client.delete_collection(self.collection)
        self._encoded = None

    # ------------------------------------------------------------------ reads

    def _document(self, msg: pb.Document | pb.Hit) -> Document:
        return Document(id=msg.id, page_content=msg.text.get(self.text_field, ""), metadata=metadata_of(msg))

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The documents of ``ids`` that exist, in that order."""
        if not ids:
            return []
        return [self._document(doc) for doc in self.client.get(self.collection, list(ids))]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        if not ids:
            return []
        return [self._document(doc) for doc in await self.async_client.get(self.collection, list(ids))]

    def _search_type(self, kwargs: dict[str, Any]) -> str:
        search_type = kwargs.pop("search_type", None) or self.search_type
        if search_type not in SEARCH_TYPES:
            raise ValueError(f"search_type: unknown value {search_type!r}; valid: {', '.join(SEARCH_TYPES)}")
        return search_type

    def _needs_query_vector(self, search_type: str) -> bool:
        return search_type != "bm25" and not self._encoded

    def _search_args(
        self, query: str | None, vector: Sequence[float] | None, k: int, search_type: str, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        """BraidClient.search's arguments for one LangChain search."""
        args: dict[str, Any] = {
            "limit": k,
            "filter": to_filter(kwargs.pop("filter", None)),
            "text_fields": [self.text_field],
            "include_payload": True,
        }
        if search_type != "bm25":
            # The dense strand: a client-side vector, or the query text for the field's own encoder.
            args["dense"] = (self.dense_field, list(vector) if vector is not None else query)
        if search_type != "similarity":
            if query is None:
                raise ValueError(f"search_type {search_type!r} needs query text (not only a vector)")
            args["bm25"] = query
        if search_type == "hybrid":
            args["fusion"] = kwargs.pop("fusion", self.fusion)
            args["weights"] = kwargs.pop("weights", self.weights)
        return search_options(args, kwargs, "search")

    def _with_scores(self, hits: list[pb.Hit]) -> list[tuple[Document, float]]:
        return [(self._document(hit), hit.score) for hit in hits]

    def _search(self, query: str | None, vector: Sequence[float] | None, k: int, kwargs: dict[str, Any]) -> list:
        search_type = self._search_type(kwargs)
        self._known_or_raise()
        if vector is None and self._needs_query_vector(search_type):
            vector = self._embedding().embed_query(query or "")
        return self.client.search(self.collection, **self._search_args(query, vector, k, search_type, kwargs))

    async def _asearch(self, query: str | None, vector: Sequence[float] | None, k: int, kwargs: dict[str, Any]) -> list:
        search_type = self._search_type(kwargs)
        if not await self._aknown():
            raise self._missing()
        if vector is None and self._needs_query_vector(search_type):
            vector = await self._embedding().aembed_query(query or "")
        args = self._search_args(query, vector, k, search_type, kwargs)
        return await self.async_client.search(self.collection, **args)

    def _known_or_raise(self) -> None:
        if not self._known():
            raise self._missing()

    def _missing(self) -> ValueError:
        return ValueError(f"collection {self.collection!r} does not exist (yet): add documents or ensure_collection()")

    def _embedding(self) -> Embeddings:
        if self.embedding is None:
            raise ValueError("embedding= is needed: the collection has no server-side encoder")
        return self.embedding

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [self._document(hit) for hit in self._search(query, None, k, kwargs)]

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [self._document(hit) for hit in await self._asearch(query, None, k, kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """Documents with Braid's score: cosine similarity for "similarity" on a cosine field,
        BM25 for "bm25", the fused score for "hybrid"; higher is better."""
        return self._with_scores(self._search(query, None, k, kwargs))

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        return self._with_scores(await self._asearch(query, None, k, kwargs))

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, **kwargs)]

    async def asimilarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score_by_vector(embedding, k, **kwargs)]

    def similarity_search_with_score_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        kwargs.setdefault("search_type", "similarity")
        return self._with_scores(self._search(None, embedding, k, kwargs))

    async def asimilarity_search_with_score_by_vector(
        self, embedding: list[float], k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        kwargs.setdefault("search_type", "similarity")
        return self._with_scores(await self._asearch(None, embedding, k, kwargs))

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        # Braid's cosine score is the similarity itself, which LangChain's relevance is too.
        if self.search_type == "similarity" and self._collection_metric in (None, pb.COSINE):
            return lambda score: score
        raise NotImplementedError("relevance scores are defined for the similarity search of a cosine field")

    # -------------------------------------------------------------------- MMR

    def _mmr_pick(
        self,
        hits: list[pb.Hit],
        stored: list[pb.Document],
        query_vector: Sequence[float] | None,
        k: int,
        lambda_mult: float,
    ) -> list[Document]:
        by_id = {doc.id: doc for doc in stored}
        hits = [hit for hit in hits if hit.id in by_id and self.dense_field in by_id[hit.id].dense]
        if not hits:
            return []
        vectors = np.stack(
            [np.frombuffer(by_id[hit.id].dense[self.dense_field].packed, dtype="<f4") for hit in hits]
        ).astype(np.float32)
        # The query's similarity: from its vector when known, else the dense strand's (cosine) scores.
        sims = _cosine(query_vector, vectors) if query_vector is not None else np.array([h.score for h in hits])
        return [self._document(hits[i]) for i in _mmr(sims, vectors, k, lambda_mult)]

    def _mmr(self, query: str | None, vector: Sequence[float] | None, k: int, fetch_k: int, lambda_mult: float,
             kwargs: dict[str, Any]) -> list[Document]:  # fmt: skip
        kwargs["search_type"] = "similarity"
        self._known_or_raise()
        if vector is None and not self._encoded:
            vector = self._embedding().embed_query(query or "")
        hits = self._search(query, vector, fetch_k, kwargs)
        stored = self.client.get(self.collection, [hit.id for hit in hits], include_vectors=True) if hits else []
        return self._mmr_pick(hits, stored, vector, k, lambda_mult)

    async def _ammr(self, query: str | None, vector: Sequence[float] | None, k: int, fetch_k: int,
                    lambda_mult: float, kwargs: dict[str, Any]) -> list[Document]:  # fmt: skip
        kwargs["search_type"] = "similarity"
        if not await self._aknown():
            raise self._missing()
        if vector is None and not self._encoded:
            vector = await self._embedding().aembed_query(query or "")
        hits = await self._asearch(query, vector, fetch_k, kwargs)
        ids = [hit.id for hit in hits]
        stored = await self.async_client.get(self.collection, ids, include_vectors=True) if hits else []
        return self._mmr_pick(hits, stored, vector, k, lambda_mult)

    def max_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """MMR over the ``fetch_k`` nearest documents, on the vectors Braid stores (fetched with Get)."""
        return self._mmr(query, None, k, fetch_k, lambda_mult, kwargs)

    async def amax_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        return await self._ammr(query, None, k, fetch_k, lambda_mult, kwargs)

    def max_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        return self._mmr(None, embedding, k, fetch_k, lambda_mult, kwargs)

    async def amax_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        return await self._ammr(None, embedding, k, fetch_k, lambda_mult, kwargs)

    # ---------------------------------------------------------- constructors

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        collection: str = "langchain",
        **kwargs: Any,
    ) -> BraidVectorStore:
        """A store on ``collection`` (made when missing) holding ``texts``; kwargs as the constructor's."""
        store = cls(collection, embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    async def afrom_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict] | None = None,
        *,
        ids: list[str] | None = None,
        collection: str = "langchain",
        **kwargs: Any,
    ) -> BraidVectorStore:
        store = cls(collection, embedding, **kwargs)
        await store.aadd_texts(texts, metadatas, ids=ids)
        return store
