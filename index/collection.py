"""A collection: a schema and N shards, with routing, search and fusion.

Documents are routed to shard ``blake2b64(id) mod N``. A search runs every
strand in every shard (in parallel when N > 1), merges each strand's
candidates across shards into one ranked list of its depth, and only then
fuses strands, so dense and sparse results do not depend on the shard count.
BM25 on more than one shard starts with a DFS phase: each query term's document
frequency and the document count are summed over the shards, and every shard scores
with that IDF (index/text.py scales each term's boost by global / local IDF), so BM25
scores equal one shard's up to the average field length, which stays per shard.

Hits are keyed across shards as ``shard << 40 | label``.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import fusion
from .errors import BraidError, Unavailable
from .filters import Filter
from .locks import Gate
from .policy import StoragePolicy
from .query import Bm25Query, DenseQuery, SearchPlan, SearchResult, SparseQuery, SubQuery
from .records import DocumentWrite, SparseValue
from .schema import Schema
from .shard import DEFAULT_POLICY, Shard
from .spann_strand import SpannStrand
from .stats import SearchTiming, current_trace
from .text import bm25_idf
from .validate import Limits, check_dense_query, check_documents, check_ids, check_plan

log = logging.getLogger("braid.collection")
OPEN_THREADS = 4  # shards of one collection opened at once
SHARD_SHIFT = 40
_LABEL_MASK = (1 << SHARD_SHIFT) - 1
# The default hybrid plan (two or more sub-queries, no fusion given): a weighted sum of
# z-scored strands, every weight 1, each strand contributing max(window, 200) candidates.
# Chosen on six real collections (docs/relevance.md, bench/fusion_grid.py): it beats the
# better single strand on all six, where RRF (k = 60, depth 100) lost on one.
DEFAULT_FUSION = ("weighted", "z_score")
MIN_FUSION_DEPTH = 200


def shard_of(doc_id: str, shards: int) -> int:
    """Stable routing: the same id lands on the same shard on every machine and run."""
    if shards == 1:
        return 0
    digest = hashlib.blake2b(doc_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % shards


def _admitted(method: Callable) -> Callable:
    """Run a public operation inside the collection's gate (see ``Collection.close``)."""

    @functools.wraps(method)
    def wrapper(self: Collection, *args, **kwargs):  # type: ignore[no-untyped-def]
        with self._gate:
            return method(self, *args, **kwargs)

    return wrapper


@dataclass
class Ranked:
    """One strand's candidates: global keys, scores (best first) and client ids."""

    keys: np.ndarray
    scores: np.ndarray
    ids: list[str]


class Collection:
    def __init__(
        self, name: str, schema: Schema, shards: list[Shard], created_at: float, executor: Executor, limits: Limits
    ) -> None:
        self.name = name
        self.schema = schema
        self.shards = shards
        self.created_at = created_at
        self._executor = executor
        self.limits = limits
        self._gate = Gate()

    @classmethod
    def open(
        cls,
        directory: Path,
        name: str,
        schema: Schema,
        shard_count: int,
        created_at: float,
        executor: Executor,
        limits: Limits,
        policy: StoragePolicy = DEFAULT_POLICY,
        progress: Callable[[int], None] | None = None,
        opened: Callable[[], None] | None = None,
    ) -> Collection:
        """Open every shard, in parallel (replay is partly I/O); if one fails, close the others and raise.

        ``progress`` gets the bytes of log each shard replays, ``opened`` a call per shard opened.
        """

        def open_shard(i: int) -> Shard:
            shard = Shard.open(directory / f"shard-{i:03d}", schema, i, policy, progress)
            if opened is not None:
                opened()
            return shard

        if shard_count == 1:
            shards = [open_shard(0)]
        else:
            with ThreadPoolExecutor(min(shard_count, OPEN_THREADS), thread_name_prefix="braid-open") as pool:
                opening = [pool.submit(open_shard, i) for i in range(shard_count)]
                wait(opening)
            failures = [f.exception() for f in opening if f.exception() is not None]
            if failures:
                for future in opening:
                    if future.exception() is None:
                        future.result().close()
                raise failures[0]
            shards = [f.result() for f in opening]
        return cls(name, schema, shards, created_at, executor, limits)

    def close(self, error: BraidError | None = None, checkpoint: bool = False) -> None:
        """Close every shard once the operations in progress have finished.

        Operations that start after the close began raise ``error`` (the catalog passes NotFound
        when the collection is deleted, Unavailable at shutdown), so a write that spans several
        shards is applied to all of them or refused before it touches any. With ``checkpoint``
        (a clean shutdown), shards with log written since their last checkpoint checkpoint
        first, so the next start replays nothing; a checkpoint that fails (a full disk) is
        logged and the log, still intact, is replayed instead.
        """
        error = error or Unavailable(f"collection {self.name!r} is closed")
        self._gate.close(error)
        for shard in self.shards:
            if checkpoint and shard.needs_checkpoint:
                try:
                    shard.flush()
                except BaseException as err:  # incl. tantivy's PanicException: the close must go on
                    log.warning("collection %r shard %d: checkpoint at close failed: %s", self.name, shard.number, err)
            shard.close(error)

    def read_problem(self) -> str | None:
        """Why some shard refuses reads now (its recovery did not finish, e.g. a full disk), or
        None when every shard serves its data. Cheap (see Shard.read_problem)."""
        problems = [problem for shard in self.shards if (problem := shard.read_problem()) is not None]
        if not problems:
            return None
        more = f" (and {len(problems) - 1} more shards)" if len(problems) > 1 else ""
        return f"collection {self.name!r}: {problems[0]}{more}"

    def write_problem(self) -> str | None:
        """Why writes to some shard are refused now (e.g. "disk full: ..."), or None when every
        shard takes writes. Cheap: no I/O beyond a cached free-space reading per shard."""
        problems = [problem for shard in self.shards if (problem := shard.write_problem()) is not None]
        if not problems:
            return None
        more = f" (and {len(problems) - 1} more shards)" if len(problems) > 1 else ""
        return problems[0] + more

    def heal(self) -> None:
        """Reopen shards a full disk made read-only or left unrecovered, where room is back (Shard.heal)."""
        for shard in self.shards:
            shard.heal()

    def _map(self, fn, items: list) -> list:  # type: ignore[no-untyped-def]
        """Run fn over items, in parallel on the pool when there is more than one."""
        if len(items) == 1:
            return [fn(items[0])]
        return list(self._executor.map(fn, items))

    # ------------------------------------------------------------------ writes

    # ``ack`` (braid.v1 WriteAck) matters to a cluster router; a collection applies every write
    # before it returns, which satisfies both kinds of acknowledgement.

    @_admitted
    def upsert(self, docs: list[DocumentWrite], ack: int = 0) -> int:
        check_documents(docs, self.schema, self.shards[0].payload, self.limits)
        groups = self._group(docs, lambda doc: doc.id)
        return sum(self._map(lambda item: self.shards[item[0]].upsert(item[1]), list(groups.items())))

    @_admitted
    def delete_ids(self, ids: list[str], ack: int = 0) -> int:
        self._check_ids(ids)
        groups = self._group(ids, lambda doc_id: doc_id)
        return sum(self._map(lambda item: self.shards[item[0]].delete_ids(item[1]), list(groups.items())))

    def _check_ids(self, ids: list[str]) -> None:
        check_ids(ids, self.limits)

    @_admitted
    def delete_filter(self, flt: Filter, ack: int = 0) -> int:
        self.shards[0].payload.validate_filter(flt)
        return sum(self._map(lambda shard: shard.delete_filter(flt), self.shards))

    def _group(self, items: list, key) -> dict[int, list]:  # type: ignore[no-untyped-def]
        groups: dict[int, list] = {}
        count = len(self.shards)
        for item in items:
            groups.setdefault(shard_of(key(item), count), []).append(item)
        return groups

    @_admitted
    def flush(self) -> None:
        self._map(lambda shard: shard.flush(), self.shards)

    # ------------------------------------------------------------------- reads

    @_admitted
    def count(self, flt: Filter | None = None) -> int:
        if flt is not None:
            self.shards[0].payload.validate_filter(flt)
        return sum(self._map(lambda shard: shard.count(flt), self.shards))

    @_admitted
    def get(self, ids: list[str], include_vectors: bool = False) -> list[dict]:
        """Stored documents in request order; unknown ids are left out."""
        self._check_ids(ids)
        found: dict[str, dict] = {}
        for number, group in self._group(ids, lambda doc_id: doc_id).items():
            shard = self.shards[number]
            with shard.read():
                labels = {doc_id: shard.label_of(doc_id) for doc_id in group}
                labels = {doc_id: label for doc_id, label in labels.items() if label is not None}
                texts = shard.text.stored(list(labels.values())) if shard.text is not None else {}
                for doc_id, label in labels.items():
                    found[doc_id] = self._document(shard, doc_id, label, texts.get(label, {}), include_vectors)
        return [found[doc_id] for doc_id in ids if doc_id in found]

    @staticmethod
    def _document(shard: Shard, doc_id: str, label: int, text: dict, include_vectors: bool) -> dict:
        doc: dict = {
            "id": doc_id,
            "text": text,
            "payload": shard.payload.get(label),
            "metadata": shard.metadata.get(label),
            "dense": {},
            "sparse": {},
        }
        for name, index in shard.sparse.items():
            stored = index.get(label)
            if stored is not None:
                ids, tokens = index.describe(stored[0])
                doc["sparse"][name] = SparseValue(
                    values=stored[1], indices=None if tokens else np.asarray(ids, np.uint32), tokens=tokens or None
                )
        if include_vectors:
            for name, index in shard.dense.items():
                if shard.has_vector(name, label):
                    doc["dense"][name] = index.vectors([label])[0]
        return doc

    @_admitted
    def sparse_idf(self, field: str, term_ids: list[int]) -> np.ndarray:
        """BM25 IDF of each term id in a sparse field over all live documents that have the field."""
        stats = [sparse_term_stats(shard, field, term_ids) for shard in self.shards]
        return sparse_idf_of(sum(df for df, _ in stats), sum(documents for _, documents in stats))

    # ------------------------------------------------------------------ search

    def check(self, plan: SearchPlan, where: str = "") -> None:
        check_plan(plan, self.schema, self.shards[0].payload, self.limits, where)

    @_admitted
    def search(self, plan: SearchPlan, where: str = "") -> SearchResult:
        self.check(plan, where)
        depths = strand_depths(plan)
        if len(self.shards) > 1:
            self._gather_bm25_idf(plan, where)
        trace = current_trace()
        timing = trace.search(len(plan.queries)) if trace is not None else None  # the slow-query log's timings
        per_shard = self._map(lambda shard: search_shard(shard, plan, depths, where, timing), self.shards)
        started = time.perf_counter()
        result, keys = combine(plan, per_shard, depths)
        fused = time.perf_counter()
        self._materialize(result, keys, plan)
        if timing is not None:
            timing.finish(fused - started, time.perf_counter() - fused)
        return result

    def _gather_bm25_idf(self, plan: SearchPlan, where: str) -> None:
        """The DFS phase: each BM25 sub-query gets the collection's IDF of its terms, summed over
        every shard's statistics, so a multi-shard collection scores BM25 as one shard would.
        One pass: every BM25 text is analyzed once, each shard reads the document frequencies of
        all their terms at once, and the IDF is computed over the summed counts in one step."""
        text = self.shards[0].text
        if text is None:
            return
        wanted: list[tuple[Bm25Query, list[tuple[str, str]]]] = []
        for i, sub in enumerate(plan.queries):
            query = sub.query
            if isinstance(query, Bm25Query):
                fields = query.fields or text.field_names
                wanted.append((query, list(text.terms(query.text, fields, f"{where}queries[{i}].bm25.text"))))
        every = list(dict.fromkeys(key for _, keys in wanted for key in keys))
        if not every:
            return
        idf = global_bm25_idf(every, [shard_text_stats(shard, every) for shard in self.shards])
        for query, keys in wanted:
            query.idf = {key: idf[key] for key in keys}

    def _materialize(self, result: SearchResult, keys: list[int], plan: SearchPlan) -> None:
        wants_payload = plan.include_payload or bool(plan.payload_fields)
        if not (wants_payload or plan.text_fields) or not keys:
            return
        fields = None if plan.include_payload else plan.payload_fields
        located = [(self.shards[key >> SHARD_SHIFT], key & _LABEL_MASK) for key in keys]
        if wants_payload:
            result.payloads = [shard.payload.get(label, fields) for shard, label in located]
        if plan.include_payload:
            result.metadata = [shard.metadata.get(label) for shard, label in located]
        if plan.text_fields:
            result.texts = self._stored_texts(located, result.ids, plan.text_fields)

    @staticmethod
    def _stored_texts(located: list[tuple[Shard, int]], ids: list[str], fields: list[str]) -> list[dict[str, str]]:
        return stored_texts(located, ids, fields)

    def check_dense(
        self,
        field: str,
        vector: np.ndarray,
        limit: int,
        ef: int,
        where: str = "",
        max_lists: int = 0,
        eps: float | None = None,
    ) -> None:
        """The checks check_plan makes, for one plain dense query."""
        check_dense_query(self.schema, self.limits, field, vector, limit, ef, where, max_lists, eps)

    @_admitted
    def search_dense_batch(
        self,
        field: str,
        vectors: np.ndarray,
        k: int,
        ef: int,
        max_lists: int = 0,
        eps: float | None = None,
        consistency: int = 0,
    ) -> list[SearchResult]:
        """Plain dense queries (no filter, no fusion): one batched index call per shard.

        Gives the same hits as ``search`` with a single dense sub-query; the caller
        validates with ``check_dense`` first. ``consistency`` (braid.v1 Consistency) matters
        to a cluster router: one process always sees every write it acknowledged.
        """
        trace = current_trace()
        timing = trace.search(1) if trace is not None else None
        started = time.perf_counter() if timing is not None else 0.0
        parts = [dense_batch_shard(shard, field, vectors, k, (ef, max_lists, eps)) for shard in self.shards]
        if timing is not None:
            timing.add_strand(0, time.perf_counter() - started)
        results = []
        for i in range(len(vectors)):
            ranked = merge_ranked([part[i] for part in parts], k) if len(parts) > 1 else parts[0][i]
            results.append(SearchResult(ids=ranked.ids, scores=ranked.scores))
        return results


def strand_depths(plan: SearchPlan) -> list[int]:
    """How many candidates each strand contributes (per shard, and after merging across shards)."""
    window = plan.offset + plan.limit
    single = len(plan.queries) == 1
    return [sub.depth or (window if single else max(window, MIN_FUSION_DEPTH)) for sub in plan.queries]


def search_shard(
    shard: Shard, plan: SearchPlan, depths: list[int], where: str = "", timing: SearchTiming | None = None
) -> list[Ranked]:
    """Every strand of a (checked, encoded) plan in one shard: its candidates, keyed shard << 40 | label.
    With ``timing``, each strand's time here is added to it (the filter's mask counts towards strand 0)."""
    base = shard.number << SHARD_SHIFT
    out = []
    with shard.read():
        started = time.perf_counter() if timing is not None else 0.0
        filtered = plan.filter is not None and not plan.filter.is_empty()
        mask, count = shard.allowed(plan.filter)
        for i, (sub, depth) in enumerate(zip(plan.queries, depths, strict=True)):
            at = f"{where}queries[{i}]"
            labels, scores = _run_strand(shard, sub, depth, (mask, count, filtered), at)
            out.append(Ranked(labels + base, scores, shard.ids_of(labels)))
            if timing is not None:
                now = time.perf_counter()
                timing.add_strand(i, now - started)
                started = now
    return out


def combine(plan: SearchPlan, per_shard: list[list[Ranked]], depths: list[int]) -> tuple[SearchResult, list[int]]:
    """Merge each strand across shards (cut to its depth), then fuse the strands and apply the
    window: the hits, and each hit's key (shard << 40 | label) for fetching its payload and text.
    A collection and a cluster router both rank through here, so both give the same hits."""
    single = len(plan.queries) == 1
    ranked = [
        merge_ranked([strands[i] for strands in per_shard], depths[i]) if len(per_shard) > 1 else per_shard[0][i]
        for i in range(len(plan.queries))
    ]
    rule, normalization = (plan.fusion, plan.normalization) if plan.fusion else DEFAULT_FUSION
    if single and not plan.fusion:
        rule = "single"
    if rule == "single" and single and not plan.explain:
        return _single_strand(ranked[0], plan)
    fusion_keys, ids, shard_keys = _id_ordered_keys(ranked)
    strands = [
        fusion.Strand(keys, r.scores.astype(np.float64), sub.weight)
        for keys, r, sub in zip(fusion_keys, ranked, plan.queries, strict=True)
    ]
    fused = fusion.fuse(strands, rule, k=plan.rrf_k, normalization=normalization)
    fused = fusion.apply_window(fused, plan.offset, plan.limit, plan.score_threshold)
    result = SearchResult(ids=[ids[key] for key in fused.keys.tolist()], scores=fused.scores)
    if plan.explain:
        result.strand_names = [_strand_name(sub) for sub in plan.queries]
        result.ranks, result.raw = fused.ranks, fused.raw
    return result, shard_keys[fused.keys].tolist()


def _single_strand(ranked: Ranked, plan: SearchPlan) -> tuple[SearchResult, list[int]]:
    """One strand needs no fusion: it is already ranked, so only the window is applied."""
    end = len(ranked.scores)
    if plan.score_threshold is not None:
        # scores are non-increasing: keep those >= threshold
        end = int(np.searchsorted(-ranked.scores, -np.float32(plan.score_threshold), side="right"))
    window = slice(plan.offset, min(end, plan.offset + plan.limit))
    result = SearchResult(ids=ranked.ids[window], scores=ranked.scores[window].astype(np.float64))
    return result, ranked.keys[window].tolist()


def _run_strand(
    shard: Shard, sub: SubQuery, depth: int, allowed: tuple[np.ndarray, int, bool], at: str
) -> tuple[np.ndarray, np.ndarray]:
    """One strand in one shard; ``allowed``: the filter's mask, its count, and whether there is a filter."""
    mask, count, filtered = allowed
    query = sub.query
    if isinstance(query, DenseQuery):
        assert query.vector is not None
        knobs = (query.ef, query.max_lists, query.eps)
        return _dense_search(shard, query.field, query.vector[None, :], depth, knobs, mask if filtered else None)[0]
    if isinstance(query, Bm25Query):
        assert shard.text is not None
        fields = query.fields or shard.text.field_names
        parsed = shard.text.parse(query.text, fields, query.boosts, f"{at}.bm25.text", query.idf)
        if parsed is None:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        return shard.text.search(parsed, depth, mask, count, filtered)
    assert isinstance(query, SparseQuery)
    index = shard.sparse[query.field]
    vector = query.vector
    keys = index.keys_for(vector.indices.tolist() if vector.indices is not None else None, vector.tokens, intern=False)
    known = keys >= 0
    return index.search(keys[known], vector.values[known], depth, mask)


def stored_texts(located: list[tuple[Shard, int]], ids: list[str], fields: list[str]) -> list[dict[str, str]]:
    """Stored text of each hit. A hit whose document was replaced after ranking (its label's
    text is gone from tantivy) gets the text of the document's current version."""
    texts: dict[tuple[int, int], dict[str, str]] = {}
    for shard in {shard for shard, _ in located}:
        assert shard.text is not None
        with shard.read():
            labels = [label for s, label in located if s is shard]
            found = shard.text.stored(labels, fields)
            for label in labels:
                texts[(shard.number, label)] = found.get(label, {})
            replaced = {
                label: current
                for (s, label), doc_id in zip(located, ids, strict=True)
                if s is shard and label not in found and (current := shard.label_of(doc_id)) not in (None, label)
            }
            if replaced:
                current_texts = shard.text.stored(list(replaced.values()), fields)
                for label, current in replaced.items():
                    texts[(shard.number, label)] = current_texts.get(current, {})
    return [texts[(shard.number, label)] for shard, label in located]


def shard_text_stats(shard: Shard, terms: list[tuple[str, str]]) -> tuple[list[int], int]:
    """BM25's statistics of (field, term) pairs in one shard: document frequencies and the document count."""
    with shard.read():
        assert shard.text is not None
        return shard.text.term_stats(terms)


def global_bm25_idf(terms: list[tuple[str, str]], stats: list[tuple[list[int], int]]) -> dict[tuple[str, str], float]:
    """The IDF of each term over every shard's statistics (tantivy's formula, index/text.py)."""
    if not terms:
        return {}
    documents = sum(total for _, total in stats)
    frequencies = np.array([df for df, _ in stats], np.int64).sum(axis=0)  # shards x terms, summed
    return dict(zip(terms, bm25_idf(frequencies, documents).tolist(), strict=True))


def sparse_term_stats(shard: Shard, field: str, term_ids: list[int]) -> tuple[np.ndarray, int]:
    """Per term id, how many live documents of the shard have it in a sparse field; and how many have the field."""
    keys = np.asarray(term_ids, np.int64)
    with shard.read():
        index = shard.sparse[field]
        return index.document_frequency(keys, shard.allowed(None)[0]).astype(np.int64), len(index)


def sparse_idf_of(df: np.ndarray, documents: int) -> np.ndarray:
    """idf = ln(1 + (N - df + 0.5) / (df + 0.5)); 0 for terms no document has, so inference-free queries drop them."""
    idf = np.log1p((documents - df + 0.5) / (df + 0.5))
    return np.where(df > 0, idf, 0.0).astype(np.float32)


def dense_batch_shard(
    shard: Shard, field: str, vectors: np.ndarray, k: int, knobs: tuple[int, int, float | None]
) -> list[Ranked]:
    """Plain dense queries in one shard: one ranked list per vector, keyed shard << 40 | label."""
    base = shard.number << SHARD_SHIFT
    with shard.read():
        found = _dense_search(shard, field, vectors, k, knobs, None)
        return [Ranked(labels + base, scores, shard.ids_of(labels)) for labels, scores in found]


def _dense_search(
    shard: Shard,
    field: str,
    vectors: np.ndarray,
    k: int,
    knobs: tuple[int, int, float | None],
    mask: np.ndarray | None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One dense field's search in one shard (under its read lock); knobs: (ef, max_lists, eps), 0/None = default."""
    index = shard.dense[field]
    ef = knobs[0] or index.spec.hnsw.ef_search
    if isinstance(index, SpannStrand):
        return index.search(vectors, k, ef, mask, knobs[1], knobs[2])
    return index.search(vectors, k, ef, mask)


def _strand_name(sub: SubQuery) -> str:
    if sub.name:
        return sub.name
    query = sub.query
    if isinstance(query, Bm25Query):
        return "bm25:" + ",".join(query.fields) if query.fields else "bm25"
    kind = "dense" if isinstance(query, DenseQuery) else "sparse"
    return f"{kind}:{query.field}"


def _id_ordered_keys(ranked: list[Ranked]) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """Re-key every candidate by its client id's position in sorted order.

    Fusion breaks exact ties (common in RRF) by key; keys derived from client ids keep
    that order independent of which shard holds a document. Returns the per-strand fusion
    keys, the id of each key, and each key's shard-local key (shard << 40 | label).
    """
    if len(ranked) == 1:  # one strand is already in its final order; no ties to break
        only = ranked[0]
        return [np.arange(len(only.ids), dtype=np.int64)], only.ids, only.keys
    all_ids = [doc_id for r in ranked for doc_id in r.ids]
    unique, inverse = (
        np.unique(np.asarray(all_ids, dtype=object), return_inverse=True)
        if all_ids
        else (np.empty(0, object), np.empty(0, np.int64))
    )
    shard_keys = np.empty(len(unique), np.int64)
    shard_keys[inverse] = np.concatenate([r.keys for r in ranked])
    bounds = np.cumsum([len(r.ids) for r in ranked])[:-1]
    return [part.astype(np.int64) for part in np.split(inverse, bounds)], unique.tolist(), shard_keys


def merge_ranked(parts: list[Ranked], depth: int) -> Ranked:
    """One strand's candidates from every shard, best first, cut to depth (ties by smaller key)."""
    keys = np.concatenate([p.keys for p in parts])
    scores = np.concatenate([p.scores for p in parts])
    ids = [doc_id for p in parts for doc_id in p.ids]
    order = np.lexsort((keys, -scores))[:depth]
    return Ranked(keys[order], scores[order], [ids[i] for i in order.tolist()])
