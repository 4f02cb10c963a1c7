"""The asyncio face of braid.v1.Braid: decoding, API keys, admission, status codes, streams.

Handlers are registered from the proto descriptor (one per method), each with a
request parser that never raises: a body protobuf cannot decode (garbage, invalid
UTF-8, nesting past protobuf's limit) arrives as ``Undecodable`` and is answered
INVALID_ARGUMENT, not INTERNAL. The blocking body of each RPC (service/rpcs.py) runs on
a worker thread that service/admission.py grants.

BulkUpsert and UpsertStream read their stream on the event loop, so a silent stream holds
no worker. One ends with DEADLINE_EXCEEDED after ``stream_idle_timeout_s`` without a
message (or, for UpsertStream, with an acknowledgement the client does not read), and
with UNAVAILABLE when shutdown ends it. UpsertStream acknowledges each batch once it is
durable, in order. Every answer, success or failure, says how many
batches and documents were applied: in the message of an error and always in the
trailing metadata ``braid-batches-applied`` / ``braid-documents-applied``.

The snapshot streams hold a stream slot too. ExportSnapshot reads each 1 MiB piece of the
archive on a worker and writes it on the loop; a client that cancels or goes away ends it
at its next await and leaves no worker reading, one that stops reading is ended after
``stream_idle_timeout_s``. ImportSnapshot reads its stream as BulkUpsert does (the same
idle timeout), writes each piece on a worker to a hidden file that goes whatever happens,
and checks and lists the snapshot on a worker at the end.

Every handler runs inside a ``CallObserver`` (service/observe.py): the call's request id
(echoed as trailing metadata ``x-request-id``), its metrics and the slow-query log.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from braid.index import pacing
from braid.index.errors import InvalidArgument, Unavailable
from braid.v1 import braid_pb2 as pb

from .admission import RETRY_PUSHBACK_KEY, Admission, Overloaded, TimedOut
from .config import ServerConfig
from .encoding import Encoding
from .errors import describe
from .logs import with_request_id
from .observe import CallObserver
from .rpcs import BraidRpcs

_log = logging.getLogger("braid.handlers")
SERVICE = pb.DESCRIPTOR.services_by_name["Braid"]
SERVICE_NAME = SERVICE.full_name
BATCHES_APPLIED_KEY = "braid-batches-applied"
DOCUMENTS_APPLIED_KEY = "braid-documents-applied"
# Errors a handler lets through untouched: the call is gone or the process is stopping.
PASS_THROUGH = (asyncio.CancelledError, KeyboardInterrupt, SystemExit)


class Undecodable:
    """A request body protobuf could not parse."""

    __slots__ = ("error", "size", "type_name")

    def __init__(self, type_name: str, size: int, error: BaseException) -> None:
        self.type_name, self.size, self.error = type_name, size, error

    def problem(self) -> str:
        return (
            f"request: cannot decode {self.type_name} ({self.size} bytes): {self.error}; a body must be a "
            f"valid protobuf message with UTF-8 strings, nested at most 100 messages deep"
        )


def check_decoded(request: Any) -> None:
    """A request body protobuf could not decode is the client's INVALID_ARGUMENT."""
    if isinstance(request, Undecodable):
        raise InvalidArgument(request.problem())


async def run_admitted(
    admission: Admission, context: grpc.aio.ServicerContext, work: Callable[[], Any], quick: Callable[[], bool]
) -> Any:
    """A unary body, as every gRPC face of a Braid process runs it (braid.v1 here, the shard
    server's braid.cluster.v1.Shard): on the event loop itself when no worker is busy and
    ``quick()`` says the thread hop would cost as much as the body, else on an admitted worker
    within the call's deadline."""
    if admission.outstanding == 0 and quick():
        return work()
    return await admission.run(work, deadline_of(context))


def parser(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: what protobuf cannot decode comes as ``Undecodable``."""

    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except Exception as err:  # DecodeError, RecursionError, ...: the client's fault, never ours
            return Undecodable(message_class.DESCRIPTOR.full_name, len(data), err)

    return parse


def _collections(request: Any) -> list[str]:
    """The collections a request names, as given (an alias is checked by its own name), for API
    keys scoped to collections; both names of CreateAlias and UpdateAlias. ListSnapshots without
    a collection names none (its body shows a scoped key its own snapshots only)."""
    fields = request.DESCRIPTOR.fields_by_name
    if "searches" in fields:
        return [search.collection for search in request.searches]
    if isinstance(request, pb.ListSnapshotsRequest) and not request.collection:
        return []
    return [getattr(request, name) for name in ("collection", "name") if name in fields]


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline as a time.monotonic() instant; None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# Bodies that take the caller's scope (``Principal.allows``) when the server has API keys: lists
# show a scoped key its own collections' entries, and a snapshot is its collection's.
SCOPED_BODIES = frozenset({"ListCollections", "ListAliases", "ListSnapshots", "RestoreSnapshot", "DeleteSnapshot"})


class BraidHandlers:
    def __init__(
        self,
        catalog: Any,
        encoding: Encoding,
        admission: Admission,
        config: ServerConfig,
        keys: Any | None,
        rpcs_class: type[BraidRpcs] = BraidRpcs,
        observer: CallObserver | None = None,
    ) -> None:
        self.rpcs = rpcs_class(catalog, encoding, config.max_message_bytes)
        self.observer = observer or CallObserver(SERVICE_NAME)  # request ids; metrics and slow queries when on
        self.admission = admission
        self.keys = keys
        self.idle_timeout = config.stream_idle_timeout_s
        self._ending = asyncio.Event()

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in SERVICE.methods:
            parse = parser(getattr(pb, method.input_type.name))
            serialize = getattr(pb, method.output_type.name).SerializeToString
            if method.client_streaming and method.server_streaming:
                assert method.name == "UpsertStream", method.name
                handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                    self.observer.stream(method.name, self._upsert_stream),
                    request_deserializer=parse,
                    response_serializer=serialize,
                )
            elif method.client_streaming:
                assert method.name in ("BulkUpsert", "ImportSnapshot"), method.name
                body = self._bulk_upsert if method.name == "BulkUpsert" else self._import_snapshot
                handlers[method.name] = grpc.stream_unary_rpc_method_handler(
                    self.observer.stream(method.name, body),
                    request_deserializer=parse,
                    response_serializer=serialize,
                )
            elif method.server_streaming:
                assert method.name == "ExportSnapshot", method.name
                handlers[method.name] = grpc.unary_stream_rpc_method_handler(
                    self.observer.unary(method.name, self._export_snapshot),
                    request_deserializer=parse,
                    response_serializer=serialize,
                )
            else:
                handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                    self.observer.unary(method.name, self._unary(method.name)),
                    request_deserializer=parse,
                    response_serializer=serialize,
                )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def end_streams(self) -> None:
        """Shutdown: every open stream ends after its current batch with UNAVAILABLE and its counts."""
        self._ending.set()

    # ---------------------------------------------------------------- pieces

    def _authorize(self, context: grpc.aio.ServicerContext, method: str, collections: Sequence[str]) -> Any:
        """The caller's principal (None when the server has no API keys); raises if it may not call."""
        if self.keys is None:
            return None
        principal = self.keys.authenticate(context.invocation_metadata() or ())
        self.keys.authorize(principal, method, collections)
        return principal

    @staticmethod
    async def _abort(
        context: grpc.aio.ServicerContext, err: BaseException, trailing: tuple = (), template: str = "{}"
    ) -> None:
        code, message = describe(err)
        message = template.format(message)
        if isinstance(err, Overloaded):
            trailing += ((RETRY_PUSHBACK_KEY, str(err.retry_after_ms)),)
        if trailing:  # else the abort keeps the x-request-id already set (service/observe.py)
            trailing = with_request_id(trailing)
        await context.abort(code, message, trailing_metadata=trailing)

    # ----------------------------------------------------------------- unary

    def _quick(self, name: str, request: Any) -> bool:
        return name == "Search" and self.rpcs.quick(request)

    def _unary(self, name: str) -> Callable[..., Any]:
        body = getattr(self.rpcs, name)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                check_decoded(request)
                principal = self._authorize(context, name, _collections(request))
                work = functools.partial(body, request)
                if name in SCOPED_BODIES and principal is not None:
                    work = functools.partial(body, request, principal.allows)
                if name == "Search" and (on_loop := self.rpcs.on_loop(request, deadline_of(context))) is not None:
                    return await on_loop  # a router's fan-out of a plain dense search: no thread, no blocking
                # The thread hop costs as much as a quick search itself (~10% of a single client's
                # dense throughput, 15-30% of its BM25): run it here while no worker is busy. A
                # health check then waits at most for the quick searches ahead of it, each about a
                # millisecond at most (BraidRpcs.quick).
                quick = functools.partial(self._quick, name, request)
                return await run_admitted(self.admission, context, work, quick)
            except PASS_THROUGH:
                raise
            except BaseException as err:  # tantivy's PanicException is a BaseException: answer, never hang
                failure = err
            await self._abort(context, failure)

        handle.__name__ = name
        return handle

    # ---------------------------------------------------------------- stream

    async def _bulk_upsert(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        applied = _Applied()
        try:
            await self._apply_stream("BulkUpsert", requests, context, applied, None)
            context.set_trailing_metadata(with_request_id(applied.trailing()))
            return pb.BulkUpsertResponse(upserted=applied.documents, batches=applied.batches)
        except PASS_THROUGH:
            raise
        except BaseException as err:
            failure = err
        await self._abort(context, failure, applied.trailing(), applied.template())

    async def _upsert_stream(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
        applied = _Applied()

        async def acknowledge(upserted: int) -> None:
            # A client that stops reading acks fills the flow-control window and then blocks
            # this write: it is ended like a silent client, never held open for good.
            ack = pb.UpsertStreamAck(batch=applied.batches, upserted=upserted)
            try:
                await asyncio.wait_for(context.write(ack), self.idle_timeout)
            except TimeoutError:
                raise TimedOut(
                    f"stream_idle_timeout_s: the client read no acknowledgement for {self.idle_timeout:g} s"
                ) from None

        try:
            await self._apply_stream("UpsertStream", requests, context, applied, acknowledge)
            context.set_trailing_metadata(with_request_id(applied.trailing()))
            return
        except PASS_THROUGH:
            raise
        except BaseException as err:
            failure = err
        try:
            await self._abort(context, failure, applied.trailing(), applied.template())
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            # The ack the client never read is still stuck in the call, so gRPC cannot send the
            # status either. The stream's slot and worker are free already; the call itself ends
            # at the client's deadline or when its connection goes.
            _log.info("UpsertStream from %s ended without a status: %s (%s)", context.peer(), failure, err)

    async def _apply_stream(
        self,
        method: str,
        requests: AsyncIterator[Any],
        context: grpc.aio.ServicerContext,
        applied: _Applied,
        acknowledge: Callable[[int], Any] | None,
    ) -> None:
        """Apply a stream's batches in order, counting each in ``applied`` (and acknowledging it,
        when ``acknowledge`` is given) once it is durable; the writer finishes at the stream's end."""
        principal = self._authorize(context, method, ())
        with self.admission.stream(context.peer()):
            writer = self.rpcs.stream_writer()
            messages = requests.__aiter__()
            while (batch := await self._next_message(messages)) is not None:
                if isinstance(batch, Undecodable):
                    raise InvalidArgument(batch.problem())
                if principal is not None:
                    self.keys.authorize(principal, method, [batch.collection])
                upserted = await self.admission.run(functools.partial(writer.upsert, batch), deadline_of(context))
                if acknowledge is not None:
                    await acknowledge(upserted)
                applied.add(upserted)
                if self._ending.is_set():
                    raise Unavailable("server shutting down")
                # Searches first (index/pacing.py): rest here, on the loop, holding no worker, so
                # searches keep the event loop's quick path meanwhile.
                await pacing.rest_async(writer.rest_s)
            await self.admission.run(writer.finish, deadline_of(context))

    async def _next_message(self, messages: AsyncIterator[Any]) -> Any:
        """The next message, or None at the end of the stream; raises on idle timeout or shutdown."""
        read = asyncio.ensure_future(messages.__anext__())
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            done, _ = await asyncio.wait({read, ending}, timeout=self.idle_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ending.cancel()
        if read in done:
            try:
                return read.result()
            except StopAsyncIteration:
                return None
        read.cancel()
        if ending in done:
            raise Unavailable("server shutting down")
        raise TimedOut(f"stream_idle_timeout_s: no message for {self.idle_timeout:g} s")

    # -------------------------------------------------------------- snapshots

    async def _export_snapshot(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        """The snapshot's tar archive as a stream of SnapshotChunk. Each piece is read on an
        admitted worker; a client that goes away or cancels ends the call at its next await, and
        the archive (its open file) is closed once no worker reads it. A client that stops
        reading is ended like a silent stream (``stream_idle_timeout_s``)."""
        pieces = None
        pending: asyncio.Future | None = None
        opening: asyncio.Future | None = None
        try:
            check_decoded(request)
            principal = self._authorize(context, "ExportSnapshot", ())
            visible = principal.allows if principal is not None else None
            with self.admission.stream(context.peer()):
                opening = asyncio.ensure_future(
                    self.admission.run(
                        functools.partial(self.rpcs.ExportSnapshot, request, visible), deadline_of(context)
                    )
                )
                # Shielded too: opening may take long (a router downloads every shard first), and an
                # archive opened after the client went away must still be closed (its scratch copy).
                pieces = await asyncio.shield(opening)
                opening = None
                while True:
                    pending = asyncio.ensure_future(self.admission.run(functools.partial(next, pieces, None)))
                    # Shielded: a cancelled call leaves the read to finish, then the archive is closed.
                    data = await asyncio.shield(pending)
                    pending = None
                    if data is None:
                        return
                    try:
                        await asyncio.wait_for(context.write(pb.SnapshotChunk(data=data)), self.idle_timeout)
                    except TimeoutError:
                        raise TimedOut(
                            f"stream_idle_timeout_s: the client read no chunk for {self.idle_timeout:g} s"
                        ) from None
                    if self._ending.is_set():
                        raise Unavailable("server shutting down")
        except PASS_THROUGH:
            raise
        except BaseException as err:
            failure = err
        finally:
            if opening is not None:
                opening.add_done_callback(_close_opened)
            _close_when_done(pieces, pending)
        await self._abort(context, failure)

    async def _import_snapshot(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        """An archive streamed as SnapshotChunk messages, written to a hidden file of the snapshot
        store as it arrives (each piece on a worker), then checked and listed on a worker. A
        client that goes silent is ended after ``stream_idle_timeout_s``; the file never stays."""
        upload = None
        try:
            principal = self._authorize(context, "ImportSnapshot", ())
            visible = principal.allows if principal is not None else None
            with self.admission.stream(context.peer()):
                # Made here, not on a worker: a call cancelled meanwhile would leave its file behind.
                upload = self.rpcs.import_upload(visible)
                messages = requests.__aiter__()
                while (chunk := await self._next_message(messages)) is not None:
                    if isinstance(chunk, Undecodable):
                        raise InvalidArgument(chunk.problem())
                    await self.admission.run(functools.partial(upload.write, chunk), deadline_of(context))
                    if self._ending.is_set():
                        raise Unavailable("server shutting down")
                return await self.admission.run(upload.finish, deadline_of(context))
        except PASS_THROUGH:
            raise
        except BaseException as err:
            failure = err
        finally:
            if upload is not None:
                upload.close()  # an unlink: waits at most for one piece's write
        await self._abort(context, failure)


def _close_opened(opening: asyncio.Future) -> None:
    """Close the archive an export opened after its call ended (cancelled, or refused meanwhile)."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _close_when_done(pieces: Any, pending: asyncio.Future | None) -> None:
    """Close an export's archive now, or once the worker reading it returns (a generator cannot
    be closed while it runs)."""
    if pieces is None:
        return
    if pending is None or pending.done():
        pieces.close()
    else:
        pending.add_done_callback(lambda _: pieces.close())


class _Applied:
    """What a write stream has applied so far: told to the client on success and on failure."""

    def __init__(self) -> None:
        self.batches = 0
        self.documents = 0

    def add(self, documents: int) -> None:
        self.batches += 1
        self.documents += documents

    def trailing(self) -> tuple:
        return ((BATCHES_APPLIED_KEY, str(self.batches)), (DOCUMENTS_APPLIED_KEY, str(self.documents)))

    def template(self) -> str:
        """The failure message around the error's own: which batch failed and what stays applied."""
        return f"batch {self.batches}: {{}}; {self.batches} earlier batches ({self.documents} documents) were applied"
