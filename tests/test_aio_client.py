"""AsyncBraidClient (service/aio.py) against a real server: the same answers as BraidClient for
every method, many concurrent searches from one event loop, deadlines, TLS and API keys, retries
of an overloaded and of a restarted server, and cancellation of searches and write streams.

A server's workers are held busy by ``busy`` (work handed to its own admission control, as a
slow call's would be), which makes a call wait or be refused deterministically."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from braid.service.aio import NO_RETRY, AsyncBraidClient, Retry, StreamFailed, interrupted
from braid.service.auth import generate_key, hash_key, write_keys_file
from braid.service.config import ServerConfig
from braid.service.messages import document
from braid.service.server import BraidServer, create_server
from braid.v1 import braid_pb2 as pb

from .certs import make_ca, make_leaf, write_cert, write_key
from .conftest import Running, random_vectors, schema, start_in_process, stop_in_process

DIM = 8
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def _docs(n: int, start: int = 0) -> list[dict[str, Any]]:
    vectors = random_vectors(start + n, DIM, seed=3)
    return [
        {
            "id": f"d{i}",
            "text": {"title": WORDS[i % 8], "body": f"{WORDS[i % 8]} {WORDS[(i * 3) % 8]} {WORDS[(i * 5) % 8]} n{i}"},
            "dense": {"emb": vectors[i]},
            "sparse": {"splade": {WORDS[i % 8]: 1.0 + i % 3, WORDS[(i + 1) % 8]: 0.5}},
            "payload": {"lang": ("en", "de", "fr")[i % 3], "n": i},
        }
        for i in range(start, start + n)
    ]


SCHEMA = schema(DIM, payload={"lang": pb.KEYWORD, "n": pb.INT})


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def until(check: Any, what: str, within: float = 60.0) -> None:
    """Wait on the event loop until ``check()`` holds (a deadline a loaded machine meets)."""
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def busy(server: BraidServer) -> Iterator[Callable[[], None]]:
    """Every worker of ``server`` runs a call that lasts until the block ends (or the function it
    gives is called)."""
    release = threading.Event()
    held = [server.admission._submit(release.wait, None) for _ in range(server.admission.workers)]
    try:
        yield release.set
    finally:
        release.set()
        for future in held:
            future.result(timeout=60)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    server, running = start_in_process(tmp_path_factory.mktemp("aio") / "data")
    running.client.create_collection("docs", SCHEMA)
    running.client.upsert("docs", _docs(200))
    yield running
    stop_in_process(server, running)


@pytest.fixture
def one_worker(tmp_path: Path) -> Iterator[tuple[BraidServer, Running]]:
    """A server with a single worker, and a collection of 20 documents."""
    server, running = start_in_process(tmp_path / "data", workers=1)
    running.client.create_collection("docs", SCHEMA)
    running.client.upsert("docs", _docs(20))
    yield server, running
    stop_in_process(server, running)


# ------------------------------------------------------------------ answers


def test_every_method_answers_as_the_sync_client_does(shared: Running):
    sync = shared.client
    vectors = random_vectors(3, DIM, seed=9)
    english = pb.Filter(must=[pb.Condition(match=pb.Match(field="lang", value=pb.Value(keyword="en")))])
    searches: list[dict[str, Any]] = [
        {"bm25": "alpha bravo"},
        {"dense": ("emb", vectors[0]), "limit": 7, "offset": 2},
        {"sparse": ("splade", {"charlie": 1.0})},
        {
            "bm25": pb.Bm25Query(text="delta echo", boosts={"title": 2.0}),
            "dense": ("emb", vectors[1]),
            "filter": english,
            "fusion": "rrf",
            "weights": {"bm25": 0.4},
            "depth": {"dense": 50},
            "payload_fields": ["n"],
            "text_fields": ["title"],
            "explain": True,
        },
        {"bm25": "golf", "dense": ("emb", vectors[2]), "include_payload": True, "score_threshold": 0.1},
    ]
    requests = [pb.SearchRequest(collection="rt", queries=[pb.SubQuery(bm25=pb.Bm25Query(text=w))]) for w in WORDS[:3]]
    batches = [
        pb.UpsertRequest(collection="rt", documents=[pb.Document(id=f"s{i}", text={"body": "hotel"})]) for i in range(3)
    ]

    async def body() -> None:
        async with AsyncBraidClient(f"127.0.0.1:{shared.port}") as braid:
            created = await braid.create_collection("rt", SCHEMA)
            assert created.name == "rt" and created == sync.get_collection("rt")
            assert await braid.get_collection("rt") == sync.get_collection("rt")
            assert await braid.upsert("rt", _docs(20)) == 20
            bulk = await braid.bulk_upsert("rt", _docs(30, start=20), batch_size=7)
            assert (bulk.upserted, bulk.batches) == (30, 5)
            acked = [(request, ack) async for request, ack in braid.upsert_stream(batches, window=2)]
            assert [(request, ack.batch, ack.upserted) for request, ack in acked] == [
                (b, i, 1) for i, b in enumerate(batches)
            ]
            await braid.flush("rt")
            assert await braid.count("rt") == sync.count("rt") == 53
            assert await braid.count("rt", english) == sync.count("rt", english) > 0
            ids = ["d0", "d7", "s2", "nope"]
            assert await braid.get("rt", ids, include_vectors=True) == sync.get("rt", ids, include_vectors=True)
            for options in searches:
                hits = await braid.search("rt", **options)
                assert hits and hits == sync.search("rt", **options), options
            assert await braid.search_request(requests[0]) == sync.search_request(requests[0])
            assert await braid.batch_search(requests) == sync.batch_search(requests)
            assert await braid.list_collections() == sync.list_collections()

            assert await braid.create_alias("rt-live", "rt") == pb.Alias(name="rt-live", collection="rt")
            assert await braid.update_alias("rt-live", "docs") == pb.Alias(name="rt-live", collection="docs")
            assert await braid.list_aliases() == sync.list_aliases() == [pb.Alias(name="rt-live", collection="docs")]
            await braid.delete_alias("rt-live")
            assert sync.list_aliases() == []

            assert await braid.delete("rt", ["d0", "d1", "nope"]) == 2
            english_left = sync.count("rt", english)
            assert english_left > 0 and await braid.delete("rt", filter=english) == english_left
            assert sync.count("rt", english) == 0
            await braid.delete_collection("rt")
            assert "rt" not in [info.name for info in sync.list_collections()]
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await braid.get_collection("rt")
            assert info.value.code() == grpc.StatusCode.NOT_FOUND

    run(body())


def test_two_hundred_concurrent_searches_from_one_event_loop(shared: Running):
    queries = random_vectors(200, DIM, seed=21)
    expected = [
        shared.client.search("docs", dense=("emb", q), bm25=WORDS[i % 8] if i % 2 else None, limit=5)
        for i, q in enumerate(queries)
    ]

    async def body() -> list[list[pb.Hit]]:
        async with AsyncBraidClient(f"127.0.0.1:{shared.port}") as braid:
            return await asyncio.gather(
                *(
                    braid.search("docs", dense=("emb", q), bm25=WORDS[i % 8] if i % 2 else None, limit=5)
                    for i, q in enumerate(queries)
                )
            )

    got = run(body())
    assert len(got) == 200 and all(len(hits) == 5 for hits in got)
    assert got == expected


# --------------------------------------------------------- deadlines, retries


def test_a_passed_deadline_is_deadline_exceeded_and_not_retried(one_worker: tuple[BraidServer, Running]):
    server, running = one_worker

    async def body() -> None:
        address = f"127.0.0.1:{running.port}"
        async with AsyncBraidClient(address) as braid, AsyncBraidClient(address, timeout=0.3) as hasty:
            with busy(server):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await braid.search("docs", bm25="alpha", timeout=0.3)  # the call's own deadline
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await hasty.count("docs")  # the client's
                assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert not braid.recent_retries and not hasty.recent_retries
            assert len(await braid.search("docs", bm25="alpha")) > 0  # the channel is fine afterwards

    run(body())


def test_an_overloaded_server_is_retried_after_its_pushback(tmp_path: Path):
    server, running = start_in_process(tmp_path / "data", workers=1, max_queue=0)
    try:
        running.client.create_collection("docs", SCHEMA)
        running.client.create_collection("writes", SCHEMA)  # so the retried write cannot move the search's scores
        running.client.upsert("docs", _docs(20))
        expected = running.client.search("docs", bm25="alpha", limit=5)
        address = f"127.0.0.1:{running.port}"
        patient = Retry(attempts=1000, backoff_s=0.01, max_backoff_s=0.1)

        async def body() -> None:
            plain = AsyncBraidClient(address, retry=NO_RETRY)
            reader = AsyncBraidClient(address, retry=patient)
            writer = AsyncBraidClient(
                address, retry=Retry(attempts=1000, backoff_s=0.01, max_backoff_s=0.1, writes=True)
            )
            with busy(server):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await plain.search("docs", bm25="alpha", limit=5)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert int(dict(info.value.trailing_metadata())["grpc-retry-pushback-ms"]) >= 10
                with pytest.raises(grpc.aio.AioRpcError) as info:  # a write is not retried unless asked
                    await reader.upsert("writes", _docs(1, start=50))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not reader.recent_retries
                search = asyncio.ensure_future(reader.search("docs", bm25="alpha", limit=5))
                upsert = asyncio.ensure_future(writer.upsert("writes", _docs(1, start=60)))
                await until(lambda: len(reader.recent_retries) >= 2 and writer.recent_retries, "retries")
                assert not search.done() and not upsert.done()
            assert await search == expected
            assert await upsert == 1
            for retried in [*reader.recent_retries, *writer.recent_retries]:
                assert retried.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert retried.pushback_s is not None and retried.delay_s >= retried.pushback_s >= 0.01
            assert {r.method for r in reader.recent_retries} == {"Search"}
            assert {r.method for r in writer.recent_retries} == {"Upsert"}
            for client in (plain, reader, writer):
                await client.close()

        run(body())
        assert [doc.id for doc in running.client.get("writes", ["d50", "d60"])] == ["d60"]
    finally:
        stop_in_process(server, running)


def test_a_restarted_server_is_retried_with_backoff(tmp_path: Path):
    server, running = start_in_process(tmp_path / "data")
    running.client.create_collection("docs", SCHEMA)
    running.client.upsert("docs", _docs(20))
    expected = running.client.search("docs", bm25="alpha", limit=5)
    port = running.port
    stop_in_process(server, running)
    restarted: list[BraidServer] = []

    def restart() -> None:
        again = create_server(ServerConfig(data_dir=tmp_path / "data", host="127.0.0.1", port=port))
        restarted.append(again)
        again.start()
        assert again.wait_recovered(timeout=120)

    async def body() -> None:
        address = f"127.0.0.1:{port}"
        async with (
            AsyncBraidClient(address, retry=NO_RETRY) as plain,
            AsyncBraidClient(address, retry=Retry(attempts=100_000, backoff_s=0.02, max_backoff_s=0.25)) as patient,
        ):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await plain.search("docs", bm25="alpha", limit=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(grpc.aio.AioRpcError) as info:  # writes: not retried by default
                await patient.upsert("docs", _docs(1, start=70))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and not patient.recent_retries
            search = asyncio.ensure_future(patient.search("docs", bm25="alpha", limit=5, timeout=120))
            await until(lambda: len(patient.recent_retries) >= 2, "retries of the stopped server")
            assert not search.done()
            await asyncio.to_thread(restart)
            assert await search == expected
            retries = list(patient.recent_retries)
            assert {r.code for r in retries} == {grpc.StatusCode.UNAVAILABLE} and {r.method for r in retries} == {
                "Search"
            }

    try:
        run(body())
    finally:
        for again in restarted:
            again.stop(grace=0)


def test_a_call_a_stopping_server_dropped_is_retried_and_a_cancelled_one_is_not():
    """grpc answers a call that reached a stopping server before any handler took it with
    CANCELLED "CANCELLED" (grpc/grpc#41785; seen in a rolling restart of routers). That call never
    ran: the client and bulk jobs send it again. Any other CANCELLED is not retried. The answers
    come from a real gRPC server on loopback that fails the first Counts the way grpc does."""
    from braid.service.errors import server_away
    from braid.service.jobs.sender import retryable

    dropped_at_stop = (grpc.StatusCode.CANCELLED, "CANCELLED")
    answers = [dropped_at_stop, dropped_at_stop]

    async def count(request: pb.CountRequest, context: grpc.aio.ServicerContext) -> pb.CountResponse:
        if answers:
            code, details = answers.pop(0)
            await context.abort(code, details)
        return pb.CountResponse(count=7)

    async def body() -> None:
        server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(
            count,
            request_deserializer=pb.CountRequest.FromString,
            response_serializer=pb.CountResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("braid.v1.Braid", {"Count": handler}),))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            address = f"127.0.0.1:{port}"
            async with AsyncBraidClient(
                address, retry=Retry(attempts=5, backoff_s=0.01, max_backoff_s=0.02)
            ) as patient:
                assert await patient.count("docs") == 7  # after the two dropped calls
                assert [(r.method, r.code) for r in patient.recent_retries] == [
                    ("Count", grpc.StatusCode.CANCELLED)
                ] * 2
                answers.extend([dropped_at_stop, (grpc.StatusCode.CANCELLED, "cancelled by its handler")])
            async with AsyncBraidClient(address, retry=NO_RETRY) as plain:
                with pytest.raises(grpc.aio.AioRpcError) as dropped:
                    await plain.count("docs")
                with pytest.raises(grpc.aio.AioRpcError) as cancelled:
                    await plain.count("docs")
            assert server_away(dropped.value) and retryable(dropped.value)
            assert cancelled.value.code() == grpc.StatusCode.CANCELLED
            assert not server_away(cancelled.value) and not retryable(cancelled.value)
        finally:
            await server.stop(0)

    run(body())


# -------------------------------------------------------------- TLS, keys

READ_KEY, ADMIN_KEY = generate_key(), generate_key()


def test_mutual_tls_and_api_keys(tmp_path: Path):
    ca_key, ca_cert = make_ca("aio test CA")
    server_key, server_cert = make_leaf(ca_key, ca_cert, "braid server", server=True)
    client_key, client_cert = make_leaf(ca_key, ca_cert, "braid client", server=False)
    files = {
        "ca": write_cert(tmp_path / "ca.pem", ca_cert),
        "server_cert": write_cert(tmp_path / "server.pem", server_cert),
        "server_key": write_key(tmp_path / "server.key", server_key),
        "client_cert": write_cert(tmp_path / "client.pem", client_cert),
        "client_key": write_key(tmp_path / "client.key", client_key),
    }
    keys = tmp_path / "keys.json"
    write_keys_file(
        keys,
        [
            {"name": "reader", "hash": hash_key(READ_KEY), "role": "read"},
            {"name": "ops", "hash": hash_key(ADMIN_KEY), "role": "admin"},
        ],
    )
    server, running = start_in_process(
        tmp_path / "data",
        tls_cert=files["server_cert"],
        tls_key=files["server_key"],
        tls_client_ca=files["ca"],
        api_keys=keys,
    )
    tls = {"tls_ca": files["ca"], "tls_cert": files["client_cert"], "tls_key": files["client_key"]}
    address = f"127.0.0.1:{running.port}"

    async def code_of(call: Any) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        return info.value.code()

    async def body() -> None:
        async with (
            AsyncBraidClient(address, api_key=ADMIN_KEY, server_name="braid.test", **tls) as admin,
            AsyncBraidClient(address, api_key=READ_KEY, **tls) as reader,
            AsyncBraidClient(address, **tls) as anonymous,
            AsyncBraidClient(address, api_key=ADMIN_KEY, tls_ca=files["ca"], retry=NO_RETRY, timeout=10) as no_cert,
        ):
            await admin.create_collection("docs", SCHEMA)
            assert await admin.bulk_upsert("docs", _docs(10), batch_size=4) == pb.BulkUpsertResponse(
                upserted=10, batches=3
            )
            hits = await reader.search("docs", bm25="alpha", limit=3)
            assert [hit.id for hit in hits] and hits == await admin.search("docs", bm25="alpha", limit=3)
            count = await reader.stub.Count(
                pb.CountRequest(collection="docs"), timeout=10
            )  # the raw stub carries the key
            assert count.count == 10
            assert await code_of(reader.upsert("docs", _docs(1, start=30))) == grpc.StatusCode.PERMISSION_DENIED
            assert await code_of(anonymous.count("docs")) == grpc.StatusCode.UNAUTHENTICATED
            assert await code_of(no_cert.count("docs")) == grpc.StatusCode.UNAVAILABLE  # mutual TLS refuses it

    try:
        run(body())
    finally:
        stop_in_process(server, running)
    with pytest.raises(ValueError, match="api_key"):
        AsyncBraidClient(address, api_key="two words")
    with pytest.raises(ValueError, match="not a PEM file"):
        AsyncBraidClient(address, tls_ca=keys)


# ------------------------------------------------------------ cancellation


def test_a_cancelled_search_cancels_its_call_and_leaves_nothing_behind(one_worker: tuple[BraidServer, Running]):
    server, running = one_worker

    async def body() -> None:
        async with AsyncBraidClient(f"127.0.0.1:{running.port}") as braid:
            assert await braid.search("docs", bm25="alpha")  # the channel is up
            baseline = asyncio.all_tasks()
            with busy(server):
                search = asyncio.ensure_future(braid.search("docs", bm25="alpha"))
                await until(lambda: server.admission.outstanding == 2, "the search to queue on the server")
                search.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await search
                # The server saw the call cancelled: its queued work is dropped before a worker frees up.
                await until(lambda: server.admission.outstanding == 1, "the server to drop the cancelled search")
                await until(lambda: asyncio.all_tasks() == baseline, "the client's tasks of the call to end")
            assert await braid.search("docs", bm25="alpha")

    run(body())


async def _stalling(docs: list[dict[str, Any]], stalled: asyncio.Event, closed: list[str]) -> AsyncIterator[Any]:
    """Yields ``docs``, then waits for good (as a source with nothing more to give)."""
    try:
        for doc in docs:
            yield doc
        stalled.set()
        await asyncio.Event().wait()
    finally:
        closed.append("closed")


def test_a_cancelled_bulk_upsert_reports_what_the_server_applied(shared: Running):
    sync = shared.client
    sync.create_collection("bulk", SCHEMA)

    async def body() -> None:
        async with AsyncBraidClient(f"127.0.0.1:{shared.port}") as braid:
            stalled, closed = asyncio.Event(), []
            upload = asyncio.ensure_future(
                braid.bulk_upsert("bulk", _stalling(_docs(14), stalled, closed), batch_size=4)
            )
            await stalled.wait()
            upload.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await upload
            report = interrupted(info.value)
            assert report is not None and closed == ["closed"]
            assert report.applied == pb.BulkUpsertResponse(upserted=12, batches=3)
            assert [[doc.id for doc in batch.documents] for batch in report.unacked] == [["d12", "d13"]]
            assert sync.count("bulk") == 12
            assert [doc.id for doc in sync.get("bulk", [f"d{i}" for i in range(14)])] == [f"d{i}" for i in range(12)]

            # The same under asyncio.timeout: a TimeoutError, the report behind it.
            stalled = asyncio.Event()
            with pytest.raises(TimeoutError) as timed_out:
                async with asyncio.timeout(None) as scope:
                    upload = braid.bulk_upsert("bulk", _stalling(_docs(5, start=20), stalled, closed), batch_size=2)
                    waiter = asyncio.ensure_future(stalled.wait())
                    waiter.add_done_callback(lambda _: scope.reschedule(asyncio.get_running_loop().time()))
                    await upload
            report = interrupted(timed_out.value)
            assert report is not None and report.applied == pb.BulkUpsertResponse(upserted=4, batches=2)
            assert [[doc.id for doc in batch.documents] for batch in report.unacked] == [["d24"]]
            assert sync.count("bulk") == 16

    run(body())


def test_a_bulk_upsert_cancelled_while_it_writes_still_gets_the_servers_count(
    one_worker: tuple[BraidServer, Running],
):
    server, running = one_worker

    async def body() -> None:
        async with AsyncBraidClient(f"127.0.0.1:{running.port}") as braid:
            with busy(server) as release:
                upload = asyncio.ensure_future(braid.bulk_upsert("docs", _docs(6, start=200), batch_size=2))
                await until(lambda: server.admission.outstanding == 2, "the first batch to queue on the server")
                upload.cancel()  # lands in a write or in the wait for the answer: the call must go on
                release()
                with pytest.raises(asyncio.CancelledError) as info:
                    await upload
            report = interrupted(info.value)
            assert report is not None and report.applied == pb.BulkUpsertResponse(upserted=6, batches=3)
            assert report.unacked == []
        assert running.client.count("docs") == 26

    run(body())


def test_a_cancelled_bulk_upsert_the_server_cannot_answer_is_cancelled_after_the_grace(
    one_worker: tuple[BraidServer, Running],
):
    server, running = one_worker

    async def body() -> None:
        async with AsyncBraidClient(f"127.0.0.1:{running.port}", cancel_grace_s=0.2) as braid:
            stalled, closed = asyncio.Event(), []
            with busy(server):
                upload = asyncio.ensure_future(
                    braid.bulk_upsert("docs", _stalling(_docs(4, start=100), stalled, closed), batch_size=2)
                )
                await stalled.wait()
                await until(lambda: server.admission.outstanding == 2, "the first batch to queue on the server")
                upload.cancel()
                with pytest.raises(asyncio.CancelledError) as info:
                    await upload
                report = interrupted(info.value)
                assert report is not None and report.applied is None  # unknown: the server never answered
                assert [[doc.id for doc in batch.documents] for batch in report.unacked] == [
                    ["d100", "d101"],
                    ["d102", "d103"],
                ]
                await until(
                    lambda: server.admission.outstanding == 1, "the server to drop the cancelled stream's batch"
                )
        assert running.client.get("docs", ["d100", "d101", "d102", "d103"]) == []

    run(body())


def test_upsert_stream_failure_and_cancellation_report_the_unacked_batches(shared: Running):
    sync = shared.client
    sync.create_collection("stream", SCHEMA)

    def batch(i: int, dim: int = DIM) -> pb.UpsertRequest:
        doc = {"id": f"b{i}", "text": {"body": "india"}, "dense": {"emb": np.ones(dim, np.float32)}}
        return pb.UpsertRequest(collection="stream", documents=[document(doc)])

    async def body() -> None:
        async with AsyncBraidClient(f"127.0.0.1:{shared.port}") as braid:
            good = [batch(i) for i in range(3)]
            bad = batch(3, dim=DIM + 1)
            acked = []
            with pytest.raises(StreamFailed) as failed:
                async for request, _ack in braid.upsert_stream([*good, bad, batch(4)], window=1):
                    acked.append(request)
            assert acked == good and failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert failed.value.unacked == [bad]

            async def source() -> AsyncIterator[pb.UpsertRequest]:
                for i in range(10, 13):
                    yield batch(i)
                await asyncio.Event().wait()

            acks: list[pb.UpsertStreamAck] = []

            async def consume() -> None:
                async for _, ack in braid.upsert_stream(source()):
                    acks.append(ack)

            consumer = asyncio.ensure_future(consume())
            await until(lambda: len(acks) == 3, "three acks")
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError) as info:
                await consumer
            report = interrupted(info.value)
            assert report is not None and report.applied == pb.BulkUpsertResponse(upserted=3, batches=3)
            assert report.unacked == []
        assert sync.count("stream") == 6

    run(body())
