"""Snapshots in a JetStream object store, and the trim points of the shards' logs.

A blocking API over ``NatsLink`` (its loop runs nats-py; ``link.call`` bounds each call):

- the object-store bucket ``braid-snapshots`` (replicas = the streams', created by whoever
  needs it first) holds each snapshot directory (index/snapshot.py's layout: SNAPSHOT.json
  and ``shard-NNN/``) as ONE object: the POSIX tar ``snapshot.tar_chunks`` streams, members
  under one top directory. ``put_dir`` streams it up (never the whole tar in memory),
  ``get_dir`` downloads to a temp file, unpacks it (``extract_tar``) and ``verify``-s it, so a
  damaged object is DataLoss naming it; ``list(prefix)`` and ``delete``. Object names:

      auto/<uid>/<shard:03d>/<wal_seq:020d>    a replica's snapshot of one shard of one collection
                                               incarnation at log sequence wal_seq (sorts by it)
      user/<snapshot name>/shard-NNN           a user's snapshot of one shard (the router asks a replica
                                               for it: service/cluster/router/snapshots.py), a tar as above
      user/<snapshot name>/SNAPSHOT            its collection manifest: checksummed JSON (``put_bytes``),
                                               written last, so a snapshot without it is unfinished

  nats-py publishes an object's chunks first and its meta message (name, size, SHA-256) last:
  an upload cut short (kill -9) leaves chunks no meta names, which no listing shows;
  ``sweep_orphans`` purges such chunks once their last one is ORPHAN_AGE_S old (a replica
  calls it after each snapshot it takes).

- the KV bucket ``braid-trims`` holds each shard's trim point: key ``<uid>.<shard:03d>``,
  value ``{"seq": S, "object": <the snapshot that covers it>, "at": <unix time>}``. The
  shard's subject holds no record below S (a JetStream purge with that subject as filter
  keeps from S on). It is written (compare-and-set, only ever raised) BEFORE the purge, so a
  replica that reads it after a fetch knows whether the purge may have taken records it
  still needed (replica.py).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nats.js.errors

from braid.index import snapshot
from braid.index.errors import BraidError, DataLoss, NotFound

from .nats_link import NatsLink

log = logging.getLogger("braid.snapshots")
BUCKET = "braid-snapshots"
TRIMS_BUCKET = "braid-trims"
AUTO = "auto"
USER = "user"
USER_MANIFEST = "SNAPSHOT"
CHUNK_BYTES = 128 * 1024  # one message of the object's stream (nats-py's default chunk)
TRANSFER_FLOOR_S = 30.0  # an upload or download may take this long plus ...
TRANSFER_BYTES_PER_S = 8 * 1024 * 1024  # ... a second per this many bytes
TAR_MEMBER_BYTES = 3 * 512  # a member's PAX header and padding, at most (for the size estimate)
ORPHAN_AGE_S = 600.0  # chunks no object names, untouched this long, are an upload cut short: purged


def auto_prefix(uid: str, shard: int) -> str:
    return f"{AUTO}/{uid}/{shard:03d}/"


def auto_name(uid: str, shard: int, wal_seq: int) -> str:
    return f"{auto_prefix(uid, shard)}{wal_seq:020d}"


def user_prefix(snapshot_name: str) -> str:
    return f"{USER}/{snapshot_name}/"


def user_shard_name(snapshot_name: str, shard: int) -> str:
    return f"{user_prefix(snapshot_name)}{snapshot.SHARD_DIR.format(shard)}"


def user_manifest_name(snapshot_name: str) -> str:
    return f"{user_prefix(snapshot_name)}{USER_MANIFEST}"


def trim_key(uid: str, shard: int) -> str:
    return f"{uid}.{shard:03d}"


@dataclass(frozen=True)
class StoredObject:
    name: str
    bytes: int
    mtime: float  # unix time of the upload (0 when unknown)
    entry: dict[str, Any] | None = field(default=None, compare=False)  # a new snapshot's manifest shard entry

    @property
    def seq(self) -> int:
        """The log sequence of an ``auto/`` object (its last name part), else -1."""
        tail = self.name.rsplit("/", 1)[-1]
        return int(tail) if tail.isdigit() else -1


def _transfer_s(size: int) -> float:
    return TRANSFER_FLOOR_S + size / TRANSFER_BYTES_PER_S


def _mtime(text: str | None) -> float:
    try:
        return datetime.fromisoformat(text).timestamp() if text else 0.0
    except ValueError:
        return 0.0


class _ChunkReader(io.RawIOBase):
    """A file-like view of an iterator of byte chunks: nats-py's put reads it with ``readinto``
    (on an executor thread), one object chunk at a time."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._pending = memoryview(b"")
        self.sent = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        out = memoryview(buffer).cast("B")
        filled = 0
        while filled < len(out):
            if not self._pending:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._pending = memoryview(chunk)
                continue
            n = min(len(out) - filled, len(self._pending))
            out[filled : filled + n] = self._pending[:n]
            self._pending = self._pending[n:]
            filled += n
        self.sent += filled
        return filled


class SnapshotObjects:
    """Snapshots in the ``braid-snapshots`` object store and the ``braid-trims`` KV bucket,
    over a connected NatsLink; ``replicas`` is what the bucket is created with."""

    def __init__(self, link: NatsLink, replicas: int, bucket: str = BUCKET) -> None:
        self.link = link
        self.replicas = replicas
        self.bucket = bucket
        self._ready = False

    # ------------------------------------------------------------- buckets

    async def _store(self) -> Any:
        js = self.link.js
        try:
            return await js.object_store(self.bucket)
        except nats.js.errors.BucketNotFoundError:
            try:
                return await js.create_object_store(self.bucket, replicas=self.replicas)
            except nats.js.errors.BadRequestError:  # created meanwhile by another process
                return await js.object_store(self.bucket)

    def ensure(self, timeout: float = 10.0) -> None:
        """Create the object store and the trims bucket if they do not exist yet."""
        if self._ready:
            return

        async def ensure() -> None:
            await self._store()

        self.link.call(ensure(), timeout)
        self.link.ensure_bucket(TRIMS_BUCKET, self.replicas, timeout=timeout)
        self._ready = True

    # ------------------------------------------------------------- objects

    def put_dir(self, name: str, root: Path, arcroot: str | None = None) -> StoredObject:
        """Upload the snapshot directory ``root`` as the tar object ``name`` (streamed: one chunk
        in memory at a time), members under ``arcroot`` (default ``root``'s name when it is a valid
        snapshot name, else ``snapshot``). Replaces an object of that name once complete."""
        self.ensure()
        if arcroot is None:
            arcroot = root.name if snapshot.NAME_PATTERN.fullmatch(root.name) else "snapshot"
        files = [p for p in root.rglob("*") if p.is_file()]
        estimate = sum(p.stat().st_size + TAR_MEMBER_BYTES for p in files) + 2 * 512
        reader = _ChunkReader(snapshot.tar_chunks(root, arcroot, CHUNK_BYTES))

        async def put() -> Any:
            return await (await self._store()).put(name, reader)

        info = self.link.call(put(), _transfer_s(estimate))
        return StoredObject(name, int(info.size or reader.sent), time.time())

    def list(self, prefix: str = "") -> list[StoredObject]:
        """The complete objects whose names start with ``prefix``, by name."""
        self.ensure()

        async def names() -> list[StoredObject]:
            store = await self._store()
            try:
                infos = await store.list(ignore_deletes=True)
            except nats.js.errors.NotFoundError:  # an empty store
                return []
            return [
                StoredObject(i.name, int(i.size or 0), _mtime(i.mtime))
                for i in infos
                if i.name.startswith(prefix) and not i.deleted
            ]

        return sorted(self.link.call(names(), 10.0), key=lambda o: o.name)

    def get_dir(self, name: str, into: Path) -> tuple[Path, dict[str, Any]]:
        """Download object ``name``, unpack it under the new directory ``into`` and verify it:
        (the snapshot's directory, its manifest). NotFound when there is no such object;
        DataLoss naming the object when it fails a check (its SHA-256, the tar, a file's crc32)."""
        self.ensure()
        into.mkdir(parents=True)
        archive = into / ".download.tar"

        async def size() -> int:
            try:
                return int((await (await self._store()).get_info(name)).size or 0)
            except nats.js.errors.NotFoundError as err:
                raise NotFound(f"snapshot object {name!r} does not exist in {self.bucket}") from err

        async def get() -> None:
            with open(archive, "wb") as out:
                try:
                    await (await self._store()).get(name, writeinto=out)
                except nats.js.errors.NotFoundError as err:
                    raise NotFound(f"snapshot object {name!r} does not exist in {self.bucket}") from err
                except nats.js.errors.DigestMismatchError as err:
                    raise DataLoss(f"snapshot object {name!r}: its bytes do not match its SHA-256 digest") from err

        try:
            limit = _transfer_s(self.link.call(size(), 10.0))  # first: NotFound leaves no coroutine unawaited
            self.link.call(get(), limit)
            top = snapshot.extract_tar(archive, into / "snapshot")
            manifest = snapshot.verify(top)
        except NotFound:
            raise
        except BraidError as err:
            if isinstance(err, DataLoss) and name in str(err):
                raise
            raise DataLoss(f"snapshot object {name!r} in {self.bucket}: {err}") from err
        finally:
            archive.unlink(missing_ok=True)
        return top, manifest

    def put_bytes(self, name: str, data: bytes) -> StoredObject:
        """Store the small object ``name`` holding ``data`` (a user snapshot's manifest)."""
        self.ensure()

        async def put() -> Any:
            return await (await self._store()).put(name, data)

        info = self.link.call(put(), _transfer_s(len(data)))
        return StoredObject(name, int(info.size or len(data)), time.time())

    def get_bytes(self, name: str) -> bytes:
        """The bytes of the small object ``name``; NotFound when there is none, DataLoss when they
        fail the store's SHA-256 digest."""
        self.ensure()

        async def get() -> bytes:
            try:
                return bytes((await (await self._store()).get(name)).data or b"")
            except nats.js.errors.NotFoundError as err:
                raise NotFound(f"snapshot object {name!r} does not exist in {self.bucket}") from err
            except nats.js.errors.DigestMismatchError as err:
                raise DataLoss(f"snapshot object {name!r}: its bytes do not match its SHA-256 digest") from err

        return self.link.call(get(), TRANSFER_FLOOR_S)

    def delete(self, name: str) -> None:
        """Delete object ``name`` (nothing when it does not exist)."""
        self.ensure()

        async def delete() -> None:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await (await self._store()).delete(name)

        self.link.call(delete(), 10.0)

    def sweep_orphans(self, older_than_s: float = ORPHAN_AGE_S) -> list[str]:
        """Purge the chunks of uploads cut short: chunk subjects no object's meta names whose last
        chunk is older than ``older_than_s`` (an upload under way keeps adding chunks). Returns the
        subjects purged."""
        self.ensure()
        stream, chunks = f"OBJ_{self.bucket}", f"$O.{self.bucket}.C."

        async def sweep() -> list[str]:
            js = self.link.js
            subjects = (await js.stream_info(stream, subjects_filter=f"{chunks}>")).state.subjects or {}
            if not subjects:
                return []
            try:  # listed after the chunks were: an object completed meanwhile is named here
                named = {info.nuid for info in await (await self._store()).list(ignore_deletes=True)}
            except nats.js.errors.NotFoundError:
                named = set()
            purged = []
            for subject in subjects:
                if subject.removeprefix(chunks) in named:
                    continue
                try:
                    last = await js.get_last_msg(stream, subject)
                except nats.js.errors.NotFoundError:
                    continue
                if last.time is None or time.time() - last.time.timestamp() >= older_than_s:
                    await js.purge_stream(stream, subject=subject)
                    purged.append(subject)
            return purged

        purged = self.link.call(sweep(), 30.0)
        if purged:
            log.info("purged the chunks of %d snapshot upload(s) cut short: %s", len(purged), ", ".join(purged[:5]))
        return purged

    # --------------------------------------------------- replica snapshots

    def replica_snapshots(self, uid: str, shard: int) -> list[StoredObject]:
        """Shard ``shard`` of collection incarnation ``uid``'s snapshots, oldest first."""
        return sorted((o for o in self.list(auto_prefix(uid, shard)) if o.seq >= 0), key=lambda o: o.seq)

    def trim_point(self, uid: str, shard: int) -> int:
        """The sequence below which the shard's subject holds nothing (0: never trimmed), read
        from the bucket stream's leader: a trim recorded before this call is seen."""
        self.ensure()
        found = self.link.kv_get(TRIMS_BUCKET, trim_key(uid, shard))
        return int(json.loads(found[0])["seq"]) if found is not None else 0

    def trim(self, stream: str, subject: str, uid: str, shard: int, seq: int, covered_by: str) -> int:
        """Drop the records of ``subject`` below ``seq`` (the oldest retained snapshot's, named
        ``covered_by``): raise the recorded trim point to ``seq`` first (compare-and-set: never
        lowered), then purge below the recorded one. Returns the trim point."""
        self.ensure()
        key = trim_key(uid, shard)
        value = json.dumps({"seq": seq, "object": covered_by, "at": time.time()}).encode()
        while True:
            found = self.link.kv_get(TRIMS_BUCKET, key)
            if found is None:
                try:
                    self.link.kv_create(TRIMS_BUCKET, key, value)
                    point = seq
                    break
                except BraidError:  # created meanwhile: read it again
                    continue
            point = int(json.loads(found[0])["seq"])
            if point >= seq or self.link.kv_update(TRIMS_BUCKET, key, value, last=found[1]) is not None:
                point = max(point, seq)
                break

        async def purge() -> None:
            await self.link.js.purge_stream(stream, subject=subject, seq=point)

        self.link.call(purge(), 10.0)
        return point

    def forget(self, uid: str, shards: int) -> None:
        """Remove every replica snapshot and trim point of collection incarnation ``uid``."""
        for obj in self.list(f"{AUTO}/{uid}/"):
            self.delete(obj.name)
        for shard in range(shards):
            self.link.kv_delete(TRIMS_BUCKET, trim_key(uid, shard))

    # ------------------------------------------------------------ streams

    def stream_state(self, stream: str) -> dict[str, int]:
        """{"messages", "bytes", "first_seq", "last_seq"} of a stream now (benchmarks, tests)."""

        async def info() -> dict[str, int]:
            state = (await self.link.js.stream_info(stream)).state
            return {
                "messages": int(state.messages),
                "bytes": int(state.bytes),
                "first_seq": int(state.first_seq),
                "last_seq": int(state.last_seq),
            }

        return self.link.call(info(), 10.0)


def fetch_newest_valid(
    objects: SnapshotObjects, candidates: list[StoredObject], into: Path, what: str
) -> tuple[StoredObject, Path, dict[str, Any]] | None:
    """The newest of ``candidates`` (oldest first) that downloads and verifies, unpacked under
    ``into`` (a new directory per try); each that fails its checks is skipped for the one before
    it, with a WARNING naming it. None when none is valid."""
    for number, obj in enumerate(reversed(candidates)):
        target = into / f"try-{number}"
        try:
            top, manifest = objects.get_dir(obj.name, target)
            return obj, top, manifest
        except BraidError as err:  # damaged, gone, or unreadable now: the one before may do
            log.warning("%s: snapshot %s skipped, trying the one before it: %s", what, obj.name, err)
            shutil.rmtree(target, ignore_errors=True)
    return None


def scratch_dir(parent: Path, prefix: str) -> Path:
    """A new, empty directory under ``parent`` (same file system as the data: links and renames work)."""
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
