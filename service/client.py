"""A small, friendly Python client for braid.v1.Braid.

    with BraidClient("127.0.0.1:50051") as braid:
        braid.create_collection("docs", schema)
        braid.upsert("docs", [{"id": "a", "text": {"body": "hello"}, "dense": {"emb": vec}}])
        hits = braid.search("docs", bm25="hello", dense=("emb", vec), limit=5)

Documents may be given as braid.v1 ``Document`` messages or as dicts with the
keys id, text, dense (field -> list or numpy array), sparse (field -> {term: weight}
or (indices, values)) and payload (field -> str | int | float | bool | datetime).
Vectors are sent in the packed float32 form.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np

from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc


def dense_vector(values: Any) -> pb.DenseVector:
    return pb.DenseVector(packed=np.asarray(values, dtype="<f4").tobytes())


def sparse_vector(value: Any) -> pb.SparseVector:
    if isinstance(value, pb.SparseVector):
        return value
    if isinstance(value, Mapping):
        keys, weights = list(value.keys()), list(value.values())
        if keys and all(isinstance(k, int) for k in keys):
            return pb.SparseVector(indices=keys, values=weights)
        return pb.SparseVector(tokens=[str(k) for k in keys], values=weights)
    indices, values = value
    return pb.SparseVector(indices=list(indices), values=list(values))


def value(item: Any) -> pb.Value:
    if isinstance(item, pb.Value):
        return item
    if isinstance(item, bool):
        return pb.Value(bool=item)
    if isinstance(item, int):
        return pb.Value(int=item)
    if isinstance(item, float):
        return pb.Value(float=item)
    if isinstance(item, dt.datetime):
        out = pb.Value()
        out.datetime.FromDatetime(item if item.tzinfo else item.replace(tzinfo=dt.UTC))
        return out
    return pb.Value(keyword=str(item))


def document(doc: Any) -> pb.Document:
    if isinstance(doc, pb.Document):
        return doc
    out = pb.Document(id=str(doc["id"]), text=doc.get("text", {}))
    for name, vec in doc.get("dense", {}).items():
        out.dense[name].CopyFrom(dense_vector(vec))
    for name, vec in doc.get("sparse", {}).items():
        out.sparse[name].CopyFrom(sparse_vector(vec))
    for name, item in doc.get("payload", {}).items():
        out.payload[name].CopyFrom(value(item))
    return out


class BraidClient:
    """Thin wrapper over the generated stub; every method raises grpc.RpcError on a non-OK status."""

    def __init__(self, address: str = "127.0.0.1:50051", timeout: float | None = 60.0) -> None:
        self.channel = grpc.insecure_channel(
            address,
            options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
        )
        self.stub = braid_pb2_grpc.BraidStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> BraidClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    # ------------------------------------------------------------- collections

    def create_collection(self, name: str, schema: pb.Schema, shards: int = 1) -> pb.CollectionInfo:
        return self.stub.CreateCollection(
            pb.CreateCollectionRequest(name=name, schema=schema, shards=shards), timeout=self.timeout
        )

    def get_collection(self, name: str) -> pb.CollectionInfo:
        return self.stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=self.timeout)

    def list_collections(self) -> list[pb.CollectionInfo]:
        return list(self.stub.ListCollections(pb.ListCollectionsRequest(), timeout=self.timeout).collections)

    def delete_collection(self, name: str) -> None:
        self.stub.DeleteCollection(pb.DeleteCollectionRequest(name=name), timeout=self.timeout)

    # --------------------------------------------------------------- documents

    def upsert(self, collection: str, docs: Iterable[Any]) -> int:
        request = pb.UpsertRequest(collection=collection, documents=[document(d) for d in docs])
        return self.stub.Upsert(request, timeout=self.timeout).upserted

    def bulk_upsert(self, collection: str, docs: Iterable[Any], batch_size: int = 500) -> pb.BulkUpsertResponse:
        def batches() -> Iterator[pb.UpsertRequest]:
            batch: list[pb.Document] = []
            for doc in docs:
                batch.append(document(doc))
                if len(batch) >= batch_size:
                    yield pb.UpsertRequest(collection=collection, documents=batch)
                    batch = []
            if batch:
                yield pb.UpsertRequest(collection=collection, documents=batch)

        return self.stub.BulkUpsert(batches())

    def delete(self, collection: str, ids: Iterable[str] = (), filter: pb.Filter | None = None) -> int:
        request = pb.DeleteRequest(collection=collection, ids=list(ids))
        if filter is not None:
            request.filter.CopyFrom(filter)
        return self.stub.Delete(request, timeout=self.timeout).deleted

    def get(self, collection: str, ids: Iterable[str], include_vectors: bool = False) -> list[pb.Document]:
        request = pb.GetRequest(collection=collection, ids=list(ids), include_vectors=include_vectors)
        return list(self.stub.Get(request, timeout=self.timeout).documents)

    def count(self, collection: str, filter: pb.Filter | None = None) -> int:
        request = pb.CountRequest(collection=collection)
        if filter is not None:
            request.filter.CopyFrom(filter)
        return self.stub.Count(request, timeout=self.timeout).count

    def flush(self, collection: str) -> None:
        self.stub.Flush(pb.FlushRequest(collection=collection), timeout=self.timeout)

    # ------------------------------------------------------------------ search

    def search(
        self,
        collection: str,
        *,
        dense: tuple[str, Any] | None = None,
        bm25: str | None = None,
        sparse: tuple[str, Any] | None = None,
        filter: pb.Filter | None = None,
        fusion: pb.Fusion | None = None,
        limit: int = 10,
        include_payload: bool = False,
        text_fields: list[str] | None = None,
        explain: bool = False,
    ) -> list[pb.Hit]:
        """One search with up to one strand of each kind; build a SearchRequest for more control.

        ``dense`` and ``sparse`` are (field, vector) or, for fields with an encoder, (field, "query text").
        """
        request = pb.SearchRequest(
            collection=collection,
            limit=limit,
            include_payload=include_payload,
            explain=explain,
            text_fields=text_fields or [],
        )
        if dense is not None:
            field, query = dense
            if isinstance(query, str):  # text for a field with an encoder
                request.queries.add(dense=pb.DenseQuery(field=field, text=query))
            else:
                request.queries.add(dense=pb.DenseQuery(field=field, vector=dense_vector(query)))
        if bm25 is not None:
            request.queries.add(bm25=pb.Bm25Query(text=bm25))
        if sparse is not None:
            field, query = sparse
            if isinstance(query, str):
                request.queries.add(sparse=pb.SparseQuery(field=field, text=query))
            else:
                request.queries.add(sparse=pb.SparseQuery(field=field, vector=sparse_vector(query)))
        if filter is not None:
            request.filter.CopyFrom(filter)
        if fusion is not None:
            request.fusion.CopyFrom(fusion)
        return list(self.stub.Search(request, timeout=self.timeout).hits)
