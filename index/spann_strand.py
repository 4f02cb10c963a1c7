"""The dense strand of a SPANN field in one shard: sealed SPANN segment + in-memory growing HNSW.

It plays the role DenseIndex plays for an HNSW field (same add / remove / has /
search / vectors / save surface), built from three parts:

* ``sealed``: at most one SpannSegment (index/spann.py), read-only, on disk under the
  shard's ``segments/spann-<field>-<id>/``: centroids in memory, posting lists read
  per query with positioned reads.
* ``growing``: a DenseIndex (hnswlib, in memory) that takes every new vector.
* ``frozen``: while a merge runs, the growing index it is sealing; read-only and
  still searched, while new writes go to a fresh growing index.

Labels are the shard's document-version labels and never move between live
segments except by a merge, so the parts hold disjoint labels. A delete or a
replacement clears the label in ``present`` (and marks it deleted in hnswlib when it
is growing); a sealed vector stays in the posting file as a tombstone that every
sealed search filters out with the ``present`` mask, and that the next merge drops.

Merge policy (full rebuild): when the growing segment holds ``merge_threshold``
vectors and at least ``MERGE_RATIO`` times the sealed segment's live ones (or the
sealed segment's tombstones pass the same bounds), the shard runs a merge in the
background: ``begin_merge`` freezes the growing index (under the shard's write lock),
``build_merge`` rebuilds one new sealed segment from the sealed segment's live
vectors (read list by list from the posting file) and the frozen ones (no lock held:
searches and writes go on), ``finish_merge`` swaps it in (write lock). The ratio keeps
the rebuild work at O(n log n) vector-builds over a collection's life; a merge holds
its input vectors in memory while it builds (n x dim x 4 bytes).

In a checkpoint generation directory (written by ``save``, read by ``load``)::

    <field>.hnsw          the growing segment, hnswlib's serialisation (index/dense.py)
    <field>.strand.json   {"format": 1, "sealed": "<directory under segments/>" | null,
                           "growing": [labels of the growing segment's live vectors]}

The sealed segment is not copied per generation: a generation names it, and the
shard deletes segment directories no published generation names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dense import DenseIndex
from .errors import DataLoss
from .labelmask import LabelMask
from .manifest import read_json
from .schema import DenseFieldSpec
from .spann import SpannSegment

FORMAT_VERSION = 1
# A merge starts once the growing segment (or the sealed tombstones) reach this share of
# the sealed segment's live vectors, and at least the field's merge_threshold.
MERGE_RATIO = 0.25
Hit = tuple[np.ndarray, np.ndarray]


@dataclass
class MergeJob:
    """What one merge seals: a snapshot taken by ``begin_merge``."""

    directory: Path  # where the new sealed segment is built
    sealed: SpannSegment | None  # the segment being replaced
    sealed_allowed: np.ndarray  # its labels still live at the snapshot (bool mask)
    frozen_labels: np.ndarray
    frozen_vectors: np.ndarray
    labels: np.ndarray | None = None  # every label of the new segment, once built
    segment: SpannSegment | None = None  # the new segment (None: nothing was live)


class SpannStrand:
    """One SPANN field of one shard: writes and merge steps hold the shard's write lock, searches its read lock."""

    def __init__(
        self, spec: DenseFieldSpec, sealed: SpannSegment | None = None, growing: DenseIndex | None = None
    ) -> None:
        self.spec = spec
        self.sealed = sealed
        self.growing = growing if growing is not None else DenseIndex(spec)
        self.frozen: DenseIndex | None = None
        self._present = LabelMask()
        self._sealed_dead = 0  # tombstones in the sealed segment
        self._failed_merges = 0

    # ------------------------------------------------------------------ writes

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """New vectors under fresh labels go to the growing segment."""
        self.growing.add(labels, vectors)
        self._present.add(labels)

    def remove(self, label: int) -> bool:
        """Delete the label's vector (a tombstone when it is sealed); False when it has none here."""
        if not self._present.discard(label):
            return False
        if not self.growing.remove(label) and not (self.frozen is not None and self.frozen.remove(label)):
            self._sealed_dead += 1
        return True

    def has(self, label: int) -> bool:
        return label in self._present

    def present_labels(self) -> np.ndarray:
        return self._present.labels()

    @property
    def live(self) -> int:
        """How many live vectors the field holds in this shard, over every segment."""
        return self._present.count

    # ----------------------------------------------------------------- queries

    def search(
        self,
        queries: np.ndarray,
        k: int,
        ef: int,
        allowed: np.ndarray | None = None,
        max_lists: int = 0,
        eps: float | None = None,
    ) -> list[Hit]:
        """k best live vectors of each query row over every segment, (labels, scores) best first.

        ``allowed`` (a bool mask over labels) narrows the search; without it the sealed
        segment is still masked when it holds tombstones. ``ef`` is the growing segments'
        HNSW beam, ``max_lists`` / ``eps`` the sealed segment's probe (0 / None: the field's).
        """
        queries = np.atleast_2d(queries)
        if self.live <= 0 or k <= 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(queries))]
        parts: list[list[Hit]] = []
        if self.sealed is not None:
            mask = allowed if allowed is not None else (self._present.mask if self._sealed_dead else None)
            parts.append(self.sealed.search(queries, k, mask, max_lists or None, eps))
        for index in (self.frozen, self.growing):
            if index is not None and index.live > 0:
                parts.append(index.search(queries, k, ef, allowed))
        if len(parts) == 1:
            return parts[0]
        return [_top(k, [part[i] for part in parts]) for i in range(len(queries))]

    def vectors(self, labels: list[int]) -> np.ndarray:
        """Stored vectors of live labels (unit length for cosine), from whichever segment holds each."""
        out = np.empty((len(labels), self.spec.dim), dtype=np.float32)
        rest = []
        for i, label in enumerate(labels):
            index = next((x for x in (self.growing, self.frozen) if x is not None and x.has(label)), None)
            if index is not None:
                out[i] = index.vectors([label])[0]
            else:
                rest.append(i)
        if rest:
            assert self.sealed is not None
            out[rest] = self.sealed.vectors(np.asarray([labels[i] for i in rest], np.int64))
        return out

    # ------------------------------------------------------------------ merges

    def wants_merge(self) -> bool:
        """Whether the growing segment, or the sealed tombstones, are due for a merge."""
        if self.frozen is not None:
            return False
        floor = self.spec.spann.merge_threshold << min(self._failed_merges, 16)
        sealed_live = self.live - self.growing.live
        bound = max(floor, MERGE_RATIO * sealed_live)
        return self.growing.live >= bound or self._sealed_dead >= bound

    def begin_merge(self, directory: Path) -> MergeJob:
        """Freeze the growing segment and snapshot what the merge seals (caller holds the write lock)."""
        frozen = self.growing
        self.frozen = frozen
        self.growing = DenseIndex(self.spec)
        labels = frozen.present_labels()
        vectors = frozen.vectors(labels.tolist()) if len(labels) else np.empty((0, self.spec.dim), np.float32)
        allowed = self._present.mask.copy() if self.sealed is not None else np.zeros(0, bool)
        return MergeJob(directory, self.sealed, allowed, labels, vectors)

    def build_merge(self, job: MergeJob) -> None:
        """Build the new sealed segment from the snapshot (no lock needed: reads only the snapshot)."""
        labels, vectors = job.frozen_labels, job.frozen_vectors
        if job.sealed is not None:
            old_labels, old_vectors = job.sealed.live_vectors(job.sealed_allowed)
            labels = np.concatenate([old_labels, labels])
            vectors = np.concatenate([old_vectors, vectors])
        job.labels = labels
        if len(labels):
            job.segment = SpannSegment.build(job.directory, vectors, labels, self.spec.metric, self.spec.spann)

    def finish_merge(self, job: MergeJob) -> None:
        """Swap the new segment in for the old one and the frozen index (caller holds the write lock)."""
        assert job.labels is not None
        if self.sealed is not None:
            self.sealed.close()
        self.sealed = job.segment
        self.frozen = None
        # Vectors deleted while the merge built are tombstones in the new segment.
        self._sealed_dead = _missing(job.labels, self._present)
        self._failed_merges = 0

    def abort_merge(self, job: MergeJob) -> None:
        """Drop the job's segment, give the frozen vectors back to the growing segment (write lock held)."""
        if job.segment is not None:
            job.segment.close()
        frozen, self.frozen = self.frozen, None
        if frozen is not None and frozen.live > 0:
            labels = frozen.present_labels()
            self.growing.add(labels, frozen.vectors(labels.tolist()))
        self._failed_merges += 1

    # ------------------------------------------------------------- persistence

    def referenced(self) -> set[str]:
        """Names of the directories under segments/ this strand needs."""
        return {self.sealed.directory.name} if self.sealed is not None else set()

    def save(self, directory: Path) -> None:
        """Write the growing segment and the strand's manifest into a checkpoint (no merge may be running)."""
        assert self.frozen is None, "checkpoints wait for a running merge"
        self.growing.save(directory)
        meta = {
            "format": FORMAT_VERSION,
            "sealed": self.sealed.directory.name if self.sealed is not None else None,
            "growing": self.growing.present_labels().tolist(),
        }
        (directory / f"{self.spec.name}.strand.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, directory: Path, segments: Path, spec: DenseFieldSpec, present: list[int]) -> SpannStrand:
        """Open a checkpoint's strand; ``present`` lists the labels holding a live vector in this field."""
        meta = read_json(directory / f"{spec.name}.strand.json")
        if meta is None:
            if present:
                raise DataLoss(f"{directory}: no {spec.name}.strand.json for a SPANN field with vectors")
            return cls(spec)
        if meta.get("format") != FORMAT_VERSION:
            raise DataLoss(f"{directory}: unsupported {spec.name}.strand.json format {meta.get('format')}")
        growing = DenseIndex.load(directory, spec, meta["growing"])
        sealed = SpannSegment.open(segments / meta["sealed"]) if meta["sealed"] else None
        strand = cls(spec, sealed, growing)
        strand._present = LabelMask(np.asarray(present, dtype=np.int64))
        if sealed is not None:
            strand._sealed_dead = _missing(sealed.labels(), strand._present)
        return strand

    def close(self) -> None:
        if self.sealed is not None:
            self.sealed.close()


def _missing(labels: np.ndarray, present: LabelMask) -> int:
    """How many of the labels are not (or no longer) live: a sealed segment's tombstones."""
    mask = present.mask
    held = labels[labels < len(mask)]
    return len(labels) - int(np.count_nonzero(mask[held]))


def _top(k: int, hits: list[Hit]) -> Hit:
    """Best k of several segments' hits (their labels are disjoint)."""
    labels = np.concatenate([h[0] for h in hits])
    scores = np.concatenate([h[1] for h in hits])
    order = np.argsort(-scores, kind="stable")[:k]
    return labels[order], scores[order].astype(np.float32)
