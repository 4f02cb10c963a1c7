"""Collection schema: the typed description of what a document may carry.

A schema lists text fields (BM25 through tantivy), dense vector fields (an
hnswlib index each), sparse vector fields (an impact-scored inverted index each)
and typed payload fields (filterable columns). It is validated once, when the
collection is created, and stored in the collection's directory as JSON.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from .errors import InvalidArgument

NAME_PATTERN = re.compile(r"^[a-z0-9_-]{1,64}$")
# Names may not start with "_": that prefix is reserved for internal fields (tantivy's _label).
FIELD_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
MAX_DIM = 65536


class Metric(StrEnum):
    COSINE = "cosine"
    DOT = "dot"
    L2 = "l2"


class PayloadType(StrEnum):
    KEYWORD = "keyword"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    DATETIME = "datetime"  # int microseconds since the Unix epoch, UTC


class Analyzer(StrEnum):
    DEFAULT = "default"  # split on non-alphanumerics, lowercase, drop tokens over 40 bytes
    EN_STEM = "en_stem"  # default + English Snowball stemming
    RAW = "raw"  # the whole value is one token (ids, codes)
    WHITESPACE = "whitespace"


@dataclass(frozen=True)
class TextFieldSpec:
    name: str
    analyzer: Analyzer = Analyzer.DEFAULT


@dataclass(frozen=True)
class HnswParams:
    m: int = 16
    ef_construction: int = 200
    ef_search: int = 64


@dataclass(frozen=True)
class DenseFieldSpec:
    name: str
    dim: int
    metric: Metric = Metric.COSINE
    hnsw: HnswParams = field(default_factory=HnswParams)


@dataclass(frozen=True)
class SparseFieldSpec:
    name: str


@dataclass(frozen=True)
class PayloadFieldSpec:
    name: str
    type: PayloadType


@dataclass(frozen=True)
class Schema:
    text_fields: tuple[TextFieldSpec, ...] = ()
    dense_fields: tuple[DenseFieldSpec, ...] = ()
    sparse_fields: tuple[SparseFieldSpec, ...] = ()
    payload_fields: tuple[PayloadFieldSpec, ...] = ()

    def validate(self) -> None:
        """Raise InvalidArgument naming the first bad field of the schema."""
        seen: set[str] = set()
        groups = (
            ("schema.text_fields", self.text_fields),
            ("schema.dense_fields", self.dense_fields),
            ("schema.sparse_fields", self.sparse_fields),
            ("schema.payload_fields", self.payload_fields),
        )
        for where, specs in groups:
            for spec in specs:
                if not FIELD_PATTERN.match(spec.name):
                    raise InvalidArgument.field(f"{where}.name", f"{spec.name!r} must match {FIELD_PATTERN.pattern}")
                if spec.name in seen:
                    raise InvalidArgument.field(f"{where}.name", f"duplicate field name {spec.name!r}")
                seen.add(spec.name)
        for spec in self.dense_fields:
            where = f"schema.dense_fields[{spec.name}]"
            if not 1 <= spec.dim <= MAX_DIM:
                raise InvalidArgument.field(f"{where}.dim", f"must be in 1..{MAX_DIM}, got {spec.dim}")
            if not 2 <= spec.hnsw.m <= 128:
                raise InvalidArgument.field(f"{where}.hnsw.m", f"must be in 2..128, got {spec.hnsw.m}")
            if not 1 <= spec.hnsw.ef_construction <= 4096:
                raise InvalidArgument.field(
                    f"{where}.hnsw.ef_construction", f"must be in 1..4096, got {spec.hnsw.ef_construction}"
                )
            if not 1 <= spec.hnsw.ef_search <= 4096:
                raise InvalidArgument.field(f"{where}.hnsw.ef_search", f"must be in 1..4096, got {spec.hnsw.ef_search}")
        if not (self.text_fields or self.dense_fields or self.sparse_fields):
            raise InvalidArgument.field("schema", "needs at least one text, dense or sparse field")

    def text(self, name: str) -> TextFieldSpec | None:
        return next((f for f in self.text_fields if f.name == name), None)

    def dense(self, name: str) -> DenseFieldSpec | None:
        return next((f for f in self.dense_fields if f.name == name), None)

    def sparse(self, name: str) -> SparseFieldSpec | None:
        return next((f for f in self.sparse_fields if f.name == name), None)

    def payload(self, name: str) -> PayloadFieldSpec | None:
        return next((f for f in self.payload_fields if f.name == name), None)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Schema:
        return cls(
            text_fields=tuple(
                TextFieldSpec(f["name"], Analyzer(f.get("analyzer", "default"))) for f in data.get("text_fields", ())
            ),
            dense_fields=tuple(
                DenseFieldSpec(f["name"], int(f["dim"]), Metric(f["metric"]), HnswParams(**f["hnsw"]))
                for f in data.get("dense_fields", ())
            ),
            sparse_fields=tuple(SparseFieldSpec(f["name"]) for f in data.get("sparse_fields", ())),
            payload_fields=tuple(
                PayloadFieldSpec(f["name"], PayloadType(f["type"])) for f in data.get("payload_fields", ())
            ),
        )


def validate_collection_name(name: str) -> None:
    if not NAME_PATTERN.match(name or ""):
        raise InvalidArgument.field("name", f"collection name {name!r} must match {NAME_PATTERN.pattern}")
