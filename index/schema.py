"""Collection schema: the typed description of what a document may carry.

A schema lists text fields (BM25 through tantivy), dense vector fields (an
in-memory hnswlib index, or a SPANN index with posting lists on disk, each),
sparse vector fields (an impact-scored inverted index each) and typed payload
fields (filterable columns). It is validated once, when the collection is
created, and stored in the collection's directory as JSON (a dense field saved
before SPANN existed has no "index" key and loads as HNSW).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

from .errors import InvalidArgument

# Checked with fullmatch: "$" alone would also accept a trailing newline ("abc\n").
NAME_PATTERN = re.compile(r"[a-z0-9_-]{1,64}")
# Names may not start with "_": that prefix is reserved for internal fields (tantivy's _label).
FIELD_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,63}")
MAX_DIM = 65536
MODEL_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_SPARSE_TOP_K = 4096
DEFAULT_SPARSE_TOP_K = 256


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
    ENGLISH = "english"  # 2+ character words, lowercase, English stop words, Snowball stemming (index/analyzers.py)
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


class DenseIndexType(StrEnum):
    HNSW = "hnsw"  # hnswlib, all in memory (index/dense.py)
    SPANN = "spann"  # centroids in memory, posting lists on disk, plus an in-memory growing HNSW (index/strand.py)


MAX_REPLICAS = 8  # SPANN's cap on the lists one vector is written into


@dataclass(frozen=True)
class SpannParams:
    """Build parameters and per-query defaults of a SPANN index (defaults measured: docs/benchmarks.md)."""

    target_list_size: int = 64  # vectors per list before replication
    replicas: int = 8  # most lists one vector is written into (SPANN's cap)
    closure_candidates: int = 32  # nearest centroids considered for replicas
    eps_build: float = 0.15  # replicas only to lists within (1 + eps_build) of the nearest
    max_lists: int = 16  # default per-query cap on lists read
    eps: float = 0.5  # default per-query pruning: lists within (1 + eps) of the nearest
    centroid_ef: int = 64  # hnswlib beam of the centroid search (at least max_lists)
    centroid_m: int = 16
    centroid_ef_construction: int = 200
    seed: int = 0
    # Vectors in the in-memory growing segment that start a background seal into a new
    # sealed segment (tiered compaction then merges sealed segments: index/spann_strand.py).
    merge_threshold: int = 20_000

    def validate(self, where: str = "spann") -> None:
        checks = (
            ("target_list_size", self.target_list_size, 1, 1 << 20),
            ("replicas", self.replicas, 1, MAX_REPLICAS),
            ("closure_candidates", self.closure_candidates, 1, 1024),
            ("max_lists", self.max_lists, 1, 1 << 20),
            ("centroid_ef", self.centroid_ef, 1, 1 << 20),
            ("centroid_m", self.centroid_m, 2, 128),
            ("centroid_ef_construction", self.centroid_ef_construction, 1, 4096),
            ("merge_threshold", self.merge_threshold, 1, 1 << 30),
        )
        for name, value, low, high in checks:
            if not low <= value <= high:
                raise InvalidArgument.field(f"{where}.{name}", f"must be in {low}..{high}, got {value}")
        for name, number in (("eps_build", self.eps_build), ("eps", self.eps)):
            if not 0.0 <= number <= MAX_EPS:
                raise InvalidArgument.field(f"{where}.{name}", f"must be in 0..{MAX_EPS:g}, got {number}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> SpannParams:
        known = {k: v for k, v in (data or {}).items() if k in cls.__dataclass_fields__}
        return cls(**known)


MAX_EPS = 100.0


class Precision(StrEnum):
    FP32 = "fp32"
    INT8 = "int8"


class SparseQueryMode(StrEnum):
    MODEL = "model"  # queries run the sparse model too
    IDF = "idf"  # inference-free: query terms weighted by the collection's IDF


@dataclass(frozen=True)
class EncoderSpec:
    """A model that fills a vector field from text fields (run by the service, not the index)."""

    model: str
    source_fields: tuple[str, ...]
    precision: Precision = Precision.FP32
    query_mode: SparseQueryMode = SparseQueryMode.MODEL
    top_k: int = DEFAULT_SPARSE_TOP_K

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> EncoderSpec | None:
        if data is None:
            return None
        return cls(
            model=data["model"],
            source_fields=tuple(data["source_fields"]),
            precision=Precision(data.get("precision", "fp32")),
            query_mode=SparseQueryMode(data.get("query_mode", "model")),
            top_k=int(data.get("top_k", DEFAULT_SPARSE_TOP_K)),
        )


@dataclass(frozen=True)
class DenseFieldSpec:
    name: str
    dim: int
    metric: Metric = Metric.COSINE
    hnsw: HnswParams = field(default_factory=HnswParams)  # for SPANN: its growing segment's
    encoder: EncoderSpec | None = None
    index: DenseIndexType = DenseIndexType.HNSW
    spann: SpannParams = field(default_factory=SpannParams)  # used when index is SPANN


@dataclass(frozen=True)
class SparseFieldSpec:
    name: str
    encoder: EncoderSpec | None = None


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
                if not FIELD_PATTERN.fullmatch(spec.name):
                    raise InvalidArgument.field(f"{where}.name", f"{spec.name!r} must match {FIELD_PATTERN.pattern}")
                if spec.name in seen:
                    raise InvalidArgument.field(f"{where}.name", f"duplicate field name {spec.name!r}")
                seen.add(spec.name)
        for i, spec in enumerate(self.dense_fields):
            where = f"schema.dense_fields[{i}]"
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
            spec.spann.validate(f"{where}.spann")
        for where, specs in (("schema.dense_fields", self.dense_fields), ("schema.sparse_fields", self.sparse_fields)):
            for i, spec in enumerate(specs):
                if spec.encoder is not None:
                    self._validate_encoder(
                        spec.encoder, f"{where}[{i}].encoder", sparse=where.endswith("sparse_fields")
                    )
        if not (self.text_fields or self.dense_fields or self.sparse_fields):
            raise InvalidArgument.field("schema", "needs at least one text, dense or sparse field")

    def _validate_encoder(self, encoder: EncoderSpec, where: str, sparse: bool) -> None:
        if not MODEL_PATTERN.fullmatch(encoder.model):
            raise InvalidArgument.field(f"{where}.model", f"{encoder.model!r} must match {MODEL_PATTERN.pattern}")
        if not encoder.source_fields:
            raise InvalidArgument.field(f"{where}.source_fields", "name at least one text field to encode")
        for name in encoder.source_fields:
            if self.text(name) is None:
                declared = ", ".join(f.name for f in self.text_fields) or "none"
                raise InvalidArgument.field(
                    f"{where}.source_fields", f"{name!r} is not a text field (declared: {declared})"
                )
        if not sparse and encoder.query_mode is not SparseQueryMode.MODEL:
            raise InvalidArgument.field(f"{where}.query_mode", "only sparse fields have a query mode")
        if not 1 <= encoder.top_k <= MAX_SPARSE_TOP_K:
            raise InvalidArgument.field(f"{where}.top_k", f"must be in 1..{MAX_SPARSE_TOP_K}, got {encoder.top_k}")

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
                DenseFieldSpec(
                    f["name"],
                    int(f["dim"]),
                    Metric(f["metric"]),
                    HnswParams(**f["hnsw"]),
                    EncoderSpec.from_json(f.get("encoder")),
                    DenseIndexType(f.get("index", "hnsw")),
                    SpannParams.from_json(f.get("spann")),
                )
                for f in data.get("dense_fields", ())
            ),
            sparse_fields=tuple(
                SparseFieldSpec(f["name"], EncoderSpec.from_json(f.get("encoder")))
                for f in data.get("sparse_fields", ())
            ),
            payload_fields=tuple(
                PayloadFieldSpec(f["name"], PayloadType(f["type"])) for f in data.get("payload_fields", ())
            ),
        )


def validate_collection_name(name: str) -> None:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise InvalidArgument.field("name", f"collection name {name!r} must match {NAME_PATTERN.pattern}")
