"""Reads fanned out to one replica of every shard: counts, gets, IDF, and the search.

The reads go through index/collection.py's ``Scatter``, as a standalone collection's do, over
this request's ``RemoteShard`` handles (remote_shard.py: each shard's replicas, bound to the
sequence the request's consistency chose), so the DFS phase, the merge of each strand across
shards, fusion and the fetch of the hits' payload and text are one path for both, and the
hits equal a standalone collection's with the same shard count. What stays here is the
router's own: consistency, the whole search on a server holding every shard first
(covering.py), the shards' encoded request, the trace's stages, and Get (its documents stay
the shards' protobuf, which the router answers as it is).
"""

from __future__ import annotations

import time

import numpy as np

from braid.cluster.v1 import shard_pb2 as spb
from braid.index.collection import Scatter
from braid.index.filters import Filter
from braid.index.gather import combine, strand_depths
from braid.index.query import DenseQuery, SearchPlan, SearchResult, SparseQuery
from braid.index.stats import current_trace
from braid.index.validate import check_ids
from braid.v1 import braid_pb2 as pb

from ... import convert
from .covering import CoveringSearch
from .remote_shard import QueryAnalysis, RemoteShard, remote_map
from .replicas import default_deadline


class CollectionReads(CoveringSearch):
    """What service/rpcs.py reads of a collection, answered by the shards' replicas."""

    def handles(
        self, min_seqs: list[int], request: pb.SearchRequest | None = None, wire_filter: pb.Filter | None = None
    ) -> list[RemoteShard]:
        """One RemoteShard per shard for one request, each read once its replica applied ``min_seqs[shard]``."""
        return [RemoteShard(self, shard, min_seqs[shard], request, wire_filter) for shard in self.shards]

    def scatter(
        self, min_seqs: list[int], request: pb.SearchRequest | None = None, wire_filter: pb.Filter | None = None
    ) -> Scatter:
        """index/collection.py's reads over this request's handles, every shard's call in flight at once."""
        names = [spec.name for spec in self.schema.text_fields]
        text = QueryAnalysis(self._analyzers, names) if names else None
        run = remote_map(self)
        return Scatter(self.handles(min_seqs, request, wire_filter), run, run, text)

    def count(self, flt: Filter | None = None, request: pb.CountRequest | None = None) -> int:
        """Documents matching ``flt`` (the filter of ``request``, checked by the caller), or all."""
        wire = request.filter if request is not None and request.HasField("filter") else None
        return self.scatter(self._min_seqs(pb.CONSISTENCY_DEFAULT), wire_filter=wire).count(flt)

    def sparse_idf(self, field: str, term_ids: list[int]) -> np.ndarray:
        return self.scatter(self._min_seqs(pb.CONSISTENCY_DEFAULT)).sparse_idf(field, term_ids)

    def get_documents(self, request: pb.GetRequest) -> list[pb.Document]:
        """The documents of ``request.ids`` as the shards encoded them (protobuf, not dicts: the
        router answers them as they are), in request order; unknown ids are left out."""
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
        flt: Filter | None = None,
        where: str = "",
        consistency: int = 0,
        wire_filter: pb.Filter | None = None,
    ) -> list[SearchResult]:
        """index/collection.py's ``search_dense_batch`` over the replicas; ``wire_filter`` is ``flt``
        as the client sent it (the shards take it so)."""
        if flt is not None:
            self.payload.validate_filter(flt, f"{where}filter")
        min_seqs = self._min_seqs(consistency)
        failed_over = False
        if len(vectors) == 1:  # one query (by text, or STRONG): whole, on a server holding every shard
            packed = np.ascontiguousarray(vectors, "<f4").tobytes()
            dense = pb.DenseQuery(field=field, vector=pb.DenseVector(packed=packed), ef=ef, max_lists=max_lists)
            if eps is not None:
                dense.eps = eps
            request = pb.SearchRequest(collection=self.name, queries=[pb.SubQuery(dense=dense)], limit=k)
            if flt is not None and wire_filter is not None:
                request.filter.CopyFrom(wire_filter)
            response, failed_over = self._whole(request, min_seqs, None)
            if response is not None:
                ids = [hit.id for hit in response.hits]
                return [SearchResult(ids=ids, scores=np.array([hit.score for hit in response.hits], np.float32))]
        scatter = self.scatter(min_seqs, wire_filter=wire_filter)
        results = scatter.search_dense(field, vectors, k, (ef, max_lists, eps), flt)
        if failed_over:
            self.catalog.stats.failed_over()
        return results

    def search_response(
        self, request: pb.SearchRequest, plan: SearchPlan, types: dict, max_response_bytes: int | None
    ) -> pb.SearchResponse:
        """A checked, encoded plan's response: from one server holding every shard when there is
        one (a single call), else (or when it fails retryably) from the fan-out."""
        self.check(plan)
        min_seqs = self._min_seqs(request.consistency)
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
        """A checked, encoded plan: the DFS phase, rank on every shard, combine, then fetch the
        hits' payload and text from the replicas that ranked them (``Scatter``'s steps; the
        strands are timed on the shard servers, so the trace gets only the stages here)."""
        self.check(plan, where)
        shard_request = encoded_request(request, plan)
        trace = current_trace()
        started = time.perf_counter()
        if min_seqs is None:
            min_seqs = self._min_seqs(request.consistency)
        scatter = self.scatter(min_seqs, shard_request)
        depths = strand_depths(plan)
        if len(self.shards) > 1:
            scatter.gather_bm25_idf(plan, where)
        per_shard = scatter.rank(plan, depths, where)
        ranked = time.perf_counter()
        result, keys = combine(plan, per_shard, depths)
        fused = time.perf_counter()
        scatter.materialize(result, keys, plan)
        if trace is not None:
            now = time.perf_counter()
            trace.stage("shards", ranked - started, time.time_ns() - int((now - started) * 1e9))
            trace.search(0).finish(fused - ranked, now - fused)
        return result


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
