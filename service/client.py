"""A small, friendly Python client for braid.v1.Braid.

    with BraidClient("127.0.0.1:50051") as braid:
        braid.create_collection("docs", schema)
        braid.upsert("docs", [{"id": "a", "text": {"body": "hello"}, "dense": {"emb": vec}}])
        hits = braid.search("docs", bm25="hello", dense=("emb", vec), limit=5)

Documents may be given as braid.v1 ``Document`` messages or as dicts (service/messages.py,
which builds every request this client and the asyncio one, service/aio.py, send).

Security (docs/security.md): any of ``tls_ca``, ``tls_cert``, ``tls_key`` or
``server_name`` makes the channel TLS (``tls_cert`` + ``tls_key`` for mutual TLS), and
``api_key`` is sent as ``authorization: Bearer <key>`` on every call, ``client.stub``
calls included:

    BraidClient("braid.internal:50051", tls_ca="ca.pem", api_key=os.environ["BRAID_API_KEY"])

Every call has a deadline: ``timeout`` seconds (default 60), or for the BulkUpsert and
UpsertStream streams their own ``timeout=`` or else STREAM_TIMEOUT_S. ``upsert_stream``
yields each batch with its acknowledgement, which is what resumable jobs and honest
progress bars count.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc

from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from . import messages
from .messages import (  # noqa: F401  (re-exported: the names callers import from here)
    FUSIONS,
    MESSAGE_BYTES,
    STRANDS,
    STREAM_TIMEOUT_S,
    as_dict,
    dense_vector,
    document,
    metadata_of,
    sparse_vector,
    value,
)
from .snapshot_files import ExportTarget, archive_chunks


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _Metadata(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the API key) to every call of the channel.

    Per-call metadata rather than grpc.access_token_call_credentials: call credentials
    are only sent over TLS, and a key must also work on a plaintext loopback channel.
    """

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def _details(self, details: grpc.ClientCallDetails) -> _CallDetails:
        metadata = list(details.metadata or ())
        names = {name for name, _ in metadata}
        metadata += [(name, item) for name, item in self.pairs if name not in names]
        return _CallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request_iterator)


class StreamFailed(Exception):
    """An UpsertStream call that ended with an error: the status and the batches it left unacknowledged."""

    def __init__(self, error: grpc.RpcError, unacked: list[pb.UpsertRequest]) -> None:
        super().__init__(f"{error.code().name}: {error.details()}")
        self.error = error
        self.unacked = unacked

    def code(self) -> grpc.StatusCode:
        return self.error.code()


class BraidClient:
    """Thin wrapper over the generated stub; every method raises grpc.RpcError on a non-OK status.

    Args:
        address: host:port of the server.
        timeout: deadline in seconds of every unary call (a BulkUpsert stream: see bulk_upsert).
        tls_ca: PEM CA bundle that signed the server's certificate (TLS; default the system roots).
        tls_cert, tls_key: PEM client certificate and key, for a server that requires mutual TLS.
        api_key: sent as ``authorization: Bearer <key>`` on every call (plaintext channels too).
        server_name: the name to verify the server's certificate against, when it differs from
            the host in ``address`` (sets grpc.ssl_target_name_override); implies TLS.
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
    ) -> None:
        messages.check_timeout(timeout)
        key_metadata = messages.api_key_metadata(api_key) if api_key is not None else None
        options, credentials = messages.channel_setup(tls_ca, tls_cert, tls_key, server_name)
        if credentials is not None:
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self.channel: grpc.Channel = self._channel
        if key_metadata is not None:
            self.channel = grpc.intercept_channel(self._channel, _Metadata(key_metadata))
        self.stub = braid_pb2_grpc.BraidStub(self.channel)
        self.timeout = timeout

    def __enter__(self) -> BraidClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _deadline(self, timeout: float | None) -> float:
        return self.timeout if timeout is None else timeout

    # ------------------------------------------------------------- collections

    def create_collection(
        self, name: str, schema: pb.Schema, shards: int = 1, replication_factor: int = 0
    ) -> pb.CollectionInfo:
        """``replication_factor`` 0: the server's default (1 standalone, 2 in a cluster of 2+ shard servers)."""
        request = messages.create_collection(name, schema, shards, replication_factor)
        return self.stub.CreateCollection(request, timeout=self.timeout)

    def get_collection(self, name: str) -> pb.CollectionInfo:
        return self.stub.GetCollection(pb.GetCollectionRequest(name=name), timeout=self.timeout)

    def list_collections(self) -> list[pb.CollectionInfo]:
        return list(self.stub.ListCollections(pb.ListCollectionsRequest(), timeout=self.timeout).collections)

    def delete_collection(self, name: str) -> None:
        self.stub.DeleteCollection(pb.DeleteCollectionRequest(name=name), timeout=self.timeout)

    # ----------------------------------------------------------------- aliases
    # An alias is a second name of a collection, usable wherever a collection name is;
    # update_alias moves it atomically (zero-downtime reindex: build a new collection, then move).

    def create_alias(self, name: str, collection: str) -> pb.Alias:
        request = pb.CreateAliasRequest(name=name, collection=collection)
        return self.stub.CreateAlias(request, timeout=self.timeout)

    def update_alias(self, name: str, collection: str) -> pb.Alias:
        request = pb.UpdateAliasRequest(name=name, collection=collection)
        return self.stub.UpdateAlias(request, timeout=self.timeout)

    def delete_alias(self, name: str) -> None:
        self.stub.DeleteAlias(pb.DeleteAliasRequest(name=name), timeout=self.timeout)

    def list_aliases(self) -> list[pb.Alias]:
        return list(self.stub.ListAliases(pb.ListAliasesRequest(), timeout=self.timeout).aliases)

    # --------------------------------------------------------------- snapshots
    # A snapshot is a consistent copy of a collection on the server's disk (docs/operations.md,
    # "Backup and restore"); export it to take it off the machine. Taking and restoring one
    # may take longer than a search: ``timeout`` overrides the client's for that call.

    def create_snapshot(self, collection: str, timeout: float | None = None) -> pb.SnapshotInfo:
        request = pb.CreateSnapshotRequest(collection=collection)
        return self.stub.CreateSnapshot(request, timeout=self._deadline(timeout))

    def list_snapshots(self, collection: str = "") -> list[pb.SnapshotInfo]:
        """Every snapshot, oldest first, or ``collection``'s."""
        request = pb.ListSnapshotsRequest(collection=collection)
        return list(self.stub.ListSnapshots(request, timeout=self.timeout).snapshots)

    def restore_snapshot(
        self, snapshot: str, name: str, replace: bool = False, timeout: float | None = None
    ) -> pb.CollectionInfo:
        """Restore ``snapshot`` as collection ``name`` (ALREADY_EXISTS when taken, unless ``replace``)."""
        request = pb.RestoreSnapshotRequest(snapshot=snapshot, name=name, replace=replace)
        return self.stub.RestoreSnapshot(request, timeout=self._deadline(timeout))

    def delete_snapshot(self, snapshot: str) -> None:
        self.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(snapshot=snapshot), timeout=self.timeout)

    def export_snapshot(self, snapshot: str, path: str | Path, timeout: float | None = None) -> Path:
        """Download ``snapshot`` into ``path``: a .tar file, or, when ``path`` is a directory or
        ends with '/', the snapshot's directory ``path/<snapshot>/``, checked against its
        checksums (service/snapshot_files.py). Returns what it wrote; a failed export leaves
        nothing. ``timeout``: the whole download's deadline (default STREAM_TIMEOUT_S)."""
        target = ExportTarget(path)
        request = pb.ExportSnapshotRequest(snapshot=snapshot)
        call = self.stub.ExportSnapshot(request, timeout=STREAM_TIMEOUT_S if timeout is None else timeout)
        try:
            for chunk in call:
                target.write(chunk.data)
        except BaseException:
            call.cancel()
            target.abort()
            raise
        return target.finish()

    def import_snapshot(self, path: str | Path, timeout: float | None = None) -> pb.SnapshotInfo:
        """Upload a snapshot from ``path``: a .tar file export_snapshot wrote, or a snapshot
        directory (tarred on the fly). It is listed under the name it carries once the server
        checked every file. ``timeout``: the whole upload's deadline (default STREAM_TIMEOUT_S)."""
        chunks = (pb.SnapshotChunk(data=data) for data in archive_chunks(path))
        return self.stub.ImportSnapshot(chunks, timeout=STREAM_TIMEOUT_S if timeout is None else timeout)

    # --------------------------------------------------------------- documents

    def upsert(self, collection: str, docs: Iterable[Any]) -> int:
        request = messages.upsert(collection, docs)
        return self.stub.Upsert(request, timeout=self.timeout).upserted

    def bulk_upsert(
        self, collection: str, docs: Iterable[Any], batch_size: int = 500, timeout: float | None = None
    ) -> pb.BulkUpsertResponse:
        """Stream ``docs`` in batches of ``batch_size``.

        ``timeout`` is the deadline of the whole stream (default STREAM_TIMEOUT_S, not the
        client's per-call ``timeout``: a stream may carry a whole corpus).
        """

        def batches() -> Iterator[pb.UpsertRequest]:
            batcher = messages.Batcher(collection, batch_size)
            for doc in docs:
                if (batch := batcher.add(doc)) is not None:
                    yield batch
            if (batch := batcher.rest()) is not None:
                yield batch

        return self.stub.BulkUpsert(batches(), timeout=STREAM_TIMEOUT_S if timeout is None else timeout)

    def upsert_stream(
        self, requests: Iterable[pb.UpsertRequest], window: int = 4, timeout: float | None = None
    ) -> Iterator[tuple[pb.UpsertRequest, pb.UpsertStreamAck]]:
        """Send ``requests`` over one UpsertStream call and yield each with its acknowledgement,
        in order, as the server makes it durable. At most ``window`` batches are in flight, so
        the server always has the next batch while the client never runs far ahead of it.

        On failure raises ``StreamFailed``: its ``error`` is the call's grpc.RpcError and its
        ``unacked`` the batches sent without an ack (their effect is unknown; upserts are
        idempotent, so a retry resends them). ``requests`` is left just past the last batch sent.
        An exception ``requests`` raises ends the stream cleanly and is re-raised here after
        the acknowledgements of the batches before it.
        ``timeout``: the deadline of the whole stream (default STREAM_TIMEOUT_S).
        """
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        in_flight: collections.deque[pb.UpsertRequest] = collections.deque()
        slots = threading.Semaphore(window)
        # ``state`` guards in_flight and the two flags. A batch taken from ``requests`` is put
        # in flight as soon as it is taken, and a failure waits for a pull under way to land
        # there, so ``unacked`` misses nothing; acks never wait for a pull (which may encode).
        state = threading.Condition()
        ended = pulling = False
        source = iter(requests)
        broken: list[BaseException] = []

        def feed() -> Iterator[pb.UpsertRequest]:
            # Runs on gRPC's sending thread.
            nonlocal pulling
            while True:
                while not slots.acquire(timeout=0.2):
                    if ended:  # the call is over: stop waiting here
                        return
                with state:
                    if ended:
                        return
                    pulling = True
                request = None
                try:
                    request = next(source, None)
                except BaseException as err:  # re-raised on the caller's thread, after the acks so far
                    broken.append(err)
                finally:
                    with state:
                        pulling = False
                        if request is not None:
                            in_flight.append(request)
                        state.notify_all()
                if request is None or ended:
                    return
                yield request

        call = self.stub.UpsertStream(feed(), timeout=STREAM_TIMEOUT_S if timeout is None else timeout)
        try:
            for ack in call:
                with state:
                    request = in_flight.popleft()
                slots.release()
                yield request, ack
            if broken:  # ``requests`` raised: the batches before it are acknowledged; now the caller hears why
                raise broken[0]
        except grpc.RpcError as err:
            with state:
                ended = True
                state.wait_for(lambda: not pulling, timeout=STREAM_TIMEOUT_S)
                unacked = list(in_flight)
            raise StreamFailed(err, unacked) from err
        finally:
            ended = True
            call.cancel()

    def delete(self, collection: str, ids: Iterable[str] = (), filter: pb.Filter | None = None) -> int:
        request = messages.delete(collection, ids, filter)
        return self.stub.Delete(request, timeout=self.timeout).deleted

    def get(self, collection: str, ids: Iterable[str], include_vectors: bool = False) -> list[pb.Document]:
        request = messages.get(collection, ids, include_vectors)
        return list(self.stub.Get(request, timeout=self.timeout).documents)

    def count(self, collection: str, filter: pb.Filter | None = None) -> int:
        request = messages.count(collection, filter)
        return self.stub.Count(request, timeout=self.timeout).count

    def flush(self, collection: str) -> None:
        self.stub.Flush(pb.FlushRequest(collection=collection), timeout=self.timeout)

    # ------------------------------------------------------------------ search

    def search(
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
        """One search with up to one strand of each kind, plus any ``queries`` given whole.

        Args:
            dense: (field, vector), or (field, "query text") for a field with an encoder, or a DenseQuery
                (for ef, max_lists, eps).
            bm25: query text over every text field, or a Bm25Query (for fields and boosts).
            sparse: (field, vector), (field, "query text") or a SparseQuery.
            queries: further sub-queries, sent as given after the strands above.
            fusion: a Fusion, or by name: "rrf", "minmax", "zscore", "dbsf", "sum" (raw scores).
                None: the server's default (one strand alone, else z-scored weighted sum).
            weights: fusion weight per strand kind, e.g. {"bm25": 0.3, "dense": 1.0}; default 1.
            depth: candidates per strand, one number or per kind ({"dense": 200}); default by the server.
            limit, offset: the page of hits.
            score_threshold: drop hits whose final score is lower.
            payload_fields, include_payload: payload to return (named fields, or all).
            text_fields: stored text to return.
            explain: each hit's rank and score in every strand.
            timeout: deadline of this call (default the client's).

        Returns:
            The hits, best first. ``search_request`` takes a whole SearchRequest.
        """
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
        return list(self.search_request(request, timeout=timeout).hits)

    def search_request(self, request: pb.SearchRequest, timeout: float | None = None) -> pb.SearchResponse:
        """Send a SearchRequest built by hand, as it is."""
        return self.stub.Search(request, timeout=self._deadline(timeout))

    def batch_search(
        self, requests: Iterable[pb.SearchRequest], timeout: float | None = None
    ) -> list[pb.SearchResponse]:
        """Several searches in one round trip; one SearchResponse per request, in order."""
        response = self.stub.BatchSearch(messages.batch_search(requests), timeout=self._deadline(timeout))
        return list(response.results)
