"""Searches first (index/pacing.py): writes rest while searches run, builds run at a lower
CPU priority, and the server's heap is out of the collector's full passes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from braid.index import hnsw_strand, pacing
from braid.index.catalog import Catalog
from braid.index.records import DocumentWrite
from braid.service import convert
from braid.service.config import load_config

from .conftest import schema


def test_a_write_rests_only_while_searches_run():
    # a write of 40 ms, a read 0.1 s before its end: it rests as long again at share 0.5
    assert pacing.rest_for(10.0, 10.04, 9.94, 0.5) == pytest.approx(0.04)
    assert pacing.rest_for(10.0, 10.04, 9.94, 0.25) == pytest.approx(0.12)  # three times its time
    assert pacing.rest_for(10.0, 10.04, 9.94, 1.0) == 0.0  # share 1: never
    assert pacing.rest_for(10.0, 10.04, 10.04 - pacing.RECENT_S - 0.01, 0.5) == 0.0  # no search lately
    assert pacing.rest_for(0.0, 30.0, 30.0, 0.1) == pacing.MAX_REST_S  # bounded, however long it took


def test_every_search_stamps_the_reads(braid):
    client = braid.client
    client.create_collection("p", schema(dim=2, sparse=False))
    client.upsert("p", [{"id": "a", "dense": {"emb": [1.0, 0.0]}}])
    before = pacing.READS.last
    hits = client.search("p", dense=("emb", [1.0, 0.0]), limit=1)
    assert [h.id for h in hits] == ["a"]
    assert pacing.READS.last > before


def test_build_threads_run_at_a_lower_priority():
    if not hasattr(os, "getpriority"):
        pytest.skip("no per-thread priorities here")
    seen: list[int] = []

    def build() -> None:
        pacing.background_priority()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    thread = threading.Thread(target=build)
    thread.start()
    thread.join(timeout=10)
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert seen == [max(mine, pacing.BUILD_NICE)]  # that thread only: this one keeps its own
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_an_hnsw_seal_runs_at_the_build_priority(tmp_path, monkeypatch):
    """The sealer of a real strand runs niced: its thread's priority, read as it starts the build, is BUILD_NICE."""
    seen: list[int] = []
    real_build = hnsw_strand.HnswStrand._build

    def build(self, labels, vectors):
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real_build(self, labels, vectors)

    monkeypatch.setattr(hnsw_strand.HnswStrand, "_build", build)
    catalog = Catalog(tmp_path / "data")
    try:
        collection = catalog.create("c", convert.schema_from_proto(schema(dim=2, sparse=False)))
        rng = np.random.default_rng(1)
        docs = [
            DocumentWrite(id=f"d{i}", dense={"emb": rng.normal(size=2).astype(np.float32)})
            for i in range(hnsw_strand.SEAL_ROWS + 1)
        ]
        collection.upsert(docs)  # a full growing block: frozen, and the sealer starts
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        catalog.close()
    assert seen and set(seen) == {max(pacing.BUILD_NICE, os.getpriority(os.PRIO_PROCESS, 0))}


def test_write_share_is_configured_and_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("BRAID_DATA_DIR", str(tmp_path))
    assert load_config().storage.write_share == 0.5
    monkeypatch.setenv("BRAID_WRITE_SHARE", "0.25")
    assert load_config().storage.write_share == 0.25
    for bad in ("0", "1.5", "-1"):
        monkeypatch.setenv("BRAID_WRITE_SHARE", bad)
        with pytest.raises(ValueError, match="write_share"):
            load_config()


def test_the_heap_is_frozen_once_frozen():
    code = (
        "import gc; from braid.service.memory import freeze_heap; import braid.service.server; "
        "freeze_heap(); print(gc.get_freeze_count())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert int(out.stdout.strip()) > 10_000  # the imported modules' objects


def test_an_upsert_rests_after_a_search_and_not_without_one(braid, monkeypatch):
    """Through the server: an Upsert that follows a Search rests, one with no search lately does
    not; the write is there either way. The rests are recorded, not taken."""
    rests: list[float] = []
    monkeypatch.setattr(pacing, "_sleep", rests.append)
    monkeypatch.setattr(pacing, "RECENT_S", 60.0)  # "lately" spans a loaded machine's pauses
    client = braid.client
    client.create_collection("w", schema(dim=2, sparse=False))
    monkeypatch.setattr(pacing.READS, "last", -1e9)
    client.upsert("w", [{"id": "a", "dense": {"emb": [1.0, 0.0]}}])
    assert rests == []
    client.search("w", dense=("emb", [1.0, 0.0]), limit=1)
    client.upsert("w", [{"id": "b", "dense": {"emb": [0.0, 1.0]}}])
    assert len(rests) == 1 and 0 < rests[0] <= pacing.MAX_REST_S
    assert [d.id for d in client.get("w", ["b"])] == ["b"]


def test_a_stream_rests_on_the_event_loop_holding_no_worker(braid, monkeypatch):
    """A BulkUpsert batch that follows a Search rests in the stream's handler, on the event loop
    (the async hook), not on a worker thread: searches keep the loop's quick path meanwhile."""
    on_threads: list[float] = []
    on_loop: list[float] = []

    async def record(seconds: float) -> None:
        on_loop.append(seconds)

    monkeypatch.setattr(pacing, "_sleep", on_threads.append)
    monkeypatch.setattr(pacing, "_sleep_async", record)
    monkeypatch.setattr(pacing, "RECENT_S", 60.0)  # "lately" spans a loaded machine's pauses
    client = braid.client
    client.create_collection("s", schema(dim=2, sparse=False))
    docs = [{"id": f"d{i}", "dense": {"emb": [1.0, float(i)]}} for i in range(6)]
    monkeypatch.setattr(pacing.READS, "last", -1e9)
    assert client.bulk_upsert("s", docs[:3], batch_size=1).upserted == 3
    assert on_loop == [] and on_threads == []  # no search lately: no rest
    client.search("s", dense=("emb", [1.0, 0.0]), limit=1)
    assert client.bulk_upsert("s", docs[3:], batch_size=1).upserted == 3
    assert on_threads == [] and len(on_loop) >= 1 and all(0 < r <= pacing.MAX_REST_S for r in on_loop)
    assert client.count("s") == 6
