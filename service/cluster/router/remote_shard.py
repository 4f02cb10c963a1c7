"""``RemoteShard``: one shard of a collection as a router reads it, for one request.

It offers index/shard_api.py's ``ShardReads`` over braid.cluster.v1.Shard (search -> Search,
search_dense -> SearchDense, text_stats -> TextStats, sparse_stats -> TermStats, count ->
Count, fetch -> Fetch), so the router ranks, fuses and fetches through index/collection.py's
``Scatter`` as a standalone collection does. Each read runs on one replica of the shard with
failover (replicas.py ``Tries``); ``remote_map`` starts every shard's call before it waits
for any (``start_*``, a ``Pending`` each), so all shards' calls are in flight at once from the
calling thread, with no thread per shard.

A router makes its handles per request (``CollectionReads.handles``): each is bound to the
``min_seq`` the request's consistency chose for its shard (the interface carries no
consistency), and to the request's own protobuf where the shards take that rather than index
objects (the encoded SearchRequest, a Count's filter): forwarding it costs nothing and says
exactly what the client said. A fetch goes to the replica that ranked the hits (the labels are
that replica's; another has the same ones: same log, same order), another only if it fails.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.index.collection import Calls, Map
from braid.index.filters import Filter
from braid.index.gather import Ranked
from braid.index.query import Bm25Query, SearchPlan
from braid.index.shard_api import Fetched, Wanted
from braid.index.stats import SearchTiming
from braid.index.text import query_terms
from braid.v1 import braid_pb2 as pb

from ... import convert
from ...errors import RETRYABLE_CODES
from .replicas import Tries, default_deadline, error_from, ranked_of

if TYPE_CHECKING:
    from .replicas import CollectionBase

Start = Callable[[shard_pb2_grpc.ShardStub, float], Any]  # (stub, timeout) -> a gRPC future


class Pending:
    """A read started on one replica of a shard; ``result`` waits for its answer, starting the
    call on the next replica each time one fails retryably (``Tries``), as ``_fan_out`` does."""

    def __init__(
        self, shard: RemoteShard, start: Start, answer: Callable[[Any, str], Any], turn: Callable[[], int]
    ) -> None:
        self._shard = shard
        self._start = start
        self._answer = answer
        self._tries = Tries(shard.collection, shard.number, turn())
        self._attempts = self._tries.each(default_deadline())
        self._attempt = self._next()

    def _next(self) -> tuple[str, str, Any] | None:
        for node, address, timeout in self._attempts:
            return node, address, self._start(self._shard.stub(address), timeout)
        return None

    def result(self) -> Any:
        while self._attempt is not None:
            node, address, future = self._attempt
            try:
                response = future.result()
            except grpc.RpcError as err:
                self._tries.failed(node, err)
                self._attempt = self._next()
                continue
            self._tries.answered()
            return self._answer(response, address)
        raise self._tries.exhausted()


class Fetching:
    """A Fetch started on the replica that ranked the hits; if it fails retryably, ``result``
    asks the shard's replicas in turn (``CollectionBase._call``)."""

    def __init__(self, shard: RemoteShard, message: spb.FetchRequest, answer: Callable[[Any], Fetched]) -> None:
        self._shard = shard
        self._message = message
        self._answer = answer
        self._deadline = default_deadline()
        address = shard.ranked_by
        self._future = (
            None
            if address is None
            else shard.stub(address).Fetch.future(message, timeout=max(self._deadline - time.monotonic(), 0.001))
        )

    def result(self) -> Fetched:
        response = None
        if self._future is not None:
            try:
                response = self._future.result()
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE_CODES:
                    raise error_from(err) from None
        if response is None:
            message = self._message
            response, _ = self._shard.collection._call(
                self._shard.number, lambda stub, t: stub.Fetch(message, timeout=t), self._deadline
            )
        return self._answer(response)


def remote_map(collection: CollectionBase) -> Map:
    """``Scatter``'s map over RemoteShards: every call started, then each answer waited for. One
    turn for the whole scatter (taken when a first replica is picked; a fetch picks none):
    placement rotates shard i's replicas by i, so the shards land on distinct servers."""

    def run(name: str, calls: Calls) -> list:
        turn = functools.cache(collection.catalog.turn)
        started = [getattr(handle, f"start_{name}")(*args, turn=turn) for handle, args in calls]
        return [pending.result() for pending in started]

    return run


class QueryAnalysis:
    """BM25 text to (field, term) pairs with the schema's analyzers (``Scatter``'s ``Analysis``)."""

    def __init__(self, analyzers: dict[str, Any], field_names: list[str]) -> None:
        self.analyzers = analyzers
        self.field_names = field_names

    def terms(self, text: str, fields: list[str], where: str = "bm25.text") -> dict[tuple[str, str], int]:
        return query_terms(self.analyzers, text, fields, where)


class RemoteShard:
    """One shard's replicas, read for one request at ``min_seq`` (see the module's docstring)."""

    def __init__(
        self,
        collection: CollectionBase,
        number: int,
        min_seq: int,
        request: pb.SearchRequest | None = None,
        wire_filter: pb.Filter | None = None,
    ) -> None:
        self.collection = collection
        self.number = number
        self.min_seq = min_seq
        self.request = request  # for the shards: text sub-queries replaced by the router's vectors
        self.wire_filter = wire_filter  # the client's filter as it sent it, for Count and SearchDense
        self.ref = collection._refs[number]
        self.ranked_by: str | None = None  # the address of the replica whose Search answered
        self.ranked_at = 0  # the log sequence that replica had applied when it answered

    def stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        return self.collection.catalog.clients.stub(address)

    def _pending(self, start: Start, answer: Callable[[Any, str], Any], turn: Callable[[], int] | None) -> Pending:
        return Pending(self, start, answer, turn or self.collection.catalog.turn)

    # ShardReads, each one blocking call of its start_*

    def search(
        self, plan: SearchPlan, depths: list[int], where: str = "", timing: SearchTiming | None = None
    ) -> list[Ranked]:
        return self.start_search(plan, depths, where, timing).result()

    def search_dense(
        self, field: str, vectors: np.ndarray, k: int, knobs: tuple[int, int, float | None], flt: Filter | None = None
    ) -> list[Ranked]:
        return self.start_search_dense(field, vectors, k, knobs, flt).result()

    def text_stats(self, terms: list[tuple[str, str]]) -> tuple[list[int], int]:
        return self.start_text_stats(terms).result()

    def sparse_stats(self, field: str, term_ids: list[int]) -> tuple[np.ndarray, int]:
        return self.start_sparse_stats(field, term_ids).result()

    def fetch(self, labels: list[int], ids: list[str], wanted: Wanted) -> Fetched:
        return self.start_fetch(labels, ids, wanted).result()

    def count(self, flt: Filter | None) -> int:
        return self.start_count(flt).result()

    # the calls, started

    def start_search(
        self,
        plan: SearchPlan,
        depths: list[int],
        where: str = "",
        timing: SearchTiming | None = None,  # the strands run on the shard server, which times them
        turn: Callable[[], int] | None = None,
    ) -> Pending:
        """The bound request's strands (``depths`` follow from it: the server computes the same)."""
        if self.request is None:
            raise ValueError("a RemoteShard searches the request it was made for")
        idf = [
            spb.TermIdf(query=i, term=spb.TextTerm(field=field, term=term), idf=value)
            for i, sub in enumerate(plan.queries)
            if isinstance(sub.query, Bm25Query) and sub.query.idf
            for (field, term), value in sub.query.idf.items()
        ]
        message = spb.ShardSearchRequest(replica=self.ref, request=self.request, min_seq=self.min_seq, bm25_idf=idf)

        def answer(response: spb.ShardSearchResponse, address: str) -> list[Ranked]:
            self.ranked_by, self.ranked_at = address, response.applied_seq
            return [ranked_of(r) for r in response.strands]

        return self._pending(lambda stub, t: stub.Search.future(message, timeout=t), answer, turn)

    def start_search_dense(
        self,
        field: str,
        vectors: np.ndarray,
        k: int,
        knobs: tuple[int, int, float | None],
        flt: Filter | None = None,
        turn: Callable[[], int] | None = None,
    ) -> Pending:
        ef, max_lists, eps = knobs
        message = spb.ShardDenseRequest(
            replica=self.ref, field=field, vectors=np.ascontiguousarray(vectors, "<f4").tobytes(), k=k, ef=ef,
            max_lists=max_lists, min_seq=self.min_seq,
        )  # fmt: skip
        self._send_filter(message, flt)
        if eps is not None:
            message.eps = eps
        return self._pending(
            lambda stub, t: stub.SearchDense.future(message, timeout=t),
            lambda response, _: [ranked_of(r) for r in response.results],
            turn,
        )

    def start_text_stats(self, terms: list[tuple[str, str]], turn: Callable[[], int] | None = None) -> Pending:
        message = spb.TextStatsRequest(
            replica=self.ref,
            terms=[spb.TextTerm(field=field, term=term) for field, term in terms],
            min_seq=self.min_seq,
        )
        return self._pending(
            lambda stub, t: stub.TextStats.future(message, timeout=t),
            lambda response, _: (list(response.df), response.documents),
            turn,
        )

    def start_sparse_stats(self, field: str, term_ids: list[int], turn: Callable[[], int] | None = None) -> Pending:
        message = spb.TermStatsRequest(replica=self.ref, field=field, term_ids=term_ids, min_seq=self.min_seq)
        return self._pending(
            lambda stub, t: stub.TermStats.future(message, timeout=t),
            lambda response, _: (np.asarray(response.df, np.int64), response.documents),
            turn,
        )

    def _send_filter(self, message: spb.ShardCountRequest | spb.ShardDenseRequest, flt: Filter | None) -> None:
        """Put the client's filter, as it sent it, into ``message`` when the call has one (``flt``)."""
        if flt is None:
            return
        if self.wire_filter is None:
            raise ValueError("a RemoteShard filters with the filter of the request it was made for")
        message.filter.CopyFrom(self.wire_filter)
        message.has_filter = True

    def start_count(self, flt: Filter | None, turn: Callable[[], int] | None = None) -> Pending:
        message = spb.ShardCountRequest(replica=self.ref, min_seq=self.min_seq)
        self._send_filter(message, flt)
        return self._pending(
            lambda stub, t: stub.Count.future(message, timeout=t), lambda response, _: response.count, turn
        )

    def start_fetch(
        self, labels: list[int], ids: list[str], wanted: Wanted, turn: Callable[[], int] | None = None
    ) -> Fetching:
        message = spb.FetchRequest(
            replica=self.ref,
            labels=np.asarray(labels, "<i8").tobytes(),
            ids=ids,
            payload_fields=wanted.payload_fields or [],
            include_payload=wanted.metadata,
            text_fields=list(wanted.text_fields),
            min_seq=max(self.ranked_at, self.min_seq),
        )
        types = {f.name: f.type for f in self.collection.schema.payload_fields}

        def answer(response: spb.FetchResponse) -> Fetched:
            fetched = Fetched()
            if wanted.payload:
                fetched.payloads = [
                    {
                        name: convert.value_from_proto(value, f"payload.{name}")
                        for name, value in hit.payload.items()
                        if name in types
                    }
                    for hit in response.hits
                ]
            if wanted.metadata:
                fetched.metadata = [hit.metadata for hit in response.hits]
            if wanted.text_fields:
                fetched.texts = [dict(hit.text) for hit in response.hits]
            return fetched

        return Fetching(self, message, answer)
