"""Cluster mode end to end: real ``nats-server``, shard servers and routers in child processes.

Everything runs on 127.0.0.1 (service/cluster/local.py's LocalCluster). One module-scoped
cluster (1 NATS node, 2 shard servers, 2 routers) serves the read-mostly tests and is compared
hit for hit with a standalone in-process server of the same shard count; the tests that kill
a router, NATS or a shard server build a cluster of their own.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.index.collection import shard_of
from braid.service.client import BraidClient, dense_vector
from braid.service.cluster.local import LocalCluster
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster  # noqa: F401

from .conftest import Running, rpc_error, schema, start_in_process, stop_in_process

pytestmark = pytest.mark.timeout(120)

DIM = 16
N_DOCS = 300
SPARSE_TERMS = 120
T = 30.0  # the deadline of every gRPC call unless a test says otherwise
# How long a router or replica may take to see what another one did (a logged write applied, a
# collection created): milliseconds when idle, seconds on a loaded 2-core machine. A bound, not a speed.
SETTLE = 30.0
_WORDS = (
    "apple banana cherry delta echo falcon garden harbor island jungle kettle lemon meadow "
    "nectar orbit pepper quartz river saddle timber umbrella violet walnut xenon yellow zephyr "
    "anchor breeze candle desert ember forest glacier hollow ivory jasper kernel lantern marble "
    "needle ocean pillar quiver raven silver thunder velvet willow amber bronze copper granite"
)
VOCAB = _WORDS.split()
TAGS = ("red", "green", "blue", "black", "white")
PAYLOAD = {"tag": pb.KEYWORD, "n": pb.INT, "x": pb.FLOAT}


def the_schema() -> pb.Schema:
    # ef_search above a shard's size: HNSW is exhaustive here, so standalone and cluster agree exactly.
    return schema(dim=DIM, payload=PAYLOAD, ef_construction=200, ef_search=400)


# ------------------------------------------------------------------ data


def make_docs(n: int, seed: int, prefix: str = "d", start: int = 0) -> list[pb.Document]:
    """``n`` deterministic documents: dense, two text fields, a sparse vector and a payload."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    docs = []
    for i in range(n):
        doc = pb.Document(
            id=f"{prefix}{start + i}",
            text={
                "title": " ".join(rng.choice(VOCAB, size=int(rng.integers(2, 5)))),
                "body": " ".join(rng.choice(VOCAB, size=int(rng.integers(6, 22)))),
            },
        )
        doc.dense["emb"].CopyFrom(dense_vector(vectors[i]))
        terms = np.sort(rng.choice(SPARSE_TERMS, size=6, replace=False))
        doc.sparse["splade"].CopyFrom(
            pb.SparseVector(indices=terms.tolist(), values=rng.uniform(0.05, 2.0, 6).astype(np.float32).tolist())
        )
        doc.payload["tag"].keyword = TAGS[int(rng.integers(len(TAGS)))]
        doc.payload["n"].int = int(rng.integers(0, 1000))
        if i % 7:  # every 7th document has no float: exists and range filters see the difference
            doc.payload["x"].float = float(np.round(rng.uniform(-1, 1), 4))
        docs.append(doc)
    return docs


def upsert(stub: Any, collection: str, docs: list[pb.Document], batch: int = 100, **kw: Any) -> int:
    total = 0
    for i in range(0, len(docs), batch):
        request = pb.UpsertRequest(collection=collection, documents=docs[i : i + batch], **kw)
        total += stub.Upsert(request, timeout=T).upserted
    return total


def match(field: str, **value: Any) -> pb.Condition:
    return pb.Condition(match=pb.Match(field=field, value=pb.Value(**value)))


def dense_sub(q: np.ndarray, **kw: Any) -> pb.SubQuery:
    return pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(q)), **kw)


def sparse_vec(indices: list[int], values: list[float]) -> pb.SparseVector:
    return pb.SparseVector(indices=indices, values=values)


def bm25_sub(text: str, **kw: Any) -> pb.SubQuery:
    return pb.SubQuery(bm25=pb.Bm25Query(text=text), **kw)


def sparse_sub(rng: np.random.Generator, **kw: Any) -> pb.SubQuery:
    terms = np.sort(rng.choice(SPARSE_TERMS, size=4, replace=False))
    vector = pb.SparseVector(indices=terms.tolist(), values=rng.uniform(0.1, 1.5, 4).astype(np.float32).tolist())
    return pb.SubQuery(sparse=pb.SparseQuery(field="splade", vector=vector), **kw)


def query_sets(collection: str, seed: int = 7, per_kind: int = 12) -> dict[str, list[pb.SearchRequest]]:
    """A dozen searches of each kind the comparison covers."""
    rng = np.random.default_rng(seed)
    rrf = pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60))

    def words() -> str:
        return " ".join(rng.choice(VOCAB, size=int(rng.integers(1, 4))))

    def req(**kw: Any) -> pb.SearchRequest:
        return pb.SearchRequest(collection=collection, **kw)

    def vec() -> np.ndarray:
        return rng.standard_normal(DIM).astype(np.float32)

    sets: dict[str, list[pb.SearchRequest]] = {k: [] for k in (
        "dense", "dense_filter", "bm25", "sparse", "hybrid", "rrf", "offset", "threshold", "payload_text", "explain",
    )}  # fmt: skip
    for _ in range(per_kind):
        tag = TAGS[int(rng.integers(len(TAGS)))]
        flt = pb.Filter(
            must=[pb.Condition(range=pb.Range(field="n", gte=pb.Value(int=int(rng.integers(0, 500)))))],
            should=[match("tag", keyword=tag), pb.Condition(exists=pb.Exists(field="x"))],
        )
        sets["dense"].append(req(queries=[dense_sub(vec())], limit=10))
        sets["dense_filter"].append(req(queries=[dense_sub(vec())], filter=flt, limit=15))
        sets["bm25"].append(req(queries=[bm25_sub(words())], limit=10))
        sets["sparse"].append(req(queries=[sparse_sub(rng)], limit=10))
        sets["hybrid"].append(req(queries=[dense_sub(vec()), bm25_sub(words())], limit=10))
        sets["rrf"].append(req(queries=[dense_sub(vec()), bm25_sub(words()), sparse_sub(rng)], fusion=rrf, limit=12))
        sets["offset"].append(req(queries=[dense_sub(vec()), bm25_sub(words())], limit=7, offset=5))
        sets["threshold"].append(req(queries=[dense_sub(vec())], limit=50, score_threshold=0.4))
        sets["payload_text"].append(
            req(
                queries=[dense_sub(vec()), sparse_sub(rng)],
                filter=pb.Filter(must_not=[match("tag", keyword=tag)]),
                include_payload=True,
                text_fields=["title", "body"],
                limit=8,
            )
        )
        sets["explain"].append(
            req(queries=[dense_sub(vec(), name="d"), bm25_sub(words(), name="b")], explain=True, limit=10)
        )
    return sets


# ------------------------------------------------------------------ comparisons


def same_floats(a: list[float], b: list[float]) -> bool:
    """Equal to the last bit as the wire's float32 (the README's promise), NaN equal to NaN."""
    return np.array_equal(np.array(a, np.float32), np.array(b, np.float32), equal_nan=True)


def assert_same_hits(got: list[pb.Hit], want: list[pb.Hit], where: str) -> None:
    assert [h.id for h in got] == [h.id for h in want], where
    assert same_floats([h.score for h in got], [h.score for h in want]), (
        f"{where}: scores {[h.score for h in got]} != {[h.score for h in want]}"
    )
    for a, b in zip(got, want, strict=True):
        assert dict(a.payload) == dict(b.payload), f"{where}: payload of {a.id}"
        assert dict(a.text) == dict(b.text), f"{where}: text of {a.id}"
        assert [(e.query, e.rank) for e in a.explain] == [(e.query, e.rank) for e in b.explain], where
        assert same_floats([e.score for e in a.explain], [e.score for e in b.explain]), (
            f"{where}: explain of {a.id}: {list(a.explain)} != {list(b.explain)}"
        )


def assert_same_searches(cluster: Any, standalone: Any, sets: dict[str, list[pb.SearchRequest]]) -> None:
    for kind, requests in sets.items():
        empty = 0
        for i, request in enumerate(requests):
            want = list(standalone.Search(request, timeout=T).hits)
            got = list(cluster.Search(request, timeout=T).hits)
            assert_same_hits(got, want, f"{kind}[{i}]")
            empty += not want
        assert empty < len(requests), f"{kind}: every search came back empty, the comparison proves nothing"


def assert_same_batches(cluster: Any, standalone: Any, sets: dict[str, list[pb.SearchRequest]]) -> None:
    plain = pb.BatchSearchRequest(searches=sets["dense"])
    mixed = pb.BatchSearchRequest(searches=[requests[i % 3] for i, requests in enumerate(sets.values())])
    # One filter for every search: one batched SearchDense per shard, the filter sent as the client did.
    filtered = pb.BatchSearchRequest(searches=sets["dense"])
    for search in filtered.searches:
        search.filter.CopyFrom(sets["dense_filter"][0].filter)
    for name, batch in (("plain", plain), ("mixed", mixed), ("filtered", filtered)):
        want = standalone.BatchSearch(batch, timeout=T).results
        got = cluster.BatchSearch(batch, timeout=T).results
        assert len(got) == len(want) == len(batch.searches)
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_same_hits(list(a.hits), list(b.hits), f"batch {name}[{i}]")


def assert_same_documents(cluster: Any, standalone: Any, collection: str, ids: list[str]) -> None:
    for include_vectors in (False, True):
        request = pb.GetRequest(collection=collection, ids=ids, include_vectors=include_vectors)
        want = list(standalone.Get(request, timeout=T).documents)
        got = list(cluster.Get(request, timeout=T).documents)
        assert [d.id for d in got] == [d.id for d in want]
        assert got == want, f"Get include_vectors={include_vectors}"


def assert_same_counts(cluster: Any, standalone: Any, collection: str) -> None:
    filters = [
        None,
        pb.Filter(must=[match("tag", keyword="red")]),
        pb.Filter(must=[pb.Condition(range=pb.Range(field="n", lt=pb.Value(int=300)))]),
        pb.Filter(must_not=[pb.Condition(exists=pb.Exists(field="x"))]),
    ]
    for flt in filters:
        request = pb.CountRequest(collection=collection)
        if flt is not None:
            request.filter.CopyFrom(flt)
        assert cluster.Count(request, timeout=T).count == standalone.Count(request, timeout=T).count, flt


def poll(condition: Callable[[], bool], timeout: float, what: str, every: float = 0.05) -> float:
    """Until ``condition()`` holds (exceptions count as not yet); the seconds it took."""
    began = time.monotonic()
    last: BaseException | None = None
    while True:
        try:
            if condition():
                return time.monotonic() - began
        except (grpc.RpcError, AssertionError) as err:
            last = err
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout} s (last error: {last!r})")
        time.sleep(every)


def details(err: grpc.RpcError) -> str:
    return err.details() or ""


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """1 NATS node, 2 shard servers, 2 routers (the second one for CONSISTENCY_STRONG across routers)."""
    with LocalCluster(tmp_path_factory.mktemp("cluster"), shard_servers=2, routers=2, nats_nodes=1) as built:
        yield built


@pytest.fixture(scope="module")
def router(cluster: LocalCluster) -> Iterator[BraidClient]:
    with BraidClient(cluster.router_addresses[0], timeout=T) as client:
        yield client


@pytest.fixture(scope="module")
def router_b(cluster: LocalCluster) -> Iterator[BraidClient]:
    with BraidClient(cluster.router_addresses[1], timeout=T) as client:
        yield client


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    server, running = start_in_process(tmp_path_factory.mktemp("standalone"))
    yield running
    stop_in_process(server, running)


@pytest.fixture(scope="module")
def loaded(router: BraidClient, standalone: Running) -> str:
    """The same documents in the cluster and in the standalone server, 2 shards each."""
    name = "docs"
    router.create_collection(name, the_schema(), shards=2)
    standalone.client.create_collection(name, the_schema(), shards=2)
    docs = make_docs(N_DOCS, seed=1)
    assert upsert(router.stub, name, docs) == upsert(standalone.stub, name, docs) == N_DOCS
    return name


# ------------------------------------------------------------------ 1. same hits as standalone


def test_searches_match_standalone(router: BraidClient, standalone: Running, loaded: str) -> None:
    assert router.count(loaded) == standalone.client.count(loaded) == N_DOCS
    sets = query_sets(loaded)
    assert_same_searches(router.stub, standalone.stub, sets)
    assert_same_batches(router.stub, standalone.stub, sets)
    # The comparison covers what it claims: payload, text and explain came back, the threshold cut.
    hits = router.stub.Search(sets["payload_text"][0], timeout=T).hits
    assert hits and all(set(h.text) == {"title", "body"} and "tag" in h.payload for h in hits)
    hits = router.stub.Search(sets["explain"][0], timeout=T).hits
    assert hits and all([e.query for e in h.explain] == ["d", "b"] for h in hits)
    sizes = [len(router.stub.Search(r, timeout=T).hits) for r in sets["threshold"]]
    assert min(sizes) > 0 and min(sizes) < 50, sizes
    assert [len(router.stub.Search(r, timeout=T).hits) for r in sets["offset"]] == [7] * len(sets["offset"])


def test_get_and_count_match_standalone(router: BraidClient, standalone: Running, loaded: str) -> None:
    ids = [f"d{i}" for i in range(0, N_DOCS, 3)] + ["missing", "d99999"] + ["d5", "d1"]
    assert_same_documents(router.stub, standalone.stub, loaded, ids)
    assert_same_counts(router.stub, standalone.stub, loaded)


def test_writes_then_searches_match_standalone(router: BraidClient, standalone: Running) -> None:
    name = "mutated"
    router.create_collection(name, the_schema(), shards=2)
    standalone.client.create_collection(name, the_schema(), shards=2)
    docs = make_docs(N_DOCS, seed=2)
    upsert(router.stub, name, docs)
    upsert(standalone.stub, name, docs)
    sets = query_sets(name, seed=11, per_kind=6)
    every_id = [d.id for d in docs]

    # Delete by ids: some exist, some never did, one is repeated.
    ids = [f"d{i}" for i in range(0, 60, 3)] + ["nope-1", "nope-2", "d0"]
    want = standalone.stub.Delete(pb.DeleteRequest(collection=name, ids=ids), timeout=T).deleted
    got = router.stub.Delete(pb.DeleteRequest(collection=name, ids=ids), timeout=T).deleted
    assert got == want == 20
    # Delete by filter.
    flt = pb.Filter(must=[match("tag", keyword="blue"), pb.Condition(range=pb.Range(field="n", lt=pb.Value(int=500)))])
    want = standalone.stub.Delete(pb.DeleteRequest(collection=name, filter=flt), timeout=T).deleted
    got = router.stub.Delete(pb.DeleteRequest(collection=name, filter=flt), timeout=T).deleted
    assert got == want > 0
    assert_same_counts(router.stub, standalone.stub, name)
    assert_same_documents(router.stub, standalone.stub, name, every_id)
    assert_same_searches(router.stub, standalone.stub, sets)

    # Upsert replacing existing ids (and bringing back some deleted ones).
    replacements = make_docs(80, seed=3, start=30)
    assert upsert(router.stub, name, replacements) == upsert(standalone.stub, name, replacements) == 80
    assert_same_counts(router.stub, standalone.stub, name)
    assert_same_documents(router.stub, standalone.stub, name, every_id)
    assert_same_searches(router.stub, standalone.stub, sets)
    assert_same_batches(router.stub, standalone.stub, sets)

    # BulkUpsert (a stream of batches) and Flush (a checkpoint on every replica), then equal again.
    more = make_docs(120, seed=4, start=1000)
    got = router.bulk_upsert(name, more, batch_size=50, timeout=T)
    want = standalone.client.bulk_upsert(name, more, batch_size=50, timeout=T)
    assert (got.upserted, got.batches) == (want.upserted, want.batches) == (120, 3)
    router.flush(name)
    standalone.client.flush(name)
    assert_same_counts(router.stub, standalone.stub, name)
    assert_same_documents(router.stub, standalone.stub, name, every_id + [d.id for d in more])
    assert_same_searches(router.stub, standalone.stub, sets)


def test_write_larger_than_a_log_message(router: BraidClient, standalone: Running) -> None:
    """One Upsert of ~10 MB into one shard: the router splits it over several NATS messages (8 MB max)."""
    name = "big"
    router.create_collection(name, the_schema(), shards=1)
    standalone.client.create_collection(name, the_schema(), shards=1)
    docs = make_docs(50, seed=21, prefix="big")
    rng = np.random.default_rng(22)
    for doc in docs:
        doc.text["body"] = " ".join(rng.choice(VOCAB, size=28_000))  # ~200 KB each
    request = pb.UpsertRequest(collection=name, documents=docs)
    assert request.ByteSize() > 9 << 20
    assert router.stub.Upsert(request, timeout=60).upserted == standalone.stub.Upsert(request, timeout=60).upserted
    assert router.count(name) == 50
    assert_same_documents(router.stub, standalone.stub, name, [d.id for d in docs])
    sets = {
        "bm25": query_sets(name, seed=23, per_kind=4)["bm25"],
        "hybrid": query_sets(name, seed=24, per_kind=4)["hybrid"],
    }
    assert_same_searches(router.stub, standalone.stub, sets)
    flt = pb.Filter(must=[match("tag", keyword="red")])
    request = pb.DeleteRequest(collection=name, filter=flt)
    assert router.stub.Delete(request, timeout=T).deleted == standalone.stub.Delete(request, timeout=T).deleted
    assert_same_counts(router.stub, standalone.stub, name)
    router.delete_collection(name)


# ------------------------------------------------------------------ 2. read-your-writes


def test_read_your_writes(router: BraidClient) -> None:
    name = "ryw"
    router.create_collection(name, the_schema(), shards=2)
    for r in range(20):
        docs = make_docs(5, seed=100 + r, prefix=f"r{r}-")
        for doc in docs:
            doc.payload["n"].int = 10_000 + r
        assert router.stub.Upsert(pb.UpsertRequest(collection=name, documents=docs), timeout=T).upserted == 5
        ids = [d.id for d in docs]
        # Right after the default (applied) ack: Get, a filtered search, a plain dense search and Count see them.
        assert [d.id for d in router.get(name, ids)] == ids, f"round {r}: Get"
        flt = pb.Filter(must=[match("n", int=10_000 + r)])
        hits = router.search(name, bm25=VOCAB[r], dense=("emb", np.ones(DIM)), filter=flt, limit=10)
        assert {h.id for h in hits} == set(ids), f"round {r}: filtered hybrid search"
        vector = np.frombuffer(docs[r % 5].dense["emb"].packed, "<f4")
        assert router.search(name, dense=("emb", vector), limit=1)[0].id == ids[r % 5], f"round {r}: dense"
        assert router.count(name, flt) == 5, f"round {r}: Count"
        # A delete acknowledged (default ack) is gone at once, with its count.
        assert router.delete(name, [ids[0]]) == 1, f"round {r}: Delete"
        assert [d.id for d in router.get(name, ids)] == ids[1:], f"round {r}: Get after delete"
        assert router.count(name, flt) == 4, f"round {r}: Count after delete"
        hits = router.search(name, bm25=VOCAB[r], dense=("emb", np.ones(DIM)), filter=flt, limit=10)
        assert {h.id for h in hits} == set(ids[1:]), f"round {r}: search after delete"
    assert router.count(name) == 80


def test_logged_ack_and_consistency(router: BraidClient, router_b: BraidClient) -> None:
    name = "logged"
    router.create_collection(name, the_schema(), shards=2)
    poll(lambda: router_b.count(name) == 0, SETTLE, "router b sees the new collection")
    logged = pb.WRITE_ACK_LOGGED
    for r in range(8):
        docs = make_docs(6, seed=200 + r, prefix=f"l{r}-")
        for doc in docs:
            doc.payload["n"].int = 20_000 + r
        ids = {d.id for d in docs}
        response = router.stub.Upsert(pb.UpsertRequest(collection=name, documents=docs, ack=logged), timeout=T)
        assert response.upserted == 6
        # STRONG through the other router (which acknowledged nothing) sees the logged write at once.
        strong = pb.SearchRequest(
            collection=name,
            queries=[dense_sub(np.ones(DIM, np.float32))],
            filter=pb.Filter(must=[match("n", int=20_000 + r)]),
            limit=20,
            consistency=pb.CONSISTENCY_STRONG,
        )
        assert {h.id for h in router_b.stub.Search(strong, timeout=T).hits} == ids, f"round {r}: STRONG"
        plain_strong = pb.SearchRequest(
            collection=name,
            queries=[dense_sub(np.frombuffer(docs[0].dense["emb"].packed, "<f4"))],
            limit=1,
            consistency=pb.CONSISTENCY_STRONG,
        )
        assert router_b.stub.Search(plain_strong, timeout=T).hits[0].id == docs[0].id, f"round {r}: plain STRONG"
        # With the default consistency, within a bounded wait through either router.
        poll(lambda ids=ids: {d.id for d in router.get(name, sorted(ids))} == ids, SETTLE, f"round {r}: Get")
        poll(lambda ids=ids: {d.id for d in router_b.get(name, sorted(ids))} == ids, SETTLE, f"round {r}: Get on b")
    # EVENTUAL answers (whatever the replica has) and converges.
    eventual = pb.SearchRequest(
        collection=name,
        queries=[dense_sub(np.ones(DIM, np.float32))],
        limit=100,
        consistency=pb.CONSISTENCY_EVENTUAL,
    )
    poll(lambda: len(router_b.stub.Search(eventual, timeout=T).hits) == 48, SETTLE, "EVENTUAL converges")
    # A logged-ack delete answers 0 deleted (unknown), and the documents go within a bounded wait.
    gone = [f"l0-{i}" for i in range(6)]
    response = router.stub.Delete(pb.DeleteRequest(collection=name, ids=gone, ack=logged), timeout=T)
    assert response.deleted == 0
    poll(lambda: router.get(name, gone) == [], SETTLE, "logged delete applied")
    poll(lambda: router_b.count(name) == 42, SETTLE, "count after the logged delete")
    # A STRONG search on the first router sees the delete too.
    strong_all = pb.SearchRequest(
        collection=name, queries=[dense_sub(np.ones(DIM, np.float32))], limit=100, consistency=pb.CONSISTENCY_STRONG
    )
    assert len(router.stub.Search(strong_all, timeout=T).hits) == 42


# ------------------------------------------------------------------ 3. metadata


def test_metadata_through_router(router: BraidClient, router_b: BraidClient) -> None:
    name = "meta"
    info = router.create_collection(name, the_schema(), shards=2)
    assert (info.name, info.shards, info.replication_factor, info.documents) == (name, 2, 2, 0)
    upsert(router.stub, name, make_docs(40, seed=4))
    info = router.get_collection(name)
    assert (info.shards, info.replication_factor, info.documents) == (2, 2, 40)
    assert info.schema == router.get_collection(name).schema
    assert [f.name for f in info.schema.payload_fields] == ["tag", "n", "x"]
    listed = {c.name: c for c in router.list_collections()}
    assert listed[name].documents == 40 and listed[name].replication_factor == 2 and listed[name].shards == 2
    names = [c.name for c in router.list_collections()]
    assert names == sorted(names)

    err = rpc_error(lambda: router.create_collection(name, the_schema(), shards=2))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and name in details(err)

    router.delete_collection(name)
    err = rpc_error(lambda: router.get_collection(name))
    assert err.code() == grpc.StatusCode.NOT_FOUND and name in details(err)
    assert name not in {c.name for c in router.list_collections()}
    err = rpc_error(lambda: router.delete_collection(name))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    poll(
        lambda: outcome(lambda: router_b.count(name))[0] == grpc.StatusCode.NOT_FOUND,
        SETTLE,
        "the other router sees the delete",
    )

    # The same name again: a new, empty collection (nothing of the old one comes back).
    info = router.create_collection(name, the_schema(), shards=2)
    assert info.documents == 0
    time.sleep(0.5)
    assert router.count(name) == 0
    assert router.get(name, [f"d{i}" for i in range(40)]) == []
    assert router.search(name, dense=("emb", np.ones(DIM)), limit=50) == []
    assert router.search(name, bm25=" ".join(VOCAB), limit=50) == []
    poll(lambda: router_b.get_collection(name).created_at == info.created_at, SETTLE, "the other router sees it again")
    assert router_b.count(name) == 0
    assert router_b.get(name, [f"d{i}" for i in range(40)]) == []
    upsert(router.stub, name, make_docs(3, seed=5, prefix="new"))
    assert router.count(name) == 3
    assert router.get_collection(name).documents == 3
    poll(lambda: router_b.count(name) == 3, SETTLE, "the other router sees the new documents")
    router.delete_collection(name)

    # The same name created through both routers at once: exactly one wins, the other is told so.
    def create(client: BraidClient) -> tuple:
        return outcome(lambda: client.create_collection("race", the_schema(), shards=2).name)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(create, (router, router_b)))
    assert sorted(r[0] for r in results if r[0] != "OK") == [grpc.StatusCode.ALREADY_EXISTS], results
    upsert(router.stub, "race", make_docs(5, seed=6))
    poll(lambda: router_b.count("race") == 5, SETTLE, "the raced collection serves through both routers")
    router.delete_collection("race")


# ------------------------------------------------------------------ 4. errors


def test_errors_have_clear_codes(router: BraidClient, standalone: Running, loaded: str) -> None:
    missing = "no-such-collection"
    for call in (
        lambda stub: stub.GetCollection(pb.GetCollectionRequest(name=missing), timeout=T),
        lambda stub: stub.DeleteCollection(pb.DeleteCollectionRequest(name=missing), timeout=T),
        lambda stub: stub.Upsert(pb.UpsertRequest(collection=missing, documents=make_docs(1, 0)), timeout=T),
        lambda stub: stub.Delete(pb.DeleteRequest(collection=missing, ids=["a"]), timeout=T),
        lambda stub: stub.Get(pb.GetRequest(collection=missing, ids=["a"]), timeout=T),
        lambda stub: stub.Count(pb.CountRequest(collection=missing), timeout=T),
        lambda stub: stub.Search(
            pb.SearchRequest(collection=missing, queries=[dense_sub(np.ones(DIM, np.float32))]), timeout=T
        ),
        lambda stub: stub.Search(pb.SearchRequest(collection=missing, queries=[bm25_sub("apple")]), timeout=T),
    ):
        err = rpc_error(lambda call=call: call(router.stub))
        assert err.code() == grpc.StatusCode.NOT_FOUND and missing in details(err), details(err)

    err = rpc_error(lambda: router.create_collection("rf3", the_schema(), shards=2, replication_factor=3))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "3" in details(err) and "2" in details(err) and "replication_factor" in details(err), details(err)
    assert rpc_error(lambda: router.get_collection("rf3")).code() == grpc.StatusCode.NOT_FOUND

    # A bad schema: the same code and message as standalone, naming the field.
    bad = the_schema()
    bad.dense_fields[0].metric = pb.METRIC_UNSPECIFIED
    errs = [rpc_error(lambda c=c: c.create_collection("badschema", bad)) for c in (router, standalone.client)]
    assert [e.code() for e in errs] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
    assert "metric" in details(errs[0]) and details(errs[0]) == details(errs[1])
    assert rpc_error(lambda: router.get_collection("badschema")).code() == grpc.StatusCode.NOT_FOUND

    # Vectors of the wrong dimension, in a document and in a query.
    doc = make_docs(1, seed=6)[0]
    doc.dense["emb"].CopyFrom(dense_vector(np.ones(DIM + 3)))
    for stub_call, names in (
        (lambda stub: stub.Upsert(pb.UpsertRequest(collection=loaded, documents=[doc]), timeout=T), "emb"),
        (
            lambda stub: stub.Search(pb.SearchRequest(collection=loaded, queries=[dense_sub(np.ones(5))]), timeout=T),
            "queries[0].dense.vector",
        ),
        (
            lambda stub: stub.Search(
                pb.SearchRequest(collection=loaded, queries=[bm25_sub("apple"), dense_sub(np.ones(5))]), timeout=T
            ),
            "queries[1].dense.vector",
        ),
    ):
        errs = [rpc_error(lambda s=s, c=stub_call: c(s)) for s in (router.stub, standalone.stub)]
        assert [e.code() for e in errs] == [grpc.StatusCode.INVALID_ARGUMENT] * 2
        assert names in details(errs[0]) and details(errs[0]) == details(errs[1]), details(errs[0])

    # An oversized limit: RESOURCE_EXHAUSTED, word for word as standalone.
    for request in (
        pb.SearchRequest(collection=loaded, queries=[dense_sub(np.ones(DIM))], limit=1_000_000),
        pb.SearchRequest(collection=loaded, queries=[dense_sub(np.ones(DIM)), bm25_sub("apple")], limit=1_000_000),
        pb.SearchRequest(collection=loaded, queries=[bm25_sub("apple")], limit=100, offset=1_000_000),
    ):
        errs = [rpc_error(lambda s=s, r=request: s.Search(r, timeout=T)) for s in (router.stub, standalone.stub)]
        assert [e.code() for e in errs] == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 2
        assert details(errs[0]) == details(errs[1])
    assert router.count(loaded) == N_DOCS  # nothing of the refused upsert was applied


def outcome(call: Callable[[], Any]) -> tuple:
    """("OK", answer) or (status code, details): for comparing a router with a standalone server."""
    try:
        return ("OK", call())
    except grpc.RpcError as err:
        return (err.code(), details(err))


def bad_searches(collection: str) -> list[pb.SearchRequest]:
    q = np.ones(DIM, np.float32)

    def req(**kw: Any) -> pb.SearchRequest:
        return pb.SearchRequest(collection=collection, **kw)

    return [
        req(),  # no strands
        req(queries=[dense_sub(q)] * 17),
        req(queries=[pb.SubQuery(dense=pb.DenseQuery(field="nope", vector=dense_vector(q)))]),
        req(queries=[pb.SubQuery(bm25=pb.Bm25Query(text="apple", fields=["nope"]))]),
        req(queries=[pb.SubQuery(sparse=pb.SparseQuery(field="nope", vector=sparse_vec([1], [1])))]),
        req(queries=[pb.SubQuery(sparse=pb.SparseQuery(field="splade", vector=sparse_vec([1, 2], [1])))]),
        req(queries=[dense_sub(q)], filter=pb.Filter(must=[match("no..pe", keyword="x")])),
        req(queries=[dense_sub(q)], filter=pb.Filter(must=[match("n", keyword="x")])),
        req(queries=[bm25_sub("apple")], filter=pb.Filter(must=[pb.Condition(range=pb.Range(field="tag"))])),
        req(queries=[dense_sub(q)], payload_fields=["nope"]),
        req(queries=[dense_sub(q)], text_fields=["nope"]),
        req(queries=[dense_sub(q, weight=-1.0), bm25_sub("apple")]),
        req(queries=[dense_sub(q), bm25_sub("apple")], limit=20_000),
        req(queries=[dense_sub(q, depth=1_000_000)]),
        req(queries=[dense_sub(np.full(DIM, np.nan, np.float32))]),
    ]


def test_bad_requests_answer_as_standalone(router: BraidClient, standalone: Running, loaded: str) -> None:
    """The router validates as a standalone collection does: same code, same message."""
    stubs = (router.stub, standalone.stub)
    for i, request in enumerate(bad_searches(loaded)):
        got, want = (outcome(lambda s=s, r=request: [h.id for h in s.Search(r, timeout=T).hits]) for s in stubs)
        assert want[0] != "OK", f"search {i} should be refused: {request}"
        assert got == want, f"search {i}: {request}"
    bad: list[tuple[str, Any]] = [
        ("Count", pb.CountRequest(collection=loaded, filter=pb.Filter(must=[match("no..pe", keyword="x")]))),
        ("Count", pb.CountRequest(collection=loaded, filter=pb.Filter(must=[match("tag", int=3)]))),
        ("Delete", pb.DeleteRequest(collection=loaded)),
        ("Delete", pb.DeleteRequest(collection=loaded, ids=["a"], filter=pb.Filter(must=[match("tag", keyword="x")]))),
        ("Delete", pb.DeleteRequest(collection=loaded, filter=pb.Filter(must=[match("no..pe", keyword="x")]))),
        ("Delete", pb.DeleteRequest(collection=loaded, ids=[""])),
        ("Get", pb.GetRequest(collection=loaded, ids=["x" * 600])),
    ]
    for docs in (
        [pb.Document(id="")],
        [pb.Document(id="p", payload={"n": pb.Value(keyword="x")})],
        [pb.Document(id="p", payload={"nope": pb.Value(int=1)})],
        [pb.Document(id="p", text={"nope": "x"})],
        [pb.Document(id="p", sparse={"splade": sparse_vec([1], [1, 2])})],
        [pb.Document(id="p", dense={"emb": pb.DenseVector(packed=b"abc")})],
    ):
        bad.append(("Upsert", pb.UpsertRequest(collection=loaded, documents=docs)))
    for method, request in bad:
        got, want = (outcome(lambda s=s, r=request, m=method: str(getattr(s, m)(r, timeout=T))) for s in stubs)
        assert want[0] != "OK", f"{method} should be refused: {request}"
        assert got == want, f"{method}: {request}"
    assert router.count(loaded) == standalone.client.count(loaded) == N_DOCS


def test_bad_batch_search_answers_as_standalone(router: BraidClient, standalone: Running, loaded: str) -> None:
    """A refused search inside a BatchSearch: the message says which one (``searches[i].``), as standalone."""
    stubs = (router.stub, standalone.stub)
    good = pb.SearchRequest(collection=loaded, queries=[bm25_sub("apple")])
    for i, request in enumerate(bad_searches(loaded)):
        batch = pb.BatchSearchRequest(searches=[good, request])
        got, want = (outcome(lambda s=s, b=batch: len(s.BatchSearch(b, timeout=T).results)) for s in stubs)
        assert want[0] != "OK" and "searches[1]" in want[1], f"batch {i}: {want}"
        assert got == want, f"batch {i}: {request}"


def test_repeated_ids_answer_as_standalone(router: BraidClient, standalone: Running) -> None:
    name = "repeats"
    router.create_collection(name, the_schema(), shards=2)
    standalone.client.create_collection(name, the_schema(), shards=2)
    docs = make_docs(10, seed=15)
    twice = [*docs, *make_docs(4, seed=16)]  # d0..d3 twice in one batch: the last one wins
    request = pb.UpsertRequest(collection=name, documents=twice)
    assert router.stub.Upsert(request, timeout=T).upserted == standalone.stub.Upsert(request, timeout=T).upserted
    ids = ["d0", "d0", "d3", "nope", "d3", "d9"]
    assert_same_documents(router.stub, standalone.stub, name, ids)
    assert_same_counts(router.stub, standalone.stub, name)
    request = pb.DeleteRequest(collection=name, ids=["d1", "d1", "d2", "zz"])
    assert router.stub.Delete(request, timeout=T).deleted == standalone.stub.Delete(request, timeout=T).deleted == 2


# ------------------------------------------------------------------ 5. garbage to the internal service


def test_a_fetch_waits_for_the_sequence_its_hits_were_ranked_at(cluster: LocalCluster, loaded: str) -> None:
    """A replica asked for hits another one ranked (that one failed) answers only once it applied
    as much of the log: never a hit without its payload. Beyond the deadline: UNAVAILABLE."""
    with grpc.insecure_channel(cluster.address_of(cluster.shards[0])) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        replica = next(
            r for r in stub.Status(spb.StatusRequest(), timeout=10).replicas if r.replica.collection == loaded
        )
        ranked = stub.Search(
            spb.ShardSearchRequest(
                replica=replica.replica,
                request=pb.SearchRequest(collection=loaded, queries=[dense_sub(np.ones(DIM, np.float32))], limit=3),
            ),
            timeout=10,
        ).strands[0]
        fetch = spb.FetchRequest(replica=replica.replica, labels=ranked.labels, ids=ranked.ids, include_payload=True)
        fetch.min_seq = replica.applied_seq
        hits = stub.Fetch(fetch, timeout=10).hits
        assert [h.id for h in hits] == list(ranked.ids) and all(h.payload for h in hits)
        fetch.min_seq = replica.applied_seq + 10**6  # a sequence it has not applied
        with pytest.raises(grpc.RpcError) as info:
            stub.Fetch(fetch, timeout=1.5)
        assert info.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), info.value
        assert info.value.code() != grpc.StatusCode.UNAVAILABLE or "did not catch up" in details(info.value)


def test_shard_service_refuses_garbage(cluster: LocalCluster, router: BraidClient, loaded: str) -> None:
    address = cluster.address_of(cluster.shards[0])
    with grpc.insecure_channel(address) as channel:
        for method in ("Search", "SearchDense", "Fetch", "Get", "Count", "TermStats", "WaitApplied", "Flush"):
            raw = channel.unary_unary(
                f"/braid.cluster.v1.Shard/{method}", request_serializer=None, response_deserializer=None
            )
            for garbage in (b"\xff" * 32, b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256))):
                with pytest.raises(grpc.RpcError) as info:
                    raw(garbage, timeout=10)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, garbage, info.value)

        search = channel.unary_unary(
            "/braid.cluster.v1.Shard/Search",
            request_serializer=spb.ShardSearchRequest.SerializeToString,
            response_deserializer=spb.ShardSearchResponse.FromString,
        )
        request = spb.ShardSearchRequest(
            replica=spb.ReplicaRef(collection=loaded, uid="feedfacecafe", shard=1),
            request=pb.SearchRequest(collection=loaded, queries=[dense_sub(np.ones(DIM, np.float32))]),
        )
        with pytest.raises(grpc.RpcError) as info:
            search(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shard 1" in details(info.value) and loaded in details(info.value), details(info.value)

        # This very server still answers good requests: its status, and a search on each of its replicas.
        status = channel.unary_unary(
            "/braid.cluster.v1.Shard/Status",
            request_serializer=spb.StatusRequest.SerializeToString,
            response_deserializer=spb.StatusResponse.FromString,
        )(spb.StatusRequest(), timeout=10)
        assert status.node_id == cluster.shards[0].name
        mine = [r for r in status.replicas if r.replica.collection == loaded]
        assert {r.replica.shard for r in mine} == {0, 1}  # replication factor 2 on 2 servers: both shards here
        assert sum(r.documents for r in mine) == N_DOCS and all(r.caught_up and not r.problem for r in mine)
        for replica in mine:
            request = spb.ShardSearchRequest(
                replica=replica.replica,
                request=pb.SearchRequest(collection=loaded, queries=[dense_sub(np.ones(DIM, np.float32))], limit=5),
            )
            response = search(request, timeout=10)
            assert len(response.strands) == 1 and len(response.strands[0].ids) == 5
    with grpc.insecure_channel(cluster.router_addresses[0]) as channel:
        for method in ("Search", "Upsert", "Get", "CreateCollection"):
            raw = channel.unary_unary(f"/braid.v1.Braid/{method}", request_serializer=None, response_deserializer=None)
            with pytest.raises(grpc.RpcError) as info:
                raw(b"\xff" * 32, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
    # The shard server still serves: searches through the router (which reach both shard servers) work.
    assert cluster.shards[0].alive
    for _ in range(4):
        assert len(router.search(loaded, dense=("emb", np.ones(DIM)), bm25="apple", limit=10)) == 10
    assert router.count(loaded) == N_DOCS


# ------------------------------------------------------------------ 6. router restarts


def _snapshot(client: BraidClient, name: str, ids: list[str]) -> tuple:
    hits = [
        [(h.id, h.score) for h in client.search(name, dense=("emb", q), bm25=w, limit=10)]
        for q, w in zip(np.eye(DIM, dtype=np.float32)[:6], VOCAB[:6], strict=True)
    ]
    return client.count(name), [d.id for d in client.get(name, ids)], hits


def test_router_restart_loses_nothing(local_cluster: Callable[..., LocalCluster]) -> None:  # noqa: F811
    built = local_cluster(shard_servers=2, routers=1)
    docs = make_docs(150, seed=8)
    ids = [d.id for d in docs]
    with BraidClient(built.router_address, timeout=T) as client:
        client.create_collection("kept", the_schema(), shards=2)
        upsert(client.stub, "kept", docs, batch=50)

    router = built.routers[0]
    for how in ("SIGTERM", "SIGKILL"):
        with BraidClient(built.router_address, timeout=T) as client:
            # (taken again each round: the upsert and delete below change BM25 statistics)
            before = _snapshot(client, "kept", ids)
        assert before[0] == 150 and before[1] == ids
        if how == "SIGTERM":
            router.restart()
        else:
            router.kill()
            router.start()
            router.wait_ready()
        with BraidClient(built.router_address, timeout=T) as client:
            assert _snapshot(client, "kept", ids) == before, how
            assert client.get_collection("kept").documents == 150
            assert [c.name for c in client.list_collections()] == ["kept"]
            # ...and it still writes, with read-your-writes.
            extra = make_docs(2, seed=9, prefix=f"after-{how}-")
            upsert(client.stub, "kept", extra)
            assert len(client.get("kept", [d.id for d in extra])) == 2
            client.delete("kept", [d.id for d in extra])
            assert client.count("kept") == 150


# ------------------------------------------------------------------ 7. NATS unreachable


def test_nats_unreachable_refuses_writes_and_serves_reads(local_cluster: Callable[..., LocalCluster]) -> None:  # noqa: F811
    built = local_cluster(shard_servers=2, routers=1)
    assert built.nats is not None
    docs = make_docs(60, seed=10)
    ids = [d.id for d in docs]
    with BraidClient(built.router_address, timeout=T) as client:
        client.create_collection("n", the_schema(), shards=2)
        upsert(client.stub, "n", docs)
        before = [h.id for h in client.search("n", dense=("emb", np.ones(DIM)), bm25="apple banana", limit=10)]

        built.nats.nodes[0].kill()
        began = time.monotonic()
        err = rpc_error(
            lambda: client.stub.Upsert(pb.UpsertRequest(collection="n", documents=make_docs(1, seed=11)), timeout=8)
        )
        assert time.monotonic() - began < 9
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "NATS" in details(err), (err.code(), details(err))
        err = rpc_error(lambda: client.stub.Delete(pb.DeleteRequest(collection="n", ids=ids[:2]), timeout=8))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "NATS" in details(err), (err.code(), details(err))

        # Collection metadata still answers, saying why writes are refused; changing it is refused.
        info = client.stub.GetCollection(pb.GetCollectionRequest(name="n"), timeout=T)
        assert info.documents == 60 and "NATS" in info.write_problem, info
        listed = client.stub.ListCollections(pb.ListCollectionsRequest(), timeout=T).collections
        assert [c.name for c in listed] == ["n"]
        for call in (
            lambda: client.stub.CreateCollection(pb.CreateCollectionRequest(name="n2", schema=the_schema()), timeout=8),
            lambda: client.stub.DeleteCollection(pb.DeleteCollectionRequest(name="n"), timeout=8),
        ):
            began = time.monotonic()
            err = rpc_error(call)
            assert time.monotonic() - began < 9
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "NATS" in details(err), (err.code(), details(err))

        # STRONG needs the log's last sequences: refused in bounded time, naming NATS.
        strong = pb.SearchRequest(
            collection="n", queries=[dense_sub(np.ones(DIM, np.float32))], consistency=pb.CONSISTENCY_STRONG
        )
        began = time.monotonic()
        err = rpc_error(lambda: client.stub.Search(strong, timeout=8))
        assert time.monotonic() - began < 9
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "NATS" in details(err), (err.code(), details(err))

        # Reads keep working, for longer than a node's heartbeat TTL. (The deadline is T: a read
        # takes milliseconds here, but on a loaded machine a stall of seconds is no failure of Braid.)
        deadline = time.monotonic() + 7
        reads = 0
        while time.monotonic() < deadline or reads < 5:
            hits = client.search("n", dense=("emb", np.ones(DIM)), bm25="apple banana", limit=10, timeout=T)
            assert [h.id for h in hits] == before
            assert [d.id for d in client.stub.Get(pb.GetRequest(collection="n", ids=ids), timeout=T).documents] == ids
            assert client.stub.Count(pb.CountRequest(collection="n"), timeout=T).count == 60
            reads += 1
            time.sleep(0.5)

        built.nats.nodes[0].restart()
        more = make_docs(3, seed=12, prefix="back")
        poll(
            lambda: client.stub.Upsert(pb.UpsertRequest(collection="n", documents=more), timeout=10).upserted == 3,
            60,
            "writes after NATS came back",
            every=0.5,
        )
        assert len(client.get("n", [d.id for d in more])) == 3
        assert client.count("n") == 63
        assert client.get_collection("n").write_problem == ""
        # The cluster's watches resumed: a collection created now is placed, opened and served.
        client.create_collection("n2", the_schema(), shards=2)
        upsert(client.stub, "n2", docs[:20])
        assert client.count("n2") == 20
        assert len(client.search("n2", dense=("emb", np.ones(DIM)), bm25="apple", limit=5)) == 5
        client.delete_collection("n2")
        assert rpc_error(lambda: client.get_collection("n2")).code() == grpc.StatusCode.NOT_FOUND


# ------------------------------------------------------------------ 8. no live replica


async def _placement(urls: list[str], name: str) -> list[list[str]]:
    import nats

    nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=1)
    try:
        kv = await nc.jetstream().key_value("braid-collections")
        entry = await kv.get(name)
        return json.loads(entry.value)["placement"]
    finally:
        await nc.close()


def test_no_live_replica_is_unavailable_naming_the_shard(local_cluster: Callable[..., LocalCluster]) -> None:  # noqa: F811
    built = local_cluster(shard_servers=2, routers=1)
    assert built.nats is not None
    docs = make_docs(80, seed=13)
    ids = [d.id for d in docs]
    name = "single"
    with BraidClient(built.router_address, timeout=T) as client:
        info = client.create_collection(name, the_schema(), shards=2, replication_factor=1)
        assert info.replication_factor == 1
        upsert(client.stub, name, docs[:50])
        client.create_collection("double", the_schema(), shards=2)  # replication factor 2: survives
        upsert(client.stub, "double", docs[:50])
        client.flush(name)
        client.flush("double")  # a checkpoint, then more log: the restart loads one and replays the rest
        upsert(client.stub, "double", docs[50:])
        upsert(client.stub, name, docs[50:])
        before = [(h.id, h.score) for h in client.search(name, dense=("emb", np.ones(DIM)), limit=20)]

        placement = asyncio.run(asyncio.wait_for(_placement(built.nats.urls, name), 10))
        assert len(placement) == 2 and all(len(nodes) == 1 for nodes in placement)
        victim = next(child for child in built.shards if child.name == placement[0][0])
        victim.kill()

        for request in (
            pb.SearchRequest(collection=name, queries=[dense_sub(np.ones(DIM))]),
            pb.SearchRequest(collection=name, queries=[dense_sub(np.ones(DIM)), bm25_sub("apple")]),
        ):
            # Answered at once (0.1 s measured), not after waiting out the deadline for a replica.
            began = time.monotonic()
            err = rpc_error(lambda r=request: client.stub.Search(r, timeout=T))
            assert time.monotonic() - began < T / 3
            assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), details(err))
            assert name in details(err) and "shard 0" in details(err), details(err)
        # Documents of the other shard are still readable by id; Count needs every shard.
        on_shard_1 = [doc_id for doc_id in ids if shard_of(doc_id, 2) == 1]
        got = client.stub.Get(pb.GetRequest(collection=name, ids=on_shard_1), timeout=T).documents
        assert [d.id for d in got] == on_shard_1
        err = rpc_error(lambda: client.stub.Count(pb.CountRequest(collection=name), timeout=T))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "shard 0" in details(err), details(err)
        # The collection is still listed, saying what is wrong.
        info = client.stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=10)
        assert "shard 0" in info.write_problem, info
        assert {c.name for c in client.stub.ListCollections(pb.ListCollectionsRequest(), timeout=10).collections} == {
            name,
            "double",
        }
        # With two replicas of every shard, reads and writes go on on the surviving server.
        for _ in range(4):
            hits = client.stub.Search(
                pb.SearchRequest(collection="double", queries=[dense_sub(np.ones(DIM)), bm25_sub("apple")]), timeout=T
            ).hits
            assert len(hits) == 10
            assert client.stub.Count(pb.CountRequest(collection="double"), timeout=T).count == 80
        upsert(client.stub, "double", make_docs(2, seed=14, prefix="while-down-"))
        assert client.stub.Count(pb.CountRequest(collection="double"), timeout=T).count == 82

        victim.start()
        victim.wait_ready()
        poll(
            lambda: client.stub.Count(pb.CountRequest(collection=name), timeout=10).count == 80,
            SETTLE,
            "the restarted shard server serves again",
            every=0.2,
        )
        assert [d.id for d in client.get(name, ids)] == ids
        after = [(h.id, h.score) for h in client.search(name, dense=("emb", np.ones(DIM)), limit=20)]
        assert after == before
        upsert(client.stub, name, make_docs(2, seed=14, prefix="late"))
        assert client.count(name) == 82
        # The restarted server caught up with what "double" took while it was down: STRONG reads
        # answer 82 whichever replica is asked.
        strong = pb.SearchRequest(
            collection="double", queries=[dense_sub(np.ones(DIM))], limit=200, consistency=pb.CONSISTENCY_STRONG
        )
        for _ in range(6):
            assert len(client.stub.Search(strong, timeout=T).hits) == 82
