"""A shard's label table: document ids <-> integer labels, and the ``alive`` mask.

Documents are stored as versions. Every upsert gives the document a fresh integer label;
the previous version's label is marked dead in every strand at the same moment (under the
write lock), so a search never sees two versions of one id. ``alive`` (a bool mask over
labels) is the single source of truth for visibility that every strand consults.

A write's labels are handed out when it is prepared (``hand_out``: past ``size``, so no
search looks at them yet) and become visible when it is applied (``assign``, ``size``).
The table takes no lock of its own: the shard's locks guard it (applying under the write
lock, reading under the read lock). Saved in a checkpoint as ``ids.json``'s ``labels`` and
``ids`` (``saved``, ``load``); the manifest's ``next_label`` is ``size`` at that point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

INITIAL_LABELS = 1024


class LabelTable:
    """Which label holds each live document, and which labels are alive."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.label_ids: dict[int, str] = {}
        self.alive = np.zeros(INITIAL_LABELS, dtype=bool)
        self.next_label = 0  # next label to hand out (advanced when a write is prepared)
        self.size = 0  # labels covered by applied writes: the range searches look at

    @classmethod
    def load(cls, live: dict[str, Any], next_label: int) -> LabelTable:
        """The table a checkpoint saved: ``live`` is ids.json, ``next_label`` the manifest's."""
        table = cls()
        table.next_label = table.size = next_label
        table.grow(table.size)
        for label, doc_id in zip(live["labels"], live["ids"], strict=True):
            table.ids[doc_id] = label
            table.label_ids[label] = doc_id
            table.alive[label] = True
        return table

    def saved(self) -> dict[str, list[Any]]:
        """The live labels and their ids, as a checkpoint's ids.json holds them."""
        live_labels = sorted(self.label_ids)
        return {"labels": live_labels, "ids": [self.label_ids[label] for label in live_labels]}

    def hand_out(self, count: int) -> int:
        """Reserve ``count`` labels for a write being prepared; returns the first."""
        first = self.next_label
        self.next_label += count
        return first

    def grow(self, size: int) -> None:
        """Make ``alive`` cover labels below ``size`` (doubling its capacity)."""
        capacity = len(self.alive)
        if size <= capacity:
            return
        while capacity < size:
            capacity *= 2
        self.alive = _resized(self.alive, capacity)

    def assign(self, doc_id: str, label: int) -> None:
        """``label`` now holds ``doc_id`` and is alive (its previous label was killed first)."""
        self.ids[doc_id] = label
        self.label_ids[label] = doc_id
        self.alive[label] = True

    def pop(self, doc_id: str) -> int | None:
        """Forget ``doc_id``; returns its label (to kill) or None when it is not live."""
        return self.ids.pop(doc_id, None)

    def kill(self, label: int) -> None:
        """``label`` is dead: no search sees it again."""
        self.alive[label] = False
        self.label_ids.pop(label, None)

    def label_of(self, doc_id: str) -> int | None:
        return self.ids.get(doc_id)

    def ids_of(self, labels: np.ndarray) -> list[str]:
        label_ids = self.label_ids
        return [label_ids[label] for label in labels.tolist()]

    def doc_id(self, label: int) -> str:
        return self.label_ids[label]

    @property
    def live_count(self) -> int:
        return len(self.ids)

    def memory_bytes(self) -> int:
        return 200 * len(self.ids) + self.alive.nbytes  # two dict entries and an id string a document


def _resized(array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros(capacity, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
