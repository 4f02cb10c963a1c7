"""The blocking body of each braid.v1.Braid RPC: convert the request, call the catalog, convert back.

Run on a worker thread by service/handlers.py, which owns decoding, authentication,
admission and status codes. Methods take the decoded request and raise index or
encoder errors; BulkUpsert is handled batch by batch through ``upsert``. The snapshot
streams: ExportSnapshot returns the archive as an iterator of pieces (each pulled on a
worker), ImportSnapshot writes through ``import_upload``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from braid.index import hnsw_plan, pacing
from braid.index.catalog import Catalog, Quarantined
from braid.index.collection import Collection
from braid.index.errors import (
    BraidError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from braid.index.hnsw_strand import SEAL_ROWS
from braid.index.query import SearchPlan, SearchResult
from braid.index.schema import DenseIndexType, Schema
from braid.index.snapshot import TAR_BLOCK
from braid.index.snapshot import check_name as check_snapshot_name
from braid.index.snapshot_store import SnapshotStore
from braid.v1 import braid_pb2 as pb

from . import convert
from .encoding import Encoding
from .snapshot_files import CHUNK_BYTES as EXPORT_CHUNK_BYTES
from .snapshot_files import rechunk


class BraidRpcs:
    """The body of every braid.v1.Braid RPC, run on a worker thread; errors are index errors."""

    def __init__(self, catalog: Catalog, encoding: Encoding, max_response_bytes: int | None = None) -> None:
        self.catalog = catalog
        self.encoding = encoding
        self.max_response_bytes = max_response_bytes

    def _info(self, collection: Collection) -> pb.CollectionInfo:
        info = convert.collection_to_proto(
            collection.name, collection.schema, len(collection.shards), collection.count(), collection.created_at
        )
        info.write_problem = collection.write_problem() or ""
        info.replication_factor = getattr(collection, "replication_factor", 1)
        info.aliases.extend(self.catalog.aliases_of(collection.name))
        self.encoding.stamp_fingerprints(info.schema)
        return info

    @staticmethod
    def _types(collection: Collection) -> dict:
        return {f.name: f.type for f in collection.schema.payload_fields}

    # ------------------------------------------------------------- collections

    def CreateCollection(self, request: pb.CreateCollectionRequest) -> Any:
        schema = self.encoding.resolve_schema(convert.schema_from_proto(request.schema))
        self.encoding.check_fingerprints(request.schema)
        return self._info(self.catalog.create(request.name, schema, request.shards or 1, request.replication_factor))

    def GetCollection(self, request: pb.GetCollectionRequest) -> Any:
        return self._info(self.catalog.get(request.name))

    def ListCollections(self, request: pb.ListCollectionsRequest, visible: Callable[[str], bool] | None = None) -> Any:
        """Every collection, or those ``visible`` allows (an API key scoped to some collections)."""
        infos = []
        for collection in self.catalog.list():
            if visible is None or visible(collection.name):
                try:
                    infos.append(self._info(collection))
                except (NotFound, Unavailable):  # deleted while we listed: not there any more
                    continue
        for bad in self.catalog.quarantined():
            if visible is None or visible(bad.name):
                infos.append(_quarantined_info(bad))
                infos[-1].aliases.extend(self.catalog.aliases_of(bad.name))
        infos.sort(key=lambda info: info.name)
        return pb.ListCollectionsResponse(collections=infos)

    def DeleteCollection(self, request: pb.DeleteCollectionRequest) -> Any:
        self.catalog.delete(request.name)
        return pb.DeleteCollectionResponse()

    # ----------------------------------------------------------------- aliases

    def CreateAlias(self, request: pb.CreateAliasRequest) -> Any:
        self.catalog.create_alias(request.name, request.collection)
        return pb.Alias(name=request.name, collection=request.collection)

    def UpdateAlias(self, request: pb.UpdateAliasRequest) -> Any:
        self.catalog.update_alias(request.name, request.collection)
        return pb.Alias(name=request.name, collection=request.collection)

    def DeleteAlias(self, request: pb.DeleteAliasRequest) -> Any:
        self.catalog.delete_alias(request.name)
        return pb.DeleteAliasResponse()

    def ListAliases(self, request: pb.ListAliasesRequest, visible: Callable[[str], bool] | None = None) -> Any:
        """Every alias, or those ``visible`` allows by name or by collection (a scoped API key)."""
        aliases = [
            pb.Alias(name=name, collection=collection)
            for name, collection in self.catalog.list_aliases()
            if visible is None or visible(name) or visible(collection)
        ]
        return pb.ListAliasesResponse(aliases=aliases)

    # --------------------------------------------------------------- snapshots
    # A snapshot belongs to the collection it was taken of: a key scoped to some collections
    # (``visible``) sees and touches only their snapshots; a damaged one (no readable
    # collection) only an unscoped key.

    def CreateSnapshot(self, request: pb.CreateSnapshotRequest) -> Any:
        if not request.collection:
            raise InvalidArgument.field("collection", "give the collection (or alias) to snapshot")
        return convert.snapshot_to_proto(self.catalog.create_snapshot(request.collection))

    def ListSnapshots(self, request: pb.ListSnapshotsRequest, visible: Callable[[str], bool] | None = None) -> Any:
        collection = request.collection or None
        if collection is not None:  # an alias lists its collection's snapshots
            collection = self.catalog.aliases.target(collection) or collection
        infos = [
            convert.snapshot_to_proto(manifest)
            for manifest in self.catalog.snapshots.list(collection)
            if visible is None or visible(manifest.get("collection") or "")
        ]
        return pb.ListSnapshotsResponse(snapshots=infos)

    def RestoreSnapshot(self, request: pb.RestoreSnapshotRequest, visible: Callable[[str], bool] | None = None) -> Any:
        self._snapshot_in_scope(request.snapshot, visible)
        return self._info(self.catalog.restore_snapshot(request.snapshot, request.name, request.replace))

    def DeleteSnapshot(self, request: pb.DeleteSnapshotRequest, visible: Callable[[str], bool] | None = None) -> Any:
        self._snapshot_in_scope(request.snapshot, visible)
        self.catalog.snapshots.delete(request.snapshot)
        return pb.DeleteSnapshotResponse()

    def ExportSnapshot(
        self, request: pb.ExportSnapshotRequest, visible: Callable[[str], bool] | None = None
    ) -> Iterator[bytes]:
        """The snapshot's tar archive in pieces of EXPORT_CHUNK_BYTES (1 MiB; the last one shorter), pulled
        one by one on workers; an unknown or unreadable snapshot is refused before the first."""
        self._snapshot_in_scope(request.snapshot, visible)
        size = EXPORT_CHUNK_BYTES
        if self.max_response_bytes is not None:  # a message must fit the server's own limit
            size = max(TAR_BLOCK, min(size, self.max_response_bytes - _FRAMING_BYTES))
        return rechunk(self.catalog.snapshots.export(request.snapshot), size)

    def import_upload(self, visible: Callable[[str], bool] | None = None) -> SnapshotUpload:
        """Where an ImportSnapshot stream's archive goes: ``write(chunk)`` per message, ``finish()``
        (checks it and lists it: its SnapshotInfo) at the stream's end, ``close()`` always."""
        return SnapshotUpload(self.catalog.snapshots, visible)

    def _snapshot_in_scope(self, name: str, visible: Callable[[str], bool] | None) -> None:
        """InvalidArgument for a bad name, NotFound for an unknown snapshot, PermissionDenied for a
        scoped key and a snapshot of a collection outside its scope."""
        check_snapshot_name(name)
        if visible is None:
            return
        collection = self.catalog.snapshots.collection_of(name) or ""  # "": unreadable, unscoped keys only
        if not visible(collection):
            raise PermissionDenied(f"snapshot: {name!r} is not a snapshot of a collection this API key may use")

    # --------------------------------------------------------------- documents

    def Upsert(self, request: pb.UpsertRequest) -> Any:
        upserted, rest_s = self.apply_upsert(request)
        pacing.rest(rest_s)  # on its worker: this client's next call waits for the answer anyway
        return pb.UpsertResponse(upserted=upserted)

    def apply_upsert(self, request: pb.UpsertRequest, name: str | None = None) -> tuple[int, float]:
        """One batch: validate, encode, apply (into ``name`` when given: a stream's alias resolved
        once); (the documents upserted, the seconds the writer should rest before its next batch:
        index/pacing.py). The batch is durable and visible already: a rest holds no lock."""
        started = time.monotonic()
        collection = self.catalog.get(name or request.collection)
        docs = convert.documents_from_proto(request.documents)
        self.encoding.fill_documents(collection.schema, docs)
        upserted = collection.upsert(docs, request.ack)
        return upserted, pacing.rest_due(started, self.catalog.write_share)

    def stream_writer(self) -> Any:
        """What a BulkUpsert stream writes through: ``upsert(batch)`` per message, ``finish()`` at its end.
        Standalone applies each batch before the next is read; a router pipelines them."""
        return _DirectWriter(self)

    def Delete(self, request: pb.DeleteRequest) -> Any:
        collection = self.catalog.get(request.collection)
        flt = convert.optional_filter(request.filter, request.HasField("filter"))
        if request.ids and flt is not None:
            raise InvalidArgument.field("ids", "set ids or filter, not both")
        if flt is not None:
            return pb.DeleteResponse(deleted=collection.delete_filter(flt, request.ack))
        if not request.ids:
            raise InvalidArgument.field("ids", "give ids or a non-empty filter")
        return pb.DeleteResponse(deleted=collection.delete_ids(list(request.ids), request.ack))

    def Get(self, request: pb.GetRequest) -> Any:
        collection = self.catalog.get(request.collection)
        docs = collection.get(list(request.ids), include_vectors=request.include_vectors)
        types = self._types(collection)
        return pb.GetResponse(documents=convert.documents_to_proto(docs, types, self.max_response_bytes))

    def Count(self, request: pb.CountRequest) -> Any:
        collection = self.catalog.get(request.collection)
        flt = convert.optional_filter(request.filter, request.HasField("filter"))
        return pb.CountResponse(count=collection.count(flt))

    def Flush(self, request: pb.FlushRequest) -> Any:
        self.catalog.get(request.collection).flush()
        return pb.FlushResponse()

    # ------------------------------------------------------------------ search

    def Search(self, request: pb.SearchRequest) -> Any:
        collection = self.catalog.get(request.collection)
        if plain_dense(request, filtered=True):
            # The most common shape skips plan building and fusion: same hits, a fraction of the Python work.
            dense = request.queries[0].dense
            if convert.vector_or_text(dense.HasField("vector"), dense.text, "queries[0].dense"):
                vector = convert.dense_from_proto(dense.vector, "queries[0].dense.vector")
            else:
                vector = self.encoding.dense_texts(collection, dense.field, [dense.text], ["queries[0].dense"])[0]
            limit = request.limit or 10
            eps = dense.eps if dense.HasField("eps") else None
            collection.check_dense(dense.field, vector, limit, dense.ef, "", dense.max_lists, eps)
            filtered = _filtered(request, "")
            result = collection.search_dense_batch(
                dense.field, vector[None, :], limit, dense.ef, dense.max_lists, eps, **filtered, **self.reading(request)
            )[0]
            return convert.result_to_proto(result, _NO_TYPES, self.max_response_bytes)
        plan = convert.plan_from_proto(request)
        self.encoding.fill_plans([(collection, plan, "")])
        result = self._search(collection, plan, "", request)
        return convert.result_to_proto(result, self._types(collection), self.max_response_bytes)

    def BatchSearch(self, request: pb.BatchSearchRequest) -> Any:
        searches = request.searches
        if len(searches) > self.catalog.limits.max_batch:
            raise ResourceExhausted(
                f"searches: {len(searches)} searches exceed the maximum of {self.catalog.limits.max_batch}"
            )
        batched = self._batched_dense(searches)
        if batched is not None:
            return pb.BatchSearchResponse(results=batched)
        jobs = []
        for i, search in enumerate(searches):
            jobs.append(
                (
                    self.catalog.get(search.collection),
                    convert.plan_from_proto(search, f"searches[{i}]."),
                    f"searches[{i}].",
                )
            )
        self.encoding.fill_plans(jobs)  # every text sub-query of the batch is encoded together
        results = (
            (self._search(collection, plan, where, search), self._types(collection))
            for (collection, plan, where), search in zip(jobs, searches, strict=True)
        )
        return pb.BatchSearchResponse(results=self._within_budget(results))

    def _search(self, collection: Collection, plan: SearchPlan, where: str, request: pb.SearchRequest) -> SearchResult:
        """Run one encoded plan (a router sends ``request`` on to the shards instead)."""
        return collection.search(plan, where)

    def reading(self, request: pb.SearchRequest) -> dict[str, Any]:
        """search_dense_batch's arguments for which writes a search must see: none here (one process
        sees every write it acknowledged); a router passes the request's consistency."""
        return {}

    def _within_budget(self, results: Iterable[tuple[Any, dict]]) -> list[pb.SearchResponse]:
        """Convert (result, payload types) pairs in turn, refusing once the whole response passes its limit."""
        budget = self.max_response_bytes
        out = []
        for result, types in results:  # lazily: searches after a refusal are never run
            response = convert.result_to_proto(result, types, budget)
            if budget is not None:
                budget -= response.ByteSize() + _FRAMING_BYTES
            out.append(response)
        return out

    def on_loop(self, request: Any, deadline: float | None) -> Any:
        """An awaitable answering ``request`` without blocking the event loop, or None (the
        standalone server has none; a router's plain dense searches are one)."""
        return None

    def quick(self, request: Any) -> bool:
        """A Search cheap and bounded enough to run on the event loop itself (about a millisecond
        at most): few hits, and either a plain dense query by vector on an in-memory HNSW field
        with a modest beam, or a plain BM25 query on a one-shard collection whose terms' postings
        are few (tantivy's work is bounded by the postings it may read; the estimate costs a
        query analysis and a dictionary look-up per term, a few microseconds)."""
        if request.limit > QUICK_MAX_LIMIT or not plain(request, filtered=True):
            return False
        kind = request.queries[0].WhichOneof("query")
        if kind == "bm25":
            return not request.HasField("filter") and self._quick_bm25(request)
        if kind != "dense":
            return False
        dense = request.queries[0].dense
        if not dense.HasField("vector") or dense.ef > QUICK_MAX_EF:
            return False
        collection = self.catalog.peek(request.collection)
        spec = collection.schema.dense(dense.field) if collection is not None else None
        if spec is None or spec.index is not DenseIndexType.HNSW or spec.hnsw.ef_search > QUICK_MAX_EF:
            return False
        return not request.HasField("filter") or self._quick_filter(collection, request)

    def _quick_filter(self, collection: Collection, request: pb.SearchRequest) -> bool:
        """A filtered dense search on declared payload fields that the planner prices at
        QUICK_MAX_FILTER_COST at most over every shard (it picks a scan of few or contiguous rows,
        or a short walk): the estimate costs the filter's mask, which the shard keeps for the search
        (index/shard/indexes.py ``FilterMasks``), against a thread hop of a few hundred microseconds."""
        dense = request.queries[0].dense
        try:
            flt = convert.filter_from_proto(request.filter)
            if not flt.fields() <= {spec.name for spec in collection.schema.payload_fields}:
                return False  # a metadata path's column may not be built yet (a scan of every document)
            collection.shards[0].payload.validate_filter(flt)
            cost = 0.0
            for shard in collection.shards:
                found = shard.dense_filter_cost(dense.field, flt, request.limit or 10, dense.ef)
                if found is None:
                    return False
                cost += found
                if cost > QUICK_MAX_FILTER_COST:
                    return False
            return True
        except BraidError:
            return False  # the worker answers with the error

    def _quick_bm25(self, request: Any) -> bool:
        bm25 = request.queries[0].bm25
        if len(bm25.text) > QUICK_MAX_QUERY_CHARS:
            return False
        collection = self.catalog.peek(request.collection)
        if collection is None or len(collection.shards) != 1 or collection.shards[0].text is None:
            return False  # several shards fan out to threads anyway
        text = collection.shards[0].text
        fields = list(bm25.fields) or text.field_names
        if not set(fields) <= set(text.field_names):
            return False  # the worker answers with the error
        return text.postings(bm25.text, fields) <= QUICK_MAX_POSTINGS

    def _batched_dense(self, searches: Any) -> list[pb.SearchResponse] | None:
        """One batched HNSW call when every search is a plain dense query of one shape (and one
        filter, or none), else None."""
        if not searches:
            return []
        first = searches[0]
        if not plain_dense(first, filtered=True):
            return None
        shape = _dense_shape(first)
        for search in searches:
            if not plain_dense(search, filtered=True) or _dense_shape(search) != shape:
                return None
        collection = self.catalog.get(first.collection)
        texts = [s.queries[0].dense.text for s in searches]
        if all(texts) and not any(s.queries[0].dense.HasField("vector") for s in searches):
            wheres = [f"searches[{i}].queries[0].dense" for i in range(len(texts))]
            rows = list(self.encoding.dense_texts(collection, shape[1], texts, wheres))
        elif any(texts):
            return None  # a mix of text and vectors takes the general path
        else:
            rows = [
                convert.dense_from_proto(s.queries[0].dense.vector, f"searches[{i}].queries[0].dense.vector")
                for i, s in enumerate(searches)
            ]
        _, field, ef, limit, max_lists, eps, _, _ = shape
        for i, row in enumerate(rows):
            collection.check_dense(field, row, limit or 10, ef, f"searches[{i}].", max_lists, eps)
        filtered = _filtered(first, "searches[0].")
        results = collection.search_dense_batch(
            field, np.stack(rows), limit or 10, ef, max_lists, eps, **filtered, **self.reading(first)
        )
        return self._within_budget((result, _NO_TYPES) for result in results)


class SnapshotUpload:
    """An ImportSnapshot stream's archive, written to a hidden file of the snapshot store as it
    arrives (index/snapshot_store.py ``Upload``: the free-space floor per piece), then checked and
    listed by ``finish``; ``close`` removes the file whatever happened."""

    def __init__(self, store: SnapshotStore, visible: Callable[[str], bool] | None) -> None:
        self.store = store
        self.visible = visible
        self.upload = store.upload()

    def write(self, chunk: pb.SnapshotChunk) -> None:
        if chunk.data:
            self.upload.write(chunk.data)

    def finish(self) -> pb.SnapshotInfo:
        archive = self.upload.finish()
        if self.upload.bytes == 0:
            raise InvalidArgument.field("data", "the stream carried no archive")
        return convert.snapshot_to_proto(self.store.import_archive(archive, self._admit))

    def close(self) -> None:
        self.upload.close()

    def _admit(self, manifest: dict) -> None:
        if self.visible is not None and not self.visible(manifest.get("collection") or ""):
            raise PermissionDenied(
                f"archive: snapshot {manifest.get('name')!r} is of collection {manifest.get('collection')!r}, "
                f"which this API key may not use"
            )


class _DirectWriter:
    """A stream's batches applied one by one: each is durable and visible when upsert returns.

    An alias is resolved once per stream (at the first batch naming it), so a stream never
    splits between the old and the new target of an UpdateAlias."""

    def __init__(self, rpcs: BraidRpcs) -> None:
        self.rpcs = rpcs
        self.resolved: dict[str, str] = {}
        self.rest_s = 0.0  # what the last batch owes (index/pacing.py): the stream handler rests it on the loop

    def upsert(self, request: pb.UpsertRequest) -> int:
        name = self.resolved.get(request.collection)
        if name is None:
            name = self.resolved[request.collection] = self.rpcs.catalog.resolve(request.collection)
        upserted, self.rest_s = self.rpcs.apply_upsert(request, name)
        return upserted

    def finish(self) -> None:
        """Every batch is applied already."""


_NO_TYPES: dict = {}
# What a quick Search may ask for (see BraidRpcs.quick).
QUICK_MAX_LIMIT = 100
QUICK_MAX_EF = 256
# A quick filtered dense search: its cost as its planner prices it (index/hnsw_plan.py), in rows
# gathered and scored (~0.3 us each here), at most the dearest unfiltered quick search's (a walk
# for QUICK_MAX_EF candidates, and a full growing block scanned): 4,608, about 1.4 ms. A filter
# keeping 10% of 100,000 documents (a view scan of 10,000 rows, 2,500) is one.
QUICK_MAX_FILTER_COST = hnsw_plan.WALK_COST * QUICK_MAX_EF + SEAL_ROWS
# A quick BM25 query: its text's length (each term costs tantivy a look-up in every segment:
# some 40 words at most), and its terms' document frequencies summed (tantivy reads about
# 10 ns per posting here: 100,000 postings take well under a millisecond).
QUICK_MAX_QUERY_CHARS = 256
QUICK_MAX_POSTINGS = 100_000


def _quarantined_info(bad: Quarantined) -> pb.CollectionInfo:
    """What ListCollections shows of a collection that failed to open: its name, error and what metadata survived."""
    info = pb.CollectionInfo(name=bad.name, error=str(bad.error))
    try:
        meta = bad.meta or {}
        info.shards = int(meta.get("shards", 0))
        info.schema.CopyFrom(convert.schema_to_proto(Schema.from_json(meta["schema"])))
        info.created_at.FromNanoseconds(int(float(meta["created_at"]) * 1e9))
    except Exception:  # damaged metadata: the name and the error are what matter
        pass
    return info


_FRAMING_BYTES = 6  # a repeated message field's tag and length prefix, at most


def _dense_shape(request: pb.SearchRequest) -> tuple:
    """What plain dense searches must share to run as one batched call."""
    dense = request.queries[0].dense
    eps = dense.eps if dense.HasField("eps") else None
    flt = request.filter.SerializeToString(deterministic=True) if request.HasField("filter") else None
    shape = (request.collection, dense.field, dense.ef, request.limit, dense.max_lists, eps, request.consistency)
    return (*shape, flt)


def _filtered(request: pb.SearchRequest, where: str) -> dict[str, Any]:
    """search_dense_batch's filter arguments for a plain dense search: none without a filter."""
    flt = convert.optional_filter(request.filter, request.HasField("filter"), f"{where}filter")
    return {"flt": flt, "where": where} if flt is not None else {}


def plain_dense(request: pb.SearchRequest, filtered: bool = False) -> bool:
    """One dense sub-query with nothing that needs fusion, filtering (unless ``filtered``) or materializing."""
    return plain(request, filtered) and request.queries[0].WhichOneof("query") == "dense"


def plain(request: pb.SearchRequest, filtered: bool = False) -> bool:
    """One sub-query with nothing that needs fusion, filtering (unless ``filtered``) or materializing."""
    return (
        len(request.queries) == 1
        and not request.queries[0].depth
        and (filtered or not request.HasField("filter"))
        and not request.HasField("fusion")
        and not request.offset
        and not request.HasField("score_threshold")
        and not request.payload_fields
        and not request.include_payload
        and not request.text_fields
        and not request.explain
    )
