"""A shard's in-memory state: its label table and every index, and how a write changes them.

``Indexes`` is what recovery builds (index/shard/recovery.py), a checkpoint saves
(index/shard/checkpoint.py) and a reopen swaps in whole: the label table (labels.py), the
payload columns, the metadata store, the dense strands (HNSW or SPANN), the sparse
indexes and tantivy. A write reaches it in two steps (the shard runs them in log order,
index/shard/sequencer.py): ``prepare`` stages the new versions where no search looks yet,
outside the write lock; ``apply`` makes them visible in every strand at once, under it.
It takes no lock of its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import numpy as np

from .. import records
from ..filters import Filter
from ..hnsw_strand import HnswStrand
from ..metadata import MetadataStore
from ..payload import PayloadStore
from ..schema import DenseFieldSpec, DenseIndexType, Schema
from ..spann_strand import SpannStrand
from ..sparse import SparseIndex
from ..text import TextIndex
from .labels import LabelTable
from .ops import Op

MASKS = 8  # filter masks kept until the next write (a byte per label each: 8 MB in all at 1M labels)


class Indexes:
    """The label table and the indexes of one shard; see the module doc."""

    def __init__(
        self,
        labels: LabelTable,
        payload: PayloadStore,
        metadata: MetadataStore,
        dense: dict[str, HnswStrand | SpannStrand],
        sparse: dict[str, SparseIndex],
    ) -> None:
        self.labels = labels
        self.payload = payload
        self.metadata = metadata
        self.dense = dense
        self.sparse = sparse
        self.text: TextIndex | None = None  # opened by recovery, after the checkpoint is loaded
        self.masks = FilterMasks()

    @classmethod
    def empty(cls, schema: Schema) -> Indexes:
        return cls(
            LabelTable(),
            PayloadStore(schema.payload_fields),
            MetadataStore(),
            {f.name: _new_dense(f) for f in schema.dense_fields},
            {f.name: SparseIndex(f.name) for f in schema.sparse_fields},
        )

    def spann_strands(self) -> dict[str, SpannStrand]:
        return {name: index for name, index in self.dense.items() if isinstance(index, SpannStrand)}

    def hnsw_strands(self) -> list[HnswStrand]:
        return [index for index in self.dense.values() if isinstance(index, HnswStrand)]

    def prepare(self, op: Op) -> None:
        """Hand out labels and stage new versions in tantivy, the payload columns and the dense
        vectors; nothing becomes visible yet (the labels are past ``labels.size``).

        The new labels are not alive until ``apply``, so searches skip them even after
        the tantivy commit; old versions leave tantivy only after apply hides them, so a
        document being replaced never drops out of BM25 results.
        """
        if op.kind != records.UPSERT:
            return
        op.first_label = first = self.labels.hand_out(len(op.docs))
        if self.text is not None:
            for offset, doc in enumerate(op.docs):
                if doc.text:
                    self.text.add(first + offset, doc.text)
        # Staged here, outside the write lock, for labels no search looks at yet (past ``size``):
        # the payload columns, and each dense field's vectors as one array in stored form.
        batches: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        for offset, doc in enumerate(op.docs):
            self.payload.set(first + offset, doc.payload)
            self.metadata.set(first + offset, doc.metadata)
            for name, vector in doc.dense.items():
                labels, vectors = batches.setdefault(name, ([], []))
                labels.append(first + offset)
                vectors.append(vector)
        for name, (labels, vectors) in batches.items():
            index = self.dense[name]
            stacked = np.stack(vectors).astype(np.float32, copy=False)
            if isinstance(index, HnswStrand):
                stacked = index.stored_form(stacked)
            op.dense[name] = (np.asarray(labels, np.int64), stacked)

    def apply(self, op: Op) -> int:
        """Make a prepared write visible to every strand at once (caller holds the write lock).
        Returns what it did: documents upserted, or deleted."""
        try:
            if op.kind == records.UPSERT:
                return self._apply_upsert(op)
            if op.kind == records.DELETE_IDS:
                return self._remove_ids(op.ids)
            mask = self.allowed(op.filter)
            return self._remove_ids([self.labels.doc_id(int(label)) for label in np.flatnonzero(mask)])
        finally:
            self.masks.clear()  # every mask of the live labels may have changed

    def allowed(self, flt: Filter | None) -> np.ndarray:
        """Mask of the live labels passing ``flt`` (call under the shard's read or write lock)."""
        return self.allowed_count(flt)[0]

    def allowed_count(self, flt: Filter | None) -> tuple[np.ndarray, int]:
        """``allowed``, and how many labels it sets (a filter's: read-only, and shared with every
        search of the same filter until the next write)."""
        size = self.labels.size
        alive = self.labels.alive[:size]
        if flt is None or flt.is_empty():
            return alive, self.labels.live_count
        key = repr(flt)  # repr, not the Filter: Match(f, 1) == Match(f, True), yet they differ by type
        found = self.masks.get(key)
        if found is None:
            mask = self.payload.evaluate(flt, size, self.metadata) & alive
            mask.flags.writeable = False
            found = mask, int(np.count_nonzero(mask))
            self.masks.put(key, found)
        return found

    def _apply_upsert(self, op: Op) -> int:
        docs, first, table = op.docs, op.first_label, self.labels
        table.grow(first + len(docs))
        for offset, doc in enumerate(docs):
            label = first + offset
            old = table.label_of(doc.id)
            if old is not None:
                self._remove_label(old)
            table.assign(doc.id, label)
            for name, value in doc.sparse.items():
                index = self.sparse[name]
                keys = index.keys_for(
                    value.indices.tolist() if value.indices is not None else None, value.tokens, intern=True
                )
                index.add(label, keys, value.values)
        table.size = first + len(docs)
        for name, (labels, vectors) in op.dense.items():
            index = self.dense[name]
            if isinstance(index, HnswStrand):
                index.add(labels, vectors, stored=True)
            else:
                index.add(labels, vectors)
        return len(docs)

    def _remove_ids(self, ids: list[str]) -> int:
        removed = 0
        for doc_id in ids:
            label = self.labels.pop(doc_id)
            if label is not None:
                self._remove_label(label)
                removed += 1
        return removed

    def _remove_label(self, label: int) -> None:
        self.labels.kill(label)
        self.metadata.remove(label)
        for index in self.dense.values():
            index.remove(label)
        for index in self.sparse.values():
            index.remove(label)
        if self.text is not None:
            self.text.remove(label)


class FilterMasks:
    """The masks (and their counts) of the last MASKS filters searched, until the next write (``apply`` clears them).

    A filtered search computes its filter's mask twice without it (the server's estimate of
    whether the search may run on its event loop, service/rpcs.py, and the search), and a
    filter that repeats (a tenant, a dashboard's range) once per search: 50-150 us at 100,000
    documents. Reads hold the shard's read lock and ``clear`` runs under its write lock, so a
    mask found here is the one computing it again would give. A small lock guards the table
    (searches run on several threads at once).
    """

    __slots__ = ("_lock", "_table")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._table: OrderedDict[str, tuple[np.ndarray, int]] = OrderedDict()  # (mask, labels it sets)

    def get(self, key: str) -> tuple[np.ndarray, int] | None:
        with self._lock:
            found = self._table.get(key)
            if found is not None:
                self._table.move_to_end(key)
            return found

    def put(self, key: str, found: tuple[np.ndarray, int]) -> None:
        with self._lock:
            self._table[key] = found
            if len(self._table) > MASKS:
                self._table.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._table.clear()


def _new_dense(spec: DenseFieldSpec) -> HnswStrand | SpannStrand:
    return SpannStrand(spec) if spec.index is DenseIndexType.SPANN else HnswStrand(spec)
