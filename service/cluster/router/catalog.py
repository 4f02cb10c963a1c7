"""``RemoteCatalog``: a router's catalog, the collections and aliases of the NATS KV buckets
(service/cluster/meta.py), watched into memory.

Aliases: watched from their own bucket like collections; a request resolves a name once,
from one snapshot of the view. A name the view does not know is read from NATS before
NOT_FOUND (an alias made through another router a moment ago), and an alias change answers
once this router's view reflects it, so it reads its own changes.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid

from braid.index.aliases import check_name
from braid.index.catalog import Recovery, check_shard_count
from braid.index.errors import (
    AlreadyExists,
    BraidError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from braid.index.schema import NAME_PATTERN, Schema, validate_collection_name
from braid.index.validate import Limits

from ...config import ServerConfig
from ..meta import (
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
from ..nats_link import NatsLink
from ..view import ClusterState, RouterStats, ShardClients
from .collection import RemoteCollection
from .replicas import default_deadline
from .snapshots import RouterSnapshots, restore_failure

log = logging.getLogger("braid.router")
RESTORE_LOOK_S = 1.0  # while a restore is waited for, the replicas' Status is read this often
CREATE_WAIT_S = 15.0  # how long CreateCollection waits for a replica of every shard to open
ALIAS_WAIT_S = 5.0  # how long an alias change waits for this router's view to reflect it
ALIAS_TRIES = 8  # compare-and-set attempts of an alias change racing others on the same alias
FRESH_READ_S = 2.0  # a read of one key from NATS when the view does not know a name


class RemoteCatalog:
    """The catalog of a router: collections from the metadata bucket, data on shard servers."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        # A router serves no reads of its own, so its writes never rest (index/pacing.py); the
        # shard servers' replicas apply the log as it comes.
        self.write_share = 1.0
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
        self.snapshots = RouterSnapshots(self)  # users' snapshots in the object store

    def recover(self) -> None:
        """Wait for NATS, make sure the buckets exist, and read them once (health turns SERVING after)."""
        while not self.link.wait_connected(1.0):
            pass
        while True:
            try:
                self.link.ensure_bucket(COLLECTIONS_BUCKET, self.config.stream_replicas)
                self.link.ensure_bucket(NODES_BUCKET, self.config.stream_replicas, ttl=NODE_TTL_S)
                self.link.ensure_bucket(ALIASES_BUCKET, self.config.stream_replicas)
                self.snapshots.objects.ensure()  # the snapshot buckets too, before any replica needs them
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
            return self.collection_of(meta)
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
        return self.collection_of(meta)

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

    def collection_of(self, meta: CollectionMeta) -> RemoteCollection:
        """The collection of ``meta`` (one object per incarnation, made on first use)."""
        collection = self._collections.get(meta.name)
        if collection is None or collection.meta.uid != meta.uid:
            collection = self._collections[meta.name] = RemoteCollection(self, meta)
        return collection

    def peek(self, name: str) -> None:
        return None

    def list(self) -> list[RemoteCollection]:
        self._ready()
        metas = self.state.metas  # one snapshot: a collection deleted meanwhile is simply not listed
        return [self.collection_of(metas[name]) for name in sorted(metas)]

    def quarantined(self) -> list:
        return []

    def create(
        self, name: str, schema: Schema, shards: int = 1, replication_factor: int = 0, restore_from: str = ""
    ) -> RemoteCollection:
        """A new collection; with ``restore_from`` (a user snapshot), one whose replicas start from
        it, returned once every shard has a caught-up replica (undone when that fails)."""
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
        placement = place(shards, factor, nodes)
        meta = CollectionMeta(name, uid, schema.to_json(), shards, factor, time.time(), placement, restore_from)
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
        if not restore_from:
            collection.wait_open(min(default_deadline(), time.monotonic() + CREATE_WAIT_S))
            return collection
        try:
            self._wait_restored(collection, restore_from, default_deadline())
        except BaseException as err:
            self._undo(name, uid)
            if isinstance(err, Unavailable):
                raise Unavailable(
                    f"restoring snapshot {restore_from!r} as collection {name!r} did not finish before the call's "
                    f"deadline, and was undone (give the call more time): {err}"
                ) from err
            raise
        return collection

    def _wait_restored(self, collection: RemoteCollection, snapshot_name: str, deadline: float) -> None:
        """Until every shard of a restored collection has a caught-up replica (the call's whole
        deadline: a download may take it); a replica that cannot lay the snapshot in (gone,
        damaged) ends the wait at once with that error."""
        while True:
            try:
                collection.wait_open(min(deadline, time.monotonic() + RESTORE_LOOK_S))
                return
            except Unavailable:
                failure = restore_failure(collection)
                if failure is not None:
                    raise failure from None
                if time.monotonic() >= deadline:
                    raise

    def _undo(self, name: str, uid: str) -> None:
        """Delete collection ``name`` if it still is incarnation ``uid`` (a failed restore)."""
        meta = self.state.metas.get(name)
        if meta is None or meta.uid != uid:
            return
        try:
            self.delete(name)
        except BraidError as err:
            log.warning("a failed restore left collection %r (uid %s): %s", name, uid, err)

    def restore(
        self, name: str, schema: Schema, shards: int, snapshot_name: str, replace: bool, replication_factor: int = 0
    ) -> RemoteCollection:
        """Collection ``name`` restored from user snapshot ``snapshot_name`` (router/snapshots.py), with
        the snapshotted collection's ``replication_factor`` while enough shard servers are live (else
        the default). A collection of that name is AlreadyExists unless ``replace``: then it is deleted
        first (a delete refuses while aliases point at it; an alias swap is the atomic way to replace)."""
        self._ready()
        validate_collection_name(name)
        if name in self.state.metas or self._read_collection(name) is not None:
            if not replace:
                raise AlreadyExists(
                    f"collection {name!r} already exists: restore under another name and point an alias at it, "
                    f"or pass replace to delete it first"
                )
            self.delete(name)
        live = len(self.state.live_nodes())
        if replication_factor > live:
            log.warning(
                "restoring %s: replication factor %d of the snapshot exceeds the %d live shard servers; "
                "using the default",
                name,
                replication_factor,
                live,
            )
            replication_factor = 0
        return self.create(name, schema, shards, replication_factor, restore_from=snapshot_name)

    # --------------------------------------------------------------- snapshots

    def create_snapshot(self, name: str) -> dict:
        return self.snapshots.create(name)

    def restore_snapshot(self, snapshot_name: str, name: str, replace: bool = False) -> RemoteCollection:
        return self.snapshots.restore(snapshot_name, name, replace)

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
