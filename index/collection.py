"""A collection: a schema and N shards, with routing, scatter and gather.

Documents are routed to shard ``blake2b64(id) mod N``. Every operation is scattered over the
shards' handles (index/shard_api.py ``ShardHandle``; in process, ``Shard``), in parallel on
the pool when N > 1, and their answers gathered by index/gather.py: a search runs every strand
in every shard, merges each strand's candidates across shards into one ranked list of its
depth, and only then fuses strands, so dense and sparse results do not depend on the shard
count; then the final hits' payload, metadata and text are fetched from the shards that
ranked them. BM25 on more than one shard starts with a DFS phase: each query term's document
frequency and the document count are summed over the shards, and every shard scores with
that IDF (index/text.py scales each term's boost by global / local IDF), so BM25 scores equal
one shard's up to the average field length, which stays per shard.

The reads' scatter and gather is ``Scatter``: handles and a map. A collection maps on its
pool; a cluster router (service/cluster/router/) maps over its remote shards by starting every
shard's call first and then waiting for each, so the two read through one path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import BraidError, Unavailable
from .filters import Filter
from .gather import (
    LABEL_MASK,
    SHARD_SHIFT,
    Ranked,
    combine,
    global_bm25_idf,
    merge_batches,
    sparse_idf_of,
    strand_depths,
)
from .locks import Gate
from .policy import StoragePolicy
from .query import Bm25Query, SearchPlan, SearchResult
from .records import DocumentWrite
from .schema import Schema
from .shard import DEFAULT_POLICY, Shard
from .shard_api import Fetched, ShardReads, Wanted
from .snapshot import SHARD_DIR
from .stats import SearchTiming, current_trace
from .validate import ChecksDense, Limits, check_documents, check_ids, check_plan

log = logging.getLogger("braid.collection")
OPEN_THREADS = 4  # shards of one collection opened at once


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


Calls = list[tuple[ShardReads, tuple]]


class Map(Protocol):
    """``handle.<name>(*args)`` for each (handle, args) of ``calls``: the answers, in order."""

    def __call__(self, name: str, calls: Calls) -> list: ...


def serial_map(name: str, calls: Calls) -> list:
    """One call after another on this thread."""
    return [getattr(handle, name)(*args) for handle, args in calls]


class Analysis(Protocol):
    """How BM25 query text becomes (field, term) pairs (index/text.py ``TextIndex``)."""

    field_names: list[str]

    def terms(self, text: str, fields: list[str], where: str = "bm25.text") -> dict[tuple[str, str], int]: ...


class Scatter:
    """A collection's reads over its shards' handles: each scattered with ``map``, the answers
    gathered (index/gather.py). ``quick_map`` runs the plain dense batch, which may be on the
    server's event loop; ``text``: the analysis of BM25 text for the DFS phase (None: no text
    fields)."""

    def __init__(self, handles: Sequence[ShardReads], map: Map, quick_map: Map, text: Analysis | None) -> None:
        self.handles = handles
        self.map = map
        self.quick_map = quick_map
        self.text = text

    def count(self, flt: Filter | None) -> int:
        return sum(self.map("count", [(handle, (flt,)) for handle in self.handles]))

    def sparse_idf(self, field: str, term_ids: list[int]) -> np.ndarray:
        """BM25 IDF of each term id in a sparse field over all live documents that have the field."""
        stats = self.map("sparse_stats", [(handle, (field, term_ids)) for handle in self.handles])
        return sparse_idf_of(sum(df for df, _ in stats), sum(documents for _, documents in stats))

    def search(self, plan: SearchPlan, where: str = "") -> SearchResult:
        """A checked, encoded plan: the DFS phase, every strand on every shard, fusion, then the
        hits' payload and text (the slow-query log's timings on the way)."""
        depths = strand_depths(plan)
        if len(self.handles) > 1:
            self.gather_bm25_idf(plan, where)
        trace = current_trace()
        timing = trace.search(len(plan.queries)) if trace is not None else None  # the slow-query log's timings
        per_shard = self.rank(plan, depths, where, timing)
        started = time.perf_counter()
        result, keys = combine(plan, per_shard, depths)
        fused = time.perf_counter()
        self.materialize(result, keys, plan)
        if timing is not None:
            timing.finish(fused - started, time.perf_counter() - fused)
        return result

    def rank(
        self, plan: SearchPlan, depths: list[int], where: str = "", timing: SearchTiming | None = None
    ) -> list[list[Ranked]]:
        """Every shard's candidates of every strand."""
        return self.map("search", [(handle, (plan, depths, where, timing)) for handle in self.handles])

    def gather_bm25_idf(self, plan: SearchPlan, where: str) -> None:
        """The DFS phase: each BM25 sub-query gets the collection's IDF of its terms, summed over
        every shard's statistics, so a multi-shard collection scores BM25 as one shard would.
        One pass: every BM25 text is analyzed once, each shard reads the document frequencies of
        all their terms at once, and the IDF is computed over the summed counts in one step."""
        text = self.text
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
        idf = global_bm25_idf(every, self.map("text_stats", [(handle, (every,)) for handle in self.handles]))
        for query, keys in wanted:
            query.idf = {key: idf[key] for key in keys}

    def materialize(self, result: SearchResult, keys: list[int], plan: SearchPlan) -> None:
        """Each hit's payload, metadata and text, from the shard that ranked it."""
        wanted = Wanted.of(plan)
        if not wanted or not keys:
            return
        positions: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            positions.setdefault(key >> SHARD_SHIFT, []).append(position)
        calls: Calls = [
            (self.handles[number], ([keys[p] & LABEL_MASK for p in where], [result.ids[p] for p in where], wanted))
            for number, where in positions.items()
        ]
        parts = list(zip(positions.values(), self.map("fetch", calls), strict=True))
        if wanted.payload:
            result.payloads = _placed(parts, len(keys), lambda fetched: fetched.payloads)
        if wanted.metadata:
            result.metadata = _placed(parts, len(keys), lambda fetched: fetched.metadata)
        if wanted.text_fields:
            result.texts = _placed(parts, len(keys), lambda fetched: fetched.texts)

    def search_dense(
        self, field: str, vectors: np.ndarray, k: int, knobs: tuple[int, int, float | None], flt: Filter | None
    ) -> list[SearchResult]:
        """Dense queries with nothing to fuse or fetch, under one filter (or none): one batched
        call per shard, on ``quick_map``."""
        parts = self.quick_map("search_dense", [(handle, (field, vectors, k, knobs, flt)) for handle in self.handles])
        return merge_batches(parts, k)


class Collection(ChecksDense):
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

    def _pool_map(self, name: str, calls: Calls) -> list:
        return self._map(lambda call: getattr(call[0], name)(*call[1]), calls)

    def _scatter(self) -> Scatter:
        # Made per read: a shard's text index is read as it is now (a heal may reopen it).
        return Scatter(self.shards, self._pool_map, serial_map, self.shards[0].text)

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

    @_admitted
    def snapshot(self, dest: Path) -> list[dict[str, int]]:
        """Snapshot every shard into ``dest/shard-NNN`` (index/snapshot.py), in parallel; their entries."""
        return self._map(lambda shard: shard.snapshot(dest / SHARD_DIR.format(shard.number)), self.shards)

    # ------------------------------------------------------------------- reads

    @_admitted
    def count(self, flt: Filter | None = None) -> int:
        if flt is not None:
            self.shards[0].payload.validate_filter(flt)
        return self._scatter().count(flt)

    @_admitted
    def get(self, ids: list[str], include_vectors: bool = False) -> list[dict]:
        """Stored documents in request order; unknown ids are left out."""
        self._check_ids(ids)
        groups = list(self._group(ids, lambda doc_id: doc_id).items())
        parts = self._map(lambda item: self.shards[item[0]].documents(item[1], include_vectors), groups)
        found = {doc["id"]: doc for part in parts for doc in part}
        return [found[doc_id] for doc_id in ids if doc_id in found]

    @_admitted
    def sparse_idf(self, field: str, term_ids: list[int]) -> np.ndarray:
        """BM25 IDF of each term id in a sparse field over all live documents that have the field."""
        return self._scatter().sparse_idf(field, term_ids)

    # ------------------------------------------------------------------ search

    def check(self, plan: SearchPlan, where: str = "") -> None:
        check_plan(plan, self.schema, self.shards[0].payload, self.limits, where)

    @_admitted
    def search(self, plan: SearchPlan, where: str = "") -> SearchResult:
        self.check(plan, where)
        return self._scatter().search(plan, where)

    @_admitted
    def search_dense_batch(
        self,
        field: str,
        vectors: np.ndarray,
        k: int,
        ef: int,
        max_lists: int = 0,
        eps: float | None = None,
        flt: Filter | None = None,
        where: str = "",
    ) -> list[SearchResult]:
        """Dense queries with nothing to fuse or fetch, all under one filter ``flt`` (or none):
        one batched index call per shard.

        Gives the same hits as ``search`` with a single dense sub-query; the caller
        validates the vectors with ``check_dense`` first. ``where`` prefixes the filter's path in an error.
        """
        if flt is not None:
            self.shards[0].payload.validate_filter(flt, f"{where}filter")
        trace = current_trace()
        timing = trace.search(1) if trace is not None else None
        started = time.perf_counter() if timing is not None else 0.0
        # One shard after another (serial_map): a plain dense search may run on the server's event loop.
        results = self._scatter().search_dense(field, vectors, k, (ef, max_lists, eps), flt)
        if timing is not None:
            timing.add_strand(0, time.perf_counter() - started)
        return results


def _placed(parts: list[tuple[list[int], Fetched]], n: int, column: Callable[[Fetched], list | None]) -> list:
    """One column of the shards' fetched hits, back in the hits' order."""
    out: list = [None] * n
    for where, fetched in parts:
        values = column(fetched)
        assert values is not None
        for position, value in zip(where, values, strict=True):
            out[position] = value
    return out
