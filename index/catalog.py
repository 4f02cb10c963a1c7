"""The catalog: every collection under one data directory, its recovery and its quarantine.

Layout::

    <data_dir>/collections/<name>/collection.json   {"name", "schema", "shards", "created_at", "format"}
    <data_dir>/collections/<name>/shard-000/ ...     one directory per shard (index/shard/)

    <data_dir>/aliases.json                         the alias table (index/aliases.py)

A collection is created in a hidden staging directory and published by
renaming it into place, so a crash never leaves half a collection; a delete
renames it away before removing files. Hidden leftovers are removed at startup.

Recovery (``recover``) opens collections in parallel and reports its progress
(``Recovery.describe``: shards open, share of the log replayed). A collection that
fails to open is *quarantined*: it is listed with its error, its calls answer that
error (DataLoss naming the file when the data is damaged, else FailedPrecondition),
DeleteCollection removes it, and every other collection serves as usual.

Aliases (index/aliases.py): ``get`` resolves an alias to its collection with one lookup,
so a call that resolves once sees the old or the new target of a concurrent
``update_alias``, never both. Names are disjoint: a collection cannot take an alias's name
nor an alias a collection's, an alias points at a collection by its own name (never at an
alias), and a collection with aliases cannot be deleted. Alias changes hold the catalog's
lock, so they never race a create or delete of the collections they name.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import snapshot
from .aliases import AliasTable, check_name
from .collection import Collection
from .dirlock import DataDirLock
from .diskspace import FreeSpace, is_disk_full
from .errors import (
    AlreadyExists,
    BraidError,
    DataLoss,
    DiskFull,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from .manifest import fsync_dir, read_json, write_json_atomic
from .policy import StoragePolicy
from .schema import Schema, validate_collection_name
from .snapshot_store import SnapshotStore
from .validate import Limits

log = logging.getLogger("braid.catalog")

MAX_SHARDS = 64
RECOVERY_THREADS = 4  # collections opened at once


def check_shard_count(shards: int) -> None:
    if not 1 <= shards <= MAX_SHARDS:
        raise InvalidArgument.field("shards", f"must be in 1..{MAX_SHARDS}, got {shards}")


@dataclass
class Recovery:
    """Progress of opening the catalog's collections; read from other threads without a lock."""

    shards_total: int = 0
    shards_open: int = 0
    log_bytes_total: int = 0
    log_bytes_replayed: int = 0
    done: bool = False
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def replayed(self, nbytes: int) -> None:
        with self._lock:
            self.log_bytes_replayed += nbytes

    def shard_opened(self) -> None:
        with self._lock:
            self.shards_open += 1

    def describe(self) -> str:
        if self.done:
            return "recovered"
        share = self.log_bytes_replayed / self.log_bytes_total if self.log_bytes_total else 0.0
        return (
            f"recovering: {self.shards_open} of {self.shards_total} shards open, "
            f"{min(share, 1.0):.0%} of {self.log_bytes_total / 1e6:.1f} MB of log replayed "
            f"({time.monotonic() - self.started:.0f} s so far)"
        )


@dataclass(frozen=True)
class Quarantined:
    """A collection that failed to open: what the operator and its callers are told."""

    name: str
    path: Path
    error: BraidError
    meta: dict | None

    def raise_error(self) -> None:
        raise type(self.error)(str(self.error))


def _log_bytes(collection_dir: Path, shards: int) -> int:
    total = 0
    for i in range(shards):
        wal = collection_dir / f"shard-{i:03d}" / "wal"
        if wal.is_dir():
            total += sum(p.stat().st_size for p in wal.iterdir() if p.is_file())
    return total


class Catalog:
    """Every collection of a data directory.

    ``recover=False`` builds the catalog without opening anything (the server binds its
    port first, then calls ``recover`` on a thread); until recovery ends, calls answer
    Unavailable with its progress.
    """

    def __init__(
        self,
        data_dir: Path,
        limits: Limits | None = None,
        search_threads: int = 8,
        policy: StoragePolicy | None = None,
        recover: bool = True,
    ) -> None:
        self._dir_lock = DataDirLock(data_dir)
        self.root = data_dir / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.policy = policy or StoragePolicy()
        self._executor = ThreadPoolExecutor(max_workers=search_threads, thread_name_prefix="braid-shard")
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._quarantined: dict[str, Quarantined] = {}
        self._closed = False
        self.aliases = AliasTable(data_dir)
        self.snapshots = SnapshotStore(data_dir / "snapshots", self.policy.min_free_bytes)
        self.recovery = Recovery()
        if recover:
            self.recover()

    # ---------------------------------------------------------------- recovery

    def recover(self) -> None:
        """Open every collection (in parallel), quarantining those that fail; idempotent."""
        if self.recovery.done:
            return
        for leftover in self.root.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)
        self.aliases.load()  # a damaged file quarantines the aliases, never the collections
        found: list[tuple[Path, dict | None]] = []
        for path in sorted(p for p in self.root.iterdir() if p.is_dir()):
            try:
                meta = read_json(path / "collection.json")
            except Exception as err:  # unreadable or damaged metadata: quarantine, don't stop the server
                self._quarantine(path.name, path, None, err)
                continue
            if meta is None:
                continue
            found.append((path, meta))
            shards = int(meta.get("shards", 1))
            self.recovery.shards_total += shards
            self.recovery.log_bytes_total += _log_bytes(path, shards)
        with ThreadPoolExecutor(RECOVERY_THREADS, thread_name_prefix="braid-recover") as pool:
            list(pool.map(lambda item: self._recover_one(*item), found))
        self.recovery.done = True
        if self._quarantined:
            log.error("quarantined collections: %s", ", ".join(sorted(self._quarantined)))

    def _recover_one(self, path: Path, meta: dict) -> None:
        name = str(meta.get("name", path.name))
        if self._closed:  # shut down while recovering: open nothing more
            return
        try:
            collection = self._open(path, meta)
        except BaseException as err:  # incl. tantivy's PanicException: one bad collection never stops the rest
            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise
            self._quarantine(name, path, meta, err)
            return
        with self._lock:
            if self._closed:
                collection.close()
                return
            self._collections[name] = collection

    def _quarantine(self, name: str, path: Path, meta: dict | None, err: BaseException) -> None:
        cause = str(err) if isinstance(err, BraidError) else f"{type(err).__name__}: {err} (under {path})"
        kind = DataLoss if isinstance(err, DataLoss) else FailedPrecondition
        error = kind(
            f"collection {name!r} is quarantined: it failed to open: {cause}; run `braid verify`, then "
            f"restore it from a snapshot or rebuild it from the source, or DeleteCollection to remove it"
        )
        log.error("%s", error)
        with self._lock:
            self._quarantined[name] = Quarantined(name, path, error, meta)

    def _open(self, path: Path, meta: dict) -> Collection:
        return Collection.open(
            path,
            meta["name"],
            Schema.from_json(meta["schema"]),
            int(meta["shards"]),
            float(meta["created_at"]),
            self._executor,
            self.limits,
            self.policy,
            progress=self.recovery.replayed,
            opened=self.recovery.shard_opened,
        )

    @property
    def closed(self) -> bool:
        return self._closed

    def quarantined(self) -> list[Quarantined]:
        return [self._quarantined[name] for name in sorted(self._quarantined)]

    # ------------------------------------------------------------- collections

    def create(self, name: str, schema: Schema, shards: int = 1, replication_factor: int = 0) -> Collection:
        """A new collection; ``replication_factor`` 0 or 1 (one process holds one copy of each shard)."""
        validate_collection_name(name)
        schema.validate()
        check_shard_count(shards)
        if replication_factor > 1:
            raise FailedPrecondition(
                f"replication_factor: {replication_factor} exceeds the 1 shard server of a standalone Braid "
                "(run a cluster, --role router/shard, for replicas)"
            )
        meta = {"format": 1, "name": name, "schema": schema.to_json(), "shards": shards, "created_at": time.time()}
        with self._lock:
            if self._name_taken(name):
                raise AlreadyExists(f"collection {name!r} already exists")
            with self._staged("creating", meta) as staging:
                self._open(staging, meta).close()  # a collection that cannot open is never published
                return self._publish(staging, meta)

    @property
    def write_share(self) -> float:
        """The share of their time upserts may take while searches run (index/pacing.py)."""
        return self.policy.write_share

    def get(self, name: str) -> Collection:
        """The collection called ``name``, or the one alias ``name`` points at (one lookup)."""
        collection = self._collections.get(name)
        if collection is None:
            self._check_open()
            quarantined = self._quarantined.get(name)
            if quarantined is not None:
                quarantined.raise_error()
            target = self.aliases.target(name)  # DataLoss while the alias file is damaged: it may be one
            if target is None:
                raise NotFound(f"collection {name!r} does not exist")
            collection = self._collections.get(target)
            if collection is None:
                quarantined = self._quarantined.get(target)
                if quarantined is not None:
                    quarantined.raise_error()
                raise NotFound(f"collection {target!r} (alias {name!r} points at it) does not exist")
        return collection

    def resolve(self, name: str) -> str:
        """The collection name ``name`` stands for: its target when it is an alias, else itself."""
        if name in self._collections or name in self._quarantined:
            return name
        return self.aliases.peek(name) or name

    def peek(self, name: str) -> Collection | None:
        """The open collection of that name (or alias), or None; never raises (for cheap routing decisions)."""
        return self._collections.get(name) or self._collections.get(self.aliases.peek(name) or "")

    def _is_collection(self, name: str) -> bool:
        return name in self._collections or name in self._quarantined or (self.root / name).exists()

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down")
        if not self.recovery.done:
            raise Unavailable(self.recovery.describe())

    def list(self) -> list[Collection]:
        self._check_open()
        return [self._collections[name] for name in sorted(self._collections)]

    def delete(self, name: str) -> None:
        """Delete a collection (a quarantined one too). Operations on it still in progress
        finish first; those that start later fail with NotFound."""
        with self._lock:
            self._check_open()
            if name not in self._collections and name not in self._quarantined:
                target = self.aliases.target(name)
                if target is not None:
                    raise FailedPrecondition(
                        f"name: {name!r} is an alias of {target!r}; delete the alias (DeleteAlias) or the "
                        f"collection by its own name"
                    )
                raise NotFound(f"collection {name!r} does not exist")
            self.aliases.check()  # damaged: whether aliases point at it cannot be told
            pointing = self.aliases.aliases_of(name)
            if pointing:
                raise FailedPrecondition(
                    f"name: collection {name!r} has aliases {', '.join(pointing)}: delete them (DeleteAlias) or "
                    f"point them at another collection (UpdateAlias) first"
                )
            self._retire(name, NotFound(f"collection {name!r} does not exist (it was deleted)"))

    # --------------------------------------------------------------- snapshots

    def create_snapshot(self, name: str) -> dict:
        """Snapshot collection ``name`` (or the one alias ``name`` names) into the snapshot store;
        its manifest. Writes and searches go on (index/snapshot.py)."""
        collection = self.get(name)
        info = {
            "schema": collection.schema.to_json(),
            "shard_count": len(collection.shards),
            "created_at": time.time(),
            "collection_created_at": collection.created_at,
        }
        return self.snapshots.create(collection.name, info, collection.snapshot)

    def restore_snapshot(self, snapshot_name: str, name: str, replace: bool = False) -> Collection:
        """A collection ``name`` holding what snapshot ``snapshot_name`` holds, answering every search
        as the snapshotted collection did. An existing collection of that name is AlreadyExists
        unless ``replace``: then it is swapped for the restored one under the same name, so its
        aliases follow (a search sees the old or the new collection, never a mix)."""
        validate_collection_name(name)
        path, manifest = self.snapshots.verified(snapshot_name)  # DataLoss naming a bad file, before anything
        schema = Schema.from_json(manifest["schema"])
        shards = int(manifest["shard_count"])
        if sorted(int(s["shard"]) for s in manifest["shards"]) != list(range(shards)):
            raise DataLoss(f"{path / snapshot.MANIFEST}: holds shards {manifest['shards']!r}, not all of {shards}")
        with self._lock:
            self._check_restore_target(name, replace)
        meta = {"format": 1, "name": name, "schema": schema.to_json(), "shards": shards, "created_at": time.time()}
        with self._staged("restoring", meta) as staging:
            # Laid out and opened once in staging without the catalog's lock (a large restore must not
            # hold creates, deletes and alias changes up); one that cannot open is never published.
            for i in range(shards):
                shard_dir = snapshot.SHARD_DIR.format(i)
                snapshot.restore_shard(path / shard_dir, staging / shard_dir, keep_seq=False)
            self._open(staging, meta).close()
            with self._lock:
                if self._check_restore_target(name, replace):  # again: a create may have raced it
                    self._retire(name, NotFound(f"collection {name!r} was replaced by a restore; retry"))
                collection = self._publish(staging, meta)
        log.info("restored snapshot %s as collection %s", snapshot_name, name)
        return collection

    def _name_taken(self, name: str) -> bool:
        """Whether collection ``name`` exists (caller holds the lock); AlreadyExists when ``name`` is an alias."""
        self._check_open()
        exists = self._is_collection(name)
        alias_of = self.aliases.target(name)  # DataLoss while the alias file is damaged
        if alias_of is not None:
            raise AlreadyExists(f"name: {name!r} is already an alias (of collection {alias_of!r})")
        return exists

    def _check_restore_target(self, name: str, replace: bool) -> bool:
        """Whether collection ``name`` exists (caller holds the lock); AlreadyExists when it may not be
        restored over, or when the name is an alias."""
        exists = self._name_taken(name)
        if exists and not replace:
            raise AlreadyExists(
                f"collection {name!r} already exists: restore under another name and point an alias at it, "
                f"or pass replace to swap it"
            )
        return exists

    @contextlib.contextmanager
    def _staged(self, verb: str, meta: dict) -> Iterator[Path]:
        """A hidden directory holding ``meta`` as collection.json, for the body to fill and publish
        (``_publish`` renames it into place); removed when the body fails, a full disk being DiskFull."""
        name = meta["name"]
        FreeSpace(self.root, self.policy.min_free_bytes).check(0)
        staging = self.root / f".{verb}-{name}-{uuid.uuid4().hex[:8]}"
        try:
            staging.mkdir()
            write_json_atomic(staging / "collection.json", meta)
            yield staging
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError) and is_disk_full(err):
                what = "create" if verb == "creating" else "restore"
                raise DiskFull(f"disk full: cannot {what} collection {name!r} under {self.root}: {err}") from err
            raise

    def _publish(self, staging: Path, meta: dict) -> Collection:
        """Rename a staged collection into place and open it (caller holds the lock)."""
        final = self.root / meta["name"]
        staging.rename(final)
        fsync_dir(self.root)
        collection = self._open(final, meta)
        self._collections[meta["name"]] = collection
        return collection

    def _retire(self, name: str, error: BraidError) -> None:
        """Close collection ``name`` (or forget its quarantine) and remove its files (caller holds the lock)."""
        collection = self._collections.pop(name, None)
        if collection is not None:
            collection.close(error)
            path = self.root / name
        elif name in self._quarantined:
            path = self._quarantined.pop(name).path
        else:
            path = self.root / name  # a directory with no collection.json: left by a crash
        doomed = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
        path.rename(doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    # ----------------------------------------------------------------- aliases

    def create_alias(self, name: str, collection: str) -> None:
        """A new alias ``name`` of ``collection``; durable when it returns."""
        check_name(name, "name")
        check_name(collection, "collection")
        with self._lock:
            self._check_open()
            if self._is_collection(name):
                raise AlreadyExists(f"name: {name!r} is a collection; an alias needs a name of its own")
            existing = self.aliases.target(name)
            if existing is not None:
                raise AlreadyExists(
                    f"name: alias {name!r} already exists (it points at {existing!r}); UpdateAlias moves it"
                )
            self._check_target(collection)
            self.aliases.set(name, collection)

    def update_alias(self, name: str, collection: str) -> None:
        """Point alias ``name`` at ``collection``: one atomic swap, durable when it returns."""
        check_name(name, "name")
        check_name(collection, "collection")
        with self._lock:
            self._check_open()
            current = self._existing_alias(name)
            self._check_target(collection)
            if current != collection:
                self.aliases.set(name, collection)

    def delete_alias(self, name: str) -> None:
        """Remove alias ``name`` (never its collection); durable when it returns."""
        check_name(name, "name")
        with self._lock:
            self._check_open()
            self._existing_alias(name)
            self.aliases.remove(name)

    def list_aliases(self) -> list[tuple[str, str]]:
        """Every (alias, collection), sorted by alias."""
        self._check_open()
        return self.aliases.items()

    def aliases_of(self, collection: str) -> list[str]:
        """The aliases of ``collection``, sorted (CollectionInfo.aliases)."""
        return self.aliases.aliases_of(collection)

    def _existing_alias(self, name: str) -> str:
        current = self.aliases.target(name)
        if current is None:
            if self._is_collection(name):
                raise NotFound(f"name: {name!r} is a collection, not an alias (alias calls never change collections)")
            raise NotFound(f"name: alias {name!r} does not exist")
        return current

    def _check_target(self, collection: str) -> None:
        """What an alias may point at: an existing collection, by its own name."""
        if self._is_collection(collection):
            return
        target = self.aliases.target(collection)
        if target is not None:
            raise InvalidArgument.field(
                "collection",
                f"{collection!r} is an alias (of {target!r}); an alias points at a collection by its own name",
            )
        raise NotFound(f"collection: collection {collection!r} does not exist")

    def close(self, checkpoint: bool = True) -> None:
        """Close every collection (operations in progress finish; later ones get Unavailable).

        With ``checkpoint`` (the default, a clean shutdown) shards checkpoint first, so the next
        start replays nothing.
        """
        with self._lock:
            self._closed = True
            collections = list(self._collections.values())
            self._collections.clear()
        for collection in collections:
            collection.close(Unavailable("the server is shutting down"), checkpoint=checkpoint)
        self._executor.shutdown(wait=True)
        self._dir_lock.release()
