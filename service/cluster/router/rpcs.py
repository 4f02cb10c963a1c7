"""``RouterRpcs``: the braid.v1 bodies of a router, the standalone ones (service/rpcs.py) except
where a message is forwarded to the shard servers as it is."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from braid.index.errors import NotFound, ResourceExhausted, Unavailable
from braid.index.query import SearchPlan, SearchResult
from braid.index.snapshot import TAR_BLOCK
from braid.v1 import braid_pb2 as pb

from ... import convert
from ...rpcs import BraidRpcs, plain_dense
from ...snapshot_files import CHUNK_BYTES as EXPORT_CHUNK_BYTES
from ...snapshot_files import rechunk
from .catalog import RemoteCatalog
from .replicas import DEFAULT_TIMEOUT_S
from .snapshots import Export
from .writes import PipelinedWriter


class RouterRpcs(BraidRpcs):
    """braid.v1 bodies on a router: the standalone ones, except where a message is forwarded as it is."""

    catalog: RemoteCatalog  # type: ignore[assignment]

    def _info(self, collection: Any) -> pb.CollectionInfo:
        try:
            documents = collection.count()
            problem = collection.write_problem() or ""
        except (Unavailable, NotFound) as err:  # a shard with no live replica: still listed, with why
            documents, problem = 0, str(err)
        info = convert.collection_to_proto(
            collection.name, collection.schema, len(collection.shards), documents, collection.created_at
        )
        info.write_problem = problem
        info.replication_factor = collection.replication_factor
        info.aliases.extend(self.catalog.aliases_of(collection.name))
        self.encoding.stamp_fingerprints(info.schema)
        return info

    def quick(self, request: Any) -> bool:
        return False  # every search is a network fan-out: see on_loop

    def on_loop(self, request: Any, deadline: float | None) -> Any:
        """Searches that need no encoder run with grpc.aio on the event loop itself: the hop to a
        worker thread and back would cost as much as the shard's own search. Plain dense ones by
        vector always (whole on one server, or fanned out); any other shape when some server
        holds a replica of every shard (whole on it)."""
        plain = plain_dense(request)
        if plain and not request.queries[0].dense.HasField("vector"):
            return None  # text to embed: on a worker
        if not plain and not _vectors_only(request):
            return None
        if request.consistency == pb.CONSISTENCY_STRONG or not self.catalog.state.synced.is_set():
            return None  # STRONG asks NATS first (blocking); a starting router answers on a worker
        meta = self.catalog.known(request.collection)  # an alias resolved once, from the view
        if meta is None:
            return None  # NOT_FOUND (or a fresh read of NATS) from the worker path
        collection = self.catalog.collection_of(meta)
        deadline = deadline or time.monotonic() + DEFAULT_TIMEOUT_S
        if plain:
            return collection.search_dense_on_loop(request, deadline, self.max_response_bytes)
        if not collection.coverable:
            return None  # fanned out and fetched on a worker (it blocks)
        return collection.search_whole_on_loop(request, deadline, self.max_response_bytes, self._types(collection))

    # Snapshots: the standalone bodies over RemoteCatalog's RouterSnapshots (router/snapshots.py),
    # but for the alias look-up of a listing and an export's scratch directory.

    def ListSnapshots(self, request: pb.ListSnapshotsRequest, visible: Callable[[str], bool] | None = None) -> Any:
        collection = self.catalog.resolve(request.collection) if request.collection else None
        infos = [
            convert.snapshot_to_proto(manifest)
            for manifest in self.catalog.snapshots.list(collection)
            if visible is None or visible(manifest.get("collection") or "")
        ]
        return pb.ListSnapshotsResponse(snapshots=infos)

    def ExportSnapshot(
        self, request: pb.ExportSnapshotRequest, visible: Callable[[str], bool] | None = None
    ) -> Iterator[bytes]:
        """The standalone stream of pieces, from a scratch copy that goes when the stream is closed,
        ends or fails (also before its first piece)."""
        self._snapshot_in_scope(request.snapshot, visible)
        size = EXPORT_CHUNK_BYTES
        if self.max_response_bytes is not None:  # a message must fit the server's own limit
            size = max(TAR_BLOCK, min(size, self.max_response_bytes - FRAMING_BYTES))
        export = self.catalog.snapshots.export(request.snapshot)
        return Export(rechunk(export, size), export.close)

    def stream_writer(self) -> Any:
        return PipelinedWriter(self)

    def Get(self, request: pb.GetRequest) -> Any:
        documents = self.catalog.get(request.collection).get_documents(request)
        response = pb.GetResponse(documents=documents)
        if self.max_response_bytes is not None and response.ByteSize() > self.max_response_bytes:
            limit = self.max_response_bytes
            raise ResourceExhausted(
                f"the response would exceed {limit} bytes (the maximum message size); ask for fewer ids"
            )
        return response

    def Count(self, request: pb.CountRequest) -> Any:
        collection = self.catalog.get(request.collection)
        flt = convert.optional_filter(request.filter, request.HasField("filter"))
        if flt is not None:
            collection.payload.validate_filter(flt)
        return pb.CountResponse(count=collection.count(flt, request))

    def Search(self, request: pb.SearchRequest) -> Any:
        if plain_dense(request):
            return super().Search(request)
        collection = self.catalog.get(request.collection)
        plan = convert.plan_from_proto(request)
        self.encoding.fill_plans([(collection, plan, "")])
        return collection.search_response(request, plan, self._types(collection), self.max_response_bytes)

    def _search(self, collection: Any, plan: SearchPlan, where: str, request: pb.SearchRequest) -> SearchResult:
        return collection.search_request(request, plan, where)

    def reading(self, request: pb.SearchRequest) -> dict[str, Any]:
        """The request's consistency (the sequence each shard's replica must have applied, replicas.py)
        and its filter as the client sent it (the shards take it so)."""
        wire = {"wire_filter": request.filter} if request.HasField("filter") else {}
        return {"consistency": request.consistency, **wire}


FRAMING_BYTES = 6  # a repeated message field's tag and length prefix, at most (service/rpcs.py)


def _vectors_only(request: pb.SearchRequest) -> bool:
    """Every dense and sparse sub-query gives its vector (and no text): nothing to encode."""
    for sub in request.queries:
        kind = sub.WhichOneof("query")
        if kind == "dense":
            if sub.dense.text or not sub.dense.HasField("vector"):
                return False
        elif kind == "sparse":
            if sub.sparse.text or not sub.sparse.HasField("vector"):
                return False
        elif kind != "bm25":
            return False
    return bool(request.queries)
