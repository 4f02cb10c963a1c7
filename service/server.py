"""The braid.v1.Braid gRPC servicer, and building (``create_server``) apart from running (``serve``).

Each RPC validates and converts its request (service/convert.py), calls the
catalog, and maps any index error to a status code through service/errors.py.
The standard grpc.health.v1 service and server reflection are registered too.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from braid.index.catalog import Catalog
from braid.index.collection import Collection
from braid.index.errors import InvalidArgument, ResourceExhausted
from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from . import convert
from .config import ServerConfig
from .encoding import Encoding
from .errors import EXPECTED_ERRORS, abort

log = logging.getLogger("braid.server")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Braid"].full_name


def rpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Turn every exception of a servicer method into the matching gRPC status."""

    @functools.wraps(method)
    def wrapper(self: BraidServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except EXPECTED_ERRORS as err:
            abort(context, err)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # tantivy's PanicException is a BaseException: answer INTERNAL, never hang
            if isinstance(err, grpc.RpcError) or context.code() is not None:
                raise
            abort(context, err)

    return wrapper


class BraidServicer(braid_pb2_grpc.BraidServicer):
    def __init__(self, catalog: Catalog, encoding: Encoding) -> None:
        self.catalog = catalog
        self.encoding = encoding

    def _info(self, collection: Collection) -> pb.CollectionInfo:
        return convert.collection_to_proto(
            collection.name, collection.schema, len(collection.shards), collection.count(), collection.created_at
        )

    @staticmethod
    def _types(collection: Collection) -> dict:
        return {f.name: f.type for f in collection.schema.payload_fields}

    # ------------------------------------------------------------- collections

    @rpc
    def CreateCollection(self, request: pb.CreateCollectionRequest, context: grpc.ServicerContext) -> Any:
        schema = self.encoding.resolve_schema(convert.schema_from_proto(request.schema))
        return self._info(self.catalog.create(request.name, schema, request.shards or 1))

    @rpc
    def GetCollection(self, request: pb.GetCollectionRequest, context: grpc.ServicerContext) -> Any:
        return self._info(self.catalog.get(request.name))

    @rpc
    def ListCollections(self, request: pb.ListCollectionsRequest, context: grpc.ServicerContext) -> Any:
        return pb.ListCollectionsResponse(collections=[self._info(c) for c in self.catalog.list()])

    @rpc
    def DeleteCollection(self, request: pb.DeleteCollectionRequest, context: grpc.ServicerContext) -> Any:
        self.catalog.delete(request.name)
        return pb.DeleteCollectionResponse()

    # --------------------------------------------------------------- documents

    @rpc
    def Upsert(self, request: pb.UpsertRequest, context: grpc.ServicerContext) -> Any:
        return pb.UpsertResponse(upserted=self._upsert(request))

    def _upsert(self, request: pb.UpsertRequest) -> int:
        collection = self.catalog.get(request.collection)
        docs = convert.documents_from_proto(request.documents)
        self.encoding.fill_documents(collection.schema, docs)
        return collection.upsert(docs)

    @rpc
    def BulkUpsert(self, request_iterator: Iterator[pb.UpsertRequest], context: grpc.ServicerContext) -> Any:
        upserted, batches = 0, 0
        for batch in request_iterator:
            try:
                upserted += self._upsert(batch)
            except EXPECTED_ERRORS as err:
                err.args = (
                    f"batch {batches}: {err}; {batches} earlier batches ({upserted} documents) were acknowledged",
                )
                raise
            batches += 1
        return pb.BulkUpsertResponse(upserted=upserted, batches=batches)

    @rpc
    def Delete(self, request: pb.DeleteRequest, context: grpc.ServicerContext) -> Any:
        collection = self.catalog.get(request.collection)
        flt = convert.optional_filter(request.filter, request.HasField("filter"))
        if request.ids and flt is not None:
            raise InvalidArgument.field("ids", "set ids or filter, not both")
        if flt is not None:
            return pb.DeleteResponse(deleted=collection.delete_filter(flt))
        if not request.ids:
            raise InvalidArgument.field("ids", "give ids or a non-empty filter")
        return pb.DeleteResponse(deleted=collection.delete_ids(list(request.ids)))

    @rpc
    def Get(self, request: pb.GetRequest, context: grpc.ServicerContext) -> Any:
        collection = self.catalog.get(request.collection)
        docs = collection.get(list(request.ids), include_vectors=request.include_vectors)
        types = self._types(collection)
        return pb.GetResponse(documents=[convert.document_to_proto(doc, types) for doc in docs])

    @rpc
    def Count(self, request: pb.CountRequest, context: grpc.ServicerContext) -> Any:
        collection = self.catalog.get(request.collection)
        flt = convert.optional_filter(request.filter, request.HasField("filter"))
        return pb.CountResponse(count=collection.count(flt))

    @rpc
    def Flush(self, request: pb.FlushRequest, context: grpc.ServicerContext) -> Any:
        self.catalog.get(request.collection).flush()
        return pb.FlushResponse()

    # ------------------------------------------------------------------ search

    @rpc
    def Search(self, request: pb.SearchRequest, context: grpc.ServicerContext) -> Any:
        collection = self.catalog.get(request.collection)
        if _plain_dense(request):
            # The most common shape skips plan building and fusion: same hits, a fraction of the Python work.
            dense = request.queries[0].dense
            if convert.vector_or_text(dense.HasField("vector"), dense.text, "queries[0].dense"):
                vector = convert.dense_from_proto(dense.vector, "queries[0].dense.vector")
            else:
                vector = self.encoding.dense_texts(collection, dense.field, [dense.text], ["queries[0].dense"])[0]
            limit = request.limit or 10
            eps = dense.eps if dense.HasField("eps") else None
            collection.check_dense(dense.field, vector, limit, dense.ef, "", dense.max_lists, eps)
            result = collection.search_dense_batch(dense.field, vector[None, :], limit, dense.ef, dense.max_lists, eps)[
                0
            ]
            return convert.result_to_proto(result, _NO_TYPES)
        plan = convert.plan_from_proto(request)
        self.encoding.fill_plans([(collection, plan, "")])
        return convert.result_to_proto(collection.search(plan), self._types(collection))

    @rpc
    def BatchSearch(self, request: pb.BatchSearchRequest, context: grpc.ServicerContext) -> Any:
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
        results = [
            convert.result_to_proto(collection.search(plan, where), self._types(collection))
            for collection, plan, where in jobs
        ]
        return pb.BatchSearchResponse(results=results)

    def _batched_dense(self, searches: Any) -> list[pb.SearchResponse] | None:
        """One batched HNSW call when every search is a plain dense query of one shape, else None."""
        if not searches:
            return []
        first = searches[0]
        if not _plain_dense(first):
            return None
        shape = _dense_shape(first)
        for search in searches:
            if not _plain_dense(search) or _dense_shape(search) != shape:
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
        _, field, ef, limit, max_lists, eps = shape
        for i, row in enumerate(rows):
            collection.check_dense(field, row, limit or 10, ef, f"searches[{i}].", max_lists, eps)
        results = collection.search_dense_batch(field, np.stack(rows), limit or 10, ef, max_lists, eps)
        return [convert.result_to_proto(result, _NO_TYPES) for result in results]


_NO_TYPES: dict = {}


def _dense_shape(request: pb.SearchRequest) -> tuple:
    """What plain dense searches must share to run as one batched call."""
    dense = request.queries[0].dense
    eps = dense.eps if dense.HasField("eps") else None
    return (request.collection, dense.field, dense.ef, request.limit, dense.max_lists, eps)


def _plain_dense(request: pb.SearchRequest) -> bool:
    """One dense sub-query with nothing that needs fusion, filtering or materializing."""
    return (
        len(request.queries) == 1
        and request.queries[0].WhichOneof("query") == "dense"
        and not request.queries[0].depth
        and not request.HasField("filter")
        and not request.HasField("fusion")
        and not request.offset
        and not request.HasField("score_threshold")
        and not request.payload_fields
        and not request.include_payload
        and not request.text_fields
        and not request.explain
    )


def _add_health(server: grpc.Server) -> health.HealthServicer:
    servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", SERVICE_NAME):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def _add_reflection(server: grpc.Server) -> None:
    names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server)


def create_server(config: ServerConfig, catalog: Catalog | None = None) -> tuple[grpc.Server, int, Catalog, Encoding]:
    """Build (but do not start) the server; returns it, the bound port, the catalog and the encoders.

    After ``server.stop`` the caller closes the encoders, then the catalog.
    """
    catalog = catalog or Catalog(config.data_dir, config.limits)
    encoding = Encoding(
        config.models_path, config.encoder_threads or None, config.encoder_max_batch, config.encoder_max_wait_ms / 1000
    )
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers), options=options)
    braid_pb2_grpc.add_BraidServicer_to_server(BraidServicer(catalog, encoding), server)
    _add_health(server)
    _add_reflection(server)
    port = server.add_insecure_port(config.address)
    if port == 0:
        encoding.close()
        catalog.close()
        raise OSError(f"cannot bind {config.address}")
    return server, port, catalog, encoding


def serve(config: ServerConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight RPCs and close every shard cleanly."""
    server, port, catalog, encoding = create_server(config)
    server.start()
    log.info("braid serving on %s:%d, data in %s", config.host, port, config.data_dir)
    if ready is not None:
        ready(port)
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stopping.wait()
    log.info("shutting down")
    server.stop(grace=10).wait()
    encoding.close()
    catalog.close()
