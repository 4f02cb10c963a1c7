"""The dense strand of a SPANN field in one shard: tiered sealed SPANN segments + in-memory growing HNSW.

It plays the role DenseIndex plays for an HNSW field (same add / remove / has /
search / vectors / save surface), built from three kinds of part:

* ``sealed``: a list of SpannSegments (index/spann.py), read-only, on disk under the
  shard's ``segments/spann-<field>-<id>/``: centroids in memory, posting lists read
  per query with positioned reads.
* ``growing``: a DenseIndex (hnswlib, in memory) that takes every new vector.
* ``frozen``: while a seal runs, the growing index it is sealing; read-only and
  still searched, while new writes go to a fresh growing index.

Labels are the shard's document-version labels and never move between live
segments except by a merge, so the parts hold disjoint labels. A delete or a
replacement clears the label in ``present`` (and marks it deleted in hnswlib when it
is growing); a sealed vector stays in its posting file as a tombstone that every
sealed search filters out with the ``present`` mask, and that the next compaction of
its segment drops. ``_owner`` (one byte a label) says which sealed segment holds a
label, so a delete counts against the right segment.

Merge policy (tiered, as in an LSM tree), one merge at a time per shard (index/merger.py):

* **seal**: once the growing segment holds ``merge_threshold`` vectors it is frozen
  (in the writer's thread, under the shard's write lock, so it never passes the
  threshold by more than one write batch plus what arrives while another merge
  runs), and a NEW sealed segment is built from the frozen vectors alone: O(threshold).
* **compaction**: segments fall in size tiers by live rows (tier t: rows in
  [threshold * 4^t, threshold * 4^(t+1)), TIER_FACTOR = 4); when TIER_FANOUT = 4
  segments share the lowest such tier, their live vectors (read list by list from
  the posting files) are rebuilt into one segment, one tier up. A segment whose
  tombstones reach TOMBSTONE_RATIO = 25% of its rows is rebuilt alone (no segment
  left when nothing in it is live). Each vector is rebuilt O(log4(n / threshold))
  times, so the total build work is O(n log n), and there are at most
  3 x (tiers) + a few segments per field and shard.

A merge runs in three steps: ``begin_merge`` snapshots the inputs (write lock),
``build_merge`` builds the new segment (no lock: searches and writes go on),
``finish_merge`` swaps it in for its inputs (write lock). A merge holds its input
vectors in memory while it builds (inputs x dim x 4 bytes).

In a checkpoint generation directory (written by ``save``, read by ``load``)::

    <field>.hnsw          the growing segment, hnswlib's serialisation (index/dense.py)
    <field>.strand.json   {"format": 2, "sealed": ["<directory under segments/>", ...],
                           "growing": [labels of the growing segment's live vectors], "crc32"}
                          (its own checksum, index/manifest.py; also in the generation's CHECKSUMS)

Format 1 (``"sealed": "<directory>" | null``, one segment) still loads. Sealed
segments are not copied per generation: a generation names them, and the shard
deletes segment directories no published generation names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import durable
from .dense import DenseIndex
from .errors import DataLoss
from .labelmask import HoldsLabels, LabelMask
from .manifest import dumps_checked, read_json
from .schema import DenseFieldSpec
from .spann import SpannSegment
from .stats import SpannStats

FORMAT_VERSION = 2
READ_FORMATS = (1, 2)
# Size tiers grow by this factor; this many segments in one tier are compacted into one.
TIER_FACTOR = 4
TIER_FANOUT = 4
# A segment whose tombstones reach this share of its rows is rebuilt without them.
TOMBSTONE_RATIO = 0.25
# Past this many sealed segments the smallest TIER_FANOUT are compacted whatever their tiers
# (the owner map has one byte a label: at most 255 segments).
MAX_SEGMENTS = 64
_NO_OWNER = 255
Hit = tuple[np.ndarray, np.ndarray]


@dataclass
class MergeJob:
    """What one merge builds: a snapshot taken by ``begin_merge``."""

    directory: Path  # where the new sealed segment is built
    inputs: list[SpannSegment]  # sealed segments being compacted (empty for a seal)
    allowed: np.ndarray  # labels live at the snapshot (bool mask), for the inputs
    frozen_labels: np.ndarray  # the frozen growing segment's vectors (empty for a compaction)
    frozen_vectors: np.ndarray
    labels: np.ndarray | None = None  # every label of the new segment, once built
    segment: SpannSegment | None = None  # the new segment (None: nothing was live)
    kind: str = field(default="seal")


class SpannStrand(HoldsLabels):
    """One SPANN field of one shard: writes and merge steps hold the shard's write lock, searches its read lock."""

    def __init__(self, spec: DenseFieldSpec, growing: DenseIndex | None = None) -> None:
        self.spec = spec
        self.sealed: list[SpannSegment] = []
        self.growing = growing if growing is not None else DenseIndex(spec)
        self.frozen: DenseIndex | None = None
        self._present = LabelMask()
        self._owner = np.full(0, _NO_OWNER, dtype=np.uint8)  # label -> slot of the sealed segment holding it
        self._slots: dict[str, int] = {}  # segment directory name -> slot
        self._dead = np.zeros(_NO_OWNER, dtype=np.int64)  # tombstones per slot
        self._merging = False
        self._failed_seals = 0
        self._failed_compactions = 0
        self.stats = SpannStats()  # posting-list reads of every sealed segment (the shard binds its own)

    def bind_stats(self, stats: SpannStats) -> None:
        """Count this strand's reads (its sealed segments', now and later) into ``stats``."""
        self.stats = stats
        for segment in self.sealed:
            segment.stats = stats

    def memory_bytes(self) -> int:
        """Estimated resident bytes: the growing (and frozen) HNSW segments, every sealed segment's
        centroids and tables (``SpannSegment.memory_bytes``), the owner map and the live mask."""
        total = self.growing.memory_bytes() + self._owner.nbytes + self._present.mask.nbytes
        frozen = self.frozen
        if frozen is not None:
            total += frozen.memory_bytes()
        return total + sum(segment.memory_bytes() for segment in list(self.sealed))

    # ------------------------------------------------------------------ writes

    def add(self, labels: np.ndarray, vectors: np.ndarray) -> None:
        """New vectors under fresh labels go to the growing segment."""
        self.growing.add(labels, vectors)
        self._present.add(labels)

    def remove(self, label: int) -> bool:
        """Delete the label's vector (a tombstone when it is sealed); False when it has none here."""
        if not self._present.discard(label):
            return False
        in_memory = self.growing.remove(label) or (self.frozen is not None and self.frozen.remove(label))
        if not in_memory and label < len(self._owner) and self._owner[label] != _NO_OWNER:
            self._dead[self._owner[label]] += 1
        return True

    def dead(self, segment: SpannSegment) -> int:
        """Tombstones in a sealed segment: rows whose label is no longer live."""
        return int(self._dead[self._slots[segment.directory.name]])

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

        Every part answers its own top k and the best k are kept (labels are disjoint,
        scores comparable). ``allowed`` (a bool mask over labels) narrows the search;
        without it a sealed segment is still masked when it holds tombstones. ``ef`` is
        the growing segments' HNSW beam, ``max_lists`` / ``eps`` each sealed segment's
        probe (0 / None: the field's).
        """
        queries = np.atleast_2d(queries)
        if self.live <= 0 or k <= 0:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(queries))]
        parts: list[list[Hit]] = []
        for segment in self.sealed:
            mask = allowed if allowed is not None else (self._present.mask if self.dead(segment) else None)
            parts.append(segment.search(queries, k, mask, max_lists or None, eps))
        for index in (self.frozen, self.growing):
            if index is not None and index.live > 0:
                parts.append(index.search(queries, k, ef, allowed))
        if not parts:
            return [(np.empty(0, np.int64), np.empty(0, np.float32)) for _ in range(len(queries))]
        if len(parts) == 1:
            return parts[0]
        return [_top(k, [part[i] for part in parts]) for i in range(len(queries))]

    def vectors(self, labels: list[int]) -> np.ndarray:
        """Stored vectors of live labels (unit length for cosine), from whichever segment holds each."""
        out = np.empty((len(labels), self.spec.dim), dtype=np.float32)
        rest: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            index = next((x for x in (self.growing, self.frozen) if x is not None and x.has(label)), None)
            if index is not None:
                out[i] = index.vectors([label])[0]
            else:
                slot = int(self._owner[label]) if label < len(self._owner) else _NO_OWNER
                rest.setdefault(slot, []).append(i)
        if rest:
            by_slot = {self._slots[s.directory.name]: s for s in self.sealed}
            for slot, rows in rest.items():
                assert slot in by_slot, "label held by no segment"
                out[rows] = by_slot[slot].vectors(np.asarray([labels[i] for i in rows], np.int64))
        return out

    # ------------------------------------------------------------------ merges

    def wants_merge(self) -> bool:
        """Whether a seal or a compaction is due (and no merge is running)."""
        return self._plan() is not None

    def _plan(self) -> list[SpannSegment] | None:
        """What the next merge does: [] a seal, a list of segments a compaction, None nothing."""
        if self._merging:
            return None
        if self.growing.live >= self.spec.spann.merge_threshold << min(self._failed_seals, 16):
            return []
        if self._failed_compactions or not self.sealed:
            return None
        for segment in self.sealed:
            dead = self.dead(segment)
            if dead and dead >= TOMBSTONE_RATIO * segment.count:
                return [segment]
        tiers: dict[int, list[SpannSegment]] = {}
        for segment in self.sealed:
            tiers.setdefault(self._tier(segment.count - self.dead(segment)), []).append(segment)
        for tier in sorted(tiers):
            if len(tiers[tier]) >= TIER_FANOUT:
                return tiers[tier]
        if len(self.sealed) >= MAX_SEGMENTS:
            return sorted(self.sealed, key=lambda s: s.count - self.dead(s))[:TIER_FANOUT]
        return None

    def _tier(self, rows: int) -> int:
        """Size tier of a segment with this many live rows: 0 below TIER_FACTOR x merge_threshold, +1 per factor."""
        tier, bound = 0, TIER_FACTOR * self.spec.spann.merge_threshold
        while rows >= bound:
            tier, bound = tier + 1, bound * TIER_FACTOR
        return tier

    def begin_merge(self, directory: Path) -> MergeJob | None:
        """Snapshot what the next due merge builds (caller holds the write lock); None when none is due.

        A seal freezes the growing segment (a fresh one takes new writes); a compaction
        snapshots the live mask its inputs are read with.
        """
        plan = self._plan()
        if plan is None:
            return None
        self._merging = True
        if plan:
            empty = np.empty((0, self.spec.dim), np.float32)
            return MergeJob(directory, plan, self._present.mask.copy(), np.empty(0, np.int64), empty, kind="compact")
        frozen = self.growing
        self.frozen = frozen
        self.growing = DenseIndex(self.spec)
        labels = frozen.present_labels()
        vectors = frozen.vectors(labels.tolist()) if len(labels) else np.empty((0, self.spec.dim), np.float32)
        return MergeJob(directory, [], np.zeros(0, bool), labels, vectors)

    def build_merge(self, job: MergeJob) -> None:
        """Build the new sealed segment from the snapshot (no lock needed: reads only the snapshot)."""
        labels, vectors = [job.frozen_labels], [job.frozen_vectors]
        for segment in job.inputs:
            old_labels, old_vectors = segment.live_vectors(job.allowed)
            labels.append(old_labels)
            vectors.append(old_vectors)
        job.labels = np.concatenate(labels)
        if len(job.labels):
            job.segment = SpannSegment.build(
                job.directory, np.concatenate(vectors), job.labels, self.spec.metric, self.spec.spann
            )

    def finish_merge(self, job: MergeJob) -> None:
        """Swap the new segment in for the job's inputs or frozen index (caller holds the write lock)."""
        assert job.labels is not None
        for segment in job.inputs:
            self._detach(segment)
            segment.close()
        if job.segment is not None:
            self._attach(job.segment, job.labels)
        if job.kind == "seal":
            self.frozen = None
            self._failed_seals = 0
        self._failed_compactions = 0
        self._merging = False

    def abort_merge(self, job: MergeJob) -> None:
        """Drop the job's segment; a seal gives the frozen vectors back to the growing segment (write lock held)."""
        if job.segment is not None:
            job.segment.close()
        if job.kind == "seal":
            frozen, self.frozen = self.frozen, None
            if frozen is not None and frozen.live > 0:
                labels = frozen.present_labels()
                self.growing.add(labels, frozen.vectors(labels.tolist()))
            self._failed_seals += 1
        else:
            self._failed_compactions += 1
        self._merging = False

    def _attach(self, segment: SpannSegment, labels: np.ndarray) -> None:
        """Add a sealed segment holding these labels; rows no longer live count as its tombstones."""
        slot = next(s for s in range(_NO_OWNER) if s not in self._slots.values())
        self._slots[segment.directory.name] = slot
        segment.stats = self.stats
        self.sealed.append(segment)
        if len(labels):
            top = int(labels.max()) + 1
            if top > len(self._owner):
                grown = np.full(max(top, 2 * len(self._owner)), _NO_OWNER, dtype=np.uint8)
                grown[: len(self._owner)] = self._owner
                self._owner = grown
            self._owner[labels] = slot
        self._dead[slot] = _missing(labels, self._present)

    def _detach(self, segment: SpannSegment) -> None:
        slot = self._slots.pop(segment.directory.name)
        self._dead[slot] = 0
        self.sealed.remove(segment)

    # ------------------------------------------------------------- persistence

    def referenced(self) -> set[str]:
        """Names of the directories under segments/ this strand needs."""
        return {segment.directory.name for segment in self.sealed}

    def save(self, directory: Path) -> None:
        """Write the growing segment and the strand's manifest into a checkpoint (no merge may be running)."""
        assert self.frozen is None and not self._merging, "checkpoints wait for a running merge"
        self.growing.save(directory)
        meta = {
            "format": FORMAT_VERSION,
            "sealed": [segment.directory.name for segment in self.sealed],
            "growing": self.growing.present_labels().tolist(),
        }
        durable.write_bytes(directory / f"{self.spec.name}.strand.json", dumps_checked(meta))

    @classmethod
    def load(cls, directory: Path, segments: Path, spec: DenseFieldSpec, present: list[int]) -> SpannStrand:
        """Open a checkpoint's strand; ``present`` lists the labels holding a live vector in this field."""
        meta = read_json(directory / f"{spec.name}.strand.json")
        if meta is None:
            if present:
                raise DataLoss(f"{directory}: no {spec.name}.strand.json for a SPANN field with vectors")
            return cls(spec)
        if meta.get("format") not in READ_FORMATS:
            raise DataLoss(f"{directory}: unsupported {spec.name}.strand.json format {meta.get('format')}")
        names = meta["sealed"] if meta["format"] >= 2 else [meta["sealed"]] if meta["sealed"] else []
        growing = DenseIndex.load(directory, spec, meta["growing"])
        strand = cls(spec, growing)
        strand._present = LabelMask(np.asarray(present, dtype=np.int64))
        try:
            for name in names:
                segment = SpannSegment.open(segments / name)
                strand._attach(segment, segment.labels())
        except BaseException:
            strand.close()
            raise
        return strand

    def close(self) -> None:
        for segment in self.sealed:
            segment.close()


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
