"""Searches that need no encoder, run with grpc.aio on the event loop itself: the hop to a
worker thread and back would cost as much as the shard's own search (service/cluster/router/rpcs.py
``on_loop`` decides which)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np

from braid.cluster.v1 import shard_pb2 as spb
from braid.index.gather import merge_ranked
from braid.index.query import Bm25Query, SearchResult
from braid.index.stats import current_trace
from braid.index.validate import check_query_text
from braid.v1 import braid_pb2 as pb

from ... import convert
from ...admission import deadline_scope
from ...logs import forward_metadata
from .reads import CollectionReads
from .replicas import Tries, ranked_of


class LoopSearches(CollectionReads):
    """The on-loop variants of ``search_response`` and ``search_dense_batch``."""

    async def search_whole_on_loop(
        self, request: pb.SearchRequest, deadline: float, max_response_bytes: int | None, types: dict
    ) -> pb.SearchResponse:
        """search_response for a request with nothing to encode, on the event loop (grpc.aio). When
        no server holding every shard is live or the one asked fails retryably, the fan-out runs
        on a thread (it blocks)."""
        plan = convert.plan_from_proto(request)
        for i, sub in enumerate(plan.queries):  # sizes first, as the encoding step checks them (service/encoding.py)
            if isinstance(sub.query, Bm25Query):
                check_query_text(sub.query.text, f"queries[{i}].bm25.text", self.limits.max_query_bytes)
        self.check(plan)
        min_seqs = self._min_seqs(request.consistency)
        failed_over = False
        found = self._coverer(self.catalog.turn())
        if found is not None:
            node, address = found
            message = self._covering_request(request, min_seqs, max_response_bytes)
            trace = current_trace()  # the slow-query log's and the tracer's "shards" stage
            started = time.perf_counter()
            try:
                stub = self.catalog.clients.aio_stub(address)
                response = await stub.SearchCollection(
                    message, timeout=self._covering_timeout(deadline), metadata=forward_metadata()
                )
            except grpc.aio.AioRpcError as err:
                failed_over = self._covering_failed(node, err)
            else:
                if trace is not None:
                    seconds = time.perf_counter() - started
                    trace.stage("shards", seconds, time.time_ns() - int(seconds * 1e9))
                return response
        result = await asyncio.to_thread(_within, deadline, lambda: self.search_request(request, plan, "", min_seqs))
        if failed_over:
            self.catalog.stats.failed_over()
        return convert.result_to_proto(result, types, max_response_bytes)

    async def search_dense_on_loop(
        self, request: pb.SearchRequest, deadline: float, max_response_bytes: int | None
    ) -> pb.SearchResponse:
        """search_dense_batch for one plain dense query by vector, on the event loop (grpc.aio)."""
        dense = request.queries[0].dense
        limit = request.limit or 10
        eps = dense.eps if dense.HasField("eps") else None
        min_seqs = self._min_seqs(request.consistency)
        failed_over = False
        found = self._coverer(self.catalog.turn())
        # The request as it came (it names no text to embed). The server checks the query as
        # standalone does (the same checks, in the same order, with the same messages), so it is
        # not checked twice; only a limit past this router's maximum is refused here, and first
        # whatever standalone would say first.
        if found is not None and 1 <= limit <= self.limits.max_limit:
            node, address = found
            message = self._covering_request(request, min_seqs, max_response_bytes)
            try:
                stub = self.catalog.clients.aio_stub(address)
                return await stub.SearchCollection(
                    message, timeout=self._covering_timeout(deadline), metadata=forward_metadata()
                )
            except grpc.aio.AioRpcError as err:
                failed_over = self._covering_failed(node, err)
        vector = convert.dense_from_proto(dense.vector, "queries[0].dense.vector")
        self.check_dense(dense.field, vector, limit, dense.ef, "", dense.max_lists, eps)
        packed = np.ascontiguousarray(vector, "<f4").tobytes()

        async def one(shard: int, turn: int) -> Any:
            message = spb.ShardDenseRequest(
                replica=self._ref(shard), field=dense.field, vectors=packed, k=limit, ef=dense.ef,
                max_lists=dense.max_lists, min_seq=min_seqs[shard],
            )  # fmt: skip
            if eps is not None:
                message.eps = eps
            tries = Tries(self, shard, turn)
            for node, address, timeout in tries.each(deadline):
                try:
                    stub = self.catalog.clients.aio_stub(address)
                    answer = await stub.SearchDense(message, timeout=timeout, metadata=forward_metadata())
                except grpc.aio.AioRpcError as err:
                    tries.failed(node, err)
                    continue
                tries.answered()
                return answer
            raise tries.exhausted()

        turn = self.catalog.turn()
        responses = await asyncio.gather(*(one(shard, turn) for shard in self.shards))
        if failed_over:
            self.catalog.stats.failed_over()
        parts = [ranked_of(response.results[0]) for response in responses]
        ranked = merge_ranked(parts, limit) if len(parts) > 1 else parts[0]
        result = SearchResult(ids=ranked.ids, scores=ranked.scores)
        return convert.result_to_proto(result, {}, max_response_bytes)


def _within(deadline: float, work: Callable[[], Any]) -> Any:
    """``work`` on this thread as an admitted worker runs it: with the call's deadline (the
    request id comes with the thread's copy of the context: asyncio.to_thread)."""
    with deadline_scope(deadline):
        return work()
