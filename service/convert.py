"""Conversions between braid.v1 protobuf messages and the index layer's plain types.

The only module that reads request messages field by field (tests check that
every request field is read somewhere here). Dense vectors decode straight into
numpy, from the packed little-endian float32 form or from repeated floats.

Enums: proto3 enums are open, so a message may carry a number the schema does not
name (99, or a client's typo mapped to 0). Every enum field is looked up in a table
here; a number not in it is INVALID_ARGUMENT naming the field and listing the names.
0 is accepted only where the proto documents it as a default (Normalization);
``metric`` has no default.

Responses: ``result_to_proto`` and ``documents_to_proto`` take ``max_bytes`` and stop
with RESOURCE_EXHAUSTED as soon as the hits or documents built so far pass it, rather
than building a response the transport will refuse anyway. Hit scores are float32 on
the wire: fused scores beyond its range are clipped to +-3.4e38 (ranking is done in
float64 before that).
"""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from braid.index.errors import InvalidArgument, ResourceExhausted
from braid.index.filters import Condition, Exists, Filter, Match, MatchAny, Range
from braid.index.query import Bm25Query, DenseQuery, SearchPlan, SearchResult, SparseQuery, SubQuery
from braid.index.records import DocumentWrite, SparseValue
from braid.index.schema import (
    DEFAULT_SPARSE_TOP_K,
    Analyzer,
    DenseFieldSpec,
    DenseIndexType,
    EncoderSpec,
    HnswParams,
    Metric,
    PayloadFieldSpec,
    PayloadType,
    Precision,
    Schema,
    SpannParams,
    SparseFieldSpec,
    SparseQueryMode,
    TextFieldSpec,
)
from braid.index.validate import check_query_count
from braid.v1 import braid_pb2 as pb

_METRICS = {pb.COSINE: Metric.COSINE, pb.DOT: Metric.DOT, pb.L2: Metric.L2}
_METRICS_OUT = {Metric.COSINE: pb.COSINE, Metric.DOT: pb.DOT, Metric.L2: pb.L2}
_PAYLOAD_TYPES = {
    pb.KEYWORD: PayloadType.KEYWORD,
    pb.INT: PayloadType.INT,
    pb.FLOAT: PayloadType.FLOAT,
    pb.BOOL: PayloadType.BOOL,
    pb.DATETIME: PayloadType.DATETIME,
}
_PAYLOAD_TYPES_OUT = {v: k for k, v in _PAYLOAD_TYPES.items()}
_NORMALIZATIONS = {
    pb.NORMALIZATION_UNSPECIFIED: "min_max",
    pb.MIN_MAX: "min_max",
    pb.Z_SCORE: "z_score",
    pb.DBSF: "dbsf",
    pb.NONE: "none",
}
_F32_MAX = float(np.finfo(np.float32).max)
_DEFAULT_HNSW = HnswParams()
_DEFAULT_SPANN = SpannParams()
E = TypeVar("E", bound=Enum)
V = TypeVar("V")

# ------------------------------------------------------------------- schema


def _choice(kind: type[E], value: str, default: E, where: str) -> E:
    """The enum member named by a string field (empty: ``default``), or INVALID_ARGUMENT listing the choices."""
    try:
        return kind(value) if value else default
    except ValueError:
        raise InvalidArgument.choice(where, value, [member.value for member in kind]) from None


def _enum(table: dict[int, V], number: int, kind: str, where: str) -> V:
    """The value of an enum number, or INVALID_ARGUMENT naming ``where`` and listing the accepted names."""
    try:
        return table[number]
    except KeyError:
        names = pb.DESCRIPTOR.enum_types_by_name[kind].values_by_number
        shown = f"{names[number].name} ({number})" if number in names else f"unknown number {number}"
        valid = ", ".join(names[n].name for n in table)
        raise InvalidArgument.field(where, f"must be one of {valid}, got {shown}") from None


def schema_from_proto(msg: pb.Schema) -> Schema:
    text = [
        TextFieldSpec(f.name, _choice(Analyzer, f.analyzer, Analyzer.DEFAULT, f"schema.text_fields[{i}].analyzer"))
        for i, f in enumerate(msg.text_fields)
    ]
    dense = []
    for i, f in enumerate(msg.dense_fields):
        metric = _enum(_METRICS, f.metric, "Metric", f"schema.dense_fields[{i}].metric")
        hnsw = HnswParams(
            m=f.hnsw.m or _DEFAULT_HNSW.m,
            ef_construction=f.hnsw.ef_construction or _DEFAULT_HNSW.ef_construction,
            ef_search=f.hnsw.ef_search or _DEFAULT_HNSW.ef_search,
        )
        encoder = _optional_encoder(f, f"schema.dense_fields[{i}].encoder")
        index = _choice(DenseIndexType, f.index, DenseIndexType.HNSW, f"schema.dense_fields[{i}].index")
        if f.HasField("spann") and index is not DenseIndexType.SPANN:
            raise InvalidArgument.field(f"schema.dense_fields[{i}].spann", 'set only with index "spann"')
        dense.append(DenseFieldSpec(f.name, f.dim, metric, hnsw, encoder, index, spann_from_proto(f.spann)))
    payload = [
        PayloadFieldSpec(f.name, _enum(_PAYLOAD_TYPES, f.type, "PayloadType", f"schema.payload_fields[{i}].type"))
        for i, f in enumerate(msg.payload_fields)
    ]
    return Schema(
        text_fields=tuple(text),
        dense_fields=tuple(dense),
        sparse_fields=tuple(
            SparseFieldSpec(f.name, _optional_encoder(f, f"schema.sparse_fields[{i}].encoder"))
            for i, f in enumerate(msg.sparse_fields)
        ),
        payload_fields=tuple(payload),
    )


def spann_from_proto(msg: pb.SpannParams) -> SpannParams:
    """SPANN parameters with 0 / unset replaced by the defaults (validated by Schema.validate)."""
    d = _DEFAULT_SPANN
    return SpannParams(
        target_list_size=msg.target_list_size or d.target_list_size,
        replicas=msg.replicas or d.replicas,
        closure_candidates=msg.closure_candidates or d.closure_candidates,
        eps_build=_short(msg.eps_build) if msg.HasField("eps_build") else d.eps_build,
        max_lists=msg.max_lists or d.max_lists,
        eps=_short(msg.eps) if msg.HasField("eps") else d.eps,
        centroid_ef=msg.centroid_ef or d.centroid_ef,
        centroid_m=msg.centroid_m or d.centroid_m,
        centroid_ef_construction=msg.centroid_ef_construction or d.centroid_ef_construction,
        seed=msg.seed,
        merge_threshold=msg.merge_threshold or d.merge_threshold,
    )


def _short(value: float) -> float:
    """A float32 from the wire as the shortest decimal that reads back the same (0.15, not 0.15000000596)."""
    return float(f"{value:.7g}")


def spann_to_proto(spec: DenseFieldSpec) -> pb.SpannParams | None:
    if spec.index is not DenseIndexType.SPANN:
        return None
    return pb.SpannParams(**spec.spann.to_json())


def _optional_encoder(field: pb.DenseVectorField | pb.SparseVectorField, where: str) -> EncoderSpec | None:
    return encoder_from_proto(field.encoder, where) if field.HasField("encoder") else None


def encoder_from_proto(msg: pb.Encoder, where: str) -> EncoderSpec:
    return EncoderSpec(
        msg.model,
        tuple(msg.source_fields),
        _choice(Precision, msg.precision, Precision.FP32, f"{where}.precision"),
        _choice(SparseQueryMode, msg.query_mode, SparseQueryMode.MODEL, f"{where}.query_mode"),
        msg.top_k or DEFAULT_SPARSE_TOP_K,
    )


def encoder_to_proto(spec: EncoderSpec | None) -> pb.Encoder | None:
    if spec is None:
        return None
    return pb.Encoder(
        model=spec.model,
        source_fields=list(spec.source_fields),
        precision=spec.precision.value,
        query_mode=spec.query_mode.value,
        top_k=spec.top_k,
    )


def schema_to_proto(schema: Schema) -> pb.Schema:
    return pb.Schema(
        text_fields=[pb.TextField(name=f.name, analyzer=f.analyzer.value) for f in schema.text_fields],
        dense_fields=[
            pb.DenseVectorField(
                name=f.name,
                dim=f.dim,
                metric=_METRICS_OUT[f.metric],
                hnsw=pb.HnswParams(m=f.hnsw.m, ef_construction=f.hnsw.ef_construction, ef_search=f.hnsw.ef_search),
                encoder=encoder_to_proto(f.encoder),
                index=f.index.value,
                spann=spann_to_proto(f),
            )
            for f in schema.dense_fields
        ],
        sparse_fields=[
            pb.SparseVectorField(name=f.name, encoder=encoder_to_proto(f.encoder)) for f in schema.sparse_fields
        ],
        payload_fields=[pb.PayloadField(name=f.name, type=_PAYLOAD_TYPES_OUT[f.type]) for f in schema.payload_fields],
    )


def collection_to_proto(name: str, schema: Schema, shards: int, documents: int, created_at: float) -> pb.CollectionInfo:
    created = Timestamp()
    created.FromNanoseconds(int(created_at * 1e9))
    return pb.CollectionInfo(
        name=name, schema=schema_to_proto(schema), shards=shards, documents=documents, created_at=created
    )


def snapshot_to_proto(manifest: dict) -> pb.SnapshotInfo:
    """A snapshot manifest (index/snapshot.py; a listing's damaged entry has only ``name`` and
    ``error``) as SnapshotInfo."""
    if "error" in manifest:
        return pb.SnapshotInfo(name=str(manifest.get("name", "")), error=str(manifest["error"]))
    created = Timestamp()
    created.FromNanoseconds(int(float(manifest.get("created_at") or 0) * 1e9))
    shards = [
        pb.ShardSnapshot(
            shard=int(s.get("shard", 0)), sequence=int(s.get("wal_seq", 0)), documents=int(s.get("documents", 0))
        )
        for s in manifest.get("shards", [])
    ]
    return pb.SnapshotInfo(
        name=manifest.get("name") or "",
        collection=manifest.get("collection") or "",
        created_at=created,
        size_bytes=int(manifest.get("bytes") or 0),
        documents=sum(shard.documents for shard in shards),
        shards=shards,
        format=int(manifest.get("format") or 0),
    )


# ---------------------------------------------------------------- documents


def dense_from_proto(msg: pb.DenseVector, where: str) -> np.ndarray:
    if msg.packed:
        if msg.values:
            raise InvalidArgument.field(where, "set values or packed, not both")
        if len(msg.packed) % 4:
            raise InvalidArgument.field(where, f"packed length {len(msg.packed)} is not a multiple of 4")
        return np.frombuffer(msg.packed, dtype="<f4").astype(np.float32, copy=False)
    return np.asarray(msg.values, dtype=np.float32)


def sparse_from_proto(msg: pb.SparseVector, where: str) -> SparseValue:
    if msg.indices and msg.tokens:
        raise InvalidArgument.field(where, "set indices or tokens, not both")
    values = np.asarray(msg.values, dtype=np.float32)
    if msg.tokens:
        return SparseValue(values=values, tokens=list(msg.tokens))
    return SparseValue(values=values, indices=np.asarray(msg.indices, dtype=np.uint32))


def value_from_proto(msg: pb.Value, where: str) -> object:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument.field(where, "value is not set")
    if kind == "datetime":
        try:
            return msg.datetime.ToMicroseconds()
        except ValueError as err:  # outside 0001-01-01..9999-12-31, or bad nanos
            raise InvalidArgument.field(where, f"invalid timestamp: {err}") from None
    return getattr(msg, kind)


def value_to_proto(value: object, kind: PayloadType) -> pb.Value:
    if kind is PayloadType.KEYWORD:
        return pb.Value(keyword=value)  # type: ignore[arg-type]
    if kind is PayloadType.INT:
        return pb.Value(int=value)  # type: ignore[arg-type]
    if kind is PayloadType.FLOAT:
        return pb.Value(float=value)  # type: ignore[arg-type]
    if kind is PayloadType.BOOL:
        return pb.Value(bool=value)  # type: ignore[arg-type]
    stamp = Timestamp()
    stamp.FromMicroseconds(int(value))  # type: ignore[call-overload]
    return pb.Value(datetime=stamp)


def document_from_proto(msg: pb.Document, where: str) -> DocumentWrite:
    return DocumentWrite(
        id=msg.id,
        text=dict(msg.text),
        dense={name: dense_from_proto(v, f"{where}.dense.{name}") for name, v in msg.dense.items()},
        sparse={name: sparse_from_proto(v, f"{where}.sparse.{name}") for name, v in msg.sparse.items()},
        payload={name: value_from_proto(v, f"{where}.payload.{name}") for name, v in msg.payload.items()},
        metadata=msg.metadata,
    )


def documents_from_proto(msgs: list[pb.Document]) -> list[DocumentWrite]:
    return [document_from_proto(doc, f"documents[{i}]") for i, doc in enumerate(msgs)]


def document_to_proto(doc: dict, types: dict[str, PayloadType]) -> pb.Document:
    out = pb.Document(id=doc["id"], text=doc["text"], metadata=doc.get("metadata", ""))
    for name, value in doc["payload"].items():
        out.payload[name].CopyFrom(value_to_proto(value, types[name]))
    for name, vector in doc["dense"].items():
        out.dense[name].packed = np.asarray(vector, dtype="<f4").tobytes()
    for name, sparse in doc["sparse"].items():
        target = out.sparse[name]
        target.values.extend(sparse.values.tolist())
        if sparse.tokens:
            target.tokens.extend(sparse.tokens)
        else:
            target.indices.extend(sparse.indices.tolist())
    return out


def documents_to_proto(
    docs: list[dict], types: dict[str, PayloadType], max_bytes: int | None = None
) -> list[pb.Document]:
    """The documents of a Get; ResourceExhausted as soon as those built pass ``max_bytes`` (None: no check)."""
    out = []
    total = 0
    for doc in docs:
        msg = document_to_proto(doc, types)
        if max_bytes is not None:
            total += _framed(msg.ByteSize())
            if total > max_bytes:
                raise _too_large(max_bytes, _GET_ADVICE)
        out.append(msg)
    return out


# ------------------------------------------------------------------ filters


def filter_from_proto(msg: pb.Filter, where: str = "filter") -> Filter:
    return Filter(
        must=tuple(_condition(c, f"{where}.must[{i}]") for i, c in enumerate(msg.must)),
        should=tuple(_condition(c, f"{where}.should[{i}]") for i, c in enumerate(msg.should)),
        must_not=tuple(_condition(c, f"{where}.must_not[{i}]") for i, c in enumerate(msg.must_not)),
    )


def optional_filter(msg: pb.Filter, present: bool, where: str = "filter") -> Filter | None:
    if not present:
        return None
    flt = filter_from_proto(msg, where)
    return None if flt.is_empty() else flt


def _condition(msg: pb.Condition, where: str) -> Condition:
    kind = msg.WhichOneof("kind")
    if kind == "match":
        return Match(msg.match.field, value_from_proto(msg.match.value, f"{where}.match.value"))  # type: ignore[arg-type]
    if kind == "any":
        values = tuple(value_from_proto(v, f"{where}.any.values[{i}]") for i, v in enumerate(msg.any.values))
        return MatchAny(msg.any.field, values)  # type: ignore[arg-type]
    if kind == "range":
        r = msg.range
        bounds = {}
        for bound in ("gt", "gte", "lt", "lte"):
            if r.HasField(bound):
                msg_bound = getattr(r, bound)
                value = value_from_proto(msg_bound, f"{where}.range.{bound}")
                if isinstance(value, (str, bool)):
                    raise InvalidArgument.field(f"{where}.range.{bound}", "range bounds must be int, float or datetime")
                if (
                    bound in ("gte", "lt")
                    and msg_bound.WhichOneof("kind") == "datetime"
                    and msg_bound.datetime.nanos % 1000
                ):
                    # Stored datetimes are whole microseconds: "at or after 10.5 us" means ">= 11 us",
                    # "before 10.5 us" means "< 11 us" (gt and lte are right when truncated).
                    value += 1
                bounds[bound] = value
        return Range(r.field, **bounds)  # type: ignore[arg-type]
    if kind == "exists":
        return Exists(msg.exists.field)
    if kind == "filter":
        return filter_from_proto(msg.filter, f"{where}.filter")
    raise InvalidArgument.field(where, "condition is empty; set match, any, range, exists or filter")


# ------------------------------------------------------------------- search


def plan_from_proto(msg: pb.SearchRequest, where: str = "") -> SearchPlan:
    check_query_count(len(msg.queries), where)  # before any per-strand work (text encoding comes next)
    queries = []
    for i, sub in enumerate(msg.queries):
        at = f"{where}queries[{i}]"
        kind = sub.WhichOneof("query")
        if kind == "dense":
            dense = sub.dense
            vector = None
            if vector_or_text(dense.HasField("vector"), dense.text, f"{at}.dense"):
                vector = dense_from_proto(dense.vector, f"{at}.dense.vector")
            eps = dense.eps if dense.HasField("eps") else None
            query: object = DenseQuery(dense.field, vector, dense.ef, dense.text, dense.max_lists, eps)
        elif kind == "bm25":
            query = Bm25Query(sub.bm25.text, list(sub.bm25.fields), dict(sub.bm25.boosts))
        elif kind == "sparse":
            sparse = sub.sparse
            sparse_vector = None
            if vector_or_text(sparse.HasField("vector"), sparse.text, f"{at}.sparse"):
                sparse_vector = sparse_from_proto(sparse.vector, f"{at}.sparse.vector")
            query = SparseQuery(sparse.field, sparse_vector, sparse.text)
        else:
            raise InvalidArgument.field(at, "set one of dense, bm25 or sparse")
        weight = sub.weight if sub.weight != 0.0 else 1.0
        if math.isnan(weight):
            raise InvalidArgument.field(f"{at}.weight", "must not be NaN")
        queries.append(SubQuery(query, sub.name, sub.depth, weight))  # type: ignore[arg-type]
    fusion, rrf_k, normalization = "", 60, "min_max"
    rule = msg.fusion.WhichOneof("rule") if msg.HasField("fusion") else None
    if rule == "rrf":
        fusion, rrf_k = "rrf", msg.fusion.rrf.k or 60
    elif rule == "weighted":
        fusion = "weighted"
        normalization = _enum(
            _NORMALIZATIONS, msg.fusion.weighted.normalization, "Normalization", f"{where}fusion.weighted.normalization"
        )
    return SearchPlan(
        queries=queries,
        filter=optional_filter(msg.filter, msg.HasField("filter")),
        fusion=fusion,
        rrf_k=rrf_k,
        normalization=normalization,
        limit=msg.limit or 10,
        offset=msg.offset,
        score_threshold=msg.score_threshold if msg.HasField("score_threshold") else None,
        payload_fields=list(msg.payload_fields) or None,
        include_payload=msg.include_payload,
        text_fields=list(msg.text_fields),
        explain=msg.explain,
    )


def vector_or_text(has_vector: bool, text: str, where: str) -> bool:
    """True when the sub-query carries a vector; text alone is encoded later by the service."""
    if has_vector and text:
        raise InvalidArgument.field(where, "set vector or text, not both")
    return has_vector or not text


def _too_large(max_bytes: int, advice: str) -> ResourceExhausted:
    return ResourceExhausted(f"the response would exceed {max_bytes} bytes (the maximum message size); {advice}")


_SEARCH_ADVICE = "lower `limit`, or ask for fewer `payload_fields` / `text_fields`"
_GET_ADVICE = "ask for fewer `ids`, or set `include_vectors=false`"


def _framed(size: int) -> int:
    """Bytes of one element of a repeated message field numbered 1..15: tag, length varint, the message."""
    return 1 + max(1, (size.bit_length() + 6) // 7) + size


def result_to_proto(
    result: SearchResult, types: dict[str, PayloadType], max_bytes: int | None = None
) -> pb.SearchResponse:
    """The response of a search; ResourceExhausted as soon as the hits built pass ``max_bytes`` (None: no check)."""
    scores = result.scores.tolist()
    if not all(-_F32_MAX <= score <= _F32_MAX for score in scores):  # rare (NaN too: clip keeps it)
        scores = np.clip(result.scores, -_F32_MAX, _F32_MAX).tolist()
    if result.payloads is None and result.metadata is None and result.texts is None and result.ranks is None:
        # Hot path: ids and scores only (add() in place is about twice as fast as building Hit objects).
        response = pb.SearchResponse()
        add = response.hits.add
        for doc_id, score in zip(result.ids, scores, strict=True):
            add(id=doc_id, score=score)
        if max_bytes is not None and response.ByteSize() > max_bytes:  # small hits: one C-level pass
            raise _too_large(max_bytes, _SEARCH_ADVICE)
        return response
    hits = []
    total = 0
    for n, (doc_id, score) in enumerate(zip(result.ids, scores, strict=True)):
        hit = pb.Hit(id=doc_id, score=score)
        if result.payloads is not None:
            for name, value in result.payloads[n].items():
                hit.payload[name].CopyFrom(value_to_proto(value, types[name]))
        if result.metadata is not None:
            hit.metadata = result.metadata[n]
        if result.texts is not None:
            hit.text.update(result.texts[n])
        if result.ranks is not None and result.raw is not None and result.strand_names is not None:
            for s, name in enumerate(result.strand_names):
                hit.explain.add(query=name, rank=int(result.ranks[n, s]), score=float(result.raw[n, s]))
        if max_bytes is not None:
            total += _framed(hit.ByteSize())
            if total > max_bytes:
                raise _too_large(max_bytes, _SEARCH_ADVICE)
        hits.append(hit)
    return pb.SearchResponse(hits=hits)
