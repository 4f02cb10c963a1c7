"""The braid.v1 messages the Python clients send, built in one place.

BraidClient (service/client.py) and AsyncBraidClient (service/aio.py) take the same
arguments and must send the same bytes for them: both build every request, every batch of
a stream and their channel's options and credentials with the functions here, and differ
only in how they send them.

Documents may be given as braid.v1 ``Document`` messages or as dicts with the keys id,
text, dense (field -> list or numpy array), sparse (field -> {term: weight} or
(indices, values)), payload (field -> str | int | float | bool | datetime) and metadata
(undeclared keys: a dict of JSON values, nested dicts and lists included, or its JSON text).
Vectors are sent in the packed float32 form. ``as_dict`` and ``metadata_of`` read a returned
Document or Hit back into plain Python.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from braid.v1 import braid_pb2 as pb

from .tls import channel_credentials

# The deadline of a BulkUpsert stream when none is given: generous, as a stream may carry
# a whole corpus, but finite, so a client never waits forever on a dead connection.
STREAM_TIMEOUT_S = 6 * 3600.0
MESSAGE_BYTES = 64 << 20
# Fusion by name, as in braid eval: search(..., fusion="rrf").
FUSIONS: dict[str, pb.Fusion] = {
    "rrf": pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60)),
    "minmax": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.MIN_MAX)),
    "zscore": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.Z_SCORE)),
    "dbsf": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.DBSF)),
    "sum": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.NONE)),
}
STRANDS = ("dense", "bm25", "sparse")


# ------------------------------------------------------------------ channel


def check_timeout(timeout: float) -> None:
    if timeout is None or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")


def check_api_key(api_key: str) -> None:
    # gRPC rejects such metadata with an obscure error; never echo the key itself.
    if not api_key or any(c.isspace() or not c.isprintable() or not c.isascii() for c in api_key):
        raise ValueError("api_key must be non-empty printable ASCII without spaces")


def api_key_metadata(api_key: str) -> list[tuple[str, str]]:
    """The metadata that carries an API key (checked first)."""
    check_api_key(api_key)
    return [("authorization", f"Bearer {api_key}")]


def channel_setup(
    tls_ca: str | Path | None = None,
    tls_cert: str | Path | None = None,
    tls_key: str | Path | None = None,
    server_name: str | None = None,
) -> tuple[list[tuple[str, Any]], grpc.ChannelCredentials | None]:
    """A client channel's options, and its TLS credentials (None: plaintext). Any of the TLS
    arguments makes the channel TLS; ``server_name`` overrides the name the certificate is checked against."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", MESSAGE_BYTES),
        ("grpc.max_send_message_length", MESSAGE_BYTES),
    ]
    if all(option is None for option in (tls_ca, tls_cert, tls_key, server_name)):
        return options, None
    credentials = channel_credentials(
        Path(tls_ca) if tls_ca is not None else None,
        Path(tls_cert) if tls_cert is not None else None,
        Path(tls_key) if tls_key is not None else None,
    )
    if server_name is not None:
        options.append(("grpc.ssl_target_name_override", server_name))
    return options, credentials


# ---------------------------------------------------------------- documents


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
    out.metadata = metadata_text(doc.get("metadata"))
    return out


def metadata_text(item: Any) -> str:
    """A document's metadata for the wire: a mapping as compact JSON text, a str as given, None as none.
    NaN and infinities are refused here (ValueError), as the server would refuse them."""
    if item is None:
        return ""
    if isinstance(item, str):
        return item
    if not isinstance(item, Mapping):
        raise TypeError(f"metadata must be a dict (or its JSON text), got {type(item).__name__}")
    return json.dumps(item, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def metadata_of(msg: pb.Document | pb.Hit) -> dict[str, Any]:
    """The metadata of a returned Document or Hit as a dict ({} when it has none)."""
    return json.loads(msg.metadata) if msg.metadata else {}


def value_of(msg: pb.Value) -> Any:
    """A payload Value as Python: str, int, float, bool or an aware UTC datetime."""
    kind = msg.WhichOneof("kind")
    if kind == "datetime":
        return msg.datetime.ToDatetime(tzinfo=dt.UTC)
    return getattr(msg, kind) if kind is not None else None


def as_dict(msg: pb.Document | pb.Hit) -> dict[str, Any]:
    """A returned Document or Hit as plain Python: id, text, payload, metadata (and score for a Hit)."""
    out: dict[str, Any] = {
        "id": msg.id,
        "text": dict(msg.text),
        "payload": {name: value_of(v) for name, v in msg.payload.items()},
        "metadata": metadata_of(msg),
    }
    if isinstance(msg, pb.Hit):
        out["score"] = msg.score
    return out


class Batcher:
    """Documents into the UpsertRequests of a BulkUpsert stream, ``batch_size`` at a time.

    ``add`` returns a full batch when one is ready, ``rest`` the last, short one; ``pending``
    holds the documents taken but not yet in a batch (what a stream stopped early never sent).
    """

    def __init__(self, collection: str, batch_size: int) -> None:
        self.collection = collection
        self.batch_size = batch_size
        self.pending: list[pb.Document] = []

    def add(self, doc: Any) -> pb.UpsertRequest | None:
        self.pending.append(document(doc))
        return self.rest() if len(self.pending) >= self.batch_size else None

    def rest(self) -> pb.UpsertRequest | None:
        if not self.pending:
            return None
        batch, self.pending = self.pending, []
        return pb.UpsertRequest(collection=self.collection, documents=batch)


# ----------------------------------------------------------------- requests


def create_collection(name: str, schema: pb.Schema, shards: int, replication_factor: int) -> pb.CreateCollectionRequest:
    return pb.CreateCollectionRequest(name=name, schema=schema, shards=shards, replication_factor=replication_factor)


def upsert(collection: str, docs: Iterable[Any]) -> pb.UpsertRequest:
    return pb.UpsertRequest(collection=collection, documents=[document(d) for d in docs])


def delete(collection: str, ids: Iterable[str], filter: pb.Filter | None) -> pb.DeleteRequest:
    request = pb.DeleteRequest(collection=collection, ids=list(ids))
    if filter is not None:
        request.filter.CopyFrom(filter)
    return request


def get(collection: str, ids: Iterable[str], include_vectors: bool) -> pb.GetRequest:
    return pb.GetRequest(collection=collection, ids=list(ids), include_vectors=include_vectors)


def count(collection: str, filter: pb.Filter | None) -> pb.CountRequest:
    request = pb.CountRequest(collection=collection)
    if filter is not None:
        request.filter.CopyFrom(filter)
    return request


def batch_search(requests: Iterable[pb.SearchRequest]) -> pb.BatchSearchRequest:
    return pb.BatchSearchRequest(searches=list(requests))


def _strand(request: pb.SearchRequest, kind: str, query: Any, weights: Mapping[str, float], depth: Any) -> None:
    sub = request.queries.add()
    getattr(sub, kind).CopyFrom(query)
    if kind in weights:
        sub.weight = weights[kind]
    strand_depth = depth.get(kind) if isinstance(depth, Mapping) else depth
    if strand_depth:
        sub.depth = strand_depth


def fusion_of(fusion: pb.Fusion | str) -> pb.Fusion:
    if isinstance(fusion, pb.Fusion):
        return fusion
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: unknown value {fusion!r}; valid: {', '.join(sorted(FUSIONS))}")
    return FUSIONS[fusion]


def search(
    collection: str,
    *,
    dense: tuple[str, Any] | pb.DenseQuery | None,
    bm25: str | pb.Bm25Query | None,
    sparse: tuple[str, Any] | pb.SparseQuery | None,
    queries: Iterable[pb.SubQuery],
    filter: pb.Filter | None,
    fusion: pb.Fusion | str | None,
    weights: Mapping[str, float] | None,
    depth: int | Mapping[str, int] | None,
    limit: int,
    offset: int,
    score_threshold: float | None,
    payload_fields: Iterable[str],
    include_payload: bool,
    text_fields: Iterable[str] | None,
    explain: bool,
) -> pb.SearchRequest:
    """The SearchRequest of BraidClient.search (which documents the arguments)."""
    weights = dict(weights or {})
    depths = depth if isinstance(depth, Mapping) else {}
    unknown = sorted((set(weights) | set(depths)) - set(STRANDS))
    if unknown:
        raise ValueError(f"weights/depth: unknown strand(s) {unknown}; valid: {', '.join(STRANDS)}")
    request = pb.SearchRequest(
        collection=collection,
        limit=limit,
        offset=offset,
        payload_fields=list(payload_fields),
        include_payload=include_payload,
        text_fields=list(text_fields or []),
        explain=explain,
    )
    if dense is not None:
        if not isinstance(dense, pb.DenseQuery):
            field, query = dense
            if isinstance(query, str):  # text for a field with an encoder
                dense = pb.DenseQuery(field=field, text=query)
            else:
                dense = pb.DenseQuery(field=field, vector=dense_vector(query))
        _strand(request, "dense", dense, weights, depth)
    if bm25 is not None:
        _strand(request, "bm25", bm25 if isinstance(bm25, pb.Bm25Query) else pb.Bm25Query(text=bm25), weights, depth)
    if sparse is not None:
        if not isinstance(sparse, pb.SparseQuery):
            field, query = sparse
            if isinstance(query, str):
                sparse = pb.SparseQuery(field=field, text=query)
            else:
                sparse = pb.SparseQuery(field=field, vector=sparse_vector(query))
        _strand(request, "sparse", sparse, weights, depth)
    request.queries.extend(queries)
    if filter is not None:
        request.filter.CopyFrom(filter)
    if fusion is not None:
        request.fusion.CopyFrom(fusion_of(fusion))
    if score_threshold is not None:
        request.score_threshold = score_threshold
    return request
