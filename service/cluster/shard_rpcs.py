"""The bodies of braid.cluster.v1.Shard's RPCs on a shard server (service/cluster/shard_server.py
owns the process: its replicas, gRPC server, health and schedules): searches, fetches, gets,
counts and term statistics on one replica once it applied the caller's ``min_seq``, whole
searches over a collection of this server's replicas (SearchCollection), WaitApplied, Flush,
Status and Snapshot. Each runs on a worker thread (or, when ``quick``, on the event loop) and
raises index/ errors, mapped to gRPC codes once (service/errors.py).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np

from braid.cluster.v1 import shard_pb2 as spb
from braid.index.collection import Collection
from braid.index.errors import InvalidArgument, Unavailable
from braid.index.gather import LABEL_MASK, Ranked, merge_ranked, strand_depths
from braid.index.query import Bm25Query, SearchResult
from braid.index.schema import DenseIndexType
from braid.index.shard_api import Wanted
from braid.index.snapshot import check_name as check_snapshot_name
from braid.index.stats import current_trace
from braid.v1 import braid_pb2 as pb

from .. import convert
from ..admission import call_deadline
from ..errors import describe
from ..rpcs import (
    QUICK_MAX_EF,
    QUICK_MAX_LIMIT,
    QUICK_MAX_POSTINGS,
    QUICK_MAX_QUERY_CHARS,
    plain,
    plain_dense,
)
from .replica import Replica
from .snapshot_objects import USER

if TYPE_CHECKING:
    from .shard_server import ShardServer

QUICK_MAX_VECTORS = 4
USER_PREFIX = f"{USER}/"


def _packed(ranked: Ranked) -> spb.Ranked:
    return spb.Ranked(
        labels=np.ascontiguousarray(ranked.keys, "<i8").tobytes(),
        scores=np.ascontiguousarray(ranked.scores, "<f4").tobytes(),
        ids=ranked.ids,
    )


class ShardRpcs:
    """The body of each braid.cluster.v1.Shard RPC, run on a worker thread."""

    def __init__(self, server: ShardServer) -> None:
        self.server = server

    def _replica(self, ref: spb.ReplicaRef) -> Replica:
        replica = self.server.replicas.get((ref.uid, ref.shard))
        if replica is None:
            raise Unavailable(
                f"collection {ref.collection!r} shard {ref.shard}: no replica on node {self.server.node_id}"
            )
        return replica

    def _shard(self, ref: spb.ReplicaRef, min_seq: int) -> Any:
        return self._replica(ref).wait_applied(min_seq, call_deadline())

    def Search(self, request: spb.ShardSearchRequest) -> Any:
        shard = self._shard(request.replica, request.min_seq)
        plan = convert.plan_from_proto(request.request)
        for entry in request.bm25_idf:  # the collection's IDF, gathered by the router (DFS phase)
            query = plan.queries[entry.query].query if entry.query < len(plan.queries) else None
            if isinstance(query, Bm25Query):
                query.idf = (query.idf or {}) | {(entry.term.field, entry.term.term): entry.idf}
        trace = current_trace()  # tracing: this call's strand spans (service/tracing.py)
        timing = trace.search(len(plan.queries)) if trace is not None else None
        strands = shard.search(plan, strand_depths(plan), timing=timing)
        return spb.ShardSearchResponse(strands=[_packed(r) for r in strands], applied_seq=shard.applied_seq)

    def SearchDense(self, request: spb.ShardDenseRequest) -> Any:
        shard = self._shard(request.replica, request.min_seq)
        vectors = np.frombuffer(request.vectors, "<f4")
        spec = shard.schema.dense(request.field)
        if spec is None or vectors.size % spec.dim:
            raise InvalidArgument.field("field", f"no dense field {request.field!r} of that dimension")
        eps = request.eps if request.HasField("eps") else None
        flt = convert.optional_filter(request.filter, request.has_filter)
        if flt is not None:
            shard.payload.validate_filter(flt)
        found = shard.search_dense(
            request.field, vectors.reshape(-1, spec.dim), request.k, (request.ef, request.max_lists, eps), flt
        )
        return spb.ShardDenseResponse(results=[_packed(r) for r in found], applied_seq=shard.applied_seq)

    def quick(self, request: Any) -> bool:
        """A SearchDense cheap enough to run on the event loop (as standalone's quick searches): one
        or a few vectors on an in-memory HNSW field of a replica that needs no wait."""
        if isinstance(request, spb.CollectionSearchRequest):
            return self._quick_collection(request)
        if (
            not isinstance(request, spb.ShardDenseRequest)
            or request.has_filter  # a filter's first use may scan every document: never on the loop
            or request.k > QUICK_MAX_LIMIT
            or request.ef > QUICK_MAX_EF
        ):
            return False
        replica = self.server.replicas.get((request.replica.uid, request.replica.shard))
        shard = replica.shard if replica is not None else None
        if shard is None or not replica.caught_up.is_set() or shard.applied_seq < request.min_seq:  # type: ignore[union-attr]
            return False
        spec = shard.schema.dense(request.field)
        return (
            spec is not None
            and spec.index is DenseIndexType.HNSW
            and spec.hnsw.ef_search <= QUICK_MAX_EF
            and len(request.vectors) <= QUICK_MAX_VECTORS * spec.dim * 4
        )

    def SearchCollection(self, request: spb.CollectionSearchRequest) -> Any:
        """A whole search on this server's replicas of every shard: what standalone's Search does
        with a collection of that many shards (service/rpcs.py), so the hits are the same."""
        view = self._covering(request)
        search = request.request
        max_bytes = request.max_response_bytes or None
        if plain_dense(search) and search.queries[0].dense.HasField("vector"):
            dense = search.queries[0].dense  # standalone's hot path: no plan, no fusion
            vector = convert.dense_from_proto(dense.vector, "queries[0].dense.vector")
            limit = search.limit or 10
            eps = dense.eps if dense.HasField("eps") else None
            view.check_dense(dense.field, vector, limit, dense.ef, "", dense.max_lists, eps)
            knobs = (dense.ef, dense.max_lists, eps)
            # As Collection.search_dense_batch, with the shards searched at once (hnswlib lets go of
            # the GIL): the parallelism a fan-out to one server per shard would have had.
            pool = self.server._executor
            others = [
                pool.submit(shard.search_dense, dense.field, vector[None, :], limit, knobs) for shard in view.shards[1:]
            ]
            parts = [view.shards[0].search_dense(dense.field, vector[None, :], limit, knobs)[0]]
            parts += [future.result()[0] for future in others]
            ranked = merge_ranked(parts, limit) if len(parts) > 1 else parts[0]
            return convert.result_to_proto(SearchResult(ids=ranked.ids, scores=ranked.scores), {}, max_bytes)
        result = view.search(convert.plan_from_proto(search))
        types = {f.name: f.type for f in view.schema.payload_fields}
        return convert.result_to_proto(result, types, max_bytes)

    def _covering(self, request: spb.CollectionSearchRequest) -> Collection:
        """A collection of this server's replica of every shard, once each applied its min_seq."""
        refs = request.replicas
        if not refs or len(request.min_seqs) != len(refs) or any(ref.shard != i for i, ref in enumerate(refs)):
            raise InvalidArgument.field("replicas", "one replica of every shard, in shard order, each with a min_seq")
        if any(ref.uid != refs[0].uid for ref in refs):
            raise InvalidArgument.field("replicas", "replicas of more than one collection")
        replicas = [self._replica(ref) for ref in refs]
        if len(replicas) != replicas[0].meta.shards:
            raise InvalidArgument.field(
                "replicas", f"{len(replicas)} replicas of a collection of {replicas[0].meta.shards} shards"
            )
        deadline = call_deadline()
        shards = [replica.wait_applied(seq, deadline) for replica, seq in zip(replicas, request.min_seqs, strict=True)]
        return self.server.collection_view(replicas[0], shards)

    def _quick_collection(self, request: spb.CollectionSearchRequest) -> bool:
        """A SearchCollection standalone would run on its event loop (service/rpcs.py ``quick``: a
        plain dense query by vector on HNSW with a modest beam, or a plain BM25 query on one shard
        with few postings), on replicas that need no wait."""
        search = request.request
        if search.limit > QUICK_MAX_LIMIT or not plain(search) or len(request.min_seqs) != len(request.replicas):
            return False
        shards = []
        for ref, min_seq in zip(request.replicas, request.min_seqs, strict=True):
            replica = self.server.replicas.get((ref.uid, ref.shard))
            shard = replica.shard if replica is not None else None
            if shard is None or not replica.caught_up.is_set() or shard.applied_seq < min_seq:  # type: ignore[union-attr]
                return False
            shards.append(shard)
        if not shards:
            return False
        kind = search.queries[0].WhichOneof("query")
        if kind == "bm25":
            bm25, text = search.queries[0].bm25, shards[0].text
            if len(shards) != 1 or text is None or len(bm25.text) > QUICK_MAX_QUERY_CHARS:
                return False  # several shards search on threads anyway
            fields = list(bm25.fields) or text.field_names
            return set(fields) <= set(text.field_names) and text.postings(bm25.text, fields) <= QUICK_MAX_POSTINGS
        dense = search.queries[0].dense
        if kind != "dense" or not dense.HasField("vector") or dense.ef > QUICK_MAX_EF:
            return False
        spec = shards[0].schema.dense(dense.field)
        return spec is not None and spec.index is DenseIndexType.HNSW and spec.hnsw.ef_search <= QUICK_MAX_EF

    def Fetch(self, request: spb.FetchRequest) -> Any:
        replica = self._replica(request.replica)
        # min_seq: what the replica that ranked the hits had applied (this one may stand in for it)
        shard = replica.wait_applied(request.min_seq, call_deadline()) if request.min_seq else replica.serving(False)
        labels = (np.frombuffer(request.labels, "<i8") & LABEL_MASK).tolist()
        ids = list(request.ids)
        wanted = Wanted.asked(request.include_payload, request.payload_fields, request.text_fields)
        fetched = shard.fetch(labels, ids, wanted)
        result = SearchResult(
            ids=ids,
            scores=np.zeros(len(ids)),
            payloads=fetched.payloads,
            metadata=fetched.metadata,
            texts=fetched.texts,
        )
        types = {f.name: f.type for f in shard.schema.payload_fields}
        return spb.FetchResponse(hits=convert.result_to_proto(result, types).hits)

    def Get(self, request: spb.ShardGetRequest) -> Any:
        replica = self._replica(request.replica)
        replica.wait_applied(request.min_seq, call_deadline())
        view = self.server.view(replica)
        docs = view.get(list(request.ids), include_vectors=request.include_vectors)
        types = {f.name: f.type for f in replica.schema.payload_fields}
        return pb.GetResponse(documents=convert.documents_to_proto(docs, types, self.server.config.max_message_bytes))

    def Count(self, request: spb.ShardCountRequest) -> Any:
        replica = self._replica(request.replica)
        shard = replica.wait_applied(request.min_seq, call_deadline())
        flt = convert.optional_filter(request.filter, request.has_filter)
        count = self.server.view(replica).count(flt)
        return spb.ShardCountResponse(count=count, applied_seq=shard.applied_seq)

    def TermStats(self, request: spb.TermStatsRequest) -> Any:
        shard = self._shard(request.replica, request.min_seq)
        if request.field not in shard.sparse:
            raise InvalidArgument.field("field", f"no sparse field {request.field!r}")
        df, documents = shard.sparse_stats(request.field, list(request.term_ids))
        return spb.TermStatsResponse(df=df.tolist(), documents=documents)

    def TextStats(self, request: spb.TextStatsRequest) -> Any:
        shard = self._shard(request.replica, request.min_seq)
        if shard.text is None:
            raise InvalidArgument.field("terms", "the collection has no text fields")
        unknown = sorted({t.field for t in request.terms} - set(shard.text.field_names))
        if unknown:
            raise InvalidArgument.field("terms", f"no text field {unknown[0]!r}")
        df, documents = shard.text_stats([(t.field, t.term) for t in request.terms])
        return spb.TextStatsResponse(df=df, documents=documents)

    def WaitApplied(self, request: spb.WaitAppliedRequest) -> Any:
        shard = self._replica(request.replica).wait_applied(request.seq, call_deadline())
        result = shard.result_of(request.seq)
        return spb.WaitAppliedResponse(applied_seq=shard.applied_seq, result=-1 if result is None else result)

    def Flush(self, request: spb.FlushRequest) -> Any:
        self._replica(request.replica).serving(need_caught_up=False).flush()
        return spb.FlushResponse()

    def Status(self, request: spb.StatusRequest) -> Any:
        response = spb.StatusResponse(node_id=self.server.node_id)
        for (uid, number), replica in sorted(self.server.replicas.items()):
            shard = replica.shard
            response.replicas.add(
                replica=spb.ReplicaRef(collection=replica.meta.name, uid=uid, shard=number),
                applied_seq=replica.applied_seq,
                caught_up=replica.caught_up.is_set(),
                problem=replica.problem or "",
                documents=shard.live_count if shard is not None else 0,
                restored_from=replica.restored_from or "",
                restore_error=describe(failure)[0].value[0] if (failure := replica.restore_failure) else 0,
            )
        return response

    def Snapshot(self, request: spb.SnapshotRequest) -> Any:
        replica = self._replica(request.replica)
        replica.wait_applied(request.min_seq, call_deadline())
        label = ""
        if request.object:  # user/<snapshot>/shard-NNN
            parts = request.object.split("/")
            if len(parts) != 3 or f"{parts[0]}/" != USER_PREFIX or not parts[2]:
                raise InvalidArgument.field("object", f"{request.object!r} is not {USER_PREFIX}<snapshot>/<part>")
            label = parts[1]
            check_snapshot_name(label, "object")
        stored = replica.take_snapshot(request.object, label)
        entry = json.dumps(stored.entry or {}, sort_keys=True)
        seq = int((stored.entry or {}).get("wal_seq", stored.seq))
        return spb.SnapshotResponse(object=stored.name, seq=seq, bytes=stored.bytes, entry=entry)
