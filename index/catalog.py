"""The catalog: every collection under one data directory.

Layout::

    <data_dir>/collections/<name>/collection.json   {"name", "schema", "shards", "created_at", "format"}
    <data_dir>/collections/<name>/shard-000/ ...     one directory per shard (index/shard.py)

A collection is created in a hidden staging directory and published by
renaming it into place, so a crash never leaves half a collection; a delete
renames it away before removing files. Hidden leftovers are removed at startup.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .collection import Collection
from .errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from .manifest import fsync_dir, read_json, write_json_atomic
from .policy import StoragePolicy
from .schema import Schema, validate_collection_name
from .validate import Limits

MAX_SHARDS = 64


class Catalog:
    def __init__(
        self,
        data_dir: Path,
        limits: Limits | None = None,
        search_threads: int = 8,
        policy: StoragePolicy | None = None,
    ) -> None:
        self.root = data_dir / "collections"
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits or Limits()
        self.policy = policy or StoragePolicy()
        self._executor = ThreadPoolExecutor(max_workers=search_threads, thread_name_prefix="braid-shard")
        self._lock = threading.Lock()
        self._collections: dict[str, Collection] = {}
        self._closed = False
        for leftover in self.root.glob(".*"):
            shutil.rmtree(leftover, ignore_errors=True)
        for path in sorted(self.root.iterdir()):
            meta = read_json(path / "collection.json")
            if meta is not None:
                self._collections[meta["name"]] = self._open(path, meta)

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
        )

    def create(self, name: str, schema: Schema, shards: int = 1) -> Collection:
        validate_collection_name(name)
        schema.validate()
        if not 1 <= shards <= MAX_SHARDS:
            raise InvalidArgument.field("shards", f"must be in 1..{MAX_SHARDS}, got {shards}")
        with self._lock:
            self._check_open()
            if name in self._collections:
                raise AlreadyExists(f"collection {name!r} already exists")
            staging = self.root / f".creating-{name}-{uuid.uuid4().hex[:8]}"
            staging.mkdir()
            meta = {"format": 1, "name": name, "schema": schema.to_json(), "shards": shards, "created_at": time.time()}
            write_json_atomic(staging / "collection.json", meta)
            try:
                # Open in staging first: a collection that cannot open is never published.
                self._open(staging, meta).close()
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            final = self.root / name
            staging.rename(final)
            fsync_dir(self.root)
            collection = self._open(final, meta)
            self._collections[name] = collection
            return collection

    def get(self, name: str) -> Collection:
        collection = self._collections.get(name)
        if collection is None:
            self._check_open()
            raise NotFound(f"collection {name!r} does not exist")
        return collection

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the server is shutting down")

    def list(self) -> list[Collection]:
        return [self._collections[name] for name in sorted(self._collections)]

    def delete(self, name: str) -> None:
        """Delete a collection. Operations on it still in progress finish first; those that
        start later fail with NotFound."""
        with self._lock:
            self._check_open()
            collection = self._collections.pop(name, None)
            if collection is None:
                raise NotFound(f"collection {name!r} does not exist")
            collection.close(NotFound(f"collection {name!r} does not exist (it was deleted)"))
            doomed = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
            (self.root / name).rename(doomed)
            fsync_dir(self.root)
            shutil.rmtree(doomed, ignore_errors=True)

    def close(self) -> None:
        """Close every collection (operations in progress finish; later ones get Unavailable)."""
        with self._lock:
            self._closed = True
            for collection in self._collections.values():
                collection.close(Unavailable("the server is shutting down"))
            self._collections.clear()
        self._executor.shutdown(wait=True)
