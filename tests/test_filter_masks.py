"""A shard's filter masks (index/shard/indexes.py ``FilterMasks``): kept until the next write, never stale.

A filtered search computes its filter's mask once for the server's quick-path estimate and
once more for the search, and a repeated filter once per search; the shard keeps the last
few masks until a write. These tests hold the cache to the one rule that matters: a mask
it hands out equals the mask computed afresh under the same read lock, through upserts,
replacements, deletes by id and by filter, and while writers and readers race.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from braid.index.filters import Filter, Match, Range
from braid.index.records import DocumentWrite
from braid.index.schema import PayloadFieldSpec, PayloadType, Schema
from braid.index.shard import Shard
from braid.index.shard import indexes as indexes_module

from .conftest import random_vectors
from .test_filter_planner import N as STRAND_N
from .test_filter_planner import _one_graph, small_blocks, tagged_shard  # noqa: F401
from .test_hnsw_segments import DIM

N = 400
RACE_S = 3.0  # how long the race test's writer writes (bounded: it stops after this or 400 batches)


def _shard(tmp_path: Path) -> Shard:
    schema = Schema(
        payload_fields=[
            PayloadFieldSpec("tag", PayloadType.KEYWORD),
            PayloadFieldSpec("r", PayloadType.INT),
            PayloadFieldSpec("flag", PayloadType.BOOL),
        ]
    )
    shard = Shard.open(tmp_path / "s", schema, 0)
    shard.upsert([_doc(i, "a" if i % 3 == 0 else "b", i % 100, i % 2 == 0) for i in range(N)])
    return shard


def _doc(i: int, tag: str, r: int, flag: bool, topic: str = "") -> DocumentWrite:
    metadata = json.dumps({"topic": topic}) if topic else ""
    return DocumentWrite(id=str(i), payload={"tag": tag, "r": r, "flag": flag}, metadata=metadata)


def _fresh(shard: Shard, flt: Filter) -> np.ndarray:
    """The mask computed without the cache (call under the shard's read lock)."""
    indexes = shard.indexes
    size = indexes.labels.size
    return indexes.payload.evaluate(flt, size, indexes.metadata) & indexes.labels.alive[:size]


def _ids(shard: Shard, mask: np.ndarray) -> set[str]:
    return set(shard.ids_of(np.flatnonzero(mask)))


FILTERS = [
    Filter(must=(Match("tag", "a"),)),
    Filter(must=(Range("r", gte=10, lt=40),), must_not=(Match("flag", True),)),
    Filter(should=(Match("tag", "a"), Range("r", gte=90))),
    Filter(must=(Match("topic", "x"),)),  # undeclared: a metadata path
]


def test_a_repeated_filter_shares_one_read_only_mask_until_a_write(tmp_path: Path) -> None:
    shard = _shard(tmp_path)
    flt = FILTERS[0]
    with shard.read():
        first, count = shard.allowed(flt)
        again, _ = shard.allowed(flt)
        assert again is first and count == len(range(0, N, 3))
        with pytest.raises(ValueError):
            first[0] = not first[0]  # read-only: a search that changed it would change every other's
    shard.upsert([_doc(N, "a", 5, False)])  # a new matching document
    with shard.read():
        after, count = shard.allowed(flt)
        assert after is not first and str(N) in _ids(shard, after)
        assert np.array_equal(after, _fresh(shard, flt))
    shard.close()


@pytest.mark.parametrize("write", ["new", "replace", "delete ids", "delete filter", "metadata"])
def test_every_kind_of_write_is_seen_by_the_next_mask(tmp_path: Path, write: str) -> None:
    """Each filter's mask is taken (cached), one write changes which documents pass, and every
    filter's next mask is the fresh one."""
    shard = _shard(tmp_path)
    with shard.read():
        before = [shard.allowed(flt)[0] for flt in FILTERS]
    if write == "new":
        shard.upsert([_doc(N + i, "a", 95, False) for i in range(5)])
    elif write == "replace":  # documents that matched FILTERS[0] stop matching
        shard.upsert([_doc(i, "b", 50, True) for i in range(0, 30, 3)])
    elif write == "delete ids":
        shard.delete_ids([str(i) for i in range(0, 60)])
    elif write == "delete filter":
        shard.delete_filter(FILTERS[1])  # uses the cached mask of that filter, then changes every mask
    else:
        shard.upsert([_doc(i, "b", 1, False, "x") for i in range(7)])
    with shard.read():
        for flt in FILTERS:
            mask, count = shard.allowed(flt)
            fresh = _fresh(shard, flt)
            assert np.array_equal(mask, fresh), (write, flt)
            assert count == int(np.count_nonzero(fresh))
        changed = [
            shard.allowed(flt)[1] != int(np.count_nonzero(old)) for flt, old in zip(FILTERS, before, strict=True)
        ]
    assert any(changed), "the write changed no filter's answer: the test proves nothing"
    shard.close()


def test_filters_equal_as_python_values_keep_their_own_masks(tmp_path: Path) -> None:
    """Match(flag, True) == Match(flag, 1) in Python, but 1 is no bool: it matches nothing."""
    shard = _shard(tmp_path)
    as_bool = Filter(must=(Match("flag", True),))
    as_int = Filter(must=(Match("flag", 1),))
    assert as_bool == as_int
    with shard.read():
        assert shard.allowed(as_bool)[1] == N // 2
        assert shard.allowed(as_int)[1] == int(np.count_nonzero(_fresh(shard, as_int)))
    shard.close()


def test_the_table_stays_within_its_bound(tmp_path: Path) -> None:
    shard = _shard(tmp_path)
    with shard.read():
        for low in range(3 * indexes_module.MASKS):
            shard.allowed(Filter(must=(Range("r", gte=low),)))
        assert len(shard.indexes.masks._table) == indexes_module.MASKS
    shard.close()


def test_readers_racing_writers_never_see_a_stale_mask(tmp_path: Path) -> None:
    """Four threads read every filter's mask while one thread upserts, replaces and deletes:
    every mask handed out equals the fresh one under the same read lock."""
    shard = _shard(tmp_path)
    stop = threading.Event()
    wrong: list[str] = []
    reads = [0] * 4

    def read(slot: int) -> None:
        rng = np.random.default_rng(slot)
        while not stop.is_set() and not wrong:
            flt = FILTERS[int(rng.integers(len(FILTERS)))]
            with shard.read():
                mask, count = shard.allowed(flt)
                fresh = _fresh(shard, flt)
                if not np.array_equal(mask, fresh) or count != int(np.count_nonzero(fresh)):
                    wrong.append(f"{flt}: {count} against {int(np.count_nonzero(fresh))}")
            reads[slot] += 1

    readers = [threading.Thread(target=read, args=(slot,)) for slot in range(4)]
    for thread in readers:
        thread.start()
    rng = np.random.default_rng(9)
    deadline = threading.Event()
    timer = threading.Timer(RACE_S, deadline.set)
    timer.start()
    try:
        for batch in range(400):
            if deadline.is_set() or wrong:
                break
            ids = rng.choice(N + 50, 8, replace=False)
            if batch % 5 == 4:
                shard.delete_ids([str(i) for i in ids])
            else:
                topic = "x" if batch % 2 else ""
                shard.upsert(
                    [_doc(int(i), str(rng.choice(["a", "b"])), int(rng.integers(100)), bool(i % 2), topic) for i in ids]
                )
    finally:
        timer.cancel()
        deadline = time.monotonic() + 30  # a loaded machine may not have run every reader yet
        while min(reads) == 0 and not wrong and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        for thread in readers:
            thread.join(30)
    assert not wrong, wrong[:3]
    assert min(reads) > 0
    shard.close()


def _dense_ids(shard: Shard, flt: Filter, query: np.ndarray, copy: bool = False) -> list[str]:
    """The shard's dense top 10 under ``flt``: through its kept mask, or a writable copy of it
    (which the strand never keeps plan inputs for: the fresh path)."""
    with shard.read():
        mask, _ = shard.allowed(flt)
        [(labels, _)] = shard.dense["emb"].search(query[None, :], 10, 16, mask.copy() if copy else mask)
        return shard.ids_of(labels)


def test_a_kept_mask_plans_once_until_vectors_or_graphs_change(
    small_blocks: None,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The strand keeps a kept mask's plan inputs (index/hnsw_plan.py ``FilterInputs``) across
    searches, drops them when a vector is added or removed or a graph sealed or merged, and
    answers through them exactly as through a fresh copy of the mask, after every change."""
    shard, vectors, _, _ = tagged_shard(tmp_path, ["a", "b", "c"], seed=51)
    strand = shard.dense["emb"]
    flt = Filter(must=(Match("tag", "a"),), must_not=(Range("r", gte=900),))
    queries = random_vectors(4, DIM, seed=52)

    def same_as_fresh() -> None:
        for query in queries:
            assert _dense_ids(shard, flt, query) == _dense_ids(shard, flt, query, copy=True)

    same_as_fresh()
    kept = strand._inputs
    assert kept is not None and kept.anded.flags.writeable is False
    same_as_fresh()
    assert strand._inputs is kept  # planned once for the same kept mask
    near = queries[0] / np.linalg.norm(queries[0])
    shard.upsert([DocumentWrite(id="new", dense={"emb": near}, payload={"tag": "a", "r": 1})])
    assert strand._inputs is None  # the write dropped them
    assert _dense_ids(shard, flt, queries[0])[0] == "new"
    same_as_fresh()
    first = _dense_ids(shard, flt, queries[1])[0]
    shard.delete_ids([first])
    assert first not in _dense_ids(shard, flt, queries[1])
    same_as_fresh()
    more = [
        DocumentWrite(id=f"x{i}", dense={"emb": v}, payload={"tag": "a", "r": 2}) for i, v in enumerate(vectors[:600])
    ]
    shard.upsert(more)
    assert shard.wait_merged(120, settled=True)  # blocks sealed, graphs merged: the graph set changed
    same_as_fresh()
    shard.close()


def test_a_writable_mask_is_never_kept(small_blocks: None) -> None:  # noqa: F811
    """A caller's own array may change between searches: the strand plans it afresh every time."""
    fill = _one_graph(gaps=False)
    allowed = np.zeros(STRAND_N, bool)
    allowed[:50] = True
    query = random_vectors(1, DIM, seed=53)[0]
    before = fill.search(query, 10, ef=16, allowed=allowed)
    assert set(before) <= set(range(50)) and fill.strand._inputs is None
    allowed[:] = False
    allowed[3000:3050] = True  # the same array, another filter
    after = fill.search(query, 10, ef=16, allowed=allowed)
    assert set(after) <= set(range(3000, 3050))
    fill.strand.close()
