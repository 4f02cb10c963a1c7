"""Writing a shard's checkpoint: a generation of durable files, its CHECKSUMS, the manifest.

A checkpoint (the shard's ``_checkpoint``, index/shard/core.py, under its apply lock) writes
``segments/<gen>.tmp/`` (``write_generation``), renames it to ``segments/<gen>/``, commits
tantivy, then publishes it by replacing MANIFEST.json (``write_manifest``) and trims the log.

A checkpoint never publishes a file a full disk cut short: each file is written under a
temporary name, fsynced and read back (index/durable.py; hnswlib's files, whose writer
reports no error, are checked by structure, index/hnswfile.py) before CHECKSUMS is computed
and the generation renamed into place; a failed checkpoint leaves the previous generation
and the whole log in force, and ``discard_unpublished`` removes what it wrote.

Segment directories the current generation does not use (older generations, a merge that
never published) are removed when the shard opens and after every checkpoint
(``remove_unreferenced``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import durable
from ..checksums import write_checksums
from ..errors import BraidError, DiskFull
from ..hnsw_strand import HnswStrand
from ..manifest import fsync_dir, read_json, write_json_atomic
from ..snapshot import capture_shard
from .indexes import Indexes

if TYPE_CHECKING:
    from .core import Shard

log = logging.getLogger("braid.shard")

Capture = Callable[[int, int, int], None]  # (generation, wal_seq, next_label), under the apply and commit locks

FORMAT_VERSION = 2  # 2: the manifest carries crc32 and wal_crc32, a generation carries CHECKSUMS


def write_generation(segments: Path, generation: int, indexes: Indexes) -> None:
    """Save every index into ``segments/<generation>/``, durable and checksummed (not yet published).

    Caller holds the shard's apply lock: no write lands meanwhile, while searches go on
    (HNSW strands snapshot their parts).
    """
    staging = segments / f"{generation}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    labels = indexes.labels
    ids = {
        **labels.saved(),
        "has_vector": {name: index.present_labels().tolist() for name, index in indexes.dense.items()},
    }
    # Every file goes through a temporary name, is fsynced and checked by reading it back
    # (index/durable.py; hnswlib's by its structure, index/hnswfile.py), so a write a full
    # disk cut short fails the checkpoint here instead of being checksummed and published.
    durable.write_bytes(staging / "ids.json", json.dumps(ids, ensure_ascii=False).encode("utf-8"))
    indexes.payload.save(staging, labels.size)  # a write being prepared may set labels past it
    indexes.metadata.save(staging, labels.size)
    previous = segments / str(generation - 1)  # unchanged HNSW graphs are linked from it
    for index in indexes.dense.values():
        if isinstance(index, HnswStrand):
            index.save(staging, previous)
        else:
            index.save(staging)
    for sparse in indexes.sparse.values():
        sparse.save(staging)
    write_checksums(staging)  # read back from the page cache; fsyncs the staging directory
    for path in staging.iterdir():
        fsync_file(path)
    final = segments / str(generation)
    staging.rename(final)
    fsync_dir(segments)


def write_manifest(
    directory: Path, version: str, generation: int, wal_seq: int, next_label: int, wal_crc: int | None
) -> None:
    """Publish ``generation`` as covering the log up to ``wal_seq`` (an atomic replace)."""
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "braid_version": version,
        "generation": generation,
        "wal_seq": wal_seq,
        # the label counter as of wal_seq: replay hands later writes the same labels
        "next_label": next_label,
    }
    if wal_crc is not None:  # lets recovery check the log agrees on where replay starts
        manifest["wal_crc32"] = wal_crc
    write_json_atomic(directory / "MANIFEST.json", manifest)


def discard_unpublished(directory: Path, generation: int) -> int | None:
    """Remove ``segments/<generation>[.tmp]`` of a checkpoint that failed before MANIFEST.json named
    it. Returns the manifest's generation when it did name it (only the steps after it failed),
    else None."""
    try:
        manifest = read_json(directory / "MANIFEST.json")
    except Exception:  # cannot tell what is published: leave the files to the next open
        return None
    if manifest is not None and int(manifest["generation"]) >= generation:
        return int(manifest["generation"])
    for name in (f"{generation}.tmp", str(generation)):
        shutil.rmtree(directory / "segments" / name, ignore_errors=True)
    return None


def remove_unreferenced(directory: Path, keep: set[str]) -> None:
    """Delete segment directories not named in ``keep`` (old generations, unfinished merges)."""
    segments = directory / "segments"
    if not segments.is_dir():
        return
    for path in segments.iterdir():
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def files(directory: Path) -> list[tuple[Path, int]]:
    """(path, size) of every regular file under ``directory``; files that vanish meanwhile are skipped."""
    out: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return out
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                out += files(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        except OSError:
            continue
    return out


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class CheckpointMixin:
    """When and how a ``Shard`` (index/shard/core.py) checkpoints: by itself once enough log
    accumulated (``_maybe_checkpoint``), on ``flush``, and after a SPANN merge. A mixin, not an
    object: a checkpoint takes the shard's gate, merge, flush and apply locks, its sequencer,
    failure state, indexes and log, so an object would need the shard's internals everywhere."""

    @property
    def needs_checkpoint(self: Shard) -> bool:
        """Writes were logged (or replayed) since the last checkpoint."""
        return self._dirty_since is not None

    def _maybe_checkpoint(self: Shard) -> None:
        # Bytes logged since the last checkpoint, not the log's size: the active WAL
        # segment is never deleted, so the size alone never falls below the threshold.
        # The age bound keeps a slow trickle of writes from growing the replay for ever.
        now = time.monotonic()
        if self._dirty_since is None:
            self._dirty_since = now
        too_old = now - self._dirty_since >= self.policy.checkpoint_interval_s
        if self._checkpointing.is_set() or (self._logged_bytes < self.policy.checkpoint_log_bytes and not too_old):
            return
        self._checkpointing.set()

        def run() -> None:
            try:
                if not self._disk.failed and not self._gate.closed:
                    self.flush()
            except BraidError:
                if not self._gate.closed:  # refused by a close that started meanwhile: nothing to do
                    log.exception("shard %d: background checkpoint failed", self.number)
            except Exception:  # a failed background checkpoint leaves the log intact
                log.exception("shard %d: background checkpoint failed", self.number)
            finally:
                self._checkpointing.clear()

        threading.Thread(target=run, name=f"braid-checkpoint-{self.number}", daemon=True).start()

    def flush(self: Shard) -> None:
        """Checkpoint: save every index into a new segment generation, publish it, trim the WAL.

        A running SPANN merge is published first (the checkpoint waits for it).
        """
        with self._gate:
            with self.merger.idle(), self._flush_lock:
                self._checkpoint_or_fail()
            self.merger.maybe_start()  # one that came due while the checkpoint held merges off

    def _publish_merge(self: Shard, swap: Callable[[], None]) -> None:
        """Swap a merged SPANN segment in and checkpoint, so the manifest names it."""
        with self._flush_lock:
            if self._disk.failed:
                raise self._disk.refusal()
            with self._lock.write():
                swap()
            self._checkpoint_or_fail()

    def snapshot(self: Shard, dest: Path) -> dict[str, int]:
        """Checkpoint, then lay the published files into ``dest`` (index/snapshot.py) before any
        write lands or tantivy commits again. Returns the shard's entry of the snapshot manifest.
        Searches go on; writes wait for the checkpoint, as they do for any."""
        captured: dict[str, int] = {}

        def capture(generation: int, wal_seq: int, next_label: int) -> None:
            referenced: set[str] = set()
            for strand in self._spann_strands().values():
                referenced |= strand.referenced()
            capture_shard(self.directory, generation, referenced, dest)
            captured.update(
                shard=self.number,
                wal_seq=wal_seq,
                next_label=next_label,
                generation=generation,
                documents=self.labels.live_count,
            )

        with self._gate:
            with self.merger.idle(), self._flush_lock:
                try:
                    self._checkpoint_or_fail(capture)
                except BaseException:
                    shutil.rmtree(dest, ignore_errors=True)
                    raise
            self.merger.maybe_start()
        return captured

    def _checkpoint_or_fail(self: Shard, capture: Capture | None = None) -> None:
        """Checkpoint; a failed one (a full disk) removes the generation it did not publish, so a
        retry can complete it, and fails the shard only when tantivy's commit broke its writer."""
        started = time.perf_counter()
        dirty_since, logged = self._dirty_since, self._logged_bytes
        generation = self._generation
        try:
            self._checkpoint(capture)
            self.stats.checkpoints.record("checkpoint", "ok", time.perf_counter() - started)
        except BaseException as err:  # incl. tantivy's PanicException
            self.stats.checkpoints.record("checkpoint", "failed", time.perf_counter() - started)
            # Judged before the unpublished files go: removing them frees the space that ran out.
            disk_full = not isinstance(err, BraidError) and self._disk.disk_full(err)
            # _checkpoint advances _generation only after the manifest
            published = discard_unpublished(self.directory, self._generation + 1)
            if published is not None:  # published; only the steps after it failed
                self._generation = published
            if self._generation == generation:  # not published: the log still needs a checkpoint
                self._logged_bytes += logged
                if dirty_since is not None and (self._dirty_since is None or dirty_since < self._dirty_since):
                    self._dirty_since = dirty_since
            if self.text is not None and self.text.broken is not None:
                self._disk.fail(f"tantivy commit in a checkpoint failed: {err}", err)
                raise self._disk.refusal() from err
            if disk_full:
                raise DiskFull(f"disk full: shard {self.number}: checkpoint failed, nothing changed: {err}") from err
            raise

    def _checkpoint(self: Shard, capture: Capture | None = None) -> None:
        """The checkpoint itself (caller holds the flush lock and no SPANN merge is running).
        ``capture`` (a snapshot) runs once the manifest is published, before any write lands
        or tantivy commits again."""
        assert self.wal is not None
        with self._apply_lock:  # no write lands meanwhile; searches go on (HNSW strands snapshot their parts)
            if self._disk.failed:
                raise self._disk.refusal()
            sequencer = self._sequencer
            wal_seq = sequencer.applied_seq
            self._logged_bytes = 0
            self._dirty_since = None
            generation = self._generation + 1
            write_generation(self.directory / "segments", generation, self.indexes)
            with contextlib.ExitStack() as held:
                if self.text is not None:
                    held.enter_context(sequencer.commit_lock)
                    self.text.commit()
                    sequencer.committed_seq = max(sequencer.committed_seq, wal_seq)
                    if capture is None:  # a plain checkpoint lets writers commit tantivy again at once
                        held.close()
                write_manifest(
                    self.directory,
                    self._version,
                    generation,
                    wal_seq,
                    self.labels.size,
                    self.wal.record_crc(wal_seq),  # lets recovery check the log agrees on where replay starts
                )
                self._generation = generation
                if capture is not None:
                    capture(generation, wal_seq, self.labels.size)
            self._remove_unreferenced()
            self.wal.truncate_prefix(wal_seq)
