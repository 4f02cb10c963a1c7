"""Users' snapshots of a cluster's collections, through the router: ``RouterSnapshots``.

What service/rpcs.py calls ``catalog.snapshots`` on a router (the standalone one is
index/snapshot_store.py), over the ``braid-snapshots`` object store
(service/cluster/snapshot_objects.py). A snapshot ``<name>`` is:

    user/<name>/shard-NNN   one per shard: a replica's snapshot of its shard, stored under
                            this name by the Snapshot RPC (a tar of index/snapshot.py's layout:
                            SNAPSHOT.json listing shard NNN alone, shard-NNN/); never counted in
                            the replicas' retention of their own snapshots nor used to trim
    user/<name>/SNAPSHOT    the collection manifest, written LAST: JSON (index/manifest.py's
                            checksummed form, ``crc32`` of the canonical content) with a standalone
                            SNAPSHOT.json's keys but ``files``: {"format", "kind", "name",
                            "collection", "schema", "shard_count", "created_at",
                            "collection_created_at", "shards": [{"shard", "wal_seq", "next_label",
                            "generation", "documents"}], "bytes" (the shard objects' sizes),
                            "braid_version"}

A snapshot without its manifest is unfinished (a create or import cut short): it is not
listed, and a delete of its name removes what there is. Creating one asks one live replica of
each shard (failing over like reads) to snapshot once it applied the last record its subject
held when the call began (STRONG), so every write acknowledged before the call is in it.

Restore creates a new incarnation of the collection (new uid, new stream) whose metadata names
the snapshot (``CollectionMeta.restore_from``); each replica lays in its shard's object before
it opens (service/cluster/replica.py) and the call returns once every shard has a caught-up
replica, or undoes the collection and says why (DATA_LOSS naming a damaged object or file).

Export downloads the shard objects into a scratch directory and lays them out as ONE
standalone snapshot (SNAPSHOT.json listing every shard and file); import splits a standalone
snapshot (or a cluster's export) into per-shard objects. So a backup moves freely between a
standalone server and a cluster. Scratch space: ``<data_dir>/snapshot-scratch/`` of the router
(emptied when it starts), with the server's free-space floor.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from braid.cluster.v1 import shard_pb2 as spb
from braid.index import snapshot
from braid.index.diskspace import FreeSpace
from braid.index.errors import AlreadyExists, BraidError, DataLoss, FailedPrecondition, NotFound
from braid.index.manifest import CHECKSUM_KEY, content_crc32, dumps_checked
from braid.index.schema import Schema, validate_collection_name
from braid.index.snapshot_store import Upload
from braid.v1 import braid_pb2 as pb

from ..snapshot_objects import (
    USER,
    USER_MANIFEST,
    SnapshotObjects,
    scratch_dir,
    user_manifest_name,
    user_prefix,
    user_shard_name,
)
from .replicas import _ERROR_OF, default_deadline

if TYPE_CHECKING:
    from .catalog import RemoteCatalog
    from .collection import RemoteCollection

log = logging.getLogger("braid.router.snapshots")
SCRATCH = "snapshot-scratch"
STATUS_TIMEOUT_S = 2.0  # a shard server's Status while a restore is waited for
# The collection manifest's keys taken from a standalone SNAPSHOT.json (import), and given to one (export).
_INFO_KEYS = (
    "name", "collection", "schema", "shard_count", "replication_factor", "created_at", "collection_created_at",
    "braid_version",
)  # fmt: skip


def parse_manifest(name: str, raw: bytes) -> dict[str, Any]:
    """A collection manifest's bytes, checked: DataLoss naming the object when damaged,
    FailedPrecondition for a format this version does not read."""
    where = f"snapshot {name!r}: object {user_manifest_name(name)!r}"
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DataLoss(f"{where}: unreadable collection manifest: {err}") from err
    if not isinstance(manifest, dict):
        raise DataLoss(f"{where}: not a JSON object")
    stored = manifest.pop(CHECKSUM_KEY, None)
    if stored != content_crc32(manifest):
        raise DataLoss(f"{where}: checksum mismatch ({CHECKSUM_KEY} {stored!r} stored)")
    if manifest.get("kind") != snapshot.KIND:
        raise DataLoss(f"{where}: not a Braid snapshot manifest (kind {manifest.get('kind')!r})")
    if manifest.get("format") not in snapshot.READ_FORMATS:
        raise FailedPrecondition(
            f"{where}: snapshot format {manifest.get('format')!r} is not one this version reads "
            f"{snapshot.READ_FORMATS}: restore it with the Braid version that wrote it "
            f"({manifest.get('braid_version')!r}) or a later one"
        )
    for key, kind in (("shards", list), ("schema", dict), ("shard_count", int)):
        if not isinstance(manifest.get(key), kind):
            raise DataLoss(f"{where}: {key!r} is {manifest.get(key)!r}, expected a {kind.__name__}")
    return manifest


def _check_shards(name: str, manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest's shard entries in shard order: DataLoss unless they are exactly 0..shard_count-1."""
    entries = sorted(manifest["shards"], key=lambda e: int(e.get("shard", -1)))
    if [int(e.get("shard", -1)) for e in entries] != list(range(int(manifest["shard_count"]))):
        raise DataLoss(f"snapshot {name!r} holds shards {entries!r}, not all of {manifest['shard_count']}")
    return entries


def restore_failure(collection: RemoteCollection, timeout: float = STATUS_TIMEOUT_S) -> BraidError | None:
    """Why a replica of restored ``collection`` cannot lay its snapshot in (its Status says so:
    the object is gone or damaged, the same for every replica), as the index error it was; None
    when no replica that answered reports one."""
    catalog, meta = collection.catalog, collection.meta
    known = catalog.state.addresses()
    for node in sorted({node for nodes in meta.placement for node in nodes}):
        if node not in known:
            continue
        try:
            status = catalog.clients.stub(known[node]).Status(spb.StatusRequest(), timeout=timeout)
        except grpc.RpcError:
            continue  # down or busy: another replica, or the next look, tells
        for replica in status.replicas:
            if replica.replica.uid == meta.uid and replica.restore_error:
                code = next((c for c in grpc.StatusCode if c.value[0] == replica.restore_error), None)
                cls = _ERROR_OF.get(code, DataLoss) if code is not None else DataLoss
                return cls(f"collection {meta.name!r} shard {replica.replica.shard} on {node}: {replica.problem}")
    return None


class Export:
    """An export's archive in pieces; ``close`` (idempotent, also at the end or on an error)
    closes the pieces and runs ``cleanup`` (removes the scratch directory)."""

    def __init__(self, pieces: Iterator[bytes], cleanup: Callable[[], None]) -> None:
        self._pieces = pieces
        self._cleanup = cleanup
        self._closed = False

    def __iter__(self) -> Export:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._pieces)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()
        finally:
            self._cleanup()


class RouterSnapshots:
    """Users' snapshots in the object store (module doc), for one router's catalog."""

    def __init__(self, catalog: RemoteCatalog) -> None:
        self.catalog = catalog
        self.objects = SnapshotObjects(catalog.link, catalog.config.stream_replicas)
        self.scratch = Path(catalog.config.data_dir) / SCRATCH
        shutil.rmtree(self.scratch, ignore_errors=True)  # a killed router's exports and imports
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._space = FreeSpace(self.scratch, catalog.config.storage.min_free_bytes)

    # ------------------------------------------------------------- reading

    def manifest(self, name: str) -> dict[str, Any]:
        """Snapshot ``name``'s checked collection manifest; NotFound when it has none."""
        snapshot.check_name(name)
        try:
            raw = self.objects.get_bytes(user_manifest_name(name))
        except NotFound:
            raise NotFound(f"snapshot {name!r} does not exist") from None
        return parse_manifest(name, raw)

    def list(self, collection: str | None = None) -> list[dict[str, Any]]:
        """Manifests of every finished snapshot (of ``collection``), oldest first; a damaged one is
        listed by name with its ``error``."""
        out = []
        for obj in self.objects.list(f"{USER}/"):
            parts = obj.name.split("/")
            if len(parts) != 3 or parts[2] != USER_MANIFEST:
                continue
            try:
                manifest = self.manifest(parts[1])
            except NotFound:  # deleted while we listed
                continue
            except BraidError as err:
                out.append({"name": parts[1], "error": str(err)})
                continue
            if collection is None or manifest.get("collection") == collection:
                out.append(manifest)
        return sorted(out, key=lambda m: (float(m.get("created_at") or 0), m["name"]))

    def collection_of(self, name: str) -> str | None:
        """The collection snapshot ``name`` was taken of; None when its manifest is damaged."""
        try:
            return self.manifest(name).get("collection")
        except (DataLoss, FailedPrecondition):
            return None

    # ------------------------------------------------------------- create

    def create(self, name: str) -> dict[str, Any]:
        """Snapshot collection ``name`` (or the one alias ``name`` names): every write acknowledged
        before the call is in it. Returns its collection manifest."""
        collection = self.catalog.get(name)
        meta = collection.meta
        min_seqs = collection._min_seqs(pb.CONSISTENCY_STRONG)  # the subjects' ends as the call begins
        label = snapshot.new_name(meta.name)
        while self.objects.list(user_prefix(label)):
            label = snapshot.new_name(meta.name)
        started = time.monotonic()

        def ask(shard: int, stub: Any, timeout: float) -> Any:
            request = spb.SnapshotRequest(
                replica=collection._ref(shard), min_seq=min_seqs[shard], object=user_shard_name(label, shard)
            )
            return stub.Snapshot.future(request, timeout=timeout)

        try:
            answers = collection._fan_out(collection.shards, ask, default_deadline())
            entries = [json.loads(answers[shard][0].entry) for shard in collection.shards]
            from braid import __version__

            manifest = {
                "format": snapshot.FORMAT_VERSION,
                "kind": snapshot.KIND,
                "name": label,
                "collection": meta.name,
                "schema": meta.schema,
                "shard_count": meta.shards,
                "replication_factor": meta.replication_factor,
                "created_at": time.time(),
                "collection_created_at": meta.created_at,
                "shards": entries,
                "bytes": sum(int(answers[shard][0].bytes) for shard in collection.shards),
                "braid_version": __version__,
            }
            self.objects.put_bytes(user_manifest_name(label), dumps_checked(manifest))
        except BaseException:
            self._remove(label)
            raise
        log.info(
            "snapshot %s of collection %s: %d shards, %d bytes in %.2f s",
            label,
            meta.name,
            meta.shards,
            manifest["bytes"],
            time.monotonic() - started,
        )
        return manifest

    # ------------------------------------------------------------- delete

    def delete(self, name: str) -> None:
        """Remove every object of snapshot ``name`` (its manifest first, so it is never listed half
        gone); NotFound when it has no manifest (what an unfinished one left is removed still)."""
        snapshot.check_name(name)
        found = self.objects.list(user_prefix(name))
        manifest = user_manifest_name(name)
        had_manifest = any(obj.name == manifest for obj in found)
        if had_manifest:
            self.objects.delete(manifest)
        for obj in found:
            if obj.name != manifest:
                self.objects.delete(obj.name)
        if not had_manifest:
            raise NotFound(f"snapshot {name!r} does not exist")

    def _remove(self, name: str) -> None:
        """Best effort: remove what an unfinished create or import of ``name`` stored."""
        try:
            for obj in self.objects.list(user_prefix(name)):
                self.objects.delete(obj.name)
        except Exception as err:  # NATS away: a later delete of the name removes it
            log.warning("snapshot %s: cannot remove its unfinished objects: %s", name, err)

    # ------------------------------------------------------------- restore

    def restore(self, name: str, collection: str, replace: bool) -> RemoteCollection:
        """Snapshot ``name`` as collection ``collection`` (see the module doc)."""
        snapshot.check_name(name)
        validate_collection_name(collection)
        manifest = self.manifest(name)  # NotFound, DataLoss, FailedPrecondition before anything
        entries = _check_shards(name, manifest)
        stored = {obj.name for obj in self.objects.list(user_prefix(name))}
        for entry in entries:
            shard_object = user_shard_name(name, int(entry["shard"]))
            if shard_object not in stored:
                raise DataLoss(f"snapshot {name!r}: object {shard_object!r} is missing from the object store")
        schema = Schema.from_json(manifest["schema"])
        factor = int(manifest.get("replication_factor") or 0)  # absent in a standalone server's snapshot
        restored = self.catalog.restore(collection, schema, len(entries), name, replace, factor)
        log.info("restored snapshot %s as collection %s (uid %s)", name, collection, restored.meta.uid)
        return restored

    # ------------------------------------------------------------- export

    def export(self, name: str) -> Export:
        """Snapshot ``name`` as one standalone snapshot's tar stream (members under ``name/``); every
        shard object is downloaded and verified before the first byte (DataLoss naming a bad one)."""
        manifest = self.manifest(name)
        entries = _check_shards(name, manifest)
        self._space.check(0)
        scratch = scratch_dir(self.scratch, ".export-")
        try:
            root = scratch / name
            root.mkdir()
            shards = []
            for entry in entries:
                number = int(entry["shard"])
                download = scratch / f"download-{number}"
                top, shard_manifest = self.objects.get_dir(user_shard_name(name, number), download)
                (top / snapshot.SHARD_DIR.format(number)).rename(root / snapshot.SHARD_DIR.format(number))
                shutil.rmtree(download, ignore_errors=True)
                shards.extend(shard_manifest["shards"])
            info = {key: manifest[key] for key in _INFO_KEYS if key in manifest}
            snapshot.write_manifest(root, {**info, "shards": shards})
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        return Export(snapshot.tar_chunks(root, name), lambda: shutil.rmtree(scratch, ignore_errors=True))

    # ------------------------------------------------------------- import

    def upload(self) -> Upload:
        """A scratch file an import's archive is written into as it arrives."""
        import uuid

        return Upload(self.scratch / f".upload-{uuid.uuid4().hex[:12]}.tar", self._space)

    def import_archive(self, archive: Path, admit: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Check a snapshot tar (a standalone server's or a cluster's export) and store it as the
        user snapshot it names, one object per shard then the manifest; AlreadyExists when taken."""
        scratch = scratch_dir(self.scratch, ".import-")
        try:
            self._space.check(0)
            top, source = snapshot.unpack(archive, scratch / "archive")
            name = top.name
            if admit is not None:
                admit(source)
            entries = _check_shards(name, source)
            if self.objects.list(user_prefix(name)):
                raise AlreadyExists(f"snapshot {name!r} already exists: delete it first")
            info = {key: source[key] for key in _INFO_KEYS if key in source}
            try:
                total = 0
                for entry in entries:
                    number = int(entry["shard"])
                    part = scratch / f"shard-{number}" / "snapshot"
                    part.mkdir(parents=True)
                    shard_dir = snapshot.SHARD_DIR.format(number)
                    (top / shard_dir).rename(part / shard_dir)
                    snapshot.write_manifest(part, {**info, "shards": [entry]})
                    total += self.objects.put_dir(user_shard_name(name, number), part, arcroot="snapshot").bytes
                    shutil.rmtree(part.parent, ignore_errors=True)
                manifest = {
                    **info,
                    "format": snapshot.FORMAT_VERSION,
                    "kind": snapshot.KIND,
                    "shards": entries,
                    "bytes": total,
                }
                self.objects.put_bytes(user_manifest_name(name), dumps_checked(manifest))
            except BaseException:
                self._remove(name)
                raise
            log.info("imported snapshot %s of collection %s (%d shards)", name, info.get("collection"), len(entries))
            return manifest
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
