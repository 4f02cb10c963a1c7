"""A small, friendly Python client for braid.v1.Braid.

    with BraidClient("127.0.0.1:50051") as braid:
        braid.create_collection("docs", schema)
        braid.upsert("docs", [{"id": "a", "text": {"body": "hello"}, "dense": {"emb": vec}}])
        hits = braid.search("docs", bm25="hello", dense=("emb", vec), limit=5)

Documents may be given as braid.v1 ``Document`` messages or as dicts with the
keys id, text, dense (field -> list or numpy array), sparse (field -> {term: weight}
or (indices, values)) and payload (field -> str | int | float | bool | datetime).
Vectors are sent in the packed float32 form.

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
import datetime as dt
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from .tls import channel_credentials

# The deadline of a BulkUpsert stream when none is given: generous, as a stream may carry
# a whole corpus, but finite, so a client never waits forever on a dead connection.
STREAM_TIMEOUT_S = 6 * 3600.0
MESSAGE_BYTES = 64 << 20
# Fusion by name, as in braid eval: search(..., fusion="rrf").
FUSIONS: dict[str, pb.Fusion] = {
    "rrf": pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60)),
    "minmax": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.MIN_MAX)),
    "zscore": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.Z_SCORE)),
    "dbsf": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.DBSF)),
    "sum": pb.Fusion(weighted=pb.WeightedSumFusion(normalization=pb.NONE)),
}
STRANDS = ("dense", "bm25", "sparse")


def dense_vector(values: Any) -> pb.DenseVector:
    return pb.DenseVector(packed=np.asarray(values, dtype="<f4").tobytes())


def sparse_vector(value: Any) -> pb.SparseVector:
    if isinstance(value, pb.SparseVector):
        return value
    if isinstance(value, Mapping):
        keys, weights = list(value.keys()), list(value.values())
        if keys and all(isinstance(k, int) for k in keys):
            return pb.SparseVector(indices=keys, values=weights)
        return pb.SparseVector(tokens=[str(k) for k in keys], values=weights)
    indices, values = value
    return pb.SparseVector(indices=list(indices), values=list(values))


def value(item: Any) -> pb.Value:
    if isinstance(item, pb.Value):
        return item
    if isinstance(item, bool):
        return pb.Value(bool=item)
    if isinstance(item, int):
        return pb.Value(int=item)
    if isinstance(item, float):
        return pb.Value(float=item)
    if isinstance(item, dt.datetime):
        out = pb.Value()
        out.datetime.FromDatetime(item if item.tzinfo else item.replace(tzinfo=dt.UTC))
        return out
    return pb.Value(keyword=str(item))


def document(doc: Any) -> pb.Document:
    if isinstance(doc, pb.Document):
        return doc
    out = pb.Document(id=str(doc["id"]), text=doc.get("text", {}))
    for name, vec in doc.get("dense", {}).items():
        out.dense[name].CopyFrom(dense_vector(vec))
    for name, vec in doc.get("sparse", {}).items():
        out.sparse[name].CopyFrom(sparse_vector(vec))
    for name, item in doc.get("payload", {}).items():
        out.payload[name].CopyFrom(value(item))
    return out


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
        metadata += [(name, value) for name, value in self.pairs if name not in names]
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


def _check_api_key(api_key: str) -> None:
    # gRPC rejects such metadata with an obscure error; never echo the key itself.
    if not api_key or any(c.isspace() or not c.isprintable() or not c.isascii() for c in api_key):
        raise ValueError("api_key must be non-empty printable ASCII without spaces")


def _strand(request: pb.SearchRequest, kind: str, query: Any, weights: Mapping[str, float], depth: Any) -> None:
    sub = request.queries.add()
    getattr(sub, kind).CopyFrom(query)
    if kind in weights:
        sub.weight = weights[kind]
    strand_depth = depth.get(kind) if isinstance(depth, Mapping) else depth
    if strand_depth:
        sub.depth = strand_depth


def _fusion(fusion: pb.Fusion | str) -> pb.Fusion:
    if isinstance(fusion, pb.Fusion):
        return fusion
    if fusion not in FUSIONS:
        raise ValueError(f"fusion: unknown value {fusion!r}; valid: {', '.join(sorted(FUSIONS))}")
    return FUSIONS[fusion]


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
        if timeout is None or not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if api_key is not None:
            _check_api_key(api_key)
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", MESSAGE_BYTES),
            ("grpc.max_send_message_length", MESSAGE_BYTES),
        ]
        if any(option is not None for option in (tls_ca, tls_cert, tls_key, server_name)):
            credentials = channel_credentials(
                Path(tls_ca) if tls_ca is not None else None,
                Path(tls_cert) if tls_cert is not None else None,
                Path(tls_key) if tls_key is not None else None,
            )
            if server_name is not None:
                options.append(("grpc.ssl_target_name_override", server_name))
            self._channel = grpc.secure_channel(address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(address, options=options)
        self.channel: grpc.Channel = self._channel
        if api_key is not None:
            self.channel = grpc.intercept_channel(self._channel, _Metadata([("authorization", f"Bearer {api_key}")]))
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
        request = pb.CreateCollectionRequest(
            name=name, schema=schema, shards=shards, replication_factor=replication_factor
        )
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

    # --------------------------------------------------------------- documents

    def upsert(self, collection: str, docs: Iterable[Any]) -> int:
        request = pb.UpsertRequest(collection=collection, documents=[document(d) for d in docs])
        return self.stub.Upsert(request, timeout=self.timeout).upserted

    def bulk_upsert(
        self, collection: str, docs: Iterable[Any], batch_size: int = 500, timeout: float | None = None
    ) -> pb.BulkUpsertResponse:
        """Stream ``docs`` in batches of ``batch_size``.

        ``timeout`` is the deadline of the whole stream (default STREAM_TIMEOUT_S, not the
        client's per-call ``timeout``: a stream may carry a whole corpus).
        """

        def batches() -> Iterator[pb.UpsertRequest]:
            batch: list[pb.Document] = []
            for doc in docs:
                batch.append(document(doc))
                if len(batch) >= batch_size:
                    yield pb.UpsertRequest(collection=collection, documents=batch)
                    batch = []
            if batch:
                yield pb.UpsertRequest(collection=collection, documents=batch)

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
        request = pb.DeleteRequest(collection=collection, ids=list(ids))
        if filter is not None:
            request.filter.CopyFrom(filter)
        return self.stub.Delete(request, timeout=self.timeout).deleted

    def get(self, collection: str, ids: Iterable[str], include_vectors: bool = False) -> list[pb.Document]:
        request = pb.GetRequest(collection=collection, ids=list(ids), include_vectors=include_vectors)
        return list(self.stub.Get(request, timeout=self.timeout).documents)

    def count(self, collection: str, filter: pb.Filter | None = None) -> int:
        request = pb.CountRequest(collection=collection)
        if filter is not None:
            request.filter.CopyFrom(filter)
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
        weights = dict(weights or {})
        depths = depth if isinstance(depth, Mapping) else {}
        unknown = sorted((set(weights) | set(depths)) - set(STRANDS))
        if unknown:
            raise ValueError(f"weights/depth: unknown strand(s) {unknown}; valid: {', '.join(STRANDS)}")
        request = pb.SearchRequest(
            collection=collection,
            limit=limit,
            offset=offset,
            payload_fields=list(payload_fields),
            include_payload=include_payload,
            text_fields=list(text_fields or []),
            explain=explain,
        )
        if dense is not None:
            if not isinstance(dense, pb.DenseQuery):
                field, query = dense
                if isinstance(query, str):  # text for a field with an encoder
                    dense = pb.DenseQuery(field=field, text=query)
                else:
                    dense = pb.DenseQuery(field=field, vector=dense_vector(query))
            _strand(request, "dense", dense, weights, depth)
        if bm25 is not None:
            _strand(
                request, "bm25", bm25 if isinstance(bm25, pb.Bm25Query) else pb.Bm25Query(text=bm25), weights, depth
            )
        if sparse is not None:
            if not isinstance(sparse, pb.SparseQuery):
                field, query = sparse
                if isinstance(query, str):
                    sparse = pb.SparseQuery(field=field, text=query)
                else:
                    sparse = pb.SparseQuery(field=field, vector=sparse_vector(query))
            _strand(request, "sparse", sparse, weights, depth)
        request.queries.extend(queries)
        if filter is not None:
            request.filter.CopyFrom(filter)
        if fusion is not None:
            request.fusion.CopyFrom(_fusion(fusion))
        if score_threshold is not None:
            request.score_threshold = score_threshold
        return list(self.search_request(request, timeout=timeout).hits)

    def search_request(self, request: pb.SearchRequest, timeout: float | None = None) -> pb.SearchResponse:
        """Send a SearchRequest built by hand, as it is."""
        return self.stub.Search(request, timeout=self._deadline(timeout))

    def batch_search(
        self, requests: Iterable[pb.SearchRequest], timeout: float | None = None
    ) -> list[pb.SearchResponse]:
        """Several searches in one round trip; one SearchResponse per request, in order."""
        response = self.stub.BatchSearch(
            pb.BatchSearchRequest(searches=list(requests)), timeout=self._deadline(timeout)
        )
        return list(response.results)
