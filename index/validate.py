"""Validation of documents and search plans against a collection's schema.

Everything a write or a search carries is checked here, before anything is
written, so a rejected batch applies nothing. Messages name the field path
(``documents[3].dense.emb``) and give the expected and received values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import metadata
from .errors import InvalidArgument, ResourceExhausted
from .payload import PayloadStore
from .query import Bm25Query, DenseQuery, SearchPlan, SparseQuery
from .records import DocumentWrite, SparseValue
from .schema import MAX_EPS, DenseFieldSpec, DenseIndexType, Schema

MAX_ID_BYTES = 512
MAX_TEXT_BYTES = 1 << 20
# |value| bound for vector components and sparse weights: 1e15**2 * 65536 dims stays far below
# float32's 3.4e38, so no dot product or L2 distance can overflow to inf/NaN.
MAX_VECTOR_VALUE = 1e15
MAX_EF = 4096
MAX_LISTS = 65536
# Fusion weights and BM25 boosts lie in [0, MAX_WEIGHT]: with vectors within MAX_VECTOR_VALUE a
# fused score stays finite in float64; the float32 on the wire is clipped (service/convert.py).
MAX_WEIGHT = 1e6
MAX_SUB_QUERIES = 16  # strands of one search
MAX_QUERY_TERMS = 1024  # distinct BM25 terms of one query text in one field (index/text.py)


@dataclass(frozen=True)
class Limits:
    """Configured maxima that requests are held to."""

    max_batch: int = 10_000
    max_limit: int = 10_000
    max_depth: int = 10_000
    max_sparse_terms: int = 4_096
    max_query_bytes: int = 64 * 1024
    max_metadata_bytes: int = metadata.MAX_BYTES  # a document's metadata, as UTF-8 JSON text


def check_id(doc_id: str, where: str) -> None:
    if not doc_id:
        raise InvalidArgument.field(where, "id must not be empty")
    if len(doc_id.encode()) > MAX_ID_BYTES:
        raise InvalidArgument.field(where, f"id is longer than {MAX_ID_BYTES} bytes")


def check_ids(ids: list[str], limits: Limits) -> None:
    """The ids of a delete or a get: at most ``max_batch``, each a valid id."""
    if len(ids) > limits.max_batch:
        raise ResourceExhausted(f"ids: {len(ids)} ids exceed the maximum of {limits.max_batch}")
    for i, doc_id in enumerate(ids):
        check_id(doc_id, f"ids[{i}]")


def check_dense(vector: np.ndarray, dim: int, where: str) -> None:
    if vector.ndim != 1 or len(vector) != dim:
        raise InvalidArgument.dimension(where, dim, int(vector.size))
    if not np.isfinite(vector).all():
        raise InvalidArgument.field(where, "vector contains NaN or infinity")
    if len(vector) and float(np.abs(vector).max()) > MAX_VECTOR_VALUE:
        raise InvalidArgument.field(
            where, f"vector values must be within +-{MAX_VECTOR_VALUE:g} (scores would overflow)"
        )


def check_sparse(value: SparseValue, where: str, max_terms: int) -> None:
    terms = len(value.tokens) if value.tokens is not None else len(value.indices if value.indices is not None else ())
    if value.tokens is not None and value.indices is not None and len(value.indices):
        raise InvalidArgument.field(where, "set indices or tokens, not both")
    if terms != len(value.values):
        raise InvalidArgument.field(where, f"{terms} terms but {len(value.values)} values")
    if terms > max_terms:
        raise ResourceExhausted(f"{where}: {terms} terms exceed the maximum of {max_terms}")
    if not np.isfinite(value.values).all():
        raise InvalidArgument.field(where, "weights contain NaN or infinity")
    if len(value.values) and float(np.abs(value.values).max()) > MAX_VECTOR_VALUE:
        raise InvalidArgument.field(where, f"weights must be within +-{MAX_VECTOR_VALUE:g} (scores would overflow)")
    keys = value.tokens if value.tokens is not None else value.indices.tolist()  # type: ignore[union-attr]
    if len(set(keys)) != len(keys):
        raise InvalidArgument.field(where, "a term appears twice")


def check_documents(docs: list[DocumentWrite], schema: Schema, payload: PayloadStore, limits: Limits) -> None:
    if len(docs) > limits.max_batch:
        raise ResourceExhausted(f"documents: batch of {len(docs)} exceeds the maximum of {limits.max_batch}")
    for i, doc in enumerate(docs):
        where = f"documents[{i}]"
        check_id(doc.id, f"{where}.id")
        for name, value in doc.text.items():
            if schema.text(name) is None:
                raise unknown_field(f"{where}.text.{name}", "text", [f.name for f in schema.text_fields])
            if len(value.encode()) > MAX_TEXT_BYTES:
                raise InvalidArgument.field(f"{where}.text.{name}", f"text is longer than {MAX_TEXT_BYTES} bytes")
        for name, vector in doc.dense.items():
            spec = schema.dense(name)
            if spec is None:
                raise unknown_field(f"{where}.dense.{name}", "dense", [f.name for f in schema.dense_fields])
            check_dense(vector, spec.dim, f"{where}.dense.{name}")
        for name, value in doc.sparse.items():
            if schema.sparse(name) is None:
                raise unknown_field(f"{where}.sparse.{name}", "sparse", [f.name for f in schema.sparse_fields])
            check_sparse(value, f"{where}.sparse.{name}", limits.max_sparse_terms)
        payload.validate(doc.payload, where=f"{where}.payload")
        # Stored (and logged) as the canonical text, so replicas and replays agree byte for byte.
        doc.metadata = metadata.canonical(
            doc.metadata, f"{where}.metadata", {f.name for f in schema.payload_fields}, limits.max_metadata_bytes
        )


def check_plan(plan: SearchPlan, schema: Schema, payload: PayloadStore, limits: Limits, where: str = "") -> None:
    if not plan.queries:
        raise InvalidArgument.field(f"{where}queries", "at least one sub-query is required")
    check_query_count(len(plan.queries), where)
    if not 1 <= plan.limit <= limits.max_limit:
        raise ResourceExhausted(f"{where}limit: {plan.limit} must be in 1..{limits.max_limit}")
    if plan.offset + plan.limit > limits.max_depth:
        raise ResourceExhausted(f"{where}offset: offset + limit exceeds the maximum of {limits.max_depth}")
    if plan.score_threshold is not None and not math.isfinite(plan.score_threshold):
        raise InvalidArgument.field(f"{where}score_threshold", "must be finite")
    for i, sub in enumerate(plan.queries):
        at = f"{where}queries[{i}]"
        if not 0 <= sub.depth <= limits.max_depth:
            raise ResourceExhausted(f"{at}.depth: {sub.depth} must be in 0..{limits.max_depth}")
        check_weight(sub.weight, f"{at}.weight")
        _check_strand(sub.query, schema, limits, at)
    if plan.filter is not None:
        payload.validate_filter(plan.filter, where=f"{where}filter")
    for name in plan.payload_fields or ():
        if schema.payload(name) is None:
            raise unknown_field(f"{where}payload_fields", "payload", [f.name for f in schema.payload_fields], name)
    for name in plan.text_fields:
        if schema.text(name) is None:
            raise unknown_field(f"{where}text_fields", "text", [f.name for f in schema.text_fields], name)


def _check_strand(query: object, schema: Schema, limits: Limits, at: str) -> None:
    if isinstance(query, DenseQuery):
        spec = schema.dense(query.field)
        if spec is None:
            raise unknown_field(f"{at}.dense.field", "dense", [f.name for f in schema.dense_fields], query.field)
        if query.vector is None:
            raise InvalidArgument.field(f"{at}.dense", "set vector or text")
        check_dense(query.vector, spec.dim, f"{at}.dense.vector")
        if query.ef > MAX_EF:
            raise ResourceExhausted(f"{at}.dense.ef: {query.ef} exceeds the maximum of {MAX_EF}")
        check_spann_knobs(spec, query.max_lists, query.eps, f"{at}.dense")
    elif isinstance(query, Bm25Query):
        if not schema.text_fields:
            raise InvalidArgument.field(f"{at}.bm25", "the collection has no text fields")
        check_query_text(query.text, f"{at}.bm25.text", limits.max_query_bytes)
        if not query.text.strip():
            raise InvalidArgument.field(f"{at}.bm25.text", "query text is empty")
        for name in list(query.fields) + list(query.boosts):
            if schema.text(name) is None:
                raise unknown_field(f"{at}.bm25.fields", "text", [f.name for f in schema.text_fields], name)
        for name, boost in query.boosts.items():
            check_weight(boost, f"{at}.bm25.boosts.{name}")
    elif isinstance(query, SparseQuery):
        if schema.sparse(query.field) is None:
            raise unknown_field(f"{at}.sparse.field", "sparse", [f.name for f in schema.sparse_fields], query.field)
        if query.vector is None:
            raise InvalidArgument.field(f"{at}.sparse", "set vector or text")
        check_sparse(query.vector, f"{at}.sparse.vector", limits.max_sparse_terms)
        if len(query.vector.values) == 0 and not query.text:  # text with no known terms just matches nothing
            raise InvalidArgument.field(f"{at}.sparse.vector", "query vector is empty")
    else:
        raise InvalidArgument.field(at, "set one of dense, bm25 or sparse")


def check_query_count(count: int, where: str = "") -> None:
    if count > MAX_SUB_QUERIES:
        raise InvalidArgument.field(
            f"{where}queries", f"{count} sub-queries, more than the maximum of {MAX_SUB_QUERIES}"
        )


def check_weight(weight: float, where: str) -> None:
    """A fusion weight or a BM25 boost: finite and within [0, MAX_WEIGHT]."""
    if not (math.isfinite(weight) and 0.0 <= weight <= MAX_WEIGHT):
        raise InvalidArgument.field(where, f"must be in 0..{MAX_WEIGHT:g}, got {weight:g}")


def check_query_text(text: str, where: str, max_bytes: int) -> None:
    """A query text's UTF-8 size against ``Limits.max_query_bytes``, before any analysis or encoding."""
    if len(text) * 4 <= max_bytes:  # UTF-8 takes at most 4 bytes a character: no need to encode
        return
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument.field(where, f"query is {size} bytes, more than the maximum of {max_bytes}")


def check_spann_knobs(spec: DenseFieldSpec, max_lists: int, eps: float | None, where: str) -> None:
    """Per-query SPANN knobs: only on SPANN fields (an HNSW field rejects them rather than ignore them)."""
    if spec.index is not DenseIndexType.SPANN:
        for name, given in (("max_lists", bool(max_lists)), ("eps", eps is not None)):
            if given:
                raise InvalidArgument.field(
                    f"{where}.{name}", f'only fields with index "spann" take {name}; {spec.name!r} is an HNSW field'
                )
        return
    if max_lists > MAX_LISTS:
        raise ResourceExhausted(f"{where}.max_lists: {max_lists} exceeds the maximum of {MAX_LISTS}")
    if eps is not None and not (math.isfinite(eps) and 0.0 <= eps <= MAX_EPS):
        raise InvalidArgument.field(f"{where}.eps", f"must be in 0..{MAX_EPS:g}, got {eps}")


class ChecksDense:
    """``check_dense`` for what has a ``schema`` and ``limits``: a standalone collection and a
    router's (service/rpcs.py checks a plain dense query through it before the batched path)."""

    schema: Schema
    limits: Limits

    def check_dense(
        self,
        field: str,
        vector: np.ndarray,
        limit: int,
        ef: int,
        where: str = "",
        max_lists: int = 0,
        eps: float | None = None,
    ) -> None:
        """The checks check_plan makes, for one plain dense query."""
        spec = self.schema.dense(field)
        if spec is None:
            declared = [f.name for f in self.schema.dense_fields]
            raise unknown_field(f"{where}queries[0].dense.field", "dense", declared, field)
        check_dense(vector, spec.dim, f"{where}queries[0].dense.vector")
        if not 1 <= limit <= self.limits.max_limit:
            raise ResourceExhausted(f"{where}limit: {limit} must be in 1..{self.limits.max_limit}")
        if ef > MAX_EF:
            raise ResourceExhausted(f"{where}queries[0].dense.ef: {ef} exceeds the maximum of {MAX_EF}")
        check_spann_knobs(spec, max_lists, eps, f"{where}queries[0].dense")


def unknown_field(where: str, kind: str, declared: list[str], name: str | None = None) -> InvalidArgument:
    shown = f"{name!r} " if name is not None else ""
    return InvalidArgument.field(
        where, f"unknown {kind} field {shown}(declared: {', '.join(declared) if declared else 'none'})"
    )
