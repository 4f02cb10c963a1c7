"""Write operations and their byte encoding inside write-ahead-log records.

Record kinds (the ``u8 kind`` of a WAL record):
  1 UPSERT        a batch of documents
  2 DELETE_IDS    a list of client ids
  3 DELETE_FILTER a payload filter, resolved against the shard state when applied
                  (replay applies it to the same state, so the result is the same)

UPSERT payload, little-endian:
  ``u32 header_len | header (UTF-8 JSON) | blob``
The JSON header is ``{"docs": [{"id", "text", "payload", "metadata", "dense": {field: [offset, dim]},
"sparse": {field: {"indices": [offset, n] | "tokens": [...], "values": [offset, n]}}}]}``;
offsets are byte offsets into ``blob``, which holds float32 vectors and weights and
uint32 term ids back to back. Vectors stay binary so a 384-dim vector costs
1,536 bytes, not a JSON float list. ``metadata`` is the document's canonical metadata
text (index/metadata.py), absent when it has none (older records replay unchanged).

DELETE_IDS and DELETE_FILTER payloads are UTF-8 JSON: ``{"ids": [...]}`` and
``{"filter": <filter as nested lists>}``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .filters import Condition, Exists, Filter, Match, MatchAny, Range

UPSERT = 1
DELETE_IDS = 2
DELETE_FILTER = 3

_U32 = struct.Struct("<I")


@dataclass
class SparseValue:
    """A sparse vector as the client sent it: term ids or tokens, and weights."""

    values: np.ndarray  # float32
    indices: np.ndarray | None = None  # uint32
    tokens: list[str] | None = None


@dataclass
class DocumentWrite:
    """One document of an upsert, already validated against the schema."""

    id: str
    text: dict[str, str] = field(default_factory=dict)
    dense: dict[str, np.ndarray] = field(default_factory=dict)
    sparse: dict[str, SparseValue] = field(default_factory=dict)
    payload: dict[str, Any] = field(default_factory=dict)
    metadata: str = ""  # JSON object text, canonical once validated (index/metadata.py); "" = none


# --------------------------------------------------------------------- upsert


def encode_upsert(docs: list[DocumentWrite]) -> bytes:
    blob = bytearray()

    def put(array: np.ndarray, dtype: str) -> list[int]:
        data = np.ascontiguousarray(array, dtype=dtype).tobytes()
        offset = len(blob)
        blob.extend(data)
        return [offset, len(array)]

    header_docs = []
    for doc in docs:
        entry: dict[str, Any] = {"id": doc.id}
        if doc.text:
            entry["text"] = doc.text
        if doc.payload:
            entry["payload"] = doc.payload
        if doc.metadata:
            entry["metadata"] = doc.metadata
        if doc.dense:
            entry["dense"] = {name: put(vector, "<f4") for name, vector in doc.dense.items()}
        if doc.sparse:
            sparse = {}
            for name, value in doc.sparse.items():
                item: dict[str, Any] = {"values": put(value.values, "<f4")}
                if value.tokens is not None:
                    item["tokens"] = value.tokens
                else:
                    item["indices"] = put(value.indices if value.indices is not None else np.empty(0), "<u4")
                sparse[name] = item
            entry["sparse"] = sparse
        header_docs.append(entry)
    header = json.dumps({"docs": header_docs}, separators=(",", ":"), ensure_ascii=False).encode()
    return _U32.pack(len(header)) + header + bytes(blob)


def decode_upsert(payload: bytes) -> list[DocumentWrite]:
    (header_len,) = _U32.unpack_from(payload, 0)
    header = json.loads(payload[4 : 4 + header_len])
    blob = memoryview(payload)[4 + header_len :]

    def take(span: list[int], dtype: str) -> np.ndarray:
        offset, count = span
        return np.frombuffer(blob, dtype=dtype, count=count, offset=offset).copy()

    docs = []
    for entry in header["docs"]:
        sparse = {}
        for name, item in entry.get("sparse", {}).items():
            values = take(item["values"], "<f4").astype(np.float32)
            if "tokens" in item:
                sparse[name] = SparseValue(values=values, tokens=list(item["tokens"]))
            else:
                sparse[name] = SparseValue(values=values, indices=take(item["indices"], "<u4").astype(np.uint32))
        docs.append(
            DocumentWrite(
                id=entry["id"],
                text=entry.get("text", {}),
                dense={name: take(span, "<f4").astype(np.float32) for name, span in entry.get("dense", {}).items()},
                sparse=sparse,
                payload=entry.get("payload", {}),
                metadata=entry.get("metadata", ""),
            )
        )
    return docs


# --------------------------------------------------------------------- delete


def encode_delete_ids(ids: list[str]) -> bytes:
    return json.dumps({"ids": ids}, ensure_ascii=False).encode()


def decode_delete_ids(payload: bytes) -> list[str]:
    return list(json.loads(payload)["ids"])


def encode_delete_filter(flt: Filter) -> bytes:
    return json.dumps({"filter": filter_to_json(flt)}, ensure_ascii=False).encode()


def decode_delete_filter(payload: bytes) -> Filter:
    return filter_from_json(json.loads(payload)["filter"])


# -------------------------------------------------------------------- filters


def filter_to_json(flt: Filter) -> dict[str, Any]:
    return {
        "must": [_condition_to_json(c) for c in flt.must],
        "should": [_condition_to_json(c) for c in flt.should],
        "must_not": [_condition_to_json(c) for c in flt.must_not],
    }


def _condition_to_json(cond: Condition) -> list[Any]:
    if isinstance(cond, Match):
        return ["match", cond.field, cond.value]
    if isinstance(cond, MatchAny):
        return ["any", cond.field, list(cond.values)]
    if isinstance(cond, Range):
        return ["range", cond.field, cond.gt, cond.gte, cond.lt, cond.lte]
    if isinstance(cond, Exists):
        return ["exists", cond.field]
    return ["filter", filter_to_json(cond)]


def filter_from_json(data: dict[str, Any]) -> Filter:
    return Filter(
        must=tuple(_condition_from_json(c) for c in data.get("must", ())),
        should=tuple(_condition_from_json(c) for c in data.get("should", ())),
        must_not=tuple(_condition_from_json(c) for c in data.get("must_not", ())),
    )


def _condition_from_json(item: list[Any]) -> Condition:
    kind = item[0]
    if kind == "match":
        return Match(item[1], item[2])
    if kind == "any":
        return MatchAny(item[1], tuple(item[2]))
    if kind == "range":
        return Range(item[1], *item[2:6])
    if kind == "exists":
        return Exists(item[1])
    return filter_from_json(item[1])
