"""A growable bool mask over a shard's labels: which labels a dense index holds a live vector for."""

from __future__ import annotations

import numpy as np

_INITIAL_CAPACITY = 1024


class LabelMask:
    """``mask[label]`` is True for the labels held; ``count`` of them. Callers hold the shard's locks."""

    def __init__(self, labels: np.ndarray | None = None) -> None:
        self.mask = np.zeros(_INITIAL_CAPACITY, dtype=bool)
        self.count = 0
        if labels is not None:
            self.add(np.asarray(labels, dtype=np.int64))

    def add(self, labels: np.ndarray) -> None:
        """Mark labels that are not held yet (fresh labels: each is counted)."""
        if not len(labels):
            return
        top = int(labels.max()) + 1
        if top > len(self.mask):
            grown = np.zeros(max(top, 2 * len(self.mask)), dtype=bool)
            grown[: len(self.mask)] = self.mask
            self.mask = grown
        self.mask[labels] = True
        self.count += len(labels)

    def discard(self, label: int) -> bool:
        """Unmark a label; False when it was not held."""
        if label not in self:
            return False
        self.mask[label] = False
        self.count -= 1
        return True

    def __contains__(self, label: int) -> bool:
        return label < len(self.mask) and bool(self.mask[label])

    def labels(self) -> np.ndarray:
        return np.flatnonzero(self.mask)


class HoldsLabels:
    """``has``, ``present_labels`` and ``live`` over ``self._present``: what every dense strand
    (index/dense.py, index/hnsw_strand.py, index/spann_strand.py) answers the same way."""

    _present: LabelMask

    def has(self, label: int) -> bool:
        return label in self._present

    def present_labels(self) -> np.ndarray:
        return self._present.labels()

    @property
    def live(self) -> int:
        """How many live vectors the strand holds."""
        return self._present.count
