"""SPANN as a dense index type, through the gRPC API: schema, recall and knobs, the growing
segment, seals and tiered compactions (live vectors kept, deleted ones dropped, the growing
segment bounded), filters, old strand manifests, and SIGKILL mid-merge."""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.index.schema import Schema
from braid.index.spann_strand import SpannStrand
from braid.service.client import dense_vector
from braid.v1 import braid_pb2 as pb

from .conftest import rpc_error, start_in_process, stop_in_process

DIM, N = 16, 3000


def clustered(n: int, seed: int, clusters: int = 50, noise: float = 1.0) -> np.ndarray:
    """Unit vectors around random centres (neighbours are meaningful, lists are not trivial)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, DIM)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + rng.normal(scale=noise, size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def spann_schema(merge_threshold: int = 0, **params: object) -> pb.Schema:
    spann = pb.SpannParams(merge_threshold=merge_threshold, **params)  # type: ignore[arg-type]
    return pb.Schema(
        dense_fields=[pb.DenseVectorField(name="emb", dim=DIM, metric=pb.COSINE, index="spann", spann=spann)],
        payload_fields=[pb.PayloadField(name="n", type=pb.INT)],
    )


def docs(vectors: np.ndarray, first: int = 0) -> list[dict]:
    return [{"id": f"d{first + i}", "dense": {"emb": v}, "payload": {"n": first + i}} for i, v in enumerate(vectors)]


def request(
    vector: np.ndarray, limit: int = 10, max_lists: int = 0, eps: float | None = None, flt: pb.Filter | None = None
) -> pb.SearchRequest:
    query = pb.DenseQuery(field="emb", vector=dense_vector(vector), max_lists=max_lists)
    if eps is not None:
        query.eps = eps
    out = pb.SearchRequest(collection="c", limit=limit, queries=[pb.SubQuery(dense=query)])
    if flt is not None:
        out.filter.CopyFrom(flt)
    return out


def search_all(stub, queries: np.ndarray, **kw: object) -> list[list[tuple[str, float]]]:  # type: ignore[no-untyped-def]
    found = stub.BatchSearch(pb.BatchSearchRequest(searches=[request(q, **kw) for q in queries]))  # type: ignore[arg-type]
    return [[(h.id, h.score) for h in r.hits] for r in found.results]


def truth(current: dict[str, np.ndarray], queries: np.ndarray, k: int, keep=lambda doc_id: True) -> list[set[str]]:  # type: ignore[no-untyped-def]
    ids = [i for i in current if keep(i)]
    base = np.stack([current[i] for i in ids])
    return [{ids[j] for j in np.argsort(-(base @ q), kind="stable")[:k]} for q in queries]


def recall(found: list[list[tuple[str, float]]], expected: list[set[str]]) -> float:
    return float(np.mean([len({h[0] for h in f} & t) / len(t) for f, t in zip(found, expected, strict=True)]))


def strand(server) -> SpannStrand:  # type: ignore[no-untyped-def]
    index = server.catalog.get("c").shards[0].dense["emb"]
    assert isinstance(index, SpannStrand)
    return index


def settle(client, part: SpannStrand) -> None:  # type: ignore[no-untyped-def]
    """Flush until no merge is running or due (a flush waits for one, then may start the next)."""
    client.flush("c")
    while part._merging:
        client.flush("c")


def live_rows(part: SpannStrand) -> int:
    """Live vectors in the sealed segments."""
    return sum(segment.count - part.dead(segment) for segment in part.sealed)


def n_below(bound: int) -> pb.Filter:
    return pb.Filter(must=[pb.Condition(range=pb.Range(field="n", lt=pb.Value(int=bound)))])


def n_mod(values: list[int]) -> pb.Filter:
    return pb.Filter(must=[pb.Condition(any=pb.MatchAny(field="n", values=[pb.Value(int=v) for v in values]))])


# -------------------------------------------------------------------- schema


def test_schema_round_trips_and_old_schemas_load_as_hnsw(tmp_path):
    server, running = start_in_process(tmp_path / "d")
    try:
        created = running.client.create_collection("c", spann_schema(replicas=4, eps=0.0, target_list_size=32))
        field = created.schema.dense_fields[0]
        assert field.index == "spann"
        assert (field.spann.replicas, field.spann.eps, field.spann.target_list_size) == (4, 0.0, 32)
        assert (field.spann.max_lists, field.spann.merge_threshold) == (16, 20000)
        assert field.spann.eps_build == pytest.approx(0.15)
        assert running.client.get_collection("c").schema == created.schema
        plain = running.client.create_collection(
            "h", pb.Schema(dense_fields=[pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE)])
        )
        assert plain.schema.dense_fields[0].index == "hnsw" and not plain.schema.dense_fields[0].HasField("spann")
    finally:
        stop_in_process(server, running)
    server, running = start_in_process(tmp_path / "d")
    try:
        assert running.client.get_collection("c").schema == created.schema
    finally:
        stop_in_process(server, running)
    old = {"dense_fields": [{"name": "v", "dim": 4, "metric": "cosine", "hnsw": {"m": 16, "ef_construction": 200}}]}
    assert Schema.from_json(old).dense_fields[0].index == "hnsw"


@pytest.mark.parametrize(
    ("field", "needle"),
    [
        (
            pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE, index="ivf"),
            "schema.dense_fields[0].index: unknown value 'ivf'",
        ),
        (
            pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE, index="spann", spann=pb.SpannParams(replicas=9)),
            "schema.dense_fields[0].spann.replicas: must be in 1..8, got 9",
        ),
        (
            pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE, index="spann", spann=pb.SpannParams(eps=-1)),
            "schema.dense_fields[0].spann.eps: must be in 0..100",
        ),
        (
            pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE, index="spann", spann=pb.SpannParams(centroid_m=1)),
            "schema.dense_fields[0].spann.centroid_m",
        ),
        (
            pb.DenseVectorField(name="v", dim=4, metric=pb.COSINE, spann=pb.SpannParams(replicas=2)),
            "schema.dense_fields[0].spann: set",
        ),
    ],
)
def test_bad_spann_schema_is_invalid_argument(braid, field, needle):
    err = rpc_error(lambda: braid.client.create_collection("c", pb.Schema(dense_fields=[field])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.details()


def test_bad_query_knobs_are_invalid_argument(braid):
    braid.client.create_collection("c", spann_schema())
    braid.client.create_collection(
        "h", pb.Schema(dense_fields=[pb.DenseVectorField(name="emb", dim=DIM, metric=pb.COSINE)])
    )
    braid.client.upsert("c", docs(clustered(5, 0)))
    vector = clustered(1, 1)[0]
    for flt in (None, n_below(100)):  # the plain dense path and the general one say the same
        hnsw = request(vector, max_lists=4, flt=flt)
        hnsw.collection = "h"
        err = rpc_error(lambda q=hnsw: braid.stub.Search(q))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert 'queries[0].dense.max_lists: only fields with index "spann"' in err.details()
        hnsw = request(vector, eps=0.5, flt=flt)
        hnsw.collection = "h"
        assert "queries[0].dense.eps" in rpc_error(lambda q=hnsw: braid.stub.Search(q)).details()
        err = rpc_error(lambda f=flt: braid.stub.Search(request(vector, eps=-0.5, flt=f)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "queries[0].dense.eps" in err.details()
        err = rpc_error(lambda f=flt: braid.stub.Search(request(vector, max_lists=10**6, flt=f)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queries[0].dense.max_lists" in err.details()


# ----------------------------------------------------------- search, merges


@pytest.fixture(scope="module")
def sealed(tmp_path_factory):  # type: ignore[no-untyped-def]
    """A server with N vectors in sealed segments (seals start at 500 growing vectors)."""
    server, running = start_in_process(tmp_path_factory.mktemp("spann") / "d")
    vectors = clustered(N, 0)
    running.client.create_collection("c", spann_schema(merge_threshold=500))
    for start in range(0, N, 1000):
        running.client.upsert("c", docs(vectors[start : start + 1000], start))
    settle(running.client, strand(server))
    current = {f"d{i}": v for i, v in enumerate(vectors)}
    yield server, running, current
    stop_in_process(server, running)


def test_recall_and_per_query_knobs(sealed):
    server, running, current = sealed
    part = strand(server)
    assert part.sealed and live_rows(part) + part.growing.live == N and part.growing.live < 500
    queries = clustered(100, 99)
    expected = truth(current, queries, 10)
    default = recall(search_all(running.stub, queries), expected)
    assert default >= 0.9
    one_list = recall(search_all(running.stub, queries, max_lists=1), expected)
    no_slack = recall(search_all(running.stub, queries, eps=0.0), expected)
    everything = recall(search_all(running.stub, queries, max_lists=10_000, eps=100.0), expected)
    assert one_list <= default - 0.1, (one_list, default)
    assert no_slack <= default - 0.1, (no_slack, default)
    assert everything == 1.0
    # The general path (a filter every document passes) finds the same.
    general = [running.stub.Search(request(q, flt=n_below(10**9))) for q in queries[:20]]
    assert [[h.id for h in r.hits] for r in general] == [
        [h[0] for h in f] for f in search_all(running.stub, queries[:20])
    ]


def test_upserts_after_a_seal_are_found_in_the_growing_segment(sealed):
    server, running, current = sealed
    sealed_before = list(strand(server).sealed)
    fresh = clustered(200, 7)
    running.client.upsert("c", docs(fresh, 10_000))
    current.update({f"d{10_000 + i}": v for i, v in enumerate(fresh)})
    part = strand(server)
    assert part.sealed == sealed_before and part.growing.live >= 200  # no seal: 200 < 500
    hits = search_all(running.stub, fresh, limit=1)
    assert [h[0][0] for h in hits] == [f"d{10_000 + i}" for i in range(200)]
    assert all(abs(h[0][1] - 1.0) < 1e-4 for h in hits)


def test_filters_on_a_spann_field(sealed):
    _, running, current = sealed
    queries = clustered(30, 5)
    payload = {doc_id: int(doc_id[1:]) for doc_id in current}
    for flt, keep in (
        (n_below(2000), lambda d: payload[d] < 2000),  # broad: lists are scanned with the mask
        (n_mod(list(range(0, 3000, 7))), lambda d: payload[d] < 3000 and payload[d] % 7 == 0),  # selective: exact
    ):
        found = [[(h.id, h.score) for h in running.stub.Search(request(q, flt=flt)).hits] for q in queries]
        assert all(keep(h[0]) for f in found for h in f)
        assert recall(found, truth(current, queries, 10, keep)) >= 0.9


def test_merge_keeps_every_live_vector_and_drops_deleted_ones(tmp_path):
    server, running = start_in_process(tmp_path / "d")
    try:
        client = running.client
        client.create_collection("c", spann_schema(merge_threshold=1000))
        vectors = clustered(2000, 1)
        client.upsert("c", docs(vectors[:1600]))
        client.flush("c")
        part = strand(server)
        assert [s.count for s in part.sealed] == [1600] and part.growing.live == 0
        client.upsert("c", docs(vectors[1600:], 1600))  # 400 growing: below the merge threshold
        assert part.growing.live == 400 and [s.count for s in part.sealed] == [1600]
        current = {f"d{i}": v for i, v in enumerate(vectors)}
        deleted = [f"d{i}" for i in range(0, 2000, 9)]  # sealed and growing
        client.delete("c", ids=deleted)
        replaced = [i for i in range(1, 2000, 11) if i % 9]
        new = clustered(len(replaced), 2)
        client.upsert(
            "c", [{"id": f"d{i}", "dense": {"emb": v}, "payload": {"n": i}} for i, v in zip(replaced, new, strict=True)]
        )
        for doc_id in deleted:
            del current[doc_id]
        current.update({f"d{i}": v for i, v in zip(replaced, new, strict=True)})

        def check() -> None:
            # Every live vector is there (read every list), and nothing deleted or replaced comes back.
            found = search_all(running.stub, np.stack(list(current.values())), limit=1, max_lists=10_000, eps=100.0)
            assert [f[0][0] for f in found] == list(current)
            for query, hits in zip(vectors, search_all(running.stub, vectors, limit=10), strict=True):
                for doc_id, score in hits:  # never a deleted id; a replaced one scores as its new vector
                    assert doc_id in current
                    assert abs(score - float(current[doc_id] @ query)) < 1e-4

        check()
        first = part.sealed[0]
        client.upsert("c", docs(clustered(700, 3), 5000))  # past the threshold: a background seal starts
        current.update({f"d{5000 + i}": v for i, v in enumerate(clustered(700, 3))})
        settle(client, part)  # waits for it
        # A new segment of the growing vectors alone (none dead); the first keeps its
        # tombstones (under a quarter of its rows) and they are still never returned.
        assert len(part.sealed) == 2 and part.sealed[0] is first and part.growing.live == 0
        assert 0 < part.dead(first) < first.count // 4 and part.dead(part.sealed[1]) == 0
        assert live_rows(part) == len(current)
        check()
        stop_in_process(server, running)
        server, running = start_in_process(tmp_path / "d")
        part = strand(server)
        assert part.live == len(current)
        check()
    finally:
        stop_in_process(server, running)


def test_deletes_alone_start_a_merge_that_drops_them(tmp_path):
    server, running = start_in_process(tmp_path / "d")
    try:
        client = running.client
        client.create_collection("c", spann_schema(merge_threshold=300))
        vectors = clustered(1600, 4)
        client.upsert("c", docs(vectors))
        client.flush("c")
        part = strand(server)
        assert [s.count for s in part.sealed] == [1600]
        client.delete("c", ids=[f"d{i}" for i in range(500)])  # tombstones: more than a quarter of the rows
        settle(client, part)
        assert [s.count for s in part.sealed] == [1100] and part.dead(part.sealed[0]) == 0
        client.delete("c", filter=n_below(10**9))  # everything: the compaction leaves no sealed segment
        settle(client, part)
        assert part.sealed == [] and part.live == 0
        assert search_all(running.stub, vectors[:3]) == [[], [], []]
        client.upsert("c", docs(vectors[:5]))
        assert [f[0][0] for f in search_all(running.stub, vectors[:5], limit=1)] == [f"d{i}" for i in range(5)]
    finally:
        stop_in_process(server, running)


def test_a_failed_merge_gives_its_vectors_back(tmp_path, monkeypatch):
    from braid.index import spann_strand
    from braid.index.records import DocumentWrite
    from braid.index.schema import DenseFieldSpec, DenseIndexType, SpannParams
    from braid.index.shard import Shard

    def broken(*args: object, **kw: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(spann_strand.SpannSegment, "build", broken)
    spec = DenseFieldSpec("emb", DIM, index=DenseIndexType.SPANN, spann=SpannParams(merge_threshold=100))
    shard = Shard.open(tmp_path / "s", Schema(dense_fields=(spec,)), 0)
    vectors = clustered(150, 6)
    shard.upsert([DocumentWrite(id=f"d{i}", dense={"emb": v}) for i, v in enumerate(vectors)])
    shard.flush()  # waits for the failed merge
    part = shard.dense["emb"]
    assert isinstance(part, SpannStrand)
    assert part.sealed == [] and part.frozen is None and part.growing.live == 150
    assert not part.wants_merge()  # it waits for twice as many before trying again
    assert not list((tmp_path / "s" / "segments").glob("spann-*"))
    with shard.read():
        found = part.search(vectors, 1, 64)
    assert [int(f[0][0]) for f in found] == list(range(150))
    shard.close()


def test_shards_do_not_change_exhaustive_results(tmp_path):
    server, running = start_in_process(tmp_path / "d")
    try:
        running.client.create_collection("c", spann_schema(merge_threshold=200), shards=2)
        vectors = clustered(1200, 8)
        running.client.upsert("c", docs(vectors))
        running.client.flush("c")
        current = {f"d{i}": v for i, v in enumerate(vectors)}
        queries = clustered(20, 9)
        found = search_all(running.stub, queries, max_lists=10_000, eps=100.0)
        assert [{h[0] for h in f} for f in found] == truth(current, queries, 10)
    finally:
        stop_in_process(server, running)


def test_searches_and_gets_run_during_merges(tmp_path):
    server, running = start_in_process(tmp_path / "d")
    try:
        client = running.client
        client.create_collection("c", spann_schema(merge_threshold=300))
        probes = clustered(40, 11)
        client.upsert("c", docs(probes))
        part = strand(server)
        stop, seen, errors = threading.Event(), set(), []

        def searcher() -> None:
            while not stop.is_set():
                try:
                    hits = search_all(running.stub, probes, limit=1)
                    assert [h[0][0] for h in hits] == [f"d{i}" for i in range(40)]
                    got = client.get("c", ["d0", "d39"], include_vectors=True)
                    assert np.allclose(np.frombuffer(got[1].dense["emb"].packed, "<f4"), probes[39], atol=1e-5)
                except Exception as err:  # reported by the main thread
                    errors.append(err)
                    return
                seen.add((tuple(map(id, part.sealed)), part.frozen is not None))

        thread = threading.Thread(target=searcher)
        thread.start()
        for start in range(100, 4100, 250):
            client.upsert("c", docs(clustered(250, start), start))
        client.flush("c")
        stop.set()
        thread.join()
        assert not errors, errors[0]
        assert any(merging for _, merging in seen), "no search ran while a merge was building"
        assert len({segment for segment, _ in seen}) >= 3, "too few merges were published"
        assert part.sealed and part.live == 4040
    finally:
        stop_in_process(server, running)


def spann_shard(path: Path, merge_threshold: int):  # type: ignore[no-untyped-def]
    from braid.index.schema import DenseFieldSpec, DenseIndexType, SpannParams
    from braid.index.shard import Shard

    spec = DenseFieldSpec("emb", DIM, index=DenseIndexType.SPANN, spann=SpannParams(merge_threshold=merge_threshold))
    shard = Shard.open(path, Schema(dense_fields=(spec,)), 0)
    part = shard.dense["emb"]
    assert isinstance(part, SpannStrand)
    return shard, part


def shard_settle(shard, part: SpannStrand) -> None:  # type: ignore[no-untyped-def]
    shard.flush()
    while part._merging:
        shard.flush()


def test_tiered_seals_compactions_and_a_bounded_growing_segment(tmp_path):
    from braid.index.records import DocumentWrite
    from braid.index.spann_strand import TIER_FANOUT

    threshold, batch = 100, 60
    shard, part = spann_shard(tmp_path / "s", threshold)
    vectors = clustered(2400, 21)
    current = dict(enumerate(vectors))
    counts, growing_max = [], 0
    for start in range(0, len(vectors), batch):
        shard.upsert([DocumentWrite(id=f"d{i}", dense={"emb": vectors[i]}) for i in range(start, start + batch)])
        growing_max = max(growing_max, part.growing.live)
        shard.flush()  # publishes the running merge (the next may start, and freezes at once)
        counts.append(len(part.sealed))
    shard_settle(shard, part)
    # Seals cut the growing segment at the threshold: it never held more than one batch past it.
    assert growing_max <= threshold + batch, growing_max
    # Many seals of ~120 vectors, compacted by fours: 20 seals leave 2 segments (1920 + 480).
    assert max(counts) >= TIER_FANOUT and any(b < a for a, b in itertools.pairwise(counts)), counts
    assert 2 <= len(part.sealed) < TIER_FANOUT and live_rows(part) + part.growing.live == len(vectors)
    assert len({part._tier(s.count) for s in part.sealed}) == len(part.sealed)  # one per tier

    def check(shard, part: SpannStrand) -> None:  # type: ignore[no-untyped-def]
        labels = np.asarray([int(shard._ids[f"d{i}"]) for i in current])
        base = np.stack(list(current.values()))
        with shard.read():
            exact = part.search(base, 1, 64, max_lists=10_000, eps=100.0)
            assert [int(f[0][0]) for f in exact] == labels.tolist()  # every live vector, at max_lists high
            queries = clustered(100, 22)
            found = part.search(queries, 10, 64)
            assert part.vectors(labels[::97].tolist()) == pytest.approx(base[::97], abs=1e-5)
        alive = set(labels.tolist())
        assert all(int(label) in alive for f in found for label in f[0])
        order = np.argsort(-(queries @ base.T), axis=1, kind="stable")[:, :10]
        hits = [len(set(f[0].tolist()) & set(labels[o].tolist())) / 10 for f, o in zip(found, order, strict=True)]
        assert np.mean(hits) >= 0.9, np.mean(hits)

    check(shard, part)
    # Tombstones: delete 30% of the biggest segment's vectors; it is rebuilt without them.
    biggest = max(part.sealed, key=lambda s: s.count)
    doomed = [int(label) for label in biggest.labels()[::3]]
    by_label = {int(shard._ids[f"d{i}"]): i for i in current}
    shard.delete_ids([f"d{by_label[label]}" for label in doomed])
    for label in doomed:
        del current[by_label[label]]
    shard_settle(shard, part)
    assert biggest not in part.sealed and all(part.dead(s) == 0 for s in part.sealed)
    assert sum(s.count for s in part.sealed) + part.growing.live == len(current)
    check(shard, part)
    names = part.referenced()
    shard.close()
    assert {p.name for p in (tmp_path / "s" / "segments").glob("spann-*")} == names  # replaced ones deleted
    shard, part = spann_shard(tmp_path / "s", threshold)
    assert part.referenced() == names and part.live == len(current)
    check(shard, part)
    shard.close()


def test_format_1_strand_manifests_load(tmp_path):
    from braid.index.records import DocumentWrite

    shard, part = spann_shard(tmp_path / "s", 100)
    vectors = clustered(150, 23)
    shard.upsert([DocumentWrite(id=f"d{i}", dense={"emb": v}) for i, v in enumerate(vectors)])
    shard_settle(shard, part)
    extra = clustered(20, 24)
    shard.upsert([DocumentWrite(id=f"e{i}", dense={"emb": v}) for i, v in enumerate(extra)])
    d0 = shard._ids["d0"]
    shard.delete_ids(["d0"])
    shard.flush()
    (name,) = part.referenced()
    shard.close()
    manifest = json.loads((tmp_path / "s" / "MANIFEST.json").read_text())
    path = tmp_path / "s" / "segments" / str(manifest["generation"]) / "emb.strand.json"
    meta = json.loads(path.read_text())
    assert meta["format"] == 2 and meta["sealed"] == [name]
    path.write_text(json.dumps({"format": 1, "sealed": name, "growing": meta["growing"]}))
    # A format 1 strand manifest comes with a generation written before checksums: no CHECKSUMS,
    # and a format 1 shard manifest without its crc32.
    (path.parent / "CHECKSUMS").unlink()
    old = {key: value for key, value in manifest.items() if key not in ("crc32", "wal_crc32")}
    (tmp_path / "s" / "MANIFEST.json").write_text(json.dumps({**old, "format": 1}))
    shard, part = spann_shard(tmp_path / "s", 100)
    assert [s.directory.name for s in part.sealed] == [name] and part.dead(part.sealed[0]) == 1
    with shard.read():
        found = part.search(np.concatenate([vectors, extra]), 1, 64, max_lists=10_000, eps=100.0)
    expected = [f"d{i}" for i in range(1, 150)] + [f"e{i}" for i in range(20)]
    assert [int(f[0][0]) for f in found[1:]] == [shard._ids[i] for i in expected]
    assert int(found[0][0][0]) != d0 and not part.has(d0)  # deleted: never returned
    shard.close()


# ---------------------------------------------------------------- SIGKILL


def _merging(shard: Path) -> set[str]:
    """Segment directories the published manifest does not name: a merge is under way."""
    try:
        manifest = json.loads((shard / "MANIFEST.json").read_text())
        meta = json.loads((shard / "segments" / str(manifest["generation"]) / "emb.strand.json").read_text())
        named = meta["sealed"] if isinstance(meta["sealed"], list) else [meta["sealed"]]
        return {p.name for p in (shard / "segments").glob("spann-*") if p.name not in named}
    except (OSError, ValueError, KeyError):
        return set()


def test_sigkill_during_a_merge_loses_nothing_acknowledged(child_server, tmp_path):
    data = tmp_path / "data"
    shard = data / "collections" / "c" / "shard-000"
    server = child_server(data)
    server.client.create_collection("c", spann_schema(merge_threshold=300))
    acked: dict[str, np.ndarray] = {}  # acknowledged upserts still live
    gone: set[str] = set()  # acknowledged deletes
    rng = random.Random(0)
    hits_mid_merge = 0
    # Merges of a few thousand vectors take tens of ms, so a kill can miss one: go on
    # (up to 6 rounds) until at least two rounds ran and one kill landed mid-merge.
    for round_ in range(6):
        if round_ >= 2 and hits_mid_merge:
            break
        stop = threading.Event()

        def writer(client, first: int, stop: threading.Event) -> None:  # type: ignore[no-untyped-def]
            i = first
            while not stop.is_set():
                batch = clustered(100, i)
                doomed = [f"d{i - 100 + j}" for j in range(0, 100, 10) if f"d{i - 100 + j}" in acked]
                try:
                    client.upsert("c", docs(batch, i))
                    acked.update({f"d{i + j}": v for j, v in enumerate(batch)})
                    for doc_id in doomed:  # from here on, whether they exist is not known
                        del acked[doc_id]
                    if doomed:
                        client.delete("c", ids=doomed)
                except grpc.RpcError:
                    return
                gone.update(doomed)
                i += 100

        thread = threading.Thread(target=writer, args=(server.client, round_ * 1_000_000, stop))
        thread.start()
        deadline = time.time() + 15
        while time.time() < deadline and not (len(acked) > 1500 * (round_ + 1) and _merging(shard)):
            time.sleep(0.002)
        time.sleep(rng.random() * 0.005)
        server.kill()
        unfinished = _merging(shard)
        stop.set()
        thread.join(timeout=30)
        hits_mid_merge += bool(unfinished)

        server = child_server(data)
        # Writes cut off by the kill may or may not be there; every acknowledged one is.
        assert len(server.client.get("c", sorted(acked))) == len(acked)
        assert server.client.get("c", sorted(gone)) == []
        assert not unfinished & {p.name for p in (shard / "segments").iterdir()}, "unfinished merge left behind"
        ids = sorted(acked)
        queries = np.stack([acked[i] for i in ids])
        found = search_all(server.client.stub, queries, limit=1, max_lists=10_000, eps=100.0)
        assert [f[0][0] for f in found] == ids
        assert len(gone) > 10
    assert hits_mid_merge >= 1, "no kill landed during a merge"
    server.stop()
