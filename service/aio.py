"""An asyncio client for braid.v1.Braid, on grpc.aio: BraidClient's methods, awaitable.

    async with AsyncBraidClient("127.0.0.1:50051") as braid:
        hits = await braid.search("docs", bm25="hello", dense=("emb", vec), limit=5)

Every method takes the same arguments, with the same defaults, as BraidClient's
(service/client.py) and sends the same request, built by service/messages.py; TLS, mutual
TLS and API keys are set up the same way. The streams take documents or batches from a
plain or an async iterable (a plain one is pulled on the event loop: keep its items cheap
to make, or pass an async iterable), and ``upsert_stream`` is an async iterator.

What an async caller needs on top:

- Retries (``retry=Retry(...)``). A read (Get, Count, Search, BatchSearch, GetCollection,
  ListCollections, ListAliases) refused with UNAVAILABLE (or dropped by a stopping server
  before it ran: CANCELLED "CANCELLED", service/errors.py) is tried again after a jittered
  exponential backoff, and one refused with RESOURCE_EXHAUSTED carrying the server's
  ``grpc-retry-pushback-ms`` (an overloaded server turning the call away at admission) no
  sooner than the server asked. Writes are not retried unless ``Retry(writes=True)``, and
  then only the idempotent ones (Upsert and Delete replace or remove by id, Flush, UpdateAlias);
  CreateCollection, DeleteCollection, CreateAlias, DeleteAlias and the streams never are (a
  second try could answer ALREADY_EXISTS or NOT_FOUND for work the first one did). The
  call's ``timeout`` bounds all its tries together; ``recent_retries`` lists the last ones.
- Cancellation. Cancelling the task that awaits a call cancels the call: the server sees it
  cancelled and drops its work if it has not started. A cancelled ``bulk_upsert`` sends no
  more batches, half-closes its stream and waits up to ``cancel_grace_s`` for the server's
  count of what it applied; ``upsert_stream`` cancels its call at once (its acks already
  said what was applied). Either raises CancelledError whose ``__cause__`` is a
  ``WriteInterrupted``: ``applied`` (the server's BulkUpsertResponse; None when it did not
  answer in time) and ``unacked``, the batches taken from the input that are not known to
  be applied, to send again (``interrupted(err)`` finds it behind asyncio.timeout's
  TimeoutError too).

The channel is opened on the first call, on the running event loop, so a client may be
made anywhere (a FastAPI app's module, say) and used from one event loop; ``close()`` it
on that loop.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import grpc.aio

from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from . import messages
from .client import StreamFailed
from .errors import overloaded, pushback_s, server_away
from .messages import STREAM_TIMEOUT_S, as_dict, metadata_of
from .snapshot_files import ExportTarget, archive_chunks

__all__ = ["AsyncBraidClient", "Retry", "StreamFailed", "WriteInterrupted", "as_dict", "interrupted", "metadata_of"]

# Calls that change nothing, and writes that leave the same documents when applied twice.
READS = frozenset(
    {"GetCollection", "ListCollections", "ListAliases", "ListSnapshots", "Get", "Count", "Search", "BatchSearch"}
)
IDEMPOTENT_WRITES = frozenset({"Upsert", "Delete", "Flush", "UpdateAlias"})
BATCHES_APPLIED_KEY = "braid-batches-applied"  # trailing metadata of a write stream (service/handlers.py)
DOCUMENTS_APPLIED_KEY = "braid-documents-applied"


@dataclass(frozen=True)
class Retry:
    """When a unary call is tried again. ``attempts`` counts every try (1: never retry); retry n
    waits a uniform draw from [0, min(max_backoff_s, backoff_s * 2**n)] (full jitter, so many
    clients refused at once do not come back at once), and never less than the server's pushback."""

    attempts: int = 5
    backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    writes: bool = False  # also retry Upsert, Delete, Flush and UpdateAlias
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"retry.attempts must be at least 1, got {self.attempts}")
        if not (self.backoff_s >= 0 and self.max_backoff_s >= self.backoff_s):
            raise ValueError("retry: need 0 <= backoff_s <= max_backoff_s")

    def retries(self, method: str) -> bool:
        return self.attempts > 1 and (method in READS or (self.writes and method in IDEMPOTENT_WRITES))

    def delay(self, retry: int, pushback_s: float = 0.0) -> float:
        return max(pushback_s, self.rng.uniform(0, min(self.max_backoff_s, self.backoff_s * 2**retry)))


NO_RETRY = Retry(attempts=1)


class Retried(NamedTuple):
    method: str
    code: grpc.StatusCode
    delay_s: float
    pushback_s: float | None  # the server's hint, None when it gave none


class WriteInterrupted(Exception):
    """What a cancelled write stream had done: the ``__cause__`` of the CancelledError it raises.

    ``applied``: what the server applied (None: unknown, it did not answer in time);
    ``unacked``: the batches taken from the input that are not known applied, in order.
    """

    def __init__(self, applied: pb.BulkUpsertResponse | None, unacked: list[pb.UpsertRequest]) -> None:
        said = "unknown" if applied is None else f"{applied.batches} batches ({applied.upserted} documents)"
        docs = sum(len(batch.documents) for batch in unacked)
        super().__init__(f"write stream cancelled: applied {said}; {len(unacked)} batches ({docs} documents) unacked")
        self.applied = applied
        self.unacked = unacked


def interrupted(err: BaseException | None) -> WriteInterrupted | None:
    """The WriteInterrupted behind ``err`` (a CancelledError, or the TimeoutError of asyncio.timeout)."""
    while err is not None:
        if isinstance(err, WriteInterrupted):
            return err
        err = err.__cause__
    return None


async def _items(source: Iterable[Any] | AsyncIterable[Any]) -> AsyncIterator[Any]:
    if isinstance(source, AsyncIterable):
        async for item in source:
            yield item
    else:
        for item in source:
            yield item


class _KeyedStub:
    """The generated stub with an API key added to every call's metadata (a caller's own
    ``authorization`` wins). Cheaper than grpc.aio interceptors, which wrap every call in another."""

    def __init__(self, stub: braid_pb2_grpc.BraidStub, pairs: list[tuple[str, str]]) -> None:
        self._stub = stub
        self._pairs = pairs

    def __getattr__(self, method: str) -> Any:
        multicallable = getattr(self._stub, method)
        pairs = self._pairs

        def call(*args: Any, metadata: Any = None, **kwargs: Any) -> Any:
            given = list(metadata or ())
            names = {name for name, _ in given}
            given += [(name, item) for name, item in pairs if name not in names]
            return multicallable(*args, metadata=given, **kwargs)

        return call


class AsyncBraidClient:
    """BraidClient's methods as coroutines; each raises grpc.aio.AioRpcError (a grpc.RpcError) on a
    non-OK status.

    Args:
        address, timeout, tls_ca, tls_cert, tls_key, api_key, server_name: as BraidClient's.
        retry: when unary calls are tried again (module doc); ``Retry(attempts=1)``: never.
        cancel_grace_s: how long a cancelled ``bulk_upsert`` waits for the server's count of
            what it applied before it cancels the call.
    """

    def __init__(
        self,
        address: str = "127.0.0.1:50051",
        timeout: float = 60.0,
        *,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        api_key: str | None = None,
        server_name: str | None = None,
        retry: Retry | None = None,
        cancel_grace_s: float = 10.0,
    ) -> None:
        messages.check_timeout(timeout)
        self._key = messages.api_key_metadata(api_key) if api_key is not None else None
        # Built now, so a bad TLS file fails here rather than in the first call.
        self._options, self._credentials = messages.channel_setup(tls_ca, tls_cert, tls_key, server_name)
        self.address = address
        self.timeout = timeout
        self.retry = Retry() if retry is None else retry
        self.cancel_grace_s = cancel_grace_s
        self.recent_retries: collections.deque[Retried] = collections.deque(maxlen=64)
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    # ----------------------------------------------------------------- channel

    @property
    def channel(self) -> grpc.aio.Channel:
        """The grpc.aio channel, opened on first use (on the running event loop)."""
        if self._channel is None:
            if self._credentials is not None:
                self._channel = grpc.aio.secure_channel(self.address, self._credentials, options=self._options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=self._options)
        return self._channel

    @property
    def stub(self) -> braid_pb2_grpc.BraidStub:
        """The generated stub on this client's channel; its calls carry the API key too."""
        if self._stub is None:
            stub = braid_pb2_grpc.BraidStub(self.channel)
            self._stub = stub if self._key is None else _KeyedStub(stub, self._key)
        return self._stub

    async def __aenter__(self) -> AsyncBraidClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    async def _call(self, method: str, request: Any, timeout: float | None = None) -> Any:
        """One unary call with this client's retries; ``timeout`` bounds every try together."""
        budget = self.timeout if timeout is None else timeout
        if not self.retry.retries(method):
            return await getattr(self.stub, method)(request, timeout=budget)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        retry = 0
        while True:
            try:
                return await getattr(self.stub, method)(request, timeout=max(deadline - loop.time(), 0.0))
            except grpc.aio.AioRpcError as err:
                delay = self._retry_delay(method, err, retry)
                if delay is None or loop.time() + delay >= deadline:
                    raise
                retry += 1
                await asyncio.sleep(delay)

    def _retry_delay(self, method: str, err: grpc.RpcError, retry: int) -> float | None:
        """How long to wait before trying ``err``'s call again; None: do not."""
        if retry + 1 >= self.retry.attempts:
            return None
        code = err.code()
        hint = pushback_s(err)
        if server_away(err):
            delay = self.retry.delay(retry)
        elif overloaded(err):
            delay = self.retry.delay(retry, hint or 0.0)  # an overload turned the call away before any work
        else:
            return None
        self.recent_retries.append(Retried(method, code, delay, hint))
        return delay

    # ------------------------------------------------------------- collections

    async def create_collection(
        self, name: str, schema: pb.Schema, shards: int = 1, replication_factor: int = 0
    ) -> pb.CollectionInfo:
        """``replication_factor`` 0: the server's default (1 standalone, 2 in a cluster of 2+ shard servers)."""
        return await self._call(
            "CreateCollection", messages.create_collection(name, schema, shards, replication_factor)
        )

    async def get_collection(self, name: str) -> pb.CollectionInfo:
        return await self._call("GetCollection", pb.GetCollectionRequest(name=name))

    async def list_collections(self) -> list[pb.CollectionInfo]:
        return list((await self._call("ListCollections", pb.ListCollectionsRequest())).collections)

    async def delete_collection(self, name: str) -> None:
        await self._call("DeleteCollection", pb.DeleteCollectionRequest(name=name))

    # ----------------------------------------------------------------- aliases

    async def create_alias(self, name: str, collection: str) -> pb.Alias:
        return await self._call("CreateAlias", pb.CreateAliasRequest(name=name, collection=collection))

    async def update_alias(self, name: str, collection: str) -> pb.Alias:
        return await self._call("UpdateAlias", pb.UpdateAliasRequest(name=name, collection=collection))

    async def delete_alias(self, name: str) -> None:
        await self._call("DeleteAlias", pb.DeleteAliasRequest(name=name))

    async def list_aliases(self) -> list[pb.Alias]:
        return list((await self._call("ListAliases", pb.ListAliasesRequest())).aliases)

    # --------------------------------------------------------------- snapshots

    async def create_snapshot(self, collection: str, timeout: float | None = None) -> pb.SnapshotInfo:
        return await self._call("CreateSnapshot", pb.CreateSnapshotRequest(collection=collection), timeout)

    async def list_snapshots(self, collection: str = "") -> list[pb.SnapshotInfo]:
        return list((await self._call("ListSnapshots", pb.ListSnapshotsRequest(collection=collection))).snapshots)

    async def restore_snapshot(
        self, snapshot: str, name: str, replace: bool = False, timeout: float | None = None
    ) -> pb.CollectionInfo:
        request = pb.RestoreSnapshotRequest(snapshot=snapshot, name=name, replace=replace)
        return await self._call("RestoreSnapshot", request, timeout)

    async def delete_snapshot(self, snapshot: str) -> None:
        await self._call("DeleteSnapshot", pb.DeleteSnapshotRequest(snapshot=snapshot))

    async def export_snapshot(self, snapshot: str, path: str | Path, timeout: float | None = None) -> Path:
        """As BraidClient.export_snapshot; the file work runs on a thread, off the event loop."""
        target = await asyncio.to_thread(ExportTarget, path)
        request = pb.ExportSnapshotRequest(snapshot=snapshot)
        call = self.stub.ExportSnapshot(request, timeout=STREAM_TIMEOUT_S if timeout is None else timeout)
        try:
            async for chunk in call:
                await asyncio.to_thread(target.write, chunk.data)
        except BaseException:
            call.cancel()
            target.abort()
            raise
        return await asyncio.to_thread(target.finish)

    async def import_snapshot(self, path: str | Path, timeout: float | None = None) -> pb.SnapshotInfo:
        """As BraidClient.import_snapshot; the archive is read on a thread, piece by piece."""
        chunks = await asyncio.to_thread(archive_chunks, path)
        call = self.stub.ImportSnapshot(timeout=STREAM_TIMEOUT_S if timeout is None else timeout)
        try:
            while (data := await asyncio.to_thread(next, chunks, None)) is not None:
                await call.write(pb.SnapshotChunk(data=data))
            await call.done_writing()
            return await call
        except BaseException:
            call.cancel()
            raise
        finally:
            await asyncio.to_thread(chunks.close)

    # --------------------------------------------------------------- documents

    async def upsert(self, collection: str, docs: Iterable[Any]) -> int:
        return (await self._call("Upsert", messages.upsert(collection, docs))).upserted

    async def delete(self, collection: str, ids: Iterable[str] = (), filter: pb.Filter | None = None) -> int:
        return (await self._call("Delete", messages.delete(collection, ids, filter))).deleted

    async def get(self, collection: str, ids: Iterable[str], include_vectors: bool = False) -> list[pb.Document]:
        return list((await self._call("Get", messages.get(collection, ids, include_vectors))).documents)

    async def count(self, collection: str, filter: pb.Filter | None = None) -> int:
        return (await self._call("Count", messages.count(collection, filter))).count

    async def flush(self, collection: str) -> None:
        await self._call("Flush", pb.FlushRequest(collection=collection))

    async def bulk_upsert(
        self,
        collection: str,
        docs: Iterable[Any] | AsyncIterable[Any],
        batch_size: int = 500,
        timeout: float | None = None,
    ) -> pb.BulkUpsertResponse:
        """Stream ``docs`` in batches of ``batch_size`` over one BulkUpsert call (as BraidClient's).

        Cancelled, it stops taking documents, lets the batch being written go, half-closes
        the stream and raises CancelledError from a WriteInterrupted with the server's count
        of what it applied and the batches after those (the unsent rest of ``docs`` excluded).
        """
        call = self.stub.BulkUpsert(timeout=STREAM_TIMEOUT_S if timeout is None else timeout)
        batcher = messages.Batcher(collection, batch_size)
        sent: list[pb.UpsertRequest] = []
        # Each write runs as its own task, shielded, so a cancel that lands during a write does
        # not cancel the call (grpc.aio would) before the stream can be half-closed.
        writing: asyncio.Future[None] | None = None
        try:
            async for doc in _items(docs):
                if (batch := batcher.add(doc)) is not None:
                    sent.append(batch)
                    writing = asyncio.ensure_future(call.write(batch))
                    await asyncio.shield(writing)
            if (batch := batcher.rest()) is not None:
                sent.append(batch)
                writing = asyncio.ensure_future(call.write(batch))
                await asyncio.shield(writing)
            writing = asyncio.ensure_future(_close(call))
            return await asyncio.shield(writing)
        except asyncio.CancelledError:
            report = await self._stop_bulk(call, writing, sent, batcher.rest())
            raise asyncio.CancelledError(str(report)) from report
        except BaseException:
            call.cancel()
            raise

    async def _stop_bulk(
        self,
        call: Any,
        writing: asyncio.Future[Any] | None,
        sent: list[pb.UpsertRequest],
        unsent: pb.UpsertRequest | None,
    ) -> WriteInterrupted:
        """End a cancelled BulkUpsert as cleanly as the grace allows and say what it applied."""

        async def settle() -> Any:
            if writing is not None:
                await writing  # the batch under way, or the close itself
            return await _close(call)

        settling = asyncio.ensure_future(settle())
        applied: pb.BulkUpsertResponse | None
        try:
            applied = await asyncio.wait_for(asyncio.shield(settling), self.cancel_grace_s)
        except grpc.RpcError as err:  # the stream failed; its trailers still count what was applied
            applied = _applied_of(err)
        except (TimeoutError, asyncio.CancelledError):  # no answer in time, or cancelled again
            settling.cancel()
            call.cancel()
            applied = None
        done = 0 if applied is None else applied.batches
        return WriteInterrupted(applied, sent[done:] + ([unsent] if unsent is not None else []))

    async def upsert_stream(
        self,
        requests: Iterable[pb.UpsertRequest] | AsyncIterable[pb.UpsertRequest],
        window: int = 4,
        timeout: float | None = None,
    ) -> AsyncIterator[tuple[pb.UpsertRequest, pb.UpsertStreamAck]]:
        """Send ``requests`` over one UpsertStream call and yield each with its acknowledgement,
        in order, as the server makes it durable; at most ``window`` batches in flight.

        As BraidClient.upsert_stream: on failure raises ``StreamFailed`` (the call's error and
        the batches sent without an ack); an exception ``requests`` raises ends the stream
        cleanly and is re-raised after the acks before it. Cancelled, it cancels the call and
        raises CancelledError from a WriteInterrupted (applied: the acked batches). Close it
        (``contextlib.aclosing``) when leaving the loop early, or the call stays open until
        the generator is collected.
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        call = self.stub.UpsertStream(timeout=STREAM_TIMEOUT_S if timeout is None else timeout)
        in_flight: collections.deque[pb.UpsertRequest] = collections.deque()
        slots = asyncio.Semaphore(window)
        broken: list[BaseException] = []
        pulled = asyncio.Event()  # set while no pull from ``requests`` is under way
        pulled.set()

        async def feed() -> None:
            source = _items(requests).__aiter__()
            try:
                while True:
                    await slots.acquire()
                    pulled.clear()
                    try:
                        request = await source.__anext__()
                    except StopAsyncIteration:
                        break
                    except Exception as err:  # re-raised to the caller, after the acks so far
                        broken.append(err)
                        break
                    finally:
                        pulled.set()
                    in_flight.append(request)  # before the write: a failure then counts it unacked
                    await call.write(request)
                await call.done_writing()
            except (grpc.RpcError, asyncio.InvalidStateError):
                return  # the call failed: the reading side reports it

        feeder = asyncio.ensure_future(feed())
        applied = pb.BulkUpsertResponse()
        try:
            async for ack in call:
                request = in_flight.popleft()
                slots.release()
                applied.batches += 1
                applied.upserted += ack.upserted
                yield request, ack
            await feeder
            if broken:
                raise broken[0]
        except grpc.RpcError as err:
            await pulled.wait()  # a pull under way lands in in_flight first (as BraidClient's)
            feeder.cancel()
            raise StreamFailed(err, list(in_flight)) from err
        except asyncio.CancelledError:
            feeder.cancel()  # a pull under way is cancelled: it never took a batch
            call.cancel()
            report = WriteInterrupted(applied, list(in_flight))
            raise asyncio.CancelledError(str(report)) from report
        finally:
            feeder.cancel()
            call.cancel()

    # ------------------------------------------------------------------ search

    async def search(
        self,
        collection: str,
        *,
        dense: tuple[str, Any] | pb.DenseQuery | None = None,
        bm25: str | pb.Bm25Query | None = None,
        sparse: tuple[str, Any] | pb.SparseQuery | None = None,
        queries: Iterable[pb.SubQuery] = (),
        filter: pb.Filter | None = None,
        fusion: pb.Fusion | str | None = None,
        weights: Mapping[str, float] | None = None,
        depth: int | Mapping[str, int] | None = None,
        limit: int = 10,
        offset: int = 0,
        score_threshold: float | None = None,
        payload_fields: Iterable[str] = (),
        include_payload: bool = False,
        text_fields: Iterable[str] | None = None,
        explain: bool = False,
        timeout: float | None = None,
    ) -> list[pb.Hit]:
        """One search: the arguments of BraidClient.search, which documents them. The hits, best first."""
        request = messages.search(
            collection,
            dense=dense,
            bm25=bm25,
            sparse=sparse,
            queries=queries,
            filter=filter,
            fusion=fusion,
            weights=weights,
            depth=depth,
            limit=limit,
            offset=offset,
            score_threshold=score_threshold,
            payload_fields=payload_fields,
            include_payload=include_payload,
            text_fields=text_fields,
            explain=explain,
        )
        return list((await self.search_request(request, timeout=timeout)).hits)

    async def search_request(self, request: pb.SearchRequest, timeout: float | None = None) -> pb.SearchResponse:
        """Send a SearchRequest built by hand, as it is."""
        return await self._call("Search", request, timeout)

    async def batch_search(
        self, requests: Iterable[pb.SearchRequest], timeout: float | None = None
    ) -> list[pb.SearchResponse]:
        """Several searches in one round trip; one SearchResponse per request, in order."""
        return list((await self._call("BatchSearch", messages.batch_search(requests), timeout)).results)


async def _close(call: Any) -> Any:
    """Half-close a client stream and wait for its answer."""
    await call.done_writing()
    return await call


def _applied_of(err: grpc.RpcError) -> pb.BulkUpsertResponse | None:
    """What a failed write stream applied, from its trailing metadata; None when it did not say."""
    trailing = dict(err.trailing_metadata() or ())
    try:
        return pb.BulkUpsertResponse(
            batches=int(trailing[BATCHES_APPLIED_KEY]), upserted=int(trailing[DOCUMENTS_APPLIED_KEY])
        )
    except (KeyError, TypeError, ValueError):
        return None
