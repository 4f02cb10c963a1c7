"""A directory of collection snapshots (standalone): naming, creating, listing, importing, deleting.

Layout::

    <data_dir>/snapshots/<snapshot name>/SNAPSHOT.json, shard-000/...   one snapshot (index/snapshot.py)
    <data_dir>/snapshots/.creating-<name>/ , .importing-<hex>/           unfinished: removed at start
    <data_dir>/snapshots/.upload-<hex>.tar                               an import's archive as it arrives

A snapshot is written under a hidden name and renamed into place once SNAPSHOT.json is
durable, so a crash never leaves half a snapshot under a listed name. The snapshot's files
are hard links to the collection's immutable files (index/snapshot.py), so it costs little
disk while the collection keeps them; it is a copy against a collection's deletion or
damage by a bug, not against losing the disk: export it (``export``) for that.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from . import snapshot
from .diskspace import FreeSpace, is_disk_full
from .errors import AlreadyExists, BraidError, DiskFull, NotFound
from .manifest import fsync_dir

log = logging.getLogger("braid.snapshots")


class SnapshotStore:
    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._space = FreeSpace(root, min_free_bytes)
        self._lock = threading.Lock()  # names are claimed under it
        for leftover in self.root.glob(".*"):  # a crash's unfinished snapshot, import or upload
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)

    def path(self, name: str) -> Path:
        """The directory of snapshot ``name``; NotFound when there is none."""
        snapshot.check_name(name)
        path = self.root / name
        if not (path / snapshot.MANIFEST).is_file():
            raise NotFound(f"snapshot {name!r} does not exist")
        return path

    def create(
        self, collection: str, info: dict[str, Any], take: Callable[[Path], list[dict[str, int]]]
    ) -> dict[str, Any]:
        """A new snapshot of ``collection``: ``take(directory)`` lays its shards there and returns
        their entries; ``info`` joins the manifest (schema, shard_count, ...). Returns the manifest."""
        self._space.check(0)
        with self._lock:
            name = snapshot.new_name(collection)
            while (self.root / name).exists():
                name = snapshot.new_name(collection)
            staging = self.root / f".creating-{name}"
            staging.mkdir()
        try:
            shards = take(staging)
            from braid import __version__

            manifest = snapshot.write_manifest(
                staging,
                {**info, "name": name, "collection": collection, "shards": shards, "braid_version": __version__},
            )
            staging.rename(self.root / name)
            fsync_dir(self.root)
        except BaseException as err:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError) and is_disk_full(err):
                raise DiskFull(f"disk full: cannot snapshot {collection!r} under {self.root}: {err}") from err
            raise
        log.info("snapshot %s of collection %s: %d bytes", name, collection, manifest["bytes"])
        return manifest

    def list(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Manifests of every snapshot (of ``collection``), oldest first; a damaged one is listed
        by name with its ``error``."""
        out = []
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                manifest = snapshot.read_manifest(path)
            except BraidError as err:
                out.append({"name": path.name, "error": str(err)})
                continue
            if collection is None or manifest.get("collection") == collection:
                out.append(manifest)
        return sorted(out, key=lambda m: (float(m.get("created_at") or 0), m["name"]))

    def collection_of(self, name: str) -> str | None:
        """The collection snapshot ``name`` was taken of; None when its manifest cannot be read.
        NotFound when there is no such snapshot, damaged or not."""
        snapshot.check_name(name)
        path = self.root / name
        if not path.is_dir():
            raise NotFound(f"snapshot {name!r} does not exist")
        try:
            return snapshot.read_manifest(path).get("collection")
        except BraidError:
            return None

    def manifest(self, name: str) -> dict[str, Any]:
        return snapshot.read_manifest(self.path(name))

    def verified(self, name: str) -> tuple[Path, dict[str, Any]]:
        """The path and manifest of snapshot ``name`` once every file passed its checksum."""
        path = self.path(name)
        return path, snapshot.verify(path)

    def delete(self, name: str) -> None:
        """Remove snapshot ``name``, damaged ones too (a listing shows them with their error)."""
        snapshot.check_name(name)
        path = self.root / name
        if not path.is_dir():
            raise NotFound(f"snapshot {name!r} does not exist")
        doomed = self.root / f".deleting-{name}-{uuid.uuid4().hex[:8]}"
        path.rename(doomed)
        fsync_dir(self.root)
        shutil.rmtree(doomed, ignore_errors=True)

    def export(self, name: str) -> Iterator[bytes]:
        """Snapshot ``name`` as a tar stream (index/snapshot.py ``tar_chunks``)."""
        path = self.path(name)
        snapshot.read_manifest(path)  # an unknown format or a damaged manifest is refused before a byte is sent
        return snapshot.tar_chunks(path, name)

    def upload(self) -> Upload:
        """A hidden file in the store that an import's archive is written into as it arrives."""
        return Upload(self.root / f".upload-{uuid.uuid4().hex[:12]}.tar", self._space)

    def import_archive(self, archive: Path, admit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Check a snapshot tar and add it under the name it carries; AlreadyExists when taken.
        ``admit(manifest)`` may refuse it (raise) once it is checked, before it is listed."""
        staging = self.root / f".importing-{uuid.uuid4().hex[:8]}"
        try:
            self._space.check(archive.stat().st_size)  # unpacked, it takes about as much again
            top, manifest = snapshot.unpack(archive, staging)
            if admit is not None:
                admit(manifest)
            with self._lock:
                if (self.root / top.name).exists():
                    raise AlreadyExists(f"snapshot {top.name!r} already exists: delete it first")
                top.rename(self.root / top.name)
                fsync_dir(self.root)
            return manifest
        except OSError as err:
            if is_disk_full(err):
                raise DiskFull(f"disk full: cannot import a snapshot under {self.root}: {err}") from err
            raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


class Upload:
    """An archive arriving in pieces (ImportSnapshot), written to a hidden file of the store: each
    piece is checked against the free-space floor first (DiskFull, as ENOSPC is), and ``close``
    removes the file, whatever happened. Thread-safe: a stream's end may close it while a piece
    is being written on another thread."""

    def __init__(self, path: Path, space: FreeSpace) -> None:
        self.path = path
        self._space = space
        self._lock = threading.Lock()
        self._file: BinaryIO | None = open(path, "xb")  # noqa: SIM115 (closed by close())
        self.bytes = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._file is None:
                raise BraidError("the upload is closed")
            try:
                self._space.check(len(data))
                self._file.write(data)
            except OSError as err:
                if is_disk_full(err):
                    raise DiskFull(f"disk full: cannot receive a snapshot under {self.path.parent}: {err}") from err
                raise
            self.bytes += len(data)

    def finish(self) -> Path:
        """The whole archive, flushed; it stays until ``close``."""
        with self._lock:
            if self._file is None:
                raise BraidError("the upload is closed")
            try:
                self._file.flush()
            except OSError as err:
                if is_disk_full(err):
                    raise DiskFull(f"disk full: cannot receive a snapshot under {self.path.parent}: {err}") from err
                raise
            return self.path

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                with contextlib.suppress(OSError):  # a full disk on the last flush: the file goes anyway
                    self._file.close()
                self._file = None
            self.path.unlink(missing_ok=True)
