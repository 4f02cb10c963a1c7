"""Reads fanned out to one replica of every shard: counts, gets, IDF, and the search.

Each strand is merged across shards and fused exactly as a collection does
(index/gather.py ``combine``), so the hits equal a standalone collection's with the same
shard count. A search with BM25 terms first gathers the collection's IDF of each from every
shard (the DFS phase), so the shards score as one shard would; the hits' payload and text
are then fetched from the replicas that ranked them.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
import numpy as np

from braid.cluster.v1 import shard_pb2 as spb
from braid.index.filters import Filter
from braid.index.gather import combine, global_bm25_idf, merge_batches, sparse_idf_of, strand_depths
from braid.index.query import Bm25Query, DenseQuery, SearchPlan, SearchResult, SparseQuery
from braid.index.stats import current_trace
from braid.index.text import query_terms
from braid.index.validate import check_ids
from braid.v1 import braid_pb2 as pb

from ... import convert
from ...errors import RETRYABLE_CODES
from .covering import CoveringSearch
from .replicas import default_deadline, error_from, ranked_of


class CollectionReads(CoveringSearch):
    """What service/rpcs.py reads of a collection, answered by the shards' replicas."""

    def count(self, flt: Filter | None = None, request: pb.CountRequest | None = None) -> int:
        min_seqs = self._min_seqs(pb.CONSISTENCY_DEFAULT)

        def call(shard: int, stub: Any, timeout: float) -> Any:
            message = spb.ShardCountRequest(replica=self._ref(shard), min_seq=min_seqs[shard])
            if request is not None and request.HasField("filter"):
                message.filter.CopyFrom(request.filter)
                message.has_filter = True
            return stub.Count.future(message, timeout=timeout)

        answers = self._fan_out(self.shards, call, default_deadline())
        return sum(response.count for response, _ in answers.values())

    def sparse_idf(self, field: str, term_ids: list[int]) -> np.ndarray:
        min_seqs = self._min_seqs(pb.CONSISTENCY_DEFAULT)
        answers = self._fan_out(
            self.shards,
            lambda s, stub, t: stub.TermStats.future(
                spb.TermStatsRequest(replica=self._ref(s), field=field, term_ids=term_ids, min_seq=min_seqs[s]),
                timeout=t,
            ),
            default_deadline(),
        )
        df = sum(np.asarray(response.df, np.int64) for response, _ in answers.values())
        documents = sum(response.documents for response, _ in answers.values())
        return sparse_idf_of(np.asarray(df, np.int64), int(documents))

    def get_documents(self, request: pb.GetRequest) -> list[pb.Document]:
        check_ids(list(request.ids), self.limits)
        groups = self._group(list(request.ids), lambda doc_id: doc_id)
        min_seqs = self._min_seqs(pb.CONSISTENCY_DEFAULT)
        answers = self._fan_out(
            list(groups),
            lambda s, stub, t: stub.Get.future(
                spb.ShardGetRequest(
                    replica=self._ref(s), ids=groups[s], include_vectors=request.include_vectors, min_seq=min_seqs[s]
                ),
                timeout=t,
            ),
            default_deadline(),
        )
        found = {doc.id: doc for response, _ in answers.values() for doc in response.documents}
        return [found[doc_id] for doc_id in request.ids if doc_id in found]

    def search_dense_batch(
        self,
        field: str,
        vectors: np.ndarray,
        k: int,
        ef: int,
        max_lists: int = 0,
        eps: float | None = None,
        consistency: int = 0,
    ) -> list[SearchResult]:
        min_seqs = self._min_seqs(consistency)
        packed = np.ascontiguousarray(vectors, "<f4").tobytes()
        failed_over = False
        if len(vectors) == 1:  # one query (by text, or STRONG): whole, on a server holding every shard
            dense = pb.DenseQuery(field=field, vector=pb.DenseVector(packed=packed), ef=ef, max_lists=max_lists)
            if eps is not None:
                dense.eps = eps
            request = pb.SearchRequest(collection=self.name, queries=[pb.SubQuery(dense=dense)], limit=k)
            response, failed_over = self._whole(request, min_seqs, None)
            if response is not None:
                ids = [hit.id for hit in response.hits]
                return [SearchResult(ids=ids, scores=np.array([hit.score for hit in response.hits], np.float32))]

        def call(shard: int, stub: Any, timeout: float) -> Any:
            message = spb.ShardDenseRequest(
                replica=self._ref(shard), field=field, vectors=packed, k=k, ef=ef, max_lists=max_lists,
                min_seq=min_seqs[shard],
            )  # fmt: skip
            if eps is not None:
                message.eps = eps
            return stub.SearchDense.future(message, timeout=timeout)

        answers = self._fan_out(self.shards, call, default_deadline())
        if failed_over:
            self.catalog.stats.failed_over()
        return merge_batches([[ranked_of(r) for r in answers[s][0].results] for s in self.shards], k)

    def search_response(
        self, request: pb.SearchRequest, plan: SearchPlan, types: dict, max_response_bytes: int | None
    ) -> pb.SearchResponse:
        """A checked, encoded plan's response: from one server holding every shard when there is
        one (a single call), else (or when it fails retryably) from the fan-out."""
        self.check(plan)
        min_seqs = self._min_seqs(plan.consistency)
        trace = current_trace()
        started = time.perf_counter()
        response, failed_over = self._whole(encoded_request(request, plan, whole=True), min_seqs, max_response_bytes)
        if response is not None:
            if trace is not None:
                seconds = time.perf_counter() - started
                trace.stage("shards", seconds, time.time_ns() - int(seconds * 1e9))
            return response
        result = self.search_request(request, plan, min_seqs=min_seqs)
        if failed_over:
            self.catalog.stats.failed_over()
        return convert.result_to_proto(result, types, max_response_bytes)

    def search_request(
        self, request: pb.SearchRequest, plan: SearchPlan, where: str = "", min_seqs: list[int] | None = None
    ) -> SearchResult:
        """A checked, encoded plan: rank on every shard, combine, then fetch the hits' payload and text."""
        self.check(plan, where)
        shard_request = encoded_request(request, plan)
        trace = current_trace()  # the slow-query log: strands run on the shard servers, so only the stages here
        started = time.perf_counter()
        if min_seqs is None:
            min_seqs = self._min_seqs(plan.consistency)
        idf = self._bm25_idf(plan, min_seqs, where) if len(self.shards) > 1 else []
        answers = self._fan_out(
            self.shards,
            lambda s, stub, t: stub.Search.future(
                spb.ShardSearchRequest(replica=self._ref(s), request=shard_request, min_seq=min_seqs[s], bm25_idf=idf),
                timeout=t,
            ),
            default_deadline(),
        )
        ranked = time.perf_counter()
        per_shard = [[ranked_of(r) for r in answers[s][0].strands] for s in self.shards]
        result, keys = combine(plan, per_shard, strand_depths(plan))
        fused = time.perf_counter()
        self._fetch(result, keys, plan, {s: answers[s][1] for s in self.shards})
        if trace is not None:
            now = time.perf_counter()
            trace.stage("shards", ranked - started, time.time_ns() - int((now - started) * 1e9))
            trace.search(0).finish(fused - ranked, now - fused)
        return result

    def _bm25_idf(self, plan: SearchPlan, min_seqs: list[int], where: str) -> list[spb.TermIdf]:
        """The DFS phase: the collection's IDF of every BM25 term of the plan, from one replica of
        each shard (one TextStats call each), so the shards score as one shard would."""
        wanted: list[tuple[int, tuple[str, str]]] = []
        for i, sub in enumerate(plan.queries):
            query = sub.query
            if isinstance(query, Bm25Query):
                fields = query.fields or [spec.name for spec in self.schema.text_fields]
                at = f"{where}queries[{i}].bm25.text"
                wanted += [(i, key) for key in query_terms(self._analyzers, query.text, fields, at)]
        if not wanted:
            return []
        keys = sorted({key for _, key in wanted})
        terms = [spb.TextTerm(field=field, term=term) for field, term in keys]
        answers = self._fan_out(
            self.shards,
            lambda s, stub, t: stub.TextStats.future(
                spb.TextStatsRequest(replica=self._ref(s), terms=terms, min_seq=min_seqs[s]), timeout=t
            ),
            default_deadline(),
        )
        idf = global_bm25_idf(keys, [(list(answer.df), answer.documents) for answer, _ in answers.values()])
        return [spb.TermIdf(query=i, term=spb.TextTerm(field=key[0], term=key[1]), idf=idf[key]) for i, key in wanted]

    def _fetch(self, result: SearchResult, keys: list[int], plan: SearchPlan, answered_by: dict[int, str]) -> None:
        wants_payload = plan.include_payload or bool(plan.payload_fields)
        if not (wants_payload or plan.text_fields) or not keys:
            return
        positions: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            positions.setdefault(key >> 40, []).append(position)
        types = {f.name: f.type for f in self.schema.payload_fields}
        payloads: list[dict] = [{} for _ in keys]
        texts: list[dict[str, str]] = [{} for _ in keys]
        metadata = [""] * len(keys)
        deadline = default_deadline()
        for shard, where in positions.items():
            message = spb.FetchRequest(
                replica=self._ref(shard),
                labels=np.asarray([keys[p] for p in where], "<i8").tobytes(),
                ids=[result.ids[p] for p in where],
                payload_fields=plan.payload_fields or [],
                include_payload=plan.include_payload,
                text_fields=plan.text_fields,
            )
            stub = self.catalog.clients.stub(answered_by[shard])
            try:  # the replica that ranked these labels; another one has the same labels (same log, same order)
                response = stub.Fetch(message, timeout=max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as err:
                if err.code() not in RETRYABLE_CODES:
                    raise error_from(err) from None
                response, _ = self._call(shard, lambda stub, t, m=message: stub.Fetch(m, timeout=t), deadline)
            for position, hit in zip(where, response.hits, strict=True):
                payloads[position] = {
                    name: convert.value_from_proto(value, f"payload.{name}") for name, value in hit.payload.items()
                }
                texts[position] = dict(hit.text)
                metadata[position] = hit.metadata
        if wants_payload:
            result.payloads = [{name: p[name] for name in p if name in types} for p in payloads]
        if plan.include_payload:
            result.metadata = metadata
        if plan.text_fields:
            result.texts = texts


def encoded_request(request: pb.SearchRequest, plan: SearchPlan, whole: bool = False) -> pb.SearchRequest:
    """The request for the shards: every text sub-query replaced by the vector the router encoded;
    the payload and text wanted only for a ``whole`` search (else the router fetches them)."""
    out = pb.SearchRequest()
    out.CopyFrom(request)
    if not whole:
        out.ClearField("payload_fields")
        out.ClearField("text_fields")
        out.include_payload = False
    for sub, planned in zip(out.queries, plan.queries, strict=True):
        query = planned.query
        if isinstance(query, DenseQuery) and sub.dense.text and query.vector is not None:
            sub.dense.text = ""
            sub.dense.vector.packed = np.ascontiguousarray(query.vector, "<f4").tobytes()
        elif isinstance(query, SparseQuery) and sub.sparse.text and query.vector is not None:
            sub.sparse.text = ""
            vector = query.vector
            if vector.tokens is not None:
                sub.sparse.vector.tokens.extend(vector.tokens)
            elif vector.indices is not None:
                sub.sparse.vector.indices.extend(vector.indices.tolist())
            sub.sparse.vector.values.extend(vector.values.tolist())
    return out
