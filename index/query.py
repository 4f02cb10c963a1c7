"""Search plans: the plain request types the service builds and the index executes."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .filters import Filter
from .records import SparseValue


@dataclass
class DenseQuery:
    field: str
    vector: np.ndarray | None  # float32, validated; None until the service encodes ``text``
    ef: int = 0  # 0: the field's ef_search
    text: str = ""  # for fields with an encoder: the service fills ``vector`` from it
    max_lists: int = 0  # SPANN fields: most posting lists read; 0: the field's spann.max_lists
    eps: float | None = None  # SPANN fields: list pruning; None: the field's spann.eps


@dataclass
class Bm25Query:
    text: str
    fields: list[str] = field(default_factory=list)  # empty: every text field
    boosts: dict[str, float] = field(default_factory=dict)
    # The collection's IDF per (field, analyzed term), gathered from every shard before the shards
    # search (a DFS phase); None: each shard scores with its own statistics (one shard needs nothing).
    idf: dict[tuple[str, str], float] | None = None


@dataclass
class SparseQuery:
    field: str
    vector: SparseValue | None  # None until the service encodes ``text``
    text: str = ""  # for fields with an encoder: the service fills ``vector`` from it


Strand = DenseQuery | Bm25Query | SparseQuery


@dataclass
class SubQuery:
    query: Strand
    name: str = ""
    depth: int = 0  # 0: the plan's default depth
    weight: float = 1.0


@dataclass
class SearchPlan:
    queries: list[SubQuery]
    filter: Filter | None = None
    fusion: str = ""  # "", "rrf", "weighted"; "": single for one query, else gather.DEFAULT_FUSION
    rrf_k: int = 60
    normalization: str = "min_max"
    limit: int = 10
    offset: int = 0
    score_threshold: float | None = None
    payload_fields: list[str] | None = None  # None: no payload; [] with include_all: all
    include_payload: bool = False
    text_fields: list[str] = field(default_factory=list)
    explain: bool = False


@dataclass
class SearchResult:
    """Hits best first; per-hit lists are parallel to ``ids``."""

    ids: list[str]
    scores: np.ndarray
    payloads: list[dict] | None = None
    metadata: list[str] | None = None  # canonical metadata text of each hit ("" = none), with payloads
    texts: list[dict[str, str]] | None = None
    # explain: strand names, and (n_hits, n_strands) ranks (0 = absent) and raw scores (NaN = absent)
    strand_names: list[str] | None = None
    ranks: np.ndarray | None = None
    raw: np.ndarray | None = None
