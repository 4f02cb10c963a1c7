"""The router (``braid serve --role router``): braid.v1 for clients, fanned out to shard replicas.

Stateless: what it knows comes from NATS (the two buckets of service/cluster/meta.py, watched
into memory), so a router restart loses nothing and any number of routers can serve. It
plugs into the standalone server as its catalog: ``RemoteCatalog`` and ``RemoteCollection``
offer what service/rpcs.py calls on a catalog and a collection, and ``RouterRpcs`` overrides
the few RPC bodies that forward protobuf messages as they are.

Writes: validate and encode here (replicas never run a model), split by shard with the same
hash as standalone, publish each shard's part as one record per message (split further to
fit NATS's max_payload) with a message id, and acknowledge once JetStream stored every part
and, by default (WRITE_ACK_APPLIED), one replica of each affected shard applied it. Nothing
unstored is acknowledged, and a failure says only what Braid knows: a publish is retried with
the same message id (JetStream keeps one copy) across a paused or killed NATS node until the
call's deadline; "it was not stored" (UNAVAILABLE) only when no try may have stored it; else
UNAVAILABLE, or DEADLINE_EXCEEDED once the deadline passed, saying the write may have been
stored (sending it again is safe). The wait for a replica's apply retries a replica that is
down or restarting until the deadline, then DEADLINE_EXCEEDED saying the write is stored.

Aliases: watched from their own bucket (service/cluster/meta.py) like collections; a request
resolves a name once, from one snapshot of the view. A name the view does not know is read
from NATS before NOT_FOUND (an alias made through another router a moment ago), and an
alias change answers once this router's view reflects it, so it reads its own changes.

Reads: when some live server holds a replica of every shard (replication factor as large as
the server count, or one shard), one of them, chosen round robin, runs the whole search as a
standalone collection of those replicas would (Shard/SearchCollection: DFS, fusion, payload and
text in one call), so the hop costs one round trip whatever the search's shape; if it fails
retryably, the search falls back to the fan-out. Otherwise one replica of every shard, chosen
round robin among the live ones, answers over braid.cluster.v1.Shard; a failed or slow
replica is retried on the next inside the call's deadline (each try gets a share of the time
left), and replicas not heard from lately are tried last, at their last address, before a read
fails. Each strand is merged across shards and fused exactly as a collection does
(index/collection.py ``combine``), so the hits equal a standalone collection's with the same
shard count. Consistency: DEFAULT waits for the writes this router acknowledged, STRONG for
the last record of each shard's subject at the start of the search, EVENTUAL for nothing
(but a replica still catching up never answers).

Every call to a replica carries the client call's request id (``x-request-id``), and
``RouterStats`` counts retries and failovers for /metrics (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.index import analyzers, records
from braid.index.aliases import check_name
from braid.index.catalog import Recovery, check_shard_count
from braid.index.collection import (
    Collection,
    Ranked,
    combine,
    global_bm25_idf,
    merge_ranked,
    sparse_idf_of,
    strand_depths,
)
from braid.index.errors import (
    AlreadyExists,
    BraidError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from braid.index.filters import Filter
from braid.index.payload import PayloadStore
from braid.index.query import Bm25Query, DenseQuery, SearchPlan, SearchResult, SparseQuery
from braid.index.records import DocumentWrite
from braid.index.schema import NAME_PATTERN, Schema, validate_collection_name
from braid.index.stats import current_trace
from braid.index.text import query_terms
from braid.index.validate import Limits, check_documents, check_plan, check_query_text
from braid.v1 import braid_pb2 as pb

from .. import convert
from ..admission import TimedOut, call_deadline
from ..config import ServerConfig
from ..errors import RETRYABLE_CODES, STATUS_OF
from ..logs import forward_metadata
from ..rpcs import BraidRpcs
from .meta import (
    ALIASES_BUCKET,
    COLLECTIONS_BUCKET,
    NODE_TTL_S,
    NODES_BUCKET,
    AliasMeta,
    CollectionMeta,
    parse_alias,
    parse_collection,
    place,
)
from .nats_link import NatsLink, NatsUnreachable, NotStored
from .view import ClusterState, RouterStats, ShardClients

log = logging.getLogger("braid.router")
DEFAULT_TIMEOUT_S = 30.0  # a call without a deadline still ends
CREATE_WAIT_S = 15.0  # how long CreateCollection waits for a replica of every shard to open
HEADER_ROOM = 1024  # bytes of a NATS message left for headers
PIPELINE_BATCHES = 16  # a BulkUpsert stream waits for the replicas at least this often
ALIAS_WAIT_S = 5.0  # how long an alias change waits for this router's view to reflect it
ALIAS_TRIES = 8  # compare-and-set attempts of an alias change racing others on the same alias
FRESH_READ_S = 2.0  # a read of one key from NATS when the view does not know a name
APPLIED_RETRY_S = 0.05  # a replica that failed a WaitApplied is asked again after this (doubling)...
APPLIED_RETRY_MAX_S = 0.5  # ...up to this
_ERROR_OF = {code: cls for cls, code in reversed(list(STATUS_OF.items())) if issubclass(cls, BraidError)}


class OutcomeUnknown(Unavailable):
    """UNAVAILABLE for a write that may or may not have been stored (the message says so)."""


class OutcomeUnknownDeadline(TimedOut):
    """DEADLINE_EXCEEDED for a write that may or may not have been stored (the message says so)."""


class AppliedUnknown(TimedOut):
    """DEADLINE_EXCEEDED for a write the log stored that no replica reported applying in time."""


def _publish_failure(err: BaseException) -> str:
    return str(err) or type(err).__name__


def _deadline() -> float:
    deadline = call_deadline()
    return deadline if deadline is not None else time.monotonic() + DEFAULT_TIMEOUT_S


def _ranked(msg: spb.Ranked) -> Ranked:
    return Ranked(np.frombuffer(msg.labels, "<i8"), np.frombuffer(msg.scores, "<f4"), list(msg.ids))


def _error_from(err: grpc.RpcError) -> BaseException:
    """A replica's refusal of a bad request, as the index error it was."""
    cls = _ERROR_OF.get(err.code(), Unavailable)
    return cls(err.details() or str(err.code()))


class _Tries:
    """The replicas of one shard to try in turn, each with its share of the time left.

    Live, unsuspected replicas first (rotated for balance); a retryable failure (UNAVAILABLE,
    DEADLINE_EXCEEDED, ...) marks the node suspect and moves on; a refusal of the request
    itself (INVALID_ARGUMENT, NOT_FOUND, ...) is raised at once: every replica would say so.
    """

    def __init__(self, collection: RemoteCollection, shard: int, turn: int | None = None) -> None:
        self.collection = collection
        self.shard = shard
        turn = collection.catalog.turn() if turn is None else turn
        self.order = collection.catalog.state.order(collection.meta.placement[shard], turn)
        self.failures: list[str] = []

    def each(self, deadline: float) -> Iterator[tuple[str, str, float]]:
        """(node, address, timeout) for each replica worth trying before ``deadline``: the live
        ones, each with its share of the time left; then, when none of them answered, those the
        view has not heard from lately (a stalled heartbeat bucket says little about a server)."""
        for i, (node, address, live) in enumerate(self.order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.failures.append("the deadline passed")
                return
            if address is None:
                self.failures.append(f"{node}: never heard of")
                continue
            later = self.order[i:]
            left = sum(1 for _, at, up in later if at is not None and (up or not live))
            if not live:
                self.failures.append(f"{node}: not live (tried at its last address)")
            yield node, address, remaining / max(left, 1)

    def failed(self, node: str, err: grpc.RpcError) -> None:
        if err.code() not in RETRYABLE_CODES:
            raise _error_from(err) from None
        self.collection.catalog.state.suspect(node)
        self.collection.catalog.stats.retried(err.code())
        self.failures.append(f"{node}: {err.code().name} {err.details()}")

    def answered(self) -> None:
        """A replica answered: a failover when an earlier one failed or was not live."""
        if self.failures:
            self.collection.catalog.stats.failed_over()

    def exhausted(self) -> Unavailable:
        name = self.collection.name
        why = "; ".join(self.failures) or "none placed"
        return Unavailable(f"collection {name!r} shard {self.shard}: no live replica answered ({why})")


class RemoteCatalog:
    """The catalog of a router: collections from the metadata bucket, data on shard servers."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.limits: Limits = config.limits
        self.recovery = Recovery()
        # First: a bad internal TLS file stops the router before it connects to anything.
        self.clients = ShardClients.for_config(config)
        self.link = NatsLink.for_config(config, "braid-router")
        self.state = ClusterState(self.link)
        self.stats = RouterStats()
        self.acked: dict[tuple[str, int], int] = {}  # (uid, shard) -> highest sequence this router acknowledged
        self._acked_lock = threading.Lock()
        self._turn = itertools.count()
        self._collections: dict[str, RemoteCollection] = {}

    def recover(self) -> None:
        """Wait for NATS, make sure the buckets exist, and read them once (health turns SERVING after)."""
        while not self.link.wait_connected(1.0):
            pass
        while True:
            try:
                self.link.ensure_bucket(COLLECTIONS_BUCKET, self.config.stream_replicas)
                self.link.ensure_bucket(NODES_BUCKET, self.config.stream_replicas, ttl=NODE_TTL_S)
                self.link.ensure_bucket(ALIASES_BUCKET, self.config.stream_replicas)
                break
            except Exception as err:
                log.warning("cannot set up the cluster buckets yet: %s", err)
                time.sleep(1.0)
        self.state.start()
        self.state.synced.wait()
        self.recovery.done = True

    def turn(self) -> int:
        return next(self._turn)

    def note_acked(self, uid: str, shard: int, seq: int) -> None:
        with self._acked_lock:
            key = (uid, shard)
            if seq > self.acked.get(key, 0):
                self.acked[key] = seq

    # ---------------------------------------------------------------- catalog

    def _ready(self) -> None:
        if not self.state.synced.is_set():
            raise Unavailable("router starting: the cluster metadata has not been read from NATS yet")

    def get(self, name: str) -> RemoteCollection:
        """The collection called ``name``, or the one alias ``name`` points at (resolved once)."""
        self._ready()
        meta = self.state.metas.get(name)
        if meta is not None:
            return self._collection(meta)
        alias = self.state.aliases.get(name) or self._read_alias(name)
        if alias is None:
            raise NotFound(f"collection {name!r} not found")
        meta = self.state.metas.get(alias.collection)
        if meta is None or meta.uid != alias.uid:
            meta = self._read_collection(alias.collection)  # the view may lag behind the alias
        if meta is None or meta.uid != alias.uid:
            raise NotFound(
                f"collection {alias.collection!r} (alias {name!r} points at it) does not exist (it was deleted; "
                f"UpdateAlias points the alias at another collection)"
            )
        return self._collection(meta)

    def known(self, name: str) -> CollectionMeta | None:
        """``get``'s collection from the view alone (never blocks, never raises), or None."""
        metas = self.state.metas
        meta = metas.get(name)
        if meta is None and (alias := self.state.aliases.get(name)) is not None:
            meta = metas.get(alias.collection)
            if meta is not None and meta.uid != alias.uid:
                return None
        return meta

    def resolve(self, name: str) -> str:
        """The collection name ``name`` stands for: its target when it is an alias, else itself."""
        if name in self.state.metas:
            return name
        alias = self.state.aliases.get(name) or self._read_alias(name)
        return alias.collection if alias is not None else name

    def _read_alias(self, name: str) -> AliasMeta | None:
        """Alias ``name`` read from NATS now, for a name the view does not know (yet); None when
        there is none or NATS cannot tell (then the view's answer stands)."""
        if not NAME_PATTERN.fullmatch(name):
            return None
        try:
            found = self.link.kv_get(ALIASES_BUCKET, name, timeout=FRESH_READ_S)
        except Unavailable:
            return None
        return parse_alias(name, found[0]) if found is not None else None

    def _read_collection(self, name: str) -> CollectionMeta | None:
        """Collection ``name``'s metadata read from NATS now; None when absent or NATS cannot tell."""
        try:
            found = self.link.kv_get(COLLECTIONS_BUCKET, name, timeout=FRESH_READ_S)
        except Unavailable:
            return None
        return parse_collection(name, found[0]) if found is not None else None

    def _collection(self, meta: CollectionMeta) -> RemoteCollection:
        collection = self._collections.get(meta.name)
        if collection is None or collection.meta.uid != meta.uid:
            collection = self._collections[meta.name] = RemoteCollection(self, meta)
        return collection

    def peek(self, name: str) -> None:
        return None

    def list(self) -> list[RemoteCollection]:
        self._ready()
        metas = self.state.metas  # one snapshot: a collection deleted meanwhile is simply not listed
        return [self._collection(metas[name]) for name in sorted(metas)]

    def quarantined(self) -> list:
        return []

    def create(self, name: str, schema: Schema, shards: int = 1, replication_factor: int = 0) -> RemoteCollection:
        self._ready()
        validate_collection_name(name)
        schema.validate()
        check_shard_count(shards)
        nodes = sorted(self.state.live_nodes())
        if not nodes:
            raise FailedPrecondition("the cluster has no live shard servers (start some with --role shard)")
        factor = replication_factor or (2 if len(nodes) >= 2 else 1)
        if factor > len(nodes):
            raise FailedPrecondition(
                f"replication_factor: {factor} exceeds the {len(nodes)} shard servers in the cluster "
                f"(a shard's replicas need distinct servers)"
            )
        if name in self.state.metas:
            raise AlreadyExists(f"collection {name!r} already exists")
        alias = self.state.aliases.get(name)
        if alias is not None:
            raise AlreadyExists(f"name: {name!r} is already an alias (of collection {alias.collection!r})")
        uid = uuid.uuid4().hex[:12]
        meta = CollectionMeta(name, uid, schema.to_json(), shards, factor, time.time(), place(shards, factor, nodes))
        self.link.add_stream(meta.stream, [f"braid.{uid}.*"], self.config.stream_replicas)
        try:
            self.link.kv_create(COLLECTIONS_BUCKET, name, meta.to_json())
        except BaseException:
            self.link.delete_stream(meta.stream)
            raise
        # An alias of this name made meanwhile through another router: each writes its key, then
        # reads the other's, so at least one of the two sees the other and backs out.
        alias = self._read_alias(name)
        if alias is not None:
            self.link.kv_delete(COLLECTIONS_BUCKET, name)
            self.link.delete_stream(meta.stream)
            raise AlreadyExists(f"name: {name!r} is already an alias (of collection {alias.collection!r})")
        metas = dict(self.state.metas)
        metas[name] = meta
        self.state.metas = metas
        collection = self.get(name)
        collection.wait_open(min(_deadline(), time.monotonic() + CREATE_WAIT_S))
        return collection

    def delete(self, name: str) -> None:
        self._ready()
        meta = self.state.metas.get(name)
        if meta is None:  # never resolved through an alias: a delete names the collection itself
            alias = self.state.aliases.get(name) or self._read_alias(name)
            if alias is not None:
                raise FailedPrecondition(
                    f"name: {name!r} is an alias of {alias.collection!r}; delete the alias (DeleteAlias) or the "
                    f"collection by its own name"
                )
            raise NotFound(f"collection {name!r} not found")
        pointing = sorted(  # every alias in NATS now, not the view: one made a moment ago counts
            alias.name
            for key, raw in self.link.kv_items(ALIASES_BUCKET).items()
            if (alias := parse_alias(key, raw)) is not None and alias.collection == name and alias.uid == meta.uid
        )
        if pointing:
            raise FailedPrecondition(
                f"name: collection {name!r} has aliases {', '.join(pointing)}: delete them (DeleteAlias) or point "
                f"them at another collection (UpdateAlias) first"
            )
        self.link.kv_delete(COLLECTIONS_BUCKET, name)
        metas = dict(self.state.metas)
        metas.pop(name, None)
        self.state.metas = metas
        self._collections.pop(name, None)
        try:
            self.link.delete_stream(meta.stream)
        except Unavailable as err:  # the metadata is gone; the stream is only unreachable data now
            log.warning("collection %r deleted, but its stream %s was not: %s", name, meta.stream, err)

    # ----------------------------------------------------------------- aliases

    def create_alias(self, name: str, collection: str) -> None:
        self._ready()
        check_name(name, "name")
        check_name(collection, "collection")
        if name in self.state.metas:
            raise AlreadyExists(f"name: {name!r} is a collection; an alias needs a name of its own")
        existing = self.state.aliases.get(name)
        if existing is not None:
            raise AlreadyExists(
                f"name: alias {name!r} already exists (it points at {existing.collection!r}); UpdateAlias moves it"
            )
        meta = self._alias_target(collection)
        try:
            revision = self.link.kv_create(ALIASES_BUCKET, name, AliasMeta(name, collection, meta.uid).to_json())
        except AlreadyExists:
            raise AlreadyExists(f"name: alias {name!r} already exists; UpdateAlias moves it") from None
        # A collection of this name made meanwhile through another router: see create().
        if self._read_collection(name) is not None:
            self.link.kv_delete_if(ALIASES_BUCKET, name, revision)
            raise AlreadyExists(f"name: {name!r} is a collection; an alias needs a name of its own")
        self._caught_up(revision)

    def update_alias(self, name: str, collection: str) -> None:
        self._ready()
        check_name(name, "name")
        check_name(collection, "collection")
        meta = self._alias_target(collection)
        value = AliasMeta(name, collection, meta.uid).to_json()
        for _ in range(ALIAS_TRIES):  # compare-and-set: an alias deleted meanwhile is never revived
            found = self.link.kv_get(ALIASES_BUCKET, name)
            if found is None:
                raise self._no_alias(name)
            revision = self.link.kv_update(ALIASES_BUCKET, name, value, found[1])
            if revision is not None:
                self._caught_up(revision)
                return
        raise Unavailable(f"name: alias {name!r} changed under each of {ALIAS_TRIES} tries to update it; retry")

    def delete_alias(self, name: str) -> None:
        self._ready()
        check_name(name, "name")
        for _ in range(ALIAS_TRIES):
            found = self.link.kv_get(ALIASES_BUCKET, name)
            if found is None:
                raise self._no_alias(name)
            revision = self.link.kv_delete_if(ALIASES_BUCKET, name, found[1])
            if revision is not None:
                self._caught_up(revision)
                return
        raise Unavailable(f"name: alias {name!r} changed under each of {ALIAS_TRIES} tries to delete it; retry")

    def list_aliases(self) -> list[tuple[str, str]]:
        self._ready()
        return sorted((alias.name, alias.collection) for alias in self.state.aliases.values())

    def aliases_of(self, collection: str) -> list[str]:
        meta = self.state.metas.get(collection)
        if meta is None:
            return []
        return sorted(
            alias.name
            for alias in self.state.aliases.values()
            if alias.collection == collection and alias.uid == meta.uid
        )

    def _alias_target(self, collection: str) -> CollectionMeta:
        """What an alias may point at: an existing collection, by its own name."""
        meta = self.state.metas.get(collection) or self._read_collection(collection)
        if meta is not None:
            return meta
        alias = self.state.aliases.get(collection) or self._read_alias(collection)
        if alias is not None:
            raise InvalidArgument.field(
                "collection",
                f"{collection!r} is an alias (of {alias.collection!r}); an alias points at a collection by its "
                "own name",
            )
        raise NotFound(f"collection: collection {collection!r} does not exist")

    def _no_alias(self, name: str) -> NotFound:
        if name in self.state.metas:
            return NotFound(f"name: {name!r} is a collection, not an alias (alias calls never change collections)")
        return NotFound(f"name: alias {name!r} does not exist")

    def _caught_up(self, revision: int) -> None:
        """Answer an alias change once this router's view reflects it (it then reads its own change)."""
        if not self.state.wait_alias_revision(revision, ALIAS_WAIT_S):
            log.warning("alias change stored (revision %d) but not yet seen by this router's watch", revision)

    def close(self) -> None:
        self.link.close()
        self.clients.close()


class RemoteCollection:
    """A collection as the router sees it: what service/rpcs.py calls on a Collection."""

    def __init__(self, catalog: RemoteCatalog, meta: CollectionMeta) -> None:
        self.catalog = catalog
        self.meta = meta
        self.name = meta.name
        self.schema = Schema.from_json(meta.schema)
        self.shards = list(range(meta.shards))
        self.created_at = meta.created_at
        self.replication_factor = meta.replication_factor
        self.limits = catalog.limits
        self.payload = PayloadStore(self.schema.payload_fields)  # types for validation; holds nothing
        self._analyzers = {spec.name: analyzers.build(spec.analyzer) for spec in self.schema.text_fields}
        self._refs = [self._ref(shard) for shard in self.shards]
        # The servers holding a replica of every shard: each can answer a whole search alone.
        self._coverers = tuple(n for n in meta.placement[0] if all(n in nodes for nodes in meta.placement[1:]))
        # Every replica is on one of them: a fan-out could only ask the same servers.
        self._covered_only = all(set(nodes) <= set(self._coverers) for nodes in meta.placement)

    # Validation is a collection's own (duck-typed: it reads schema, limits and payload types).
    check_dense = Collection.check_dense
    _check_ids = Collection._check_ids

    def check(self, plan: SearchPlan, where: str = "") -> None:
        check_plan(plan, self.schema, self.payload, self.limits, where)

    def write_problem(self) -> str | None:
        if not self.catalog.link.connected:
            return f"NATS unreachable at {','.join(self.catalog.link.urls)}: writes are refused"
        return None

    def read_problem(self) -> str | None:
        """None: a router holds no data; a shard with no live replica fails its reads by itself."""
        return None

    def heal(self) -> None:
        """Nothing to heal on a router (shard servers heal their replicas)."""

    # ------------------------------------------------------------- replicas

    def _ref(self, shard: int) -> spb.ReplicaRef:
        return spb.ReplicaRef(collection=self.name, uid=self.meta.uid, shard=shard)

    def _call(
        self, shard: int, call: Callable[[shard_pb2_grpc.ShardStub, float], Any], deadline: float
    ) -> tuple[Any, str]:
        """``call(stub, timeout)`` on one replica of ``shard`` after another until one answers;
        (its answer, its address). A replica's refusal of the request itself (INVALID_ARGUMENT...)
        is raised as it is; when none answers, Unavailable naming the shard and why each failed."""
        tries = _Tries(self, shard)
        for node, address, timeout in tries.each(deadline):
            try:
                answer = call(self.catalog.clients.stub(address), timeout)
            except grpc.RpcError as err:
                tries.failed(node, err)
                continue
            tries.answered()
            return answer, address
        raise tries.exhausted()

    def _fan_out(
        self, shards: list[int], call: Callable[[int, shard_pb2_grpc.ShardStub, float], Any], deadline: float
    ) -> dict[int, tuple[Any, str]]:
        """``call`` (returning a gRPC future) on one replica of each shard, all at once, retrying a
        failed shard on its other replicas; {shard: (answer, address)}. One turn for the whole
        request: placement rotates shard i's replicas by i, so the shards land on distinct servers."""
        turn = self.catalog.turn()
        started = {}
        for shard in shards:
            tries = _Tries(self, shard, turn)
            attempts = tries.each(deadline)
            started[shard] = (tries, attempts, self._start(shard, call, attempts))
        answers: dict[int, tuple[Any, str]] = {}
        for shard, (tries, attempts, attempt) in started.items():
            while attempt is not None:
                node, address, future = attempt
                try:
                    answers[shard] = (future.result(), address)
                    tries.answered()
                    break
                except grpc.RpcError as err:
                    tries.failed(node, err)
                attempt = self._start(shard, call, attempts)
            else:
                raise tries.exhausted()
        return answers

    def _start(
        self, shard: int, call: Callable[[int, shard_pb2_grpc.ShardStub, float], Any], attempts: Iterator
    ) -> tuple[str, str, Any] | None:
        for node, address, timeout in attempts:
            return node, address, call(shard, self.catalog.clients.stub(address), timeout)
        return None

    # A server holding a replica of every shard answers a whole search in one call (SearchCollection).

    def _coverer(self, turn: int) -> tuple[str, str] | None:
        """(node, address) of a live, unsuspected server holding a replica of every shard, chosen
        round robin by ``turn``; a suspected one when every replica is on such servers (a fan-out
        would ask them too); None otherwise (the search fans out per shard)."""
        if not self._coverers:
            return None
        state = self.catalog.state
        suspected = None
        for node, address, live in state.order(self._coverers, turn):
            if not live or address is None:
                continue
            if not state.suspected(node):
                return node, address
            suspected = suspected or (node, address)
        return suspected if self._covered_only else None

    def _covering_request(
        self, request: pb.SearchRequest, min_seqs: list[int], max_response_bytes: int | None
    ) -> spb.CollectionSearchRequest:
        return spb.CollectionSearchRequest(
            replicas=self._refs, min_seqs=min_seqs, request=request, max_response_bytes=max_response_bytes or 0
        )

    def _covering_timeout(self, deadline: float) -> float:
        """The covering server's share of the time left: half, when a fan-out to other replicas could follow."""
        remaining = max(deadline - time.monotonic(), 0.001)
        return remaining / 2 if self.replication_factor > 1 else remaining

    def _covering_failed(self, node: str, err: grpc.RpcError) -> bool:
        """A refusal of the request itself is raised; otherwise the server is suspect and the
        search falls back to the fan-out (True: a failover once that answers). A server that
        does not know SearchCollection (an older version) is no failure."""
        code = err.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return False
        if code not in RETRYABLE_CODES:
            raise _error_from(err) from None
        self.catalog.state.suspect(node)
        self.catalog.stats.retried(code)
        return True

    def search_response(
        self, request: pb.SearchRequest, plan: SearchPlan, types: dict, max_response_bytes: int | None
    ) -> pb.SearchResponse:
        """A checked, encoded plan's response: from one server holding every shard when there is
        one (a single call), else (or when it fails retryably) from the fan-out."""
        self.check(plan)
        min_seqs = self._min_seqs(plan.consistency)
        trace = current_trace()
        started = time.perf_counter()
        response, failed_over = self._whole(_encoded_request(request, plan, whole=True), min_seqs, max_response_bytes)
        if response is not None:
            if trace is not None:
                seconds = time.perf_counter() - started
                trace.stage("shards", seconds, time.time_ns() - int(seconds * 1e9))
            return response
        result = self.search_request(request, plan, min_seqs=min_seqs)
        if failed_over:
            self.catalog.stats.failed_over()
        return convert.result_to_proto(result, types, max_response_bytes)

    def _whole(
        self, request: pb.SearchRequest, min_seqs: list[int], max_response_bytes: int | None
    ) -> tuple[pb.SearchResponse | None, bool]:
        """(the response of one server holding every shard, or None when there is none or it
        failed retryably; whether it failed: a fan-out that answers then is a failover)."""
        found = self._coverer(self.catalog.turn())
        if found is None:
            return None, False
        node, address = found
        message = self._covering_request(request, min_seqs, max_response_bytes)
        try:
            stub = self.catalog.clients.stub(address)
            return stub.SearchCollection(message, timeout=self._covering_timeout(_deadline())), False
        except grpc.RpcError as err:
            return None, self._covering_failed(node, err)

    def wait_open(self, deadline: float) -> None:
        """Until one replica of every shard is open and has read its log (a fresh collection)."""
        while True:
            try:
                self._fan_out(
                    self.shards,
                    lambda s, stub, t: stub.WaitApplied.future(spb.WaitAppliedRequest(replica=self._ref(s)), timeout=t),
                    deadline,
                )
                return
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _min_seqs(self, consistency: int) -> list[int]:
        if consistency == pb.CONSISTENCY_EVENTUAL:
            return [0] * len(self.shards)
        if consistency == pb.CONSISTENCY_STRONG:
            subjects = [self.meta.subject(s) for s in self.shards]
            timeout = max(_deadline() - time.monotonic(), 0.1)  # the call's deadline: a NATS election may take seconds
            return self.catalog.link.last_seqs(self.meta.stream, subjects, timeout=timeout)
        return [self.catalog.acked.get((self.meta.uid, s), 0) for s in self.shards]

    # ------------------------------------------------------------- writes

    def upsert(self, docs: list[DocumentWrite], ack: int = 0) -> int:
        count, by_shard = self.upsert_logged(docs)
        if ack != pb.WRITE_ACK_LOGGED:
            self.wait_applied(by_shard, _deadline())
        return count

    def upsert_logged(self, docs: list[DocumentWrite]) -> tuple[int, dict[int, list[int]]]:
        """Validate and store in the log: (documents, {shard: sequences})."""
        check_documents(docs, self.schema, self.payload, self.limits)
        batch = list({doc.id: doc for doc in docs}.values())  # a repeated id: the last one wins, as standalone
        parts: list[tuple[int, int, bytes]] = []
        for shard, group in self._group(batch, lambda doc: doc.id).items():
            parts += [(shard, records.UPSERT, payload) for payload in self._chunks(group)]
        return len(batch), self.publish(parts, _deadline())

    def delete_ids(self, ids: list[str], ack: int = 0) -> int:
        self._check_ids(ids)
        parts = [
            (shard, records.DELETE_IDS, records.encode_delete_ids(group))
            for shard, group in self._group(ids, lambda doc_id: doc_id).items()
        ]
        return self._write(parts, ack)

    def delete_filter(self, flt: Filter, ack: int = 0) -> int:
        self.payload.validate_filter(flt)
        payload = records.encode_delete_filter(flt)
        return self._write([(shard, records.DELETE_FILTER, payload) for shard in self.shards], ack)

    def _group(self, items: list, key: Callable[[Any], str]) -> dict[int, list]:
        from braid.index.collection import shard_of

        groups: dict[int, list] = {}
        for item in items:
            groups.setdefault(shard_of(key(item), len(self.shards)), []).append(item)
        return groups

    def _chunks(self, docs: list[DocumentWrite]) -> list[bytes]:
        """The documents as UPSERT records, each small enough for one NATS message."""
        limit = self.catalog.link.max_payload - HEADER_ROOM
        payload = records.encode_upsert(docs)
        if len(payload) <= limit:
            return [payload]
        if len(docs) == 1:
            raise ResourceExhausted(
                f"documents: document {docs[0].id!r} encodes to {len(payload)} bytes, over the log's "
                f"message limit of {limit} bytes (NATS max_payload)"
            )
        half = len(docs) // 2
        return self._chunks(docs[:half]) + self._chunks(docs[half:])

    def _write(self, parts: list[tuple[int, int, bytes]], ack: int) -> int:
        """Publish every part; then (WRITE_ACK_APPLIED) wait for a replica of each shard to apply
        its last part. Returns the sum of what applying each part did (0 when not waited for)."""
        deadline = _deadline()
        by_shard = self.publish(parts, deadline)
        if ack == pb.WRITE_ACK_LOGGED or not by_shard:
            return 0
        return self.wait_applied(by_shard, deadline, results=True)

    def publish(self, parts: list[tuple[int, int, bytes]], deadline: float) -> dict[int, list[int]]:
        """Store (shard, kind, payload) records in the log; {shard: their sequences}.

        Unless every part was stored, the answer says what Braid knows: Unavailable "not stored"
        only when no part may have been stored by this call's failed parts (JetStream refused
        them, or NATS was unreachable all along); otherwise OutcomeUnknown (UNAVAILABLE, or
        DEADLINE_EXCEEDED once the deadline passed) saying the write may have been stored."""
        if not parts:
            return {}
        write_id = uuid.uuid4().hex
        items = [
            (self.meta.subject(shard), payload, kind, f"{write_id}.{i}")
            for i, (shard, kind, payload) in enumerate(parts)
        ]
        try:
            seqs = self.catalog.link.publish_many(items, self.meta.stream, max(deadline - time.monotonic(), 0.1))
        except NatsUnreachable as err:
            raise Unavailable(f"the log (NATS JetStream) did not store the write: {err}; it was not stored") from None
        except Unavailable as err:
            raise self._unknown(f"the log (NATS JetStream) did not answer: {err}", deadline) from None
        failed = [(parts[i][0], seq) for i, seq in enumerate(seqs) if isinstance(seq, BaseException)]
        if failed:
            stored = sorted({parts[i][0] for i, seq in enumerate(seqs) if not isinstance(seq, BaseException)})
            shards = ", ".join(str(shard) for shard in sorted({shard for shard, _ in failed}))
            why = _publish_failure(failed[0][1])
            also = f"parts for shards {stored} were stored and will apply" if stored else "no part was stored"
            if all(isinstance(err, NotStored) for _, err in failed):
                raise Unavailable(
                    f"the log (NATS JetStream) did not store the write for shard {shards}: {why}; it was not stored "
                    f"({also}; retrying is safe)"
                )
            raise self._unknown(
                f"the log (NATS JetStream) did not confirm the write for shard {shards}: {why}", deadline
            )
        by_shard: dict[int, list[int]] = {}
        for (shard, _, _), seq in zip(parts, seqs, strict=True):
            by_shard.setdefault(shard, []).append(int(seq))  # type: ignore[arg-type]
        for shard, shard_seqs in by_shard.items():
            self.catalog.note_acked(self.meta.uid, shard, max(shard_seqs))
        return by_shard

    @staticmethod
    def _unknown(what: str, deadline: float) -> BaseException:
        """A write whose outcome Braid cannot know: DEADLINE_EXCEEDED once the deadline passed, else
        UNAVAILABLE; either way saying it may have been stored, and that a retry is safe."""
        message = (
            f"{what}; the write may have been stored (and will then apply) or not: retrying the same write is "
            f"safe (an upsert or delete applied twice leaves the same documents)"
        )
        return OutcomeUnknownDeadline(message) if time.monotonic() >= deadline - 0.5 else OutcomeUnknown(message)

    def wait_applied(self, by_shard: dict[int, list[int]], deadline: float, results: bool = False) -> int:
        """Until one replica of each shard has applied its sequences; with ``results``, the sum of
        what applying each did (documents upserted or deleted)."""
        total = 0
        for shard, shard_seqs in by_shard.items():  # the shards' replicas are all asked at once
            response, address = self._first_applied(shard, max(shard_seqs), deadline)
            if not results:
                continue
            if len(shard_seqs) == 1:
                total += max(response.result, 0)
                continue
            stub = self.catalog.clients.stub(address)
            for seq in shard_seqs:  # the results of the earlier parts, from the replica that applied the last
                request = spb.WaitAppliedRequest(replica=self._ref(shard), seq=seq)
                try:
                    total += max(stub.WaitApplied(request, timeout=max(deadline - time.monotonic(), 0.001)).result, 0)
                except grpc.RpcError as err:
                    raise Unavailable(
                        f"collection {self.name!r} shard {shard}: the write is stored and applied, but its count "
                        f"could not be read: {err.code().name} {err.details()}"
                    ) from None
        return total

    def _first_applied(self, shard: int, seq: int, deadline: float) -> tuple[Any, str]:
        """Ask every replica of ``shard`` to report once it applied ``seq``; the first answer wins,
        so a replica that is down or still catching up delays nothing. A replica whose call
        fails (down, restarting, still opening its shard) is asked again after a pause, at the
        address the view has for it then, until ``deadline``: the write is stored, and the
        wait is for its deadline, not for the first failure."""
        request = spb.WaitAppliedRequest(replica=self._ref(shard), seq=seq)
        done = threading.Condition()
        calls: dict[str, tuple[str, Any]] = {}  # node -> (address, call in flight)
        next_try: dict[str, float] = {}
        pauses: dict[str, float] = {}
        failures: dict[str, str] = {}

        def notify(_: Any) -> None:
            with done:
                done.notify_all()

        try:
            with done:
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    known = self.catalog.state.addresses()
                    for node in self.meta.placement[shard]:
                        if node in calls or next_try.get(node, 0.0) > now:
                            continue
                        address = known.get(node)
                        if address is None:
                            failures[node] = "never heard of"
                            next_try[node] = now + APPLIED_RETRY_MAX_S
                            continue
                        call = self.catalog.clients.stub(address).WaitApplied.future(
                            request, timeout=max(deadline - now, 0.001)
                        )
                        calls[node] = (address, call)
                        call.add_done_callback(notify)
                    for node, (address, call) in list(calls.items()):
                        if not call.done():
                            continue
                        error = call.exception()
                        if error is None:
                            return call.result(), address
                        del calls[node]
                        failures[node] = f"{error.code().name} {error.details()}"
                        pause = pauses[node] = min(pauses.get(node, APPLIED_RETRY_S / 2) * 2, APPLIED_RETRY_MAX_S)
                        next_try[node] = now + pause
                    wake = min([deadline, *(at for node, at in next_try.items() if node not in calls)])
                    done.wait(min(max(wake - time.monotonic(), 0.001), 1.0))
        finally:
            for _, call in calls.values():
                call.cancel()
        for node in self.meta.placement[shard]:
            if node in calls:
                failures[node] = "no answer"
        why = "; ".join(f"{node}: {failures.get(node, 'not asked')}" for node in self.meta.placement[shard])
        raise AppliedUnknown(
            f"collection {self.name!r} shard {shard}: the write is stored in the log (sequence {seq}) but no replica "
            f"reported applying it before the deadline ({why}); it will apply when a replica can"
        )

    def flush(self) -> None:
        """Checkpoint every replica; Unavailable naming a shard none of whose replicas could."""
        deadline = _deadline()
        known = self.catalog.state.addresses()  # live or not: a stalled heartbeat says little about a server
        for shard, nodes in enumerate(self.meta.placement):
            failures, flushed = [], 0
            for node in nodes:
                if node not in known:
                    failures.append(f"{node}: never heard of")
                    continue
                try:
                    timeout = max(deadline - time.monotonic(), 0.001)
                    self.catalog.clients.stub(known[node]).Flush(
                        spb.FlushRequest(replica=self._ref(shard)), timeout=timeout
                    )
                    flushed += 1
                except grpc.RpcError as err:
                    failures.append(f"{node}: {err.code().name} {err.details()}")
            if not flushed:
                raise Unavailable(
                    f"collection {self.name!r} shard {shard}: no replica checkpointed ({'; '.join(failures)})"
                )

    # ------------------------------------------------------------- reads

    def count(self, flt: Filter | None = None, request: pb.CountRequest | None = None) -> int:
        min_seqs = self._min_seqs(pb.CONSISTENCY_DEFAULT)

        def call(shard: int, stub: Any, timeout: float) -> Any:
            message = spb.ShardCountRequest(replica=self._ref(shard), min_seq=min_seqs[shard])
            if request is not None and request.HasField("filter"):
                message.filter.CopyFrom(request.filter)
                message.has_filter = True
            return stub.Count.future(message, timeout=timeout)

        answers = self._fan_out(self.shards, call, _deadline())
        return sum(response.count for response, _ in answers.values())

    def sparse_idf(self, field: str, term_ids: list[int]) -> np.ndarray:
        min_seqs = self._min_seqs(pb.CONSISTENCY_DEFAULT)
        answers = self._fan_out(
            self.shards,
            lambda s, stub, t: stub.TermStats.future(
                spb.TermStatsRequest(replica=self._ref(s), field=field, term_ids=term_ids, min_seq=min_seqs[s]),
                timeout=t,
            ),
            _deadline(),
        )
        df = sum(np.asarray(response.df, np.int64) for response, _ in answers.values())
        documents = sum(response.documents for response, _ in answers.values())
        return sparse_idf_of(np.asarray(df, np.int64), int(documents))

    def get_documents(self, request: pb.GetRequest) -> list[pb.Document]:
        self._check_ids(list(request.ids))
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
            _deadline(),
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

        answers = self._fan_out(self.shards, call, _deadline())
        if failed_over:
            self.catalog.stats.failed_over()
        parts = [[_ranked(r) for r in answers[s][0].results] for s in self.shards]
        results = []
        for i in range(len(vectors)):
            ranked = merge_ranked([part[i] for part in parts], k) if len(parts) > 1 else parts[0][i]
            results.append(SearchResult(ids=ranked.ids, scores=ranked.scores))
        return results

    @property
    def coverable(self) -> bool:
        """Whether some server holds a replica of every shard (live or not)."""
        return bool(self._coverers)

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
        min_seqs = self._min_seqs(plan.consistency)
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
            tries = _Tries(self, shard, turn)
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
        parts = [_ranked(response.results[0]) for response in responses]
        ranked = merge_ranked(parts, limit) if len(parts) > 1 else parts[0]
        result = SearchResult(ids=ranked.ids, scores=ranked.scores)
        return convert.result_to_proto(result, {}, max_response_bytes)

    def search_request(
        self, request: pb.SearchRequest, plan: SearchPlan, where: str = "", min_seqs: list[int] | None = None
    ) -> SearchResult:
        """A checked, encoded plan: rank on every shard, combine, then fetch the hits' payload and text."""
        self.check(plan, where)
        shard_request = _encoded_request(request, plan)
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
            _deadline(),
        )
        ranked = time.perf_counter()
        per_shard = [[_ranked(r) for r in answers[s][0].strands] for s in self.shards]
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
            _deadline(),
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
        deadline = _deadline()
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
                    raise _error_from(err) from None
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


def _encoded_request(request: pb.SearchRequest, plan: SearchPlan, whole: bool = False) -> pb.SearchRequest:
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
        plain = _plain(request)
        if plain and not request.queries[0].dense.HasField("vector"):
            return None  # text to embed: on a worker
        if not plain and not _vectors_only(request):
            return None
        if request.consistency == pb.CONSISTENCY_STRONG or not self.catalog.state.synced.is_set():
            return None  # STRONG asks NATS first (blocking); a starting router answers on a worker
        meta = self.catalog.known(request.collection)  # an alias resolved once, from the view
        if meta is None:
            return None  # NOT_FOUND (or a fresh read of NATS) from the worker path
        collection = self.catalog._collection(meta)
        deadline = deadline or time.monotonic() + DEFAULT_TIMEOUT_S
        if plain:
            return collection.search_dense_on_loop(request, deadline, self.max_response_bytes)
        if not collection.coverable:
            return None  # fanned out and fetched on a worker (it blocks)
        return collection.search_whole_on_loop(request, deadline, self.max_response_bytes, self._types(collection))

    def stream_writer(self) -> Any:
        return _PipelinedWriter(self)

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
        if _plain(request):
            return super().Search(request)
        collection = self.catalog.get(request.collection)
        plan = convert.plan_from_proto(request)
        self.encoding.fill_plans([(collection, plan, "")])
        return collection.search_response(request, plan, self._types(collection), self.max_response_bytes)

    def _search(self, collection: Any, plan: SearchPlan, where: str, request: pb.SearchRequest) -> SearchResult:
        return collection.search_request(request, plan, where)


class _PipelinedWriter:
    """A BulkUpsert stream through a router: each batch is acknowledged once the log stored it,
    and the stream waits for the replicas' apply only every ``PIPELINE_BATCHES`` batches and at
    its end (when some batch asked for WRITE_ACK_APPLIED). Replicas apply while the router
    validates and encodes the next batches, and they never fall more than that far behind.
    A batch counted in a failed stream's ``braid-batches-applied`` is stored in the log: it
    applies, but a search may not see it until the replicas catch up."""

    def __init__(self, rpcs: RouterRpcs) -> None:
        self.rpcs = rpcs
        self.pending: dict[str, tuple[RemoteCollection, dict[int, list[int]]]] = {}
        self.wants_applied = False
        self.batches = 0
        self.resolved: dict[str, str] = {}

    def upsert(self, request: pb.UpsertRequest) -> int:
        name = self.resolved.get(request.collection)
        if name is None:  # an alias is resolved once per stream, as standalone (service/rpcs.py)
            name = self.resolved[request.collection] = self.rpcs.catalog.resolve(request.collection)
        collection = self.rpcs.catalog.get(name)
        docs = convert.documents_from_proto(request.documents)
        self.rpcs.encoding.fill_documents(collection.schema, docs)
        count, by_shard = collection.upsert_logged(docs)
        _, pending = self.pending.setdefault(collection.meta.uid, (collection, {}))
        for shard, seqs in by_shard.items():
            pending.setdefault(shard, []).append(max(seqs))
        self.wants_applied |= request.ack != pb.WRITE_ACK_LOGGED
        self.batches += 1
        if self.batches % PIPELINE_BATCHES == 0:
            self._wait(final=False)
        return count

    def finish(self) -> None:
        self._wait(final=True)

    def _wait(self, final: bool) -> None:
        pending, self.pending = self.pending, {}
        if not (self.wants_applied or not final):
            return
        deadline = _deadline()
        for collection, by_shard in pending.values():
            collection.wait_applied({shard: [max(seqs)] for shard, seqs in by_shard.items()}, deadline)


def _plain(request: pb.SearchRequest) -> bool:
    from ..rpcs import _plain_dense

    return _plain_dense(request)


def _within(deadline: float, work: Callable[[], Any]) -> Any:
    """``work`` on this thread as an admitted worker runs it: with the call's deadline (the
    request id comes with the thread's copy of the context: asyncio.to_thread)."""
    from ..admission import _call_deadline

    _call_deadline.value = deadline
    try:
        return work()
    finally:
        _call_deadline.value = None


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
