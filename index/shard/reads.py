"""What a collection reads of one shard in process: the read half of index/shard_api.py's
``ShardHandle``, as a mixin of ``Shard``.

Every operation takes the shard's read lock for its whole length, so it sees one state of the
shard (a write batch is applied entirely or not at all). Candidates are keyed
``shard << SHARD_SHIFT | label`` (index/gather.py), so a collection can merge shards' answers
and later fetch a hit's payload and text from the shard that ranked it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from ..filters import Filter
from ..gather import SHARD_SHIFT, Ranked
from ..hnsw_strand import HnswStrand
from ..query import Bm25Query, DenseQuery, SearchPlan, SparseQuery, SubQuery
from ..records import SparseValue
from ..shard_api import Fetched, Wanted
from ..spann_strand import SpannStrand
from ..stats import SearchTiming

if TYPE_CHECKING:
    from .core import Shard

DenseKnobs = tuple[int, int, float | None]  # (ef, max_lists, eps); 0 / None: the field's default


class ReadsMixin:
    """The shard's answers to a collection (``Shard`` holds the state they read)."""

    def search(
        self: Shard, plan: SearchPlan, depths: list[int], where: str = "", timing: SearchTiming | None = None
    ) -> list[Ranked]:
        """Every strand of a (checked, encoded) plan: its candidates. With ``timing``, each
        strand's time here is added to it (the filter's mask counts towards strand 0)."""
        base = self.number << SHARD_SHIFT
        out = []
        with self.read():
            started = time.perf_counter() if timing is not None else 0.0
            filtered = plan.filter is not None and not plan.filter.is_empty()
            mask, count = self.allowed(plan.filter)
            for i, (sub, depth) in enumerate(zip(plan.queries, depths, strict=True)):
                labels, scores = self._run_strand(sub, depth, (mask, count, filtered), f"{where}queries[{i}]")
                out.append(Ranked(labels + base, scores, self.ids_of(labels)))
                if timing is not None:
                    now = time.perf_counter()
                    timing.add_strand(i, now - started)
                    started = now
        return out

    def search_dense(
        self: Shard, field: str, vectors: np.ndarray, k: int, knobs: DenseKnobs, flt: Filter | None = None
    ) -> list[Ranked]:
        """Dense queries with nothing to fuse or fetch, all with one filter (or none): one ranked
        list per vector; the filter's mask is computed once for the whole batch."""
        base = self.number << SHARD_SHIFT
        with self.read():
            mask = self.allowed(flt)[0] if flt is not None else None
            found = self._dense_search(field, vectors, k, knobs, mask)
            return [Ranked(labels + base, scores, self.ids_of(labels)) for labels, scores in found]

    def dense_filter_cost(self: Shard, field: str, flt: Filter, k: int, ef: int) -> float | None:
        """What a search of one vector with ``flt`` on an in-memory HNSW field would cost, in
        its planner's unit (index/hnsw_strand.py ``filtered_cost``), or None for another field."""
        with self.read():
            index = self.dense.get(field)
            if not isinstance(index, HnswStrand):
                return None
            mask, _ = self.allowed(flt)
            return index.filtered_cost(mask, k, ef or index.spec.hnsw.ef_search)

    def text_stats(self: Shard, terms: list[tuple[str, str]]) -> tuple[list[int], int]:
        """BM25's statistics of (field, term) pairs: document frequencies and the document count."""
        with self.read():
            assert self.text is not None
            return self.text.term_stats(terms)

    def sparse_stats(self: Shard, field: str, term_ids: list[int]) -> tuple[np.ndarray, int]:
        """Per term id, how many live documents have it in a sparse field; and how many have the field."""
        keys = np.asarray(term_ids, np.int64)
        with self.read():
            index = self.sparse[field]
            return index.document_frequency(keys, self.allowed(None)[0]).astype(np.int64), len(index)

    def fetch(self: Shard, labels: list[int], ids: list[str], wanted: Wanted) -> Fetched:
        """Payload, metadata and stored text of hits this shard ranked (``labels``, with their
        ``ids``). A hit whose document was replaced after ranking (its label's text is gone from
        tantivy) gets the text of the document's current version."""
        fetched = Fetched()
        with self.read():
            if wanted.payload:
                fetched.payloads = [self.payload.get(label, wanted.payload_fields) for label in labels]
            if wanted.metadata:
                fetched.metadata = [self.metadata.get(label) for label in labels]
            if wanted.text_fields:
                assert self.text is not None
                fields = wanted.text_fields
                found = self.text.stored(labels, list(fields))
                replaced = {
                    label: current
                    for label, doc_id in zip(labels, ids, strict=True)
                    if label not in found and (current := self.label_of(doc_id)) not in (None, label)
                }
                if replaced:
                    current_texts = self.text.stored(list(replaced.values()), list(fields))
                    found |= {label: current_texts.get(current, {}) for label, current in replaced.items()}
                fetched.texts = [found.get(label, {}) for label in labels]
        return fetched

    def documents(self: Shard, ids: list[str], include_vectors: bool = False) -> list[dict]:
        """The stored documents of ``ids`` this shard holds (unknown ids are left out)."""
        with self.read():
            labels = {doc_id: label for doc_id in ids if (label := self.label_of(doc_id)) is not None}
            texts = self.text.stored(list(labels.values())) if self.text is not None else {}
            return [
                self._document(doc_id, label, texts.get(label, {}), include_vectors) for doc_id, label in labels.items()
            ]

    # ----------------------------------------------------------------- inside

    def _document(self: Shard, doc_id: str, label: int, text: dict, include_vectors: bool) -> dict:
        doc: dict = {
            "id": doc_id,
            "text": text,
            "payload": self.payload.get(label),
            "metadata": self.metadata.get(label),
            "dense": {},
            "sparse": {},
        }
        for name, index in self.sparse.items():
            stored = index.get(label)
            if stored is not None:
                term_ids, tokens = index.describe(stored[0])
                doc["sparse"][name] = SparseValue(
                    values=stored[1], indices=None if tokens else np.asarray(term_ids, np.uint32), tokens=tokens or None
                )
        if include_vectors:
            for name, index in self.dense.items():
                if self.has_vector(name, label):
                    doc["dense"][name] = index.vectors([label])[0]
        return doc

    def _run_strand(
        self: Shard, sub: SubQuery, depth: int, allowed: tuple[np.ndarray, int, bool], at: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """One strand; ``allowed``: the filter's mask, its count, and whether there is a filter."""
        mask, count, filtered = allowed
        query = sub.query
        if isinstance(query, DenseQuery):
            assert query.vector is not None
            knobs = (query.ef, query.max_lists, query.eps)
            return self._dense_search(query.field, query.vector[None, :], depth, knobs, mask if filtered else None)[0]
        if isinstance(query, Bm25Query):
            assert self.text is not None
            fields = query.fields or self.text.field_names
            parsed = self.text.parse(query.text, fields, query.boosts, f"{at}.bm25.text", query.idf)
            if parsed is None:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            return self.text.search(parsed, depth, mask, count, filtered)
        assert isinstance(query, SparseQuery)
        index = self.sparse[query.field]
        vector = query.vector
        keys = index.keys_for(
            vector.indices.tolist() if vector.indices is not None else None, vector.tokens, intern=False
        )
        known = keys >= 0
        return index.search(keys[known], vector.values[known], depth, mask)

    def _dense_search(
        self: Shard, field: str, vectors: np.ndarray, k: int, knobs: DenseKnobs, mask: np.ndarray | None
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        """One dense field's search (under the read lock)."""
        index = self.dense[field]
        ef = knobs[0] or index.spec.hnsw.ef_search
        if isinstance(index, SpannStrand):
            return index.search(vectors, k, ef, mask, knobs[1], knobs[2])
        return index.search(vectors, k, ef, mask)
