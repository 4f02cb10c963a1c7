"""A shard's write operations as decoded from their log records (index/records.py).

An ``Op`` is what the write path and replay carry from the log to prepare and apply
(index/shard/core.py): the decoded record, and what preparing it staged (its first label,
each dense field's vectors in stored form).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import records
from ..errors import DataLoss
from ..filters import Filter
from ..records import DocumentWrite

RECORD_OVERHEAD = 17  # a WAL record's header bytes (index/wal.py)


@dataclass
class Op:
    """A decoded write; ``first_label`` is handed out when it is prepared."""

    kind: int
    docs: list[DocumentWrite] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    filter: Filter | None = None
    first_label: int = -1
    dense: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # staged by prepare


def decode(kind: int, payload: bytes) -> Op:
    if kind == records.UPSERT:
        return Op(kind, docs=records.decode_upsert(payload))
    if kind == records.DELETE_IDS:
        return Op(kind, ids=records.decode_delete_ids(payload))
    if kind == records.DELETE_FILTER:
        return Op(kind, filter=records.decode_delete_filter(payload))
    raise DataLoss(f"unknown write-ahead log record kind {kind}")
