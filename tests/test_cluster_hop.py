"""The router's hop (issue 21, item 5): how many calls a search through a router costs, and that
the hits stay standalone's whichever way the router takes.

One module-scoped cluster (1 NATS node, 2 shard servers with /metrics, 1 router) and a
standalone in-process server hold the same documents in three collections: ``whole``, 2
shards with replication factor 2 (each shard server holds a replica of every shard, so one
server answers a whole search: Shard/SearchCollection), ``split``, 2 shards with replication
factor 1 (no server holds both shards, so the router fans out per shard and merges), and
``one``, 1 shard. The shard servers' call counts (``braid_rpc_requests_total``) say which
calls each search made.
"""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.cluster.v1 import shard_pb2 as spb
from braid.index.gather import sparse_idf_of
from braid.service.client import BraidClient
from braid.service.cluster.local import LocalCluster
from braid.service.cluster.router import RemoteCatalog
from braid.service.config import ServerConfig
from braid.v1 import braid_pb2 as pb

from .conftest import Running, start_in_process, stop_in_process
from .test_cluster import (
    DIM,
    N_DOCS,
    SETTLE,
    SPARSE_TERMS,
    T,
    assert_same_batches,
    assert_same_hits,
    assert_same_searches,
    bm25_sub,
    dense_sub,
    make_docs,
    outcome,
    poll,
    query_sets,
    the_schema,
    upsert,
)

pytestmark = pytest.mark.timeout(180)

WHOLE, SPLIT, ONE = "whole", "split", "one"
SHARD_METHODS = ("Search", "SearchDense", "SearchCollection", "TextStats", "TermStats", "Fetch")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _calls(port: int) -> dict[str, float]:
    """braid.cluster.v1.Shard calls answered OK by one shard server, by method (from its /metrics)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = dict.fromkeys(SHARD_METHODS, 0.0)
    pattern = r"^braid_rpc_requests_total\{([^}]*)\} ([0-9.e+-]+)$"
    for labels, value in re.findall(pattern, text, re.MULTILINE):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        ours = found.get("service") == "braid.cluster.v1.Shard" and found.get("code") == "OK"
        if ours and found.get("method") in counts:
            counts[found["method"]] += float(value)
    return counts


class Hop:
    """The cluster, its shard servers' metrics ports, a client of its router."""

    def __init__(self, cluster: LocalCluster, ports: list[int], router: BraidClient) -> None:
        self.cluster = cluster
        self.ports = ports
        self.router = router

    def calls(self) -> dict[str, float]:
        """Shard calls answered so far, summed over both shard servers."""
        total = dict.fromkeys(SHARD_METHODS, 0.0)
        for port in self.ports:
            for method, count in _calls(port).items():
                total[method] += count
        return total

    def calls_during(self, run: object) -> dict[str, float]:
        before = self.calls()
        run()  # type: ignore[operator]
        after = self.calls()
        return {method: after[method] - before[method] for method in SHARD_METHODS}


@pytest.fixture(scope="module")
def hop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hop]:
    with LocalCluster(tmp_path_factory.mktemp("hop"), shard_servers=2, routers=1, nats_nodes=1) as cluster:
        ports = []
        for shard in cluster.shards:  # each its own /metrics port: restarted with it (no data yet)
            ports.append(_free_port())
            shard.command += ["--metrics-port", str(ports[-1])]
            shard.restart()
        with BraidClient(cluster.router_address, timeout=T) as router:
            yield Hop(cluster, ports, router)


@pytest.fixture(scope="module")
def standalone(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    server, running = start_in_process(tmp_path_factory.mktemp("standalone"))
    yield running
    stop_in_process(server, running)


@pytest.fixture(scope="module")
def loaded(hop: Hop, standalone: Running) -> Hop:
    docs = make_docs(N_DOCS, seed=1)
    for name, shards, factor in ((WHOLE, 2, 2), (SPLIT, 2, 1), (ONE, 1, 1)):
        info = hop.router.create_collection(name, the_schema(), shards=shards, replication_factor=factor)
        assert info.replication_factor == factor
        standalone.client.create_collection(name, the_schema(), shards=shards)
        assert upsert(hop.router.stub, name, docs) == upsert(standalone.stub, name, docs) == N_DOCS
    return hop


def _renamed(sets: dict[str, list[pb.SearchRequest]], name: str) -> dict[str, list[pb.SearchRequest]]:
    out: dict[str, list[pb.SearchRequest]] = {}
    for kind, requests in sets.items():
        out[kind] = []
        for request in requests:
            copy = pb.SearchRequest()
            copy.CopyFrom(request)
            copy.collection = name
            out[kind].append(copy)
    return out


def test_whole_searches_take_one_call_and_match_standalone(loaded: Hop, standalone: Running) -> None:
    """Each shard server holds every shard: every search, whatever its shape (plain dense, BM25
    with its DFS phase, sparse, hybrid, payload and text), is one SearchCollection call to one
    server, never a fan-out; and the hits are standalone's to the bit. (Before SearchCollection:
    two Search calls per search, plus two TextStats for BM25 and up to two Fetch for payload.)"""
    sets = query_sets(WHOLE)
    searches = sum(len(requests) for requests in sets.values())
    calls = loaded.calls_during(lambda: assert_same_searches(loaded.router.stub, standalone.stub, sets))
    assert calls == {**dict.fromkeys(SHARD_METHODS, 0.0), "SearchCollection": searches}, calls
    # Plain dense searches that take the worker path (STRONG consistency; a batch of one) too.
    strong = []
    for request in sets["dense"][:4]:
        copy = pb.SearchRequest()
        copy.CopyFrom(request)
        copy.consistency = pb.CONSISTENCY_STRONG
        strong.append(copy)

    def worker_path() -> None:
        for i, request in enumerate(strong):
            want = list(standalone.stub.Search(request, timeout=T).hits)
            assert_same_hits(list(loaded.router.stub.Search(request, timeout=T).hits), want, f"strong[{i}]")
            batch = pb.BatchSearchRequest(searches=[request])
            got = loaded.router.stub.BatchSearch(batch, timeout=T).results[0].hits
            assert_same_hits(list(got), want, f"batch of one [{i}]")

    calls = loaded.calls_during(worker_path)
    assert calls == {**dict.fromkeys(SHARD_METHODS, 0.0), "SearchCollection": 2 * len(strong)}, calls
    # Round robin over the live, unsuspected servers that hold every shard: both answer (a
    # server whose heartbeat lags on a loaded machine sits out meanwhile, so: within SETTLE).
    before = [_calls(port)["SearchCollection"] for port in loaded.ports]

    def both_answer() -> bool:
        loaded.router.stub.Search(sets["dense"][0], timeout=T)
        return all(_calls(port)["SearchCollection"] > was for port, was in zip(loaded.ports, before, strict=True))

    poll(both_answer, SETTLE, "both shard servers answer whole searches", every=0.01)


def test_one_shard_searches_take_one_call_and_match_standalone(loaded: Hop, standalone: Running) -> None:
    """A one-shard collection: its replica's server holds every shard, so each search is one
    SearchCollection call (plain BM25 ones run on the shard server's event loop, as standalone)."""
    sets = _renamed(query_sets(ONE, seed=3, per_kind=6), ONE)
    searches = sum(len(requests) for requests in sets.values())
    calls = loaded.calls_during(lambda: assert_same_searches(loaded.router.stub, standalone.stub, sets))
    assert calls == {**dict.fromkeys(SHARD_METHODS, 0.0), "SearchCollection": searches}, calls


def test_split_searches_fan_out_and_match_standalone(loaded: Hop, standalone: Running) -> None:
    """No server holds both shards: the router fans out per shard, merges and fetches, and the
    hits are still standalone's (searches and batches)."""
    sets = _renamed(query_sets(SPLIT, seed=11), SPLIT)
    calls = loaded.calls_during(lambda: assert_same_searches(loaded.router.stub, standalone.stub, sets))
    assert calls["SearchCollection"] == 0 and calls["Search"] > 0 and calls["SearchDense"] > 0, calls
    assert calls["TextStats"] > 0 and calls["Fetch"] > 0, calls  # BM25's DFS phase, payload and text
    assert_same_batches(loaded.router.stub, standalone.stub, sets)


def test_split_reads_scatter_over_remote_shards(loaded: Hop, tmp_path: Path) -> None:
    """A router's reads of a split collection, in process: index/collection.py's Scatter over one
    RemoteShard per shard. Its sparse IDF (what weights an inference-free sparse query by text;
    no RPC here reaches it without such an encoder) is the IDF of the documents loaded, to the
    bit, 0 for a term no document has; each shard's handle counts its own documents."""
    config = ServerConfig(data_dir=tmp_path / "router", role="router", nats=loaded.cluster.nats.url_list)
    catalog = RemoteCatalog(config)
    try:
        catalog.recover()
        collection = catalog.get(SPLIT)
        terms = list(range(SPARSE_TERMS + 1))  # the last one: in no document
        df = np.zeros(len(terms), np.int64)
        for doc in make_docs(N_DOCS, seed=1):
            df[list(doc.sparse["splade"].indices)] += 1
        want = sparse_idf_of(df, N_DOCS)
        got = collection.sparse_idf("splade", terms)
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes() and got[-1] == 0
        counts = [handle.count(None) for handle in collection.handles([0, 0])]
        assert sum(counts) == N_DOCS and min(counts) > 0, counts
    finally:
        catalog.close()


def _bad_plain_dense(collection: str) -> list[pb.SearchRequest]:
    """Plain dense searches by vector (the router's event-loop path), each refused by standalone."""
    q = np.ones(DIM, np.float32)

    def req(vector: pb.DenseVector | None = None, field: str = "emb", **kw: object) -> pb.SearchRequest:
        dense = pb.DenseQuery(field=field, vector=vector or pb.DenseVector(packed=q.tobytes()))
        for name in ("ef", "max_lists"):
            if name in kw:
                setattr(dense, name, kw.pop(name))
        return pb.SearchRequest(collection=collection, queries=[pb.SubQuery(dense=dense)], **kw)  # type: ignore[arg-type]

    return [
        req(field="nope"),
        req(pb.DenseVector(packed=np.ones(DIM + 1, np.float32).tobytes())),  # wrong dimension
        req(pb.DenseVector(packed=b"abc")),  # not float32s
        req(pb.DenseVector(packed=q.tobytes(), values=[1.0])),  # both
        req(pb.DenseVector(packed=np.full(DIM, np.inf, np.float32).tobytes())),
        req(pb.DenseVector(packed=np.full(DIM, 1e30, np.float32).tobytes())),  # scores would overflow
        req(limit=20_000),
        req(limit=20_000, field="nope"),  # two faults: the one standalone names first
        req(ef=1_000_000),
        req(pb.DenseVector(packed=b"abc"), ef=1_000_000),
        req(max_lists=3),  # an HNSW field has no lists
    ]


@pytest.mark.parametrize("collection", [WHOLE, SPLIT])
def test_bad_plain_dense_searches_answer_as_standalone(loaded: Hop, standalone: Running, collection: str) -> None:
    """A plain dense query the router hands whole to one server is checked there, as standalone
    checks it: the same code and message for every fault, and first the fault standalone names first."""
    stubs = (loaded.router.stub, standalone.stub)
    for i, request in enumerate(_bad_plain_dense(collection)):
        for consistency in (pb.CONSISTENCY_DEFAULT, pb.CONSISTENCY_STRONG):  # the event loop; a worker
            request.consistency = consistency
            got, want = (outcome(lambda s=s, r=request: [h.id for h in s.Search(r, timeout=T).hits]) for s in stubs)
            assert want[0] != "OK", f"search {i} should be refused: {request}"
            assert got == want, f"search {i} ({collection}, consistency {consistency}): {request}"


def test_bad_whole_searches_answer_as_standalone(loaded: Hop, standalone: Running) -> None:
    """Searches with nothing to encode run whole from the router's event loop: refused as standalone
    refuses them, the oversized query text first (standalone checks every text's size before the rest)."""
    q = np.ones(DIM, np.float32)
    huge = "apple " * 20_000  # past max_query_bytes (64 KiB)
    bad = [
        pb.SearchRequest(queries=[pb.SubQuery(bm25=pb.Bm25Query(text=huge))]),
        pb.SearchRequest(queries=[dense_sub(q), pb.SubQuery(bm25=pb.Bm25Query(text=huge))], limit=20_000),
        pb.SearchRequest(
            queries=[pb.SubQuery(dense=pb.DenseQuery(field="nope", vector=dense_sub(q).dense.vector)), bm25_sub(huge)]
        ),
        pb.SearchRequest(queries=[dense_sub(q), bm25_sub("apple")], offset=-1 & 0xFFFFFFFF),
        pb.SearchRequest(queries=[dense_sub(q), bm25_sub("   ")]),
    ]
    stubs = (loaded.router.stub, standalone.stub)
    for i, request in enumerate(bad):
        request.collection = WHOLE
        got, want = (outcome(lambda s=s, r=request: [h.id for h in s.Search(r, timeout=T).hits]) for s in stubs)
        assert want[0] != "OK", f"search {i} should be refused"
        assert got == want, f"search {i}"


def test_search_collection_refuses_what_it_cannot_answer(loaded: Hop) -> None:
    """SearchCollection answers only for one replica of every shard, in order: otherwise
    INVALID_ARGUMENT naming ``replicas``; a replica the server does not hold is UNAVAILABLE."""
    uid = next(r.replica.uid for r in _status(loaded, 0).replicas if r.replica.collection == WHOLE)
    request = pb.SearchRequest(collection=WHOLE, queries=[dense_sub(np.ones(DIM, np.float32))], limit=5)

    def ref(shard: int, collection: str = WHOLE, of: str = uid) -> spb.ReplicaRef:
        return spb.ReplicaRef(collection=collection, uid=of, shard=shard)

    address = loaded.cluster.address_of(loaded.cluster.shards[0])
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(
            "/braid.cluster.v1.Shard/SearchCollection",
            request_serializer=spb.CollectionSearchRequest.SerializeToString,
            response_deserializer=pb.SearchResponse.FromString,
        )
        answer = call(
            spb.CollectionSearchRequest(replicas=[ref(0), ref(1)], min_seqs=[0, 0], request=request), timeout=T
        )
        assert len(answer.hits) == 5
        for replicas, min_seqs in (
            ([ref(0)], [0]),  # one shard of two
            ([ref(1), ref(0)], [0, 0]),  # out of order
            ([ref(0), ref(1)], [0]),  # a min_seq missing
            ([], []),
        ):
            message = spb.CollectionSearchRequest(replicas=replicas, min_seqs=min_seqs, request=request)
            with pytest.raises(grpc.RpcError) as info:
                call(message, timeout=T)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (replicas, info.value)
            assert "replicas" in (info.value.details() or ""), info.value.details()
        message = spb.CollectionSearchRequest(
            replicas=[ref(0, of="feedfacecafe"), ref(1, of="feedfacecafe")], min_seqs=[0, 0], request=request
        )
        with pytest.raises(grpc.RpcError) as info:
            call(message, timeout=T)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        for garbage in (b"\xff" * 32, bytes(range(256))):
            raw = channel.unary_unary("/braid.cluster.v1.Shard/SearchCollection")
            with pytest.raises(grpc.RpcError) as info:
                raw(garbage, timeout=T)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value


def _status(hop: Hop, i: int) -> spb.StatusResponse:
    with grpc.insecure_channel(hop.cluster.address_of(hop.cluster.shards[i])) as channel:
        status = channel.unary_unary(
            "/braid.cluster.v1.Shard/Status",
            request_serializer=spb.StatusRequest.SerializeToString,
            response_deserializer=spb.StatusResponse.FromString,
        )
        return status(spb.StatusRequest(), timeout=T)


def test_a_stopped_server_costs_no_search(loaded: Hop, standalone: Running) -> None:
    """Last (it stops shard server 0 for good): while the router still counts it live, the whole
    searches it would have answered fail over (to the other server, or the fan-out), and every
    search answers with standalone's hits."""
    loaded.cluster.shards[0].stop()
    sets = query_sets(WHOLE, seed=5, per_kind=4)
    for kind, requests in sets.items():
        for i, request in enumerate(requests):
            want = list(standalone.stub.Search(request, timeout=T).hits)
            got = list(loaded.router.stub.Search(request, timeout=T).hits)
            assert_same_hits(got, want, f"{kind}[{i}] with shard server 0 stopped")
