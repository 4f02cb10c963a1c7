"""The shard interface: what a collection needs of one shard, wherever the shard lives.

``Shard`` (index/shard/) implements ``ShardHandle`` in process; a router's remote shard (a
replica set with failover, service/cluster/router/) implements it over braid.cluster.v1.Shard.
``Collection`` (index/collection.py) scatters each operation over its shards' handles and
gathers the answers (index/gather.py); its reads go through ``Scatter``, which a router uses
too over its remote shards (``ShardReads``, the read half), so a standalone collection and a
router rank, fuse and fetch through one path. Like index/log.py's ``ShardLog``, it is a ``Protocol``: a handle needs
the methods, not a base class.

Reads see one state of the shard each; a collection that must see a write (a router's
consistency) picks the replica and the sequence before it calls, so the interface carries no
consistency of its own. Writes return the number of documents they changed once applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .filters import Filter
from .query import SearchPlan
from .records import DocumentWrite

if TYPE_CHECKING:
    from .gather import Ranked
    from .stats import SearchTiming


@dataclass(frozen=True)
class Wanted:
    """What a search returns of each hit beside its id and score."""

    payload: bool = False
    payload_fields: list[str] | None = None  # with ``payload``: None = every declared field
    metadata: bool = False
    text_fields: tuple[str, ...] = ()

    @classmethod
    def asked(
        cls, include_payload: bool, payload_fields: Sequence[str] | None, text_fields: Sequence[str] | None
    ) -> Wanted:
        """What a request asks: every payload field and the metadata (``include_payload``), or
        the ``payload_fields`` named; and the ``text_fields``."""
        return cls(
            payload=include_payload or bool(payload_fields),
            payload_fields=None if include_payload else list(payload_fields or []),
            metadata=include_payload,
            text_fields=tuple(text_fields or ()),
        )

    @classmethod
    def of(cls, plan: SearchPlan) -> Wanted:
        return cls.asked(plan.include_payload, plan.payload_fields, plan.text_fields)

    def __bool__(self) -> bool:
        return self.payload or self.metadata or bool(self.text_fields)


@dataclass
class Fetched:
    """Hits' payload, metadata and text, in the order asked (None: not asked)."""

    payloads: list[dict] | None = None
    metadata: list[str] | None = None
    texts: list[dict[str, str]] | None = None


class ShardReads(Protocol):
    """What ``Scatter`` (index/collection.py) reads of one shard: a router's remote shard
    offers these (its writes go through the log, its documents stay protobuf: the router's own)."""

    number: int

    def search(
        self, plan: SearchPlan, depths: list[int], where: str = "", timing: SearchTiming | None = None
    ) -> list[Ranked]: ...
    def search_dense(
        self, field: str, vectors: np.ndarray, k: int, knobs: tuple[int, int, float | None], flt: Filter | None = None
    ) -> list[Ranked]: ...
    def text_stats(self, terms: list[tuple[str, str]]) -> tuple[list[int], int]: ...
    def sparse_stats(self, field: str, term_ids: list[int]) -> tuple[np.ndarray, int]: ...
    def fetch(self, labels: list[int], ids: list[str], wanted: Wanted) -> Fetched: ...
    def count(self, flt: Filter | None) -> int: ...


class ShardHandle(ShardReads, Protocol):
    """One shard as a collection uses it."""

    # writes: applied (and durable) when they return
    def upsert(self, docs: list[DocumentWrite]) -> int: ...
    def delete_ids(self, ids: list[str]) -> int: ...
    def delete_filter(self, flt: Filter) -> int: ...
    def flush(self) -> None: ...

    # reads beyond ShardReads
    def documents(self, ids: list[str], include_vectors: bool = False) -> list[dict]: ...

    # state
    def read_problem(self) -> str | None: ...
    def write_problem(self) -> str | None: ...
    def heal(self) -> None: ...
