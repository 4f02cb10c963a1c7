"""Searches run in parallel with each other and with writes, and never see two versions of a document."""

from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np

from braid.v1 import braid_pb2 as pb

from .conftest import schema, wait_for

IDS = 200


def version_doc(i: int, version: int) -> dict:
    rng = np.random.default_rng(version * IDS + i)
    return {
        "id": f"d{i}",
        "text": {"body": f"common v{version}"},
        "dense": {"emb": rng.standard_normal(8).astype(np.float32)},
        "sparse": {"splade": {"common": float(rng.random()) + 0.1}},
        "payload": {"v": version},
    }


def test_parallel_searches_during_replacing_writes(braid):
    braid.client.create_collection("docs", schema(dim=8, payload={"v": pb.INT}), shards=3)
    braid.client.upsert("docs", [version_doc(i, 0) for i in range(IDS)])
    stop = threading.Event()
    problems: list[str] = []
    searches = Counter()
    writes: list[int] = []  # the versions the writer had acknowledged

    def writer() -> None:
        version = 1
        while not stop.is_set():
            batch = [version_doc(i, version) for i in range(0, IDS, 3)]
            assert braid.client.upsert("docs", batch) == len(batch)
            writes.append(version)
            version += 1

    def reader(kind: str) -> None:
        rng = np.random.default_rng(len(kind))
        while not stop.is_set():
            if kind == "dense":
                hits = braid.client.search("docs", dense=("emb", rng.standard_normal(8)), limit=IDS)
            elif kind == "bm25":
                hits = braid.client.search("docs", bm25="common", limit=IDS, text_fields=["body"])
                missing = [h.id for h in hits if not h.text.get("body", "").startswith("common v")]
                if missing:
                    problems.append(f"bm25: hits without their stored text {missing[:3]}")
            else:
                hits = braid.client.search("docs", sparse=("splade", {"common": 1.0}), limit=IDS)
            ids = [h.id for h in hits]
            if len(ids) != len(set(ids)):
                problems.append(f"{kind}: duplicate ids {Counter(ids).most_common(1)}")
            if len(ids) != IDS:
                problems.append(f"{kind}: {len(ids)} hits, expected {IDS}")
            count = braid.client.count("docs")
            if count != IDS:
                problems.append(f"count {count}")
            searches[kind] += 1

    threads = [threading.Thread(target=writer)] + [
        threading.Thread(target=reader, args=(kind,)) for kind in ("dense", "bm25", "sparse", "dense")
    ]
    for t in threads:
        t.start()
    # Until every thread has done some work (a loaded machine gets there later), and at least 4 s.
    began = time.monotonic()

    def enough() -> bool:
        if not all(t.is_alive() for t in threads):
            return True  # a thread died: conftest.py fails the test with its exception
        worked = len(writes) >= 5 and min(searches[kind] for kind in ("dense", "bm25", "sparse")) >= 5
        return worked and time.monotonic() - began >= 4

    wait_for(enough, timeout=120, what="5 writes and 5 searches of each kind")
    stop.set()
    for t in threads:
        t.join(timeout=60)
    # A thread that died failed the test already (conftest.py); one that hangs is caught here.
    assert not any(t.is_alive() for t in threads), "a writer or reader did not stop"
    assert not problems, problems[:5]
    assert len(writes) >= 5 and min(searches[kind] for kind in ("dense", "bm25", "sparse")) >= 5, (writes, searches)
    # The last acknowledged version is what Get returns.
    got = {d.id: d.payload["v"].int for d in braid.client.get("docs", [f"d{i}" for i in range(0, IDS, 3)])}
    assert set(got.values()) == {writes[-1]}, (writes[-1], set(got.values()))


def test_a_hit_replaced_between_ranking_and_materializing_gets_the_current_text(tmp_path):
    """The race the parallel test can hit only by chance, made deterministic at the index level."""
    from braid.index.catalog import Catalog
    from braid.index.records import DocumentWrite
    from braid.index.schema import Schema, TextFieldSpec
    from braid.index.shard_api import Wanted

    catalog = Catalog(tmp_path / "data")
    try:
        collection = catalog.create("docs", Schema(text_fields=(TextFieldSpec("body"),)))
        collection.upsert([DocumentWrite(id="a", text={"body": "old"}), DocumentWrite(id="b", text={"body": "bee"})])
        shard = collection.shards[0]
        ranked = [shard.label_of("a"), shard.label_of("b")]  # labels as ranking saw them
        collection.upsert([DocumentWrite(id="a", text={"body": "new"})])  # a replace lands before materializing
        collection.flush()  # and tantivy has dropped the old version's stored text
        wanted = Wanted(text_fields=("body",))
        assert shard.fetch(ranked, ["a", "b"], wanted).texts == [{"body": "new"}, {"body": "bee"}]
        collection.delete_ids(["a"])
        assert shard.fetch(ranked, ["a", "b"], wanted).texts == [{}, {"body": "bee"}]
    finally:
        catalog.close()
