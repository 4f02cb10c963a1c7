"""Collection aliases: every RPC through an alias, their errors, the atomic swap under load,
durability (kill -9, a flipped byte in aliases.json), API keys, and cluster mode."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from braid.index.aliases import FILE_NAME, AliasTable
from braid.index.errors import AlreadyExists, NotFound
from braid.service.auth import hash_key, write_keys_file
from braid.service.client import BraidClient, dense_vector
from braid.service.cluster.local import LocalCluster
from braid.service.cluster.meta import COLLECTIONS_BUCKET, CollectionMeta
from braid.service.cluster.natsproc import NatsCluster
from braid.service.cluster.router import RemoteCatalog
from braid.service.config import ServerConfig
from braid.service.convert import schema_from_proto
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster, nats1  # noqa: F401

from .conftest import Running, rpc_error, schema, start_in_process, stop_in_process

pytestmark = pytest.mark.timeout(120)

DIM = 8
N = 40  # documents per version


def the_schema() -> pb.Schema:
    return schema(dim=DIM, payload={"version": pb.KEYWORD, "n": pb.INT})


def version_docs(version: str, n: int = N) -> list[dict]:
    """Documents of one version: ids ``<version>-<i>``, payload ``version``, the same vectors
    and words in every version (so each search has hits in both)."""
    rng = np.random.default_rng(0)
    return [
        {
            "id": f"{version}-{i}",
            "text": {"title": f"doc {i}", "body": f"common word{i % 7} shared text"},
            "dense": {"emb": rng.standard_normal(DIM).astype(np.float32)},
            "sparse": {"splade": {f"t{i % 5}": 1.0}},
            "payload": {"version": version, "n": i},
        }
        for i in range(n)
    ]


def build(client: BraidClient, name: str, version: str, shards: int = 1) -> None:
    client.create_collection(name, the_schema(), shards=shards)
    client.upsert(name, version_docs(version))


def versions(hits: Any) -> set[str]:
    return {hit.id.split("-")[0] for hit in hits}


def check(call: Callable[[], Any], code: grpc.StatusCode, *words: str) -> str:
    """The call fails with ``code``, its message holding every one of ``words``."""
    err = rpc_error(call)
    details = err.details() or ""
    assert err.code() == code, (err.code(), details)
    for word in words:
        assert word in details, (word, details)
    return details


@pytest.fixture
def braid2(tmp_path: Path) -> Iterator[Running]:
    """A server with collections v1 and v2 (same documents, ids and payload ``version`` differ)."""
    server, running = start_in_process(tmp_path / "data")
    build(running.client, "v1", "v1")
    build(running.client, "v2", "v2", shards=2)
    yield running
    stop_in_process(server, running)


# ------------------------------------------------------------------ every RPC


def test_every_rpc_resolves_an_alias(braid2: Running) -> None:
    client, stub = braid2.client, braid2.stub
    assert client.create_alias("articles", "v1") == pb.Alias(name="articles", collection="v1")
    assert client.list_aliases() == [pb.Alias(name="articles", collection="v1")]

    info = client.get_collection("articles")
    assert (info.name, list(info.aliases), info.documents) == ("v1", ["articles"], N)
    listed = {c.name: list(c.aliases) for c in client.list_collections()}
    assert listed == {"v1": ["articles"], "v2": []}

    q = version_docs("v1")[3]["dense"]["emb"]
    assert versions(client.search("articles", dense=("emb", q), limit=5)) == {"v1"}  # the plain dense path
    hits = client.search("articles", dense=("emb", q), bm25="common", include_payload=True, limit=5)
    assert versions(hits) == {"v1"} and {h.payload["version"].keyword for h in hits} == {"v1"}
    plain = pb.SearchRequest(
        collection="articles", queries=[pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=dense_vector(q)))]
    )
    hybrid = pb.SearchRequest(collection="articles", queries=[pb.SubQuery(bm25=pb.Bm25Query(text="word3"))])
    for batch in ([plain, plain], [plain, hybrid]):  # the batched dense path, then one search at a time
        assert [versions(r.hits) for r in client.batch_search(batch)] == [{"v1"}] * 2
    assert client.count("articles") == N
    assert [d.id for d in client.get("articles", ["v1-1", "v2-1"])] == ["v1-1"]

    client.upsert("articles", [{"id": "v1-new", "text": {"body": "fresh"}, "payload": {"version": "v1"}}])
    response = client.bulk_upsert("articles", [{"id": f"v1-bulk{i}", "payload": {"version": "v1"}} for i in range(3)])
    assert response.upserted == 3
    acks = list(stub.UpsertStream(iter([pb.UpsertRequest(collection="articles", documents=[pb.Document(id="v1-s")])])))
    assert [ack.upserted for ack in acks] == [1]
    assert client.count("v1") == N + 5 and client.count("v2") == N
    assert client.delete("articles", ["v1-new", "v1-bulk0"]) == 2
    assert client.delete("articles", filter=pb.Filter(must=[_match("n", 39)])) == 1
    client.flush("articles")
    assert client.count("v1") == N + 2

    assert client.update_alias("articles", "v2") == pb.Alias(name="articles", collection="v2")
    assert versions(client.search("articles", dense=("emb", q), limit=5)) == {"v2"}
    assert list(client.get_collection("v2").aliases) == ["articles"] and not client.get_collection("v1").aliases
    client.delete_alias("articles")
    assert client.list_aliases() == [] and client.count("v2") == N  # the collection stays
    check(lambda: client.count("articles"), grpc.StatusCode.NOT_FOUND, "articles")


def _match(field: str, n: int) -> pb.Condition:
    return pb.Condition(match=pb.Match(field=field, value=pb.Value(int=n)))


def test_alias_errors_name_the_field(braid2: Running) -> None:
    client = braid2.client
    client.create_alias("articles", "v1")
    ALREADY, MISSING, INVALID, PRECONDITION = (
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    check(lambda: client.create_alias("articles", "v2"), ALREADY, "name:", "'articles'", "UpdateAlias")
    check(lambda: client.create_alias("v2", "v1"), ALREADY, "name:", "'v2' is a collection")
    check(lambda: client.create_alias("other", "nope"), MISSING, "collection:", "'nope'")
    check(lambda: client.create_alias("other", "articles"), INVALID, "collection:", "'articles' is an alias")
    check(lambda: client.create_alias("Bad Name", "v1"), INVALID, "name:", "[a-z0-9_-]{1,64}")
    check(lambda: client.create_alias("other", "x" * 65), INVALID, "collection:")
    check(lambda: client.create_alias("", "v1"), INVALID, "name:")
    check(lambda: client.update_alias("nope", "v2"), MISSING, "name:", "'nope'")
    check(lambda: client.update_alias("v1", "v2"), MISSING, "name:", "'v1' is a collection")
    check(lambda: client.update_alias("articles", "nope"), MISSING, "collection:", "'nope'")
    check(lambda: client.update_alias("articles", "articles"), INVALID, "collection:", "is an alias")
    check(lambda: client.delete_alias("nope"), MISSING, "name:", "'nope'")
    check(lambda: client.delete_alias("v1"), MISSING, "name:", "'v1' is a collection")
    check(lambda: client.create_collection("articles", the_schema()), ALREADY, "name:", "'articles'", "alias")
    check(lambda: client.delete_collection("v1"), PRECONDITION, "name:", "'v1'", "articles")
    check(lambda: client.delete_collection("articles"), PRECONDITION, "name:", "'articles' is an alias of 'v1'")
    assert client.count("v1") == N and client.list_aliases() == [pb.Alias(name="articles", collection="v1")]
    # Once its aliases moved away, the collection deletes.
    client.update_alias("articles", "v2")
    client.delete_collection("v1")
    assert [c.name for c in client.list_collections()] == ["v2"]


# ------------------------------------------------------------------ the swap


def test_swap_under_searches_never_mixes_versions(braid2: Running) -> None:
    """Searches and BatchSearches through ``articles`` while it swaps v1 <-> v2: none fails, and
    every single search answers from one version (the issue's zero-downtime reindex)."""
    client = braid2.client
    client.create_alias("articles", "v1")
    docs = version_docs("v1")
    stop = threading.Event()
    seen: set[str] = set()
    failures: list[str] = []
    searches = [0]

    def one_search(request: pb.SearchRequest) -> None:
        found = versions(client.search_request(request).hits)
        if len(found) != 1:
            failures.append(f"one search answered from {found}")
        seen.update(found)

    def searcher(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            q = dense_vector(docs[int(rng.integers(N))]["dense"]["emb"])
            dense = pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=q))
            bm25 = pb.SubQuery(bm25=pb.Bm25Query(text=f"common word{int(rng.integers(7))}"))
            plain = pb.SearchRequest(collection="articles", queries=[dense], limit=10)
            hybrid = pb.SearchRequest(collection="articles", queries=[dense, bm25], limit=10, include_payload=True)
            try:
                one_search(plain)
                one_search(hybrid)
                for batch in ([plain] * 4, [plain, hybrid, plain, hybrid]):  # batched dense, then one by one
                    for response in client.batch_search(batch):
                        found = versions(response.hits)
                        if len(found) != 1:
                            failures.append(f"a BatchSearch search answered from {found}")
                        seen.update(found)
                searches[0] += 10
            except grpc.RpcError as err:
                failures.append(f"{err.code().name}: {err.details()}")

    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(searcher, seed) for seed in range(3)]
        deadline = time.monotonic() + 8.0
        swaps = 0
        while swaps < 60 and time.monotonic() < deadline:
            client.update_alias("articles", "v2" if swaps % 2 == 0 else "v1")
            swaps += 1
            time.sleep(0.01)
        stop.set()
        for future in running:
            future.result()
    assert not failures, failures[:5]
    assert swaps >= 20 and searches[0] >= 100, (swaps, searches[0])
    assert seen == {"v1", "v2"}


def test_a_stream_resolves_its_alias_once(braid2: Running) -> None:
    """An UpdateAlias in the middle of a BulkUpsert stream: every batch lands in one collection."""
    client = braid2.client
    client.create_alias("articles", "v1")

    def batches() -> Iterator[pb.UpsertRequest]:
        for i in range(6):
            if i == 3:  # once the first batch is applied (so the stream has resolved the alias)
                _poll(lambda: client.get("v1", ["stream-0"]) != [], "the first batch is applied")
                client.update_alias("articles", "v2")
            yield pb.UpsertRequest(collection="articles", documents=[pb.Document(id=f"stream-{i}")])

    assert client.stub.BulkUpsert(batches(), timeout=30).upserted == 6
    ids = [f"stream-{i}" for i in range(6)]
    assert {name: len(client.get(name, ids)) for name in ("v1", "v2")} == {"v1": 6, "v2": 0}
    assert client.upsert("articles", [{"id": "stream-after"}]) == 1  # a new call resolves again
    assert client.get("v2", ["stream-after"]) != []


# ------------------------------------------------------------------ durability


def test_alias_changes_survive_kill_9(child_server: Any, tmp_path: Path) -> None:
    server = child_server()
    build(server.client, "v1", "v1")
    build(server.client, "v2", "v2")
    server.client.create_alias("articles", "v1")
    server.client.create_alias("latest", "v2")
    server.client.create_alias("gone", "v1")
    server.client.update_alias("articles", "v2")
    server.client.delete_alias("gone")
    server.kill()

    server = child_server(tmp_path / "data")
    assert server.client.list_aliases() == [
        pb.Alias(name="articles", collection="v2"),
        pb.Alias(name="latest", collection="v2"),
    ]
    assert server.client.count("articles") == N
    assert versions(server.client.search("articles", bm25="common", limit=5)) == {"v2"}
    assert list(server.client.get_collection("v2").aliases) == ["articles", "latest"]


def test_every_flipped_bit_in_the_alias_file_is_detected(tmp_path: Path) -> None:
    table = AliasTable(tmp_path)
    for name, target in (("articles", "articles_v2"), ("latest", "articles_v2"), ("old-1", "articles_v1")):
        table.set(name, target)
    pristine = table.path.read_bytes()
    fresh = AliasTable(tmp_path)
    fresh.load()
    assert fresh.problem is None and fresh.items() == table.items()
    for offset in range(len(pristine)):
        for bit in range(8):
            damaged = bytearray(pristine)
            damaged[offset] ^= 1 << bit
            table.path.write_bytes(bytes(damaged))
            fresh = AliasTable(tmp_path)
            fresh.load()
            assert fresh.problem is not None, (offset, bit, bytes(damaged))
            assert str(table.path) in str(fresh.problem)


def test_braid_verify_checks_the_alias_file(tmp_path: Path) -> None:
    from braid.index.verify import verify_data_dir

    data = tmp_path / "data"
    server, running = start_in_process(data)
    build(running.client, "v1", "v1")
    running.client.create_alias("articles", "v1")
    stop_in_process(server, running)
    assert verify_data_dir(data) == []
    table = AliasTable(data)
    table.load()
    table.set("gone", "no-such-collection")  # as a crash between two writes could leave it
    problems = verify_data_dir(data)
    assert [p.fatal for p in problems] == [True] and "'gone' points at 'no-such-collection'" in str(problems[0])
    damaged = bytearray(table.path.read_bytes())
    damaged[len(damaged) // 2] ^= 0x04
    table.path.write_bytes(bytes(damaged))
    problems = verify_data_dir(data)
    assert len(problems) == 1 and str(table.path) in str(problems[0]) and "aliases are unavailable" in str(problems[0])


def test_a_damaged_alias_file_quarantines_the_aliases(tmp_path: Path) -> None:
    server, running = start_in_process(tmp_path / "data")
    build(running.client, "v1", "v1")
    running.client.create_alias("articles", "v1")
    stop_in_process(server, running)
    path = tmp_path / "data" / FILE_NAME
    damaged = bytearray(path.read_bytes())
    damaged[damaged.index(b"v1")] ^= 0x04  # the target "v1" turns into "r1": a wrong collection, if trusted
    path.write_bytes(bytes(damaged))

    server, running = start_in_process(tmp_path / "data")
    try:
        client = running.client
        loss = grpc.StatusCode.DATA_LOSS
        assert client.count("v1") == N  # collections serve by their own names
        client.upsert("v1", [{"id": "v1-more", "payload": {"version": "v1"}}])
        check(lambda: client.count("articles"), loss, FILE_NAME, "checksum mismatch")
        check(lambda: client.search("articles", bm25="common"), loss, FILE_NAME)
        check(lambda: client.list_aliases(), loss, FILE_NAME)
        check(lambda: client.create_alias("other", "v1"), loss, FILE_NAME)
        check(lambda: client.update_alias("articles", "v1"), loss, FILE_NAME)
        check(lambda: client.delete_alias("articles"), loss, FILE_NAME)
        check(lambda: client.create_collection("new", the_schema()), loss, FILE_NAME)
        check(lambda: client.delete_collection("v1"), loss, FILE_NAME)
        assert path.read_bytes() == bytes(damaged)  # never overwritten
    finally:
        stop_in_process(server, running)
    path.unlink()  # the documented repair: remove (or restore) it with the server stopped
    server, running = start_in_process(tmp_path / "data")
    try:
        assert running.client.list_aliases() == []
        running.client.create_alias("articles", "v1")
        assert running.client.count("articles") == N + 1
    finally:
        stop_in_process(server, running)


# ------------------------------------------------------------------ API keys


def test_api_keys_check_the_names_given(tmp_path: Path) -> None:
    keys = {"ops": "braid_ops_key", "reader": "braid_reader_key", "scoped": "braid_scoped_key"}
    keys_file = tmp_path / "keys.json"
    write_keys_file(
        keys_file,
        [
            {"name": "ops", "hash": hash_key(keys["ops"]), "role": "admin"},
            {"name": "reader", "hash": hash_key(keys["reader"]), "role": "read", "collections": ["articles"]},
            {"name": "scoped", "hash": hash_key(keys["scoped"]), "role": "admin", "collections": ["articles", "v1"]},
        ],
    )
    server, running = start_in_process(tmp_path / "data", api_keys=keys_file)
    address = f"127.0.0.1:{running.port}"
    clients = {name: BraidClient(address, api_key=key, timeout=10) for name, key in keys.items()}
    try:
        ops, reader, scoped = clients["ops"], clients["reader"], clients["scoped"]
        build(ops, "v1", "v1")
        build(ops, "v2", "v2")
        ops.create_alias("articles", "v1")
        ops.create_alias("other", "v2")
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert reader.count("articles") == N  # the alias is in its scope, whatever it points at
        check(lambda: reader.count("v1"), denied, "'v1'")
        assert reader.list_aliases() == [pb.Alias(name="articles", collection="v1")]
        check(lambda: reader.create_alias("mine", "v1"), denied, "CreateAlias needs role admin")
        check(lambda: scoped.update_alias("articles", "v2"), denied, "'v2'")  # both names must be in scope
        check(lambda: scoped.create_alias("mine", "v1"), denied, "'mine'")
        scoped.delete_alias("articles")
        scoped.create_alias("articles", "v1")
    finally:
        for client in clients.values():
            client.close()
        stop_in_process(server, running)


# ------------------------------------------------------------------ cluster


def test_cluster_aliases(local_cluster: Callable[..., LocalCluster]) -> None:  # noqa: F811
    """Through routers: create on one, resolve on the other at once (it reads NATS for a name it
    does not know yet), swap, the errors, a race of two creates, and a router restart."""
    built = local_cluster(shard_servers=1, routers=2)
    with (
        BraidClient(built.router_addresses[0], timeout=30) as a,
        BraidClient(built.router_addresses[1], timeout=30) as b,
    ):
        for version in ("v1", "v2"):
            a.create_collection(version, the_schema(), shards=2)
            a.upsert(version, version_docs(version))
        a.create_alias("articles", "v1")
        assert a.count("articles") == N  # read-your-writes through the router that made it
        assert versions(b.search("articles", bm25="common", limit=5)) == {"v1"}  # b re-reads NATS
        assert a.get_collection("articles").name == "v1"

        b.update_alias("articles", "v2")
        assert versions(b.search("articles", bm25="common", limit=5)) == {"v2"}
        _poll(lambda: versions(a.search("articles", bm25="common", limit=5)) == {"v2"}, "a sees the swap")
        assert list(a.get_collection("v2").aliases) == ["articles"]
        assert a.list_aliases() == [pb.Alias(name="articles", collection="v2")]

        ALREADY, MISSING = grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.NOT_FOUND
        check(lambda: a.create_alias("articles", "v1"), ALREADY, "name:", "'articles'")
        check(lambda: a.create_alias("v1", "v2"), ALREADY, "'v1' is a collection")
        check(lambda: a.create_alias("other", "nope"), MISSING, "collection:", "'nope'")
        check(lambda: a.create_alias("other", "articles"), grpc.StatusCode.INVALID_ARGUMENT, "is an alias")
        check(lambda: a.update_alias("nope", "v1"), MISSING, "name:", "'nope'")
        check(lambda: a.delete_alias("nope"), MISSING, "name:", "'nope'")
        check(lambda: a.create_collection("articles", the_schema()), ALREADY, "alias")
        check(lambda: b.delete_collection("v2"), grpc.StatusCode.FAILED_PRECONDITION, "articles")
        check(lambda: b.delete_collection("articles"), grpc.StatusCode.FAILED_PRECONDITION, "is an alias")

        def create(client: BraidClient) -> str:
            try:
                return client.create_alias("raced", "v1").collection
            except grpc.RpcError as err:
                return err.code().name

        with ThreadPoolExecutor(2) as pool:
            outcomes = sorted(pool.map(create, (a, b)))
        assert outcomes == ["ALREADY_EXISTS", "v1"], outcomes
        a.delete_alias("raced")
        check(lambda: b.delete_alias("raced"), MISSING, "'raced'")
        assert b.create_alias("raced", "v2").collection == "v2"  # a deleted alias's name is free again
        assert a.count("raced") == N
        b.delete_alias("raced")

    router = built.routers[0]
    router.kill()
    router.start()
    router.wait_ready()
    with BraidClient(built.router_addresses[0], timeout=30) as a:
        assert a.list_aliases() == [pb.Alias(name="articles", collection="v2")]
        assert versions(a.search("articles", bm25="common", limit=5)) == {"v2"}
        a.update_alias("articles", "v1")
        a.delete_collection("v2")
        assert a.count("articles") == N


def test_a_router_reads_nats_for_what_its_view_lacks(nats1: NatsCluster, tmp_path: Path) -> None:  # noqa: F811
    """A RemoteCatalog in process, its view emptied by hand as if its watch lagged: it reads NATS
    before NOT_FOUND, backs out of an alias whose name became a collection meanwhile, and never
    resolves an alias to a later collection of the same name."""
    catalog = RemoteCatalog(ServerConfig(data_dir=tmp_path / "router", role="router", nats=nats1.url_list))
    schema_json = schema_from_proto(the_schema()).to_json()

    def put_collection(name: str, uid: str) -> None:  # as a router writes it; no shard server is called here
        meta = CollectionMeta(name, uid, schema_json, 1, 1, time.time(), (("shard-0",),))
        catalog.link.kv_create(COLLECTIONS_BUCKET, name, meta.to_json())

    try:
        catalog.recover()
        put_collection("v1", "uid1")
        _poll(lambda: "v1" in catalog.state.metas, "the view has v1")
        catalog.create_alias("articles", "v1")
        assert catalog.state.aliases["articles"].collection == "v1"  # answered once its own view had it
        catalog.state.aliases = {}  # a router that has not heard of it yet
        assert catalog.get("articles").name == "v1" and catalog.resolve("articles") == "v1"

        put_collection("taken", "uid2")  # through "another router", unseen by this view
        catalog.state.metas = {name: meta for name, meta in catalog.state.metas.items() if name != "taken"}
        with pytest.raises(AlreadyExists, match="'taken' is a collection"):
            catalog.create_alias("taken", "v1")
        assert catalog.link.kv_get("braid-aliases", "taken") is None  # backed out

        catalog.link.kv_delete(COLLECTIONS_BUCKET, "v1")  # a delete that raced the alias's creation
        put_collection("v1", "uid3")
        _poll(lambda: catalog.state.metas.get("v1", None) is not None and catalog.state.metas["v1"].uid == "uid3", "v1")
        with pytest.raises(NotFound, match="it was deleted"):
            catalog.get("articles")
        catalog.update_alias("articles", "v1")
        assert catalog.get("articles").meta.uid == "uid3"
    finally:
        catalog.close()


def _poll(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)
