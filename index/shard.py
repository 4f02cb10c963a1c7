"""One shard: a write-ahead log, a manifest, and the in-memory indexes it recovers.

The log is a ``ShardLog`` (index/log.py), opened by the ``log_opener`` given to ``open``:
by default the local write-ahead log under ``wal/``. A follower shard (an external log, such
as a replicated one in cluster mode) refuses the local writes (FailedPrecondition) and takes
records already durable in its log through ``apply_logged``, in seq order (seqs increase but
may skip numbers; re-delivered ones are skipped); ``wait_applied`` and ``result_of`` tell a
writer when its record is applied and what it did. Its manifest's ``wal_seq`` is the last
seq of the external log that the checkpoint covers, and ``wal/`` is the external log's to use.

Directory layout::

    MANIFEST.json         {"format": 2, "braid_version", "generation", "wal_seq", "next_label",
                           "wal_crc32", "crc32"}, replaced by atomic rename
    wal/                  write-ahead log segments (index/wal.py)
    segments/<gen>/       checkpoint of generation <gen>: ids.json (live labels, their ids, and
                          per dense field the labels holding a vector),
                          payload columns, metadata.bin (index/metadata.py), <field>.hnsw, <field>.sparse.* files,
                          <field>.strand.json for SPANN fields (index/spann_strand.py),
                          CHECKSUMS (size and crc32 of each of them, index/checksums.py)
    segments/spann-<field>-<id>/  a sealed SPANN segment (index/spann.py), named by the
                          generations that use it; merges build new ones (index/merger.py)
    text/                 tantivy index (its own commits; replay onto it is idempotent)

Documents are stored as versions. Every upsert gives the document a fresh
integer label; the previous version's label is marked dead in every strand at
the same moment (under the write lock), so a search never sees two versions
of one id. ``alive`` (a bool mask over labels) is the single source of truth
for visibility that every strand consults.

Write path (per operation), each step in sequence order across concurrent writers:
[an upsert waits, holding no lock, while an HNSW field's background builds are far behind]
-> encode -> WAL append -> group fsync -> prepare (hand out labels, stage new versions
in tantivy, the payload columns and the dense vectors, still invisible) -> group tantivy
commit -> apply under the apply lock and the write lock (the new versions become alive
and the old ones dead in every strand at once; an HNSW field only copies vectors into its
growing block; old versions leave tantivy at a later commit) -> acknowledge.
A checkpoint holds the apply lock (no write lands while it saves), not the read lock:
searches go on beside it.
Close: refuse new writes, flushes and reads with the close error (NotFound for a deleted
collection, Unavailable at shutdown) -> wait for the writes and flushes already admitted ->
stop merges and the HNSW fields' background builds -> close tantivy, the WAL and the SPANN
strands under the write lock.
Recovery: load the manifest's checkpoint, replay WAL records after its
``wal_seq`` (the WAL itself truncates a torn last record), commit tantivy (only if
something was replayed), remove segment directories the manifest does not name (an
interrupted merge's). A follower replays what its external log's ``read_from(wal_seq)``
yields, the same way (it may yield nothing); so does its reopen after a full disk.

Checksums (format 2; format 1 manifests, written before, still open unchecked): the
manifest carries its own ``crc32`` (index/manifest.py) and ``wal_crc32``, the stored CRC
of WAL record ``wal_seq`` (absent when ``wal_seq`` is 0). Before anything is parsed,
recovery checks the manifest, that ``segments/<generation>/`` exists, every file there
against its CHECKSUMS (so hnswlib never reads a corrupt file), that the log reaches
``wal_seq`` and that its record ``wal_seq`` has ``wal_crc32`` (index/wal.py), and
tantivy's file footers (index/text.py); any mismatch is DataLoss naming the file.

A full disk (ENOSPC/EDQUOT) is an ordinary error, answered DiskFull (RESOURCE_EXHAUSTED):
- below the floor (free < min_free_bytes + the batch, index/diskspace.py) an upsert is
  refused before it is logged; nothing changes;
- a failed WAL append leaves the log as it was (index/wal.py); nothing changes;
- a failure after the record is logged (tantivy commit, apply) makes the shard read-only:
  every waiting writer is woken and refused, reads go on against memory. A failed
  checkpoint removes its unpublished generation and leaves the shard writable, unless
  its tantivy commit failed (a broken tantivy writer, index/text.py), and merges give their
  work back (index/merger.py). An fsync failure is Unavailable and needs a restart, since
  the kernel may have dropped the pages;
- a read-only shard reopens in place on the first write that finds free space above the
  floor (at most one try a second): wait for writes, flushes and merges to drain (the
  write path lock, the flush lock, the merge lock) -> close tantivy without committing ->
  recover a fresh shard from the last checkpoint and the log, as ``open`` does, while
  searches use the old state -> swap its state in under the write lock. A write answered
  "disk full" after its record was logged is then applied (so it may appear after all);
  retrying it is safe, because upsert replaces by id and deletes are idempotent;
- ``open`` on a full disk does not fail: when the whole log was replayed (only tantivy's
  closing commit failed) the shard opens read-only; when the disk stopped the replay part
  way, it opens *unrecovered*: every read is refused (Unavailable, ``read_problem``: memory
  holds part of the log at most, and an answer from it would hide acknowledged writes) until
  a reopen (``heal`` or a write, once there is room) recovers the whole log. ``close`` never
  needs disk (a tantivy commit that cannot succeed is skipped or rolled back, and logged),
  so deleting a collection always frees its space and shutdown is bounded.

A checkpoint never publishes a file a full disk cut short: each file is written under a
temporary name, fsynced and read back (index/durable.py; hnswlib's files, whose writer
reports no error, are checked by structure, index/hnswfile.py) before CHECKSUMS is computed
and the generation renamed into place; a failed checkpoint leaves the previous generation
and the whole log in force.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import durable, records
from .checksums import verify_directory, write_checksums
from .diskspace import FreeSpace, is_disk_full
from .errors import BraidError, DataLoss, DiskFull, FailedPrecondition, Unavailable
from .filters import Filter
from .hnsw_strand import HnswStrand
from .locks import Gate, ReadWriteLock
from .log import LogOpener, ShardLog, open_local_wal, opens_external
from .manifest import fsync_dir, load_json, read_json, write_json_atomic
from .merger import Merger
from .metadata import FILE as METADATA_FILE
from .metadata import MetadataStore
from .payload import PayloadStore
from .policy import StoragePolicy
from .records import DocumentWrite
from .schema import DenseFieldSpec, DenseIndexType, Schema
from .spann_strand import SpannStrand
from .sparse import SparseIndex
from .stats import ShardStats
from .text import WRITER_HEAP_BYTES, TextIndex
from .wal import WalError, WriteAheadLog

log = logging.getLogger("braid.shard")

FORMAT_VERSION = 2  # 2: the manifest carries crc32 and wal_crc32, a generation carries CHECKSUMS
READ_FORMATS = (1, 2)
_INITIAL_LABELS = 1024
# A shard checkpoints by itself (in the background) once its log grows past the policy's
# checkpoint_log_bytes, so restarts replay a bounded tail even if clients never call Flush.
DEFAULT_POLICY = StoragePolicy()
RECORD_OVERHEAD = 17  # a WAL record's header bytes (index/wal.py)
PROGRESS_STEP_BYTES = 1 << 20  # report replay progress every MiB
REOPEN_BACKOFF_S = 1.0  # a shard read-only after a full disk tries to reopen at most this often
RESULTS_KEPT = 4096  # a follower keeps the results of this many of the last applied records (result_of)
# What recovery builds: the attributes ``_reopen`` takes from a freshly recovered shard.
# Everything else in __init__ (locks, gate, merger, policy, failure state) stays.
_RECOVERED_STATE = (
    "_logged_bytes",
    "_dirty_since",
    "_ids",
    "_label_ids",
    "_alive",
    "_next_label",
    "_size",
    "_generation",
    "payload",
    "metadata",
    "dense",
    "sparse",
    "text",
    "wal",
    "_prepared_seq",
    "_applied_seq",
    "_committed_seq",
    "_replayed_whole",
)


class Shard:
    def __init__(
        self,
        directory: Path,
        schema: Schema,
        number: int,
        policy: StoragePolicy = DEFAULT_POLICY,
        log_opener: LogOpener | None = None,
    ) -> None:
        from braid import __version__

        self.directory = directory
        self.schema = schema
        self.number = number
        self._version = __version__
        self._lock = ReadWriteLock()
        self._gate = Gate()  # every write and flush passes it; close waits for those inside
        self._closed = False  # set under the write lock by close: reads check it under the read lock
        self._read_guard = _ReadGuard(self)
        self._apply_cond = threading.Condition()
        self._commit_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        # Applying a write takes this, then the write lock; a checkpoint takes only this, so it sees
        # no write land while it saves, yet searches (the read lock) go on beside it.
        self._apply_lock = threading.Lock()
        self._failed: str | None = None
        self.policy = policy
        self._checkpointing = threading.Event()
        self._logged_bytes = 0  # appended since the last checkpoint began
        self._dirty_since: float | None = None  # time.monotonic() of the first write since then
        self._ids: dict[str, int] = {}
        self._label_ids: dict[int, str] = {}
        self._alive = np.zeros(_INITIAL_LABELS, dtype=bool)
        self._next_label = 0  # next label to hand out (advanced when a write is prepared)
        self._size = 0  # labels covered by applied writes: the range searches look at
        self._generation = 0
        self.payload = PayloadStore(schema.payload_fields)
        self.metadata = MetadataStore()
        self.dense: dict[str, HnswStrand | SpannStrand] = {f.name: _new_dense(f) for f in schema.dense_fields}
        self.sparse = {f.name: SparseIndex(f.name) for f in schema.sparse_fields}
        self.text: TextIndex | None = None
        self._log_opener: LogOpener = log_opener or open_local_wal
        self._external = opens_external(self._log_opener)  # a follower: apply_logged, not upsert
        self.wal: ShardLog | None = None
        self._results: OrderedDict[int, int] = OrderedDict()  # a follower's last applied seqs -> result
        self._prepared_seq = 0
        self._applied_seq = 0
        self._committed_seq = 0
        # Writes hold this shared from their first check to their acknowledgement; reopening
        # after a full disk holds it exclusively, so no write straddles the swap.
        self._write_path = ReadWriteLock()
        self._failed_disk_full = False  # _failed was caused by a full disk: a write reopens the shard
        # Why recovery did not finish (replay stopped part way): set, reads are refused with it, since
        # memory holds only part of the log; a reopen that recovers the whole log clears it.
        self._unrecovered: str | None = None
        self._replayed_whole = False  # _recover read and applied the log to its end
        self._healing = threading.Event()  # a _heal_in_background thread runs
        self._next_reopen = 0.0  # time.monotonic() before which no reopen is tried again
        self._space = FreeSpace(directory, policy.min_free_bytes)
        self.stats = ShardStats()  # what operators see (index/stats.py); kept across a reopen
        self.merger = Merger(
            number, self._spann_strands, self._lock, directory / "segments", self._publish_merge, self.stats.merges
        )

    # ---------------------------------------------------------------- lifecycle

    @classmethod
    def open(
        cls,
        directory: Path,
        schema: Schema,
        number: int,
        policy: StoragePolicy = DEFAULT_POLICY,
        progress: Callable[[int], None] | None = None,
        log_opener: LogOpener | None = None,
    ) -> Shard:
        """Open (or create) the shard and recover: checkpoint + WAL replay.

        ``progress`` is called with the byte count of each stretch of log replayed.
        ``log_opener`` opens the log (index/log.py; default: the local write-ahead log);
        one whose logs are external makes the shard a follower (see the module doc).
        """
        directory.mkdir(parents=True, exist_ok=True)
        shard = cls(directory, schema, number, policy, log_opener)
        try:
            shard._recover(progress)
        except BaseException as err:  # incl. tantivy's PanicException
            shard._open_read_only_or_raise(err)
        shard._start_strands()
        if shard._unrecovered is None:  # else the checkpoint may not even be loaded: keep every file
            shard._remove_unreferenced()
        if not shard._failed:
            shard.merger.maybe_start()
        return shard

    def _recover(self, progress: Callable[[int], None] | None = None) -> None:
        """Load the manifest's checkpoint, replay the log after it, commit tantivy (open and reopen)."""
        manifest = read_manifest(self.directory, local_log=not self._external)
        start_seq = 0
        if manifest is not None:
            self._load_checkpoint(manifest)
            start_seq = int(manifest["wal_seq"])
        if self.schema.text_fields:
            self.text = TextIndex(self.directory / "text", self.schema.text_fields)
        checkpoint_crc = manifest.get("wal_crc32") if manifest is not None else None
        self.wal = self._log_opener(self.directory / "wal", start_seq + 1, checkpoint_crc)
        if self.wal.external != self._external:
            raise FailedPrecondition(
                f"shard {self.number}: its log opener said external={self._external}, "
                f"but the log it opened says external={self.wal.external}"
            )
        replayed = 0
        self._applied_seq = start_seq
        for seq, kind, payload in self.wal.read_from(start_seq):
            if seq <= self._applied_seq:  # never from the local WAL; an external log's promise
                raise DataLoss(
                    f"shard {self.number}: log record seq {seq} follows seq {self._applied_seq} in replay: "
                    "seqs must increase"
                )
            op = _decode(kind, payload)
            self._prepare(op)
            result = self._apply(op)
            if self._external:
                self._remember(seq, result)
            self._applied_seq = seq
            replayed += len(payload) + RECORD_OVERHEAD
            if progress is not None and replayed >= PROGRESS_STEP_BYTES:
                progress(replayed)
                replayed = 0
        if progress is not None and replayed:
            progress(replayed)
        # The replayed tail counts as unchecked-pointed log: the next checkpoint comes as soon as
        # it would have before the restart, and a clean shutdown checkpoints it.
        replayed_any = self._applied_seq > start_seq
        # The whole log is in memory: enough to serve reads even if tantivy's commit below fails,
        # since a local write reaches tantivy's commit before it is acknowledged. Not a follower's:
        # its replay may hold records it never applied before, whose text no commit holds yet.
        self._replayed_whole = not (self._external and replayed_any and self.text is not None)
        self._logged_bytes = self.wal.size_bytes() if replayed_any else 0
        self._dirty_since = time.monotonic() if replayed_any else None
        self._prepared_seq = self._applied_seq
        # Documents of writes the log no longer holds (a damaged last record) leave tantivy too.
        stale = self.text is not None and self.text.remove_from(self._next_label)
        if self.text is not None and (replayed_any or stale):  # nothing replayed: nothing to commit (nor disk)
            self.text.commit()
        self._replayed_whole = True
        self._committed_seq = self._applied_seq
        self._bind_stats()

    def _bind_stats(self) -> None:
        """Point the log and the SPANN strands recovery built at this shard's stats."""
        if isinstance(self.wal, WriteAheadLog):
            self.wal.stats = self.stats.wal
        for name, strand in self._spann_strands().items():
            strand.bind_stats(self.stats.spann_for(name))

    def _open_read_only_or_raise(self, err: BaseException) -> None:
        """Recovery failed. When a full disk stopped it after the whole log was replayed (only
        tantivy's closing commit failed: every acknowledged local write was committed there
        before its acknowledgement; a follower's replay must be committed too, ``_recover``),
        the shard opens read-only: reads see every write, the first write or heal once there
        is room reopens it. When a full disk stopped it before, memory holds
        part of the log at most: the shard opens unrecovered, every read refused (Unavailable,
        ``read_problem``), until a reopen with room recovers the whole log. Otherwise it lets
        go of its files and raises."""
        usable = self.wal is not None and (self.text is not None or not self.schema.text_fields)
        disk_full = self._disk_full(err)
        if usable and disk_full and self._replayed_whole:
            log.warning("shard %d (%s): opened read-only, the disk is full: %s", self.number, self.directory, err)
            self._fail(f"recovery could not write: {err}", err)
            return
        if disk_full:
            self._unrecovered = f"recovery stopped part way through its log: {err}"
            log.warning(
                "shard %d (%s): not serving: a full disk stopped recovery (%d bytes free); it retries once "
                "there is room: %s",
                self.number,
                self.directory,
                self._space.reading(),
                err,
            )
            self._fail(f"recovery could not finish: {err}", err)
            return
        self._release_files(commit=False)
        if disk_full and not isinstance(err, BraidError):
            raise DiskFull(f"disk full: shard {self.number} under {self.directory} cannot open: {err}") from err
        raise err

    def _spann_strands(self) -> dict[str, SpannStrand]:
        return {name: index for name, index in self.dense.items() if isinstance(index, SpannStrand)}

    def _hnsw_strands(self) -> list[HnswStrand]:
        return [index for index in self.dense.values() if isinstance(index, HnswStrand)]

    def _start_strands(self) -> None:
        """Recovery merged in place; from now on HNSW fields merge in the background (index/hnsw_strand.py)."""
        for strand in self._hnsw_strands():
            strand.start(self._lock, self.stats.merges)

    def _wait_for_room(self) -> None:
        """Hold a write back (no lock held) while an HNSW field's maintainer is far behind."""
        for strand in self._hnsw_strands():
            strand.wait_for_room()

    def hnsw_parts(self) -> dict[str, dict[str, int]]:
        """Each HNSW field's graph count and rows by part (``HnswStrand.segments``), for operators. No lock."""
        return {name: index.segments() for name, index in list(self.dense.items()) if isinstance(index, HnswStrand)}

    def wait_merged(self, timeout_s: float, settled: bool = False) -> bool:
        """Whether every HNSW field sealed its frozen rows into graphs (and, with ``settled``, no
        merge is due or running) within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        return all(
            strand.wait_merged(max(0.0, deadline - time.monotonic()), settled) for strand in self._hnsw_strands()
        )

    def _remove_unreferenced(self) -> None:
        """Delete segment directories the current generation does not use (old ones, unfinished merges)."""
        segments = self.directory / "segments"
        if not segments.is_dir():
            return
        keep = {str(self._generation)}
        for strand in self._spann_strands().values():
            keep |= strand.referenced()
        for path in segments.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def _load_checkpoint(self, manifest: dict[str, Any]) -> None:
        """Load the checkpoint ``read_manifest`` checked, once its files pass their CHECKSUMS."""
        segment = self.directory / "segments" / str(int(manifest["generation"]))
        verify_directory(segment, required=manifest["format"] >= 2)
        try:
            self._load_generation(manifest, segment)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError, UnicodeDecodeError) as err:
            # Only reachable for a format 1 generation (no CHECKSUMS) or a bug: never a bare traceback.
            raise DataLoss(f"{segment}: cannot load checkpoint generation: {type(err).__name__}: {err}") from err

    def _load_generation(self, manifest: dict[str, Any], segment: Path) -> None:
        self._generation = int(manifest["generation"])
        self._next_label = self._size = int(manifest["next_label"])
        self._grow(self._size)
        live = json.loads((segment / "ids.json").read_text())
        for label, doc_id in zip(live["labels"], live["ids"], strict=True):
            self._ids[doc_id] = label
            self._label_ids[label] = doc_id
            self._alive[label] = True
        self.payload = PayloadStore.load(segment, self.schema.payload_fields)
        self.metadata = MetadataStore.load(segment)
        for spec in self.schema.dense_fields:
            present = live.get("has_vector", {}).get(spec.name, [])
            if spec.index is DenseIndexType.SPANN:
                self.dense[spec.name] = SpannStrand.load(segment, self.directory / "segments", spec, present)
            else:
                self.dense[spec.name] = HnswStrand.load(segment, spec, present)
        for spec in self.schema.sparse_fields:
            self.sparse[spec.name] = SparseIndex.load(segment, spec.name)

    def close(self, error: BraidError | None = None) -> None:
        """Close once every write and flush in progress has finished; a second close does nothing.

        From the moment close starts, writes, flushes and reads raise ``error`` (default:
        Unavailable "shard N is closed"; a collection passes NotFound when it is deleted), so an
        operation racing the close either completes before it or is refused whole. It never
        needs disk and never raises for I/O (``_release_files``): a read-only shard skips the
        tantivy commit, so deleting a collection on a full disk frees its space.
        """
        if not self._gate.close(error or Unavailable(f"shard {self.number} is closed")):
            return
        with self._apply_cond:
            self._apply_cond.notify_all()  # wait_applied callers get the close error now
        self.merger.close()
        for strand in self._hnsw_strands():  # before the lock: a maintainer may wait for it to swap
            strand.close()
        with self._flush_lock, self._lock.write():
            self._closed = True
            self._release_files(commit=not self._failed)
            self._failed = self._failed or "shard is closed"

    def _release_files(self, commit: bool) -> None:
        """Close tantivy, the WAL and the SPANN strands without ever needing disk: tantivy commits
        only when ``commit`` (a read-only shard's writer may be broken) and rolls back if that
        fails. Failures are logged, not raised, so deleting a collection and shutting down
        always finish; the log holds whatever tantivy did not commit, and replay restores it."""
        parts: list[tuple[str, Callable[[], None]]] = []
        if self.text is not None:
            parts.append(("tantivy", functools.partial(self.text.close, commit)))
        if self.wal is not None:
            parts.append(("write-ahead log", self.wal.close))
        parts += [(f"SPANN field {name}", strand.close) for name, strand in self._spann_strands().items()]
        for what, close in parts:
            try:
                close()
            except BaseException as err:  # incl. tantivy's PanicException
                log.warning("shard %d: closing its %s failed (the log keeps every write): %s", self.number, what, err)

    # ------------------------------------------------------------------ writes

    def upsert(self, docs: list[DocumentWrite]) -> int:
        """Durably insert or replace documents (validated by the caller). Returns the count."""
        latest = {doc.id: doc for doc in docs}  # a repeated id in one batch: the last one wins
        batch = list(latest.values())
        self._write(records.UPSERT, records.encode_upsert(batch))
        return len(batch)

    def delete_ids(self, ids: list[str]) -> int:
        return self._write(records.DELETE_IDS, records.encode_delete_ids(ids))

    def delete_filter(self, flt: Filter) -> int:
        return self._write(records.DELETE_FILTER, records.encode_delete_filter(flt))

    def _write(self, kind: int, payload: bytes) -> int:
        """Log, then prepare, commit and apply in sequence order; see the module docstring."""
        if self._external:
            raise FailedPrecondition(f"shard {self.number} follows a replicated log; write through the router")
        with self._gate:  # a close waits for this write to finish, or refuses it before it starts
            if self._failed_disk_full:
                self._reopen_if_room()
            with self._write_path.read():
                return self._write_admitted(kind, payload)

    def _write_admitted(self, kind: int, payload: bytes) -> int:
        if self._failed:
            raise self._refusal()
        assert self.wal is not None
        op = _decode(kind, payload)
        if kind == records.UPSERT:  # deletes pass: they are tiny, and freeing space needs them
            self._space.check(len(payload) + RECORD_OVERHEAD)
            self._wait_for_room()
        try:
            seq = self.wal.append(kind, payload)  # DiskFull leaves the log as it was: the shard goes on
        except WalError as err:  # a failed roll's fsync, or an append that could not be undone
            self._fail(f"write-ahead log unusable: {err}")
            raise Unavailable(f"shard {self.number}: write-ahead log unusable: {err}") from err
        self._logged_bytes += len(payload)
        try:
            self.wal.sync(seq)
        except (OSError, BraidError) as err:
            # The log refuses further writes after a failed fsync (the kernel may have
            # dropped the pages); the shard stops too, and a restart recovers from disk.
            self._fail(f"write-ahead log fsync failed: {err}")
            raise Unavailable(f"shard {self.number}: write-ahead log fsync failed: {err}") from err
        self._in_order(seq, "_prepared_seq", lambda: self._prepare(op))
        self._commit_text(seq)
        result = self._in_order(seq, "_applied_seq", lambda: self._apply_locked(op))
        self._maybe_checkpoint()
        self.merger.maybe_start()
        return result

    @property
    def needs_checkpoint(self) -> bool:
        """Writes were logged (or replayed) since the last checkpoint."""
        return self._dirty_since is not None

    def _maybe_checkpoint(self) -> None:
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
                if not self._failed and not self._gate.closed:
                    self.flush()
            except BraidError:
                if not self._gate.closed:  # refused by a close that started meanwhile: nothing to do
                    log.exception("shard %d: background checkpoint failed", self.number)
            except Exception:  # a failed background checkpoint leaves the log intact
                log.exception("shard %d: background checkpoint failed", self.number)
            finally:
                self._checkpointing.clear()

        threading.Thread(target=run, name=f"braid-checkpoint-{self.number}", daemon=True).start()

    def _in_order(self, seq: int, counter: str, step: Callable[[], int | None]) -> int:
        """Run one write's step after the same step of every earlier write, then advance the counter."""
        with self._apply_cond:
            while getattr(self, counter) != seq - 1 and not self._failed:
                self._apply_cond.wait()
            if self._failed:
                raise self._refusal()
            try:
                result = step()
                setattr(self, counter, seq)
            except BaseException as err:  # incl. tantivy's PanicException, so later writers never wait forever
                # The record is durable but could not be applied: memory no longer
                # matches the log, so stop taking writes; a reopen (or restart) replays it.
                self._failed = f"write {seq} failed in {counter.strip('_')}: {err!r}"
                self._failed_disk_full = self._disk_full(err)
                raise self._refusal() from err
            finally:
                self._apply_cond.notify_all()
        return result or 0

    def _apply_locked(self, op: _Op) -> int:
        with self._apply_lock, self._lock.write():
            result = self._apply(op)
            self._count_written(op, result)
            return result

    def _count_written(self, op: _Op, result: int) -> None:
        """A live write's documents, for the ingest-rate metric (recovery's replay is not counted)."""
        if op.kind == records.UPSERT:
            self.stats.count_written("upsert", len(op.docs))
        else:
            self.stats.count_written("delete", result)

    def _fail(self, reason: str, err: BaseException | None = None) -> None:
        """Stop taking writes (the first reason wins) and wake every writer waiting its turn.

        A full disk (``err`` says ENOSPC/EDQUOT) makes the shard read-only until a write finds
        room again and reopens it; anything else (an fsync failure included) until a restart.
        Never call it holding the commit lock or the shard's lock (writers wait on those
        while holding ``_apply_cond``).
        """
        with self._apply_cond:
            if self._failed is None:
                self._failed = reason
                self._failed_disk_full = err is not None and self._disk_full(err)
            self._apply_cond.notify_all()

    def _disk_full(self, err: BaseException) -> bool:
        """Whether ``err`` says the disk is full, or (a foreign error that does not say why, such
        as tantivy's "index writer was killed") the disk is full now. Braid's own errors
        (DataLoss, ...) say why: a corrupt log on a full disk is still corrupt."""
        if is_disk_full(err):
            return True
        return not isinstance(err, BraidError) and self._space.exhausted()

    def _refusal(self) -> BraidError:
        """The error a write to this failed shard gets."""
        if self._failed_disk_full:
            return DiskFull(
                f"disk full: shard {self.number} under {self.directory} is read-only ({self._failed}); "
                "writes resume when space is freed"
            )
        return Unavailable(f"shard {self.number}: {self._failed}")

    def read_problem(self) -> str | None:
        """Why reads are refused now (the Unavailable they get), or None when the shard serves its
        data: recovery did not finish (the disk filled while it replayed the log). Cheap."""
        reason = self._unrecovered
        if reason is None:
            return None
        full = " (disk full: " if self._failed_disk_full else " ("
        return (
            f"shard {self.number} under {self.directory} is not serving: {reason}{full}"
            f"{self._space.reading()} bytes free); it recovers by itself once there is room"
        )

    def write_problem(self) -> str | None:
        """Why writes are refused now (the message they get), or None when they are accepted.

        Cheap (a cached free-space reading), so a health check may call it often.
        """
        if self._gate.closed:
            return str(self._gate.error())
        if self._failed:
            return str(self._refusal())
        return self._space.problem()

    def _commit_text(self, seq: int) -> None:
        """Group commit of tantivy: one commit covers every write prepared before it started.

        A failed commit fails the shard (waking every writer waiting its turn) instead of
        leaving a sequence gap that later writers would wait on for ever.
        """
        if self.text is None:
            return
        with self._commit_lock:
            if self._committed_seq >= seq:
                return
            if self._failed:
                raise self._refusal()
            target = self._prepared_seq
            try:
                self.text.commit()
                self._committed_seq = target
                return
            except BaseException as err:  # incl. tantivy's PanicException
                failure = err
        self._fail(f"tantivy commit of write {seq} failed: {failure}", failure)  # outside the commit lock
        raise self._refusal() from failure

    # ------------------------------------------------ following an external log

    def apply_logged(self, records: list[tuple[int, int, bytes]]) -> list[int]:
        """Apply (seq, kind, payload) records already durable in the external log, in order.

        For a follower (module doc), from its one applier thread. Records with seq <=
        ``applied_seq`` are skipped (re-delivered after a reconnect) and give no result; the
        others must have increasing seqs (else DataLoss, nothing applied). Returns one result
        per applied record, what the write did: documents upserted, or deleted. The batch is
        prepared, committed to tantivy once and applied under one hold of the write lock.
        A failure after preparing starts fails the shard as on the local write path (a full
        disk: read-only, until ``heal`` or the next call reopens it and replays the external
        log from the checkpoint, these records included).
        """
        if not self._external:
            raise FailedPrecondition(f"shard {self.number} writes its own log; it does not follow one")
        with self._gate:
            if self._failed_disk_full:
                self._reopen_if_room()
            with self._write_path.read():
                return self._apply_logged_admitted(records)

    def _apply_logged_admitted(self, batch: list[tuple[int, int, bytes]]) -> list[int]:
        if self._failed:
            raise self._refusal()
        ops: list[tuple[int, _Op]] = []
        previous: int | None = None
        upserted_bytes = logged_bytes = 0
        for seq, kind, payload in batch:
            if previous is not None and seq <= previous:
                raise DataLoss(f"shard {self.number}: log record seq {seq} follows seq {previous}: seqs must increase")
            previous = seq
            if seq <= self._applied_seq:
                continue  # applied already: a re-delivery
            try:
                op = _decode(kind, payload)
            except BraidError:
                raise
            except Exception as err:  # a payload the log holds but no writer of ours encoded
                raise DataLoss(f"shard {self.number}: log record {seq} does not decode: {err!r}") from err
            ops.append((seq, op))
            logged_bytes += len(payload)
            if kind == records.UPSERT:
                upserted_bytes += len(payload) + RECORD_OVERHEAD
        if not ops:
            return []
        if upserted_bytes:  # below the floor: refused before anything changes (deletes pass, as locally)
            self._space.check(upserted_bytes)
            self._wait_for_room()
        last = ops[-1][0]
        self._logged_bytes += logged_bytes
        try:
            for _, op in ops:
                self._prepare(op)
        except BaseException as err:  # incl. tantivy's PanicException
            raise self._fail_logged(ops[0][0], last, "prepare", err) from err
        self._prepared_seq = last
        self._commit_text(last)  # compares seqs only: gaps between them are fine
        results: list[int] = []
        try:
            with self._apply_lock, self._lock.write():
                for seq, op in ops:
                    result = self._apply(op)
                    self._count_written(op, result)
                    results.append(result)
                    self._remember(seq, result)  # before applied_seq: a waiter that sees it finds the result
                    self._applied_seq = seq
        except BaseException as err:  # incl. tantivy's PanicException
            raise self._fail_logged(ops[0][0], last, "apply", err) from err
        with self._apply_cond:
            self._committed_seq = max(self._committed_seq, last)
            self._apply_cond.notify_all()
        self._maybe_checkpoint()
        self.merger.maybe_start()
        return results

    def _fail_logged(self, first: int, last: int, step: str, err: BaseException) -> BraidError:
        """Records durable in the external log could not be applied: memory no longer matches
        the log, so the shard stops (a full disk: read-only until a reopen replays them).
        Returns the refusal to raise."""
        self._fail(f"log records {first}..{last} failed in {step}: {err!r}", err)
        return self._refusal()

    def _remember(self, seq: int, result: int) -> None:
        self._results[seq] = result
        while len(self._results) > RESULTS_KEPT:
            self._results.popitem(last=False)

    @property
    def applied_seq(self) -> int:
        """The seq of the last log record applied (what a checkpoint records as ``wal_seq``)."""
        return self._applied_seq

    def result_of(self, seq: int) -> int | None:
        """What applying record ``seq`` did (documents upserted, or deleted), while it is one of
        the last RESULTS_KEPT records a follower applied (``apply_logged`` or replay); else None."""
        return self._results.get(seq)

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Block until record ``seq`` is applied (True) or ``timeout_s`` passes (False).

        Raises the close error once the shard is closing, and Unavailable while it is failed,
        quoting the write refusal ("disk full: ..."): the record is in the log, this shard
        cannot apply it now, and a reader (or a writer waiting for the apply) may ask another
        replica; RESOURCE_EXHAUSTED would read as a refused write.
        """
        deadline = time.monotonic() + timeout_s
        with self._apply_cond:
            while self._applied_seq < seq:
                if self._gate.closed:
                    raise self._gate.error()
                if self._failed:
                    raise Unavailable(
                        f"shard {self.number} cannot apply log record {seq} now (applied to "
                        f"{self._applied_seq}): {self._refusal()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._apply_cond.wait(remaining)
            return True

    # ------------------------------------------------------------- reopening

    def _heal_in_background(self) -> None:
        """``heal`` on a thread of its own (one at a time, at most one try a REOPEN_BACKOFF_S), so
        the read that asks for it is answered at once."""
        if self._healing.is_set() or time.monotonic() < self._next_reopen or self._gate.closed:
            return
        self._healing.set()

        def run() -> None:
            try:
                self.heal()
            except BaseException as err:  # incl. tantivy's PanicException; the next read tries again
                log.warning("shard %d: healing failed: %s", self.number, err)
            finally:
                self._healing.clear()

        threading.Thread(target=run, name=f"braid-heal-{self.number}", daemon=True).start()

    def heal(self) -> None:
        """A watchdog's nudge: reopen now if a full disk made the shard read-only and room is back."""
        if self._failed_disk_full:
            self._reopen_if_room()

    def _reopen_if_room(self) -> None:
        """Reopen a shard that a full disk made read-only, once free space is above the floor
        (above diskspace.SLACK_BYTES when the floor is 0).

        Called by a write before it takes the write path; at most one try a REOPEN_BACKOFF_S.
        A failed try leaves the shard read-only (with the new reason when it was not the disk).
        """
        if time.monotonic() < self._next_reopen or self._space.exhausted():
            return
        with self.merger.idle(), self._flush_lock, self._write_path.write():
            if not self._failed_disk_full or self._gate.closed:
                return  # another write reopened it meanwhile, or a close is waiting
            self._next_reopen = time.monotonic() + REOPEN_BACKOFF_S
            try:
                self._reopen()
            except BaseException as err:  # incl. tantivy's PanicException
                log.warning("shard %d: reopening after a full disk failed: %s", self.number, err)
                if not self._disk_full(err):
                    with self._apply_cond:
                        self._failed, self._failed_disk_full = f"reopening after a full disk failed: {err}", False
                    if self._unrecovered is not None:
                        self._unrecovered = f"recovery failed: {err}"
                return
        log.info("shard %d: reopened after a full disk; writes resume", self.number)

    def _reopen(self) -> None:
        """Rebuild the shard from its files as ``open`` does and swap the result in.

        Caller holds the merge lock, the flush lock and the write path exclusively, so no
        write, checkpoint or merge runs. tantivy is closed without a commit first (its
        writer may be broken; only one writer may exist), then a fresh shard recovers from
        the last checkpoint and the log, with no lock held: searches go on meanwhile against
        the old state (BM25 against tantivy's last commit). The swap itself happens under
        the write lock, so a search sees the old shard or the new one, never a mix.
        """
        if self.text is not None:
            self.text.close(commit=False)
        if self.wal is not None:
            try:
                self.wal.close()
            except BaseException as err:  # a failed fsync: the log is suspect, so only a restart may trust it
                with self._apply_cond:
                    self._failed, self._failed_disk_full = f"write-ahead log fsync failed: {err}", False
                raise
        fresh = Shard(self.directory, self.schema, self.number, self.policy, self._log_opener)
        fresh.stats = self.stats  # counters go on across the reopen
        try:
            fresh._recover()
        except BaseException:
            fresh._release_files(commit=False)
            raise
        old_strands = self._spann_strands()
        old_hnsw = self._hnsw_strands()
        with self._lock.write():
            for name in _RECOVERED_STATE:
                setattr(self, name, getattr(fresh, name))
            for seq, result in fresh._results.items():  # what the replay applied (a follower's)
                self._remember(seq, result)
            self._unrecovered = None  # the whole log is replayed: reads are answered again
        with self._apply_cond:
            self._failed, self._failed_disk_full = None, False
            self._apply_cond.notify_all()
        for strand in old_strands.values():
            strand.close()
        for old in old_hnsw:
            old.close()
        self._start_strands()
        self._remove_unreferenced()

    def _prepare(self, op: _Op) -> None:
        """Hand out labels and stage new versions in tantivy, the payload columns and the dense
        vectors; nothing becomes visible yet (the labels are past ``_size``).

        The new labels are not alive until ``_apply``, so searches skip them even after
        the tantivy commit; old versions leave tantivy only after apply hides them, so a
        document being replaced never drops out of BM25 results.
        """
        if op.kind != records.UPSERT:
            return
        op.first_label = first = self._next_label
        self._next_label += len(op.docs)
        if self.text is not None:
            for offset, doc in enumerate(op.docs):
                if doc.text:
                    self.text.add(first + offset, doc.text)
        # Staged here, outside the write lock, for labels no search looks at yet (past ``_size``):
        # the payload columns, and each dense field's vectors as one array in stored form.
        batches: dict[str, tuple[list[int], list[np.ndarray]]] = {}
        for offset, doc in enumerate(op.docs):
            self.payload.set(first + offset, doc.payload)
            self.metadata.set(first + offset, doc.metadata)
            for name, vector in doc.dense.items():
                labels, vectors = batches.setdefault(name, ([], []))
                labels.append(first + offset)
                vectors.append(vector)
        for name, (labels, vectors) in batches.items():
            index = self.dense[name]
            stacked = np.stack(vectors).astype(np.float32, copy=False)
            if isinstance(index, HnswStrand):
                stacked = index.stored_form(stacked)
            op.dense[name] = (np.asarray(labels, np.int64), stacked)

    def _apply(self, op: _Op) -> int:
        """Make a prepared write visible to every strand at once (caller holds the write lock)."""
        if op.kind == records.UPSERT:
            return self._apply_upsert(op)
        if op.kind == records.DELETE_IDS:
            return self._remove_ids(op.ids)
        mask = self._allowed(op.filter)
        return self._remove_ids([self._label_ids[int(label)] for label in np.flatnonzero(mask)])

    def _apply_upsert(self, op: _Op) -> int:
        docs, first = op.docs, op.first_label
        self._grow(first + len(docs))
        for offset, doc in enumerate(docs):
            label = first + offset
            old = self._ids.get(doc.id)
            if old is not None:
                self._remove_label(old)
            self._ids[doc.id] = label
            self._label_ids[label] = doc.id
            self._alive[label] = True
            for name, value in doc.sparse.items():
                index = self.sparse[name]
                keys = index.keys_for(
                    value.indices.tolist() if value.indices is not None else None, value.tokens, intern=True
                )
                index.add(label, keys, value.values)
        self._size = first + len(docs)
        for name, (labels, vectors) in op.dense.items():
            index = self.dense[name]
            if isinstance(index, HnswStrand):
                index.add(labels, vectors, stored=True)
            else:
                index.add(labels, vectors)
        return len(docs)

    def _remove_ids(self, ids: list[str]) -> int:
        removed = 0
        for doc_id in ids:
            label = self._ids.pop(doc_id, None)
            if label is not None:
                self._remove_label(label)
                removed += 1
        return removed

    def _remove_label(self, label: int) -> None:
        self._alive[label] = False
        self._label_ids.pop(label, None)
        self.metadata.remove(label)
        for index in self.dense.values():
            index.remove(label)
        for index in self.sparse.values():
            index.remove(label)
        if self.text is not None:
            self.text.remove(label)

    def _grow(self, size: int) -> None:
        capacity = len(self._alive)
        if size <= capacity:
            return
        while capacity < size:
            capacity *= 2
        self._alive = _resized(self._alive, capacity)

    # ----------------------------------------------------------------- queries

    def read(self) -> _ReadGuard:
        """Context manager: hold the shard's read lock while searching; raises the close error once closed."""
        return self._read_guard

    @property
    def live_count(self) -> int:
        return len(self._ids)

    def _allowed(self, flt: Filter | None) -> np.ndarray:
        size = self._size
        alive = self._alive[:size]
        if flt is None or flt.is_empty():
            return alive
        return self.payload.evaluate(flt, size, self.metadata) & alive

    def allowed(self, flt: Filter | None) -> tuple[np.ndarray, int]:
        """Mask of live labels passing the filter, and how many there are (call under read())."""
        mask = self._allowed(flt)
        return mask, int(np.count_nonzero(mask)) if flt is not None and not flt.is_empty() else self.live_count

    def ids_of(self, labels: np.ndarray) -> list[str]:
        label_ids = self._label_ids
        return [label_ids[label] for label in labels.tolist()]

    def has_vector(self, field: str, label: int) -> bool:
        return self.dense[field].has(label)

    def label_of(self, doc_id: str) -> int | None:
        return self._ids.get(doc_id)

    def count(self, flt: Filter | None) -> int:
        with self.read():
            return self.allowed(flt)[1]

    # ------------------------------------------------------------ footprint

    def footprint(self) -> dict[tuple[str, str], list[int]]:
        """{(field, index): [estimated memory bytes, disk bytes]} of this shard, for operators.

        index is hnsw, spann, sparse, payload (per field), bm25 (tantivy, every text field:
        field ""), ids (id maps, ids.json, the manifest), wal (field "") or other (leftovers
        of an interrupted checkpoint or merge). Memory is estimated from the structures'
        sizes (each index's ``memory_bytes``; tantivy: its writer's arena budget, since its
        segments are memory-mapped and live in the page cache, as do sealed SPANN lists);
        disk is the size of the files under the shard directory. No lock is taken: the
        numbers may be a write behind.
        """
        out: dict[tuple[str, str], list[int]] = {}

        def add(key: tuple[str, str], memory: int = 0, disk: int = 0) -> None:
            entry = out.setdefault(key, [0, 0])
            entry[0] += memory
            entry[1] += disk

        kinds: dict[str, str] = {}
        for name, dense in list(self.dense.items()):
            kinds[name] = "spann" if isinstance(dense, SpannStrand) else "hnsw"
            add((name, kinds[name]), dense.memory_bytes())
        for name, sparse in list(self.sparse.items()):
            kinds[name] = "sparse"
            add((name, "sparse"), sparse.memory_bytes())
        for name, nbytes in self.payload.memory_bytes().items():
            add((name, "payload"), nbytes)
        if len(self.metadata):
            add(("", "metadata"), self.metadata.memory_bytes())
        if self.text is not None:
            add(("", "bm25"), WRITER_HEAP_BYTES)
        add(("", "ids"), 200 * len(self._ids) + self._alive.nbytes)  # two dict entries and an id string a document
        for key, nbytes in self._disk_usage(kinds).items():
            add(key, disk=nbytes)
        return out

    def _disk_usage(self, kinds: dict[str, str]) -> dict[tuple[str, str], int]:
        """Bytes of every file under the shard directory, by (field, index) as in ``footprint``."""
        out: dict[tuple[str, str], int] = {}
        generation = str(self._generation)

        def key_of(top: str, parts: tuple[str, ...]) -> tuple[str, str]:
            if top == "wal":
                return "", "wal"
            if top == "text":
                return "", "bm25"
            if top != "segments" or len(parts) < 2:
                return "", "ids"  # MANIFEST.json
            directory, name = parts[0], parts[-1]
            if directory.startswith("spann-"):
                return directory[len("spann-") :].rpartition("-")[0], "spann"
            if directory != generation:
                return "", "other"
            if name == METADATA_FILE:
                return "", "metadata"
            if name == "payload.json":
                return "", "ids"  # the payload columns' metadata
            if name.startswith("payload-"):  # payload-<field>.<part>.npy
                return name[len("payload-") :].rpartition(".")[0].rpartition(".")[0], "payload"
            owner = name.split(".", 1)[0]
            if owner in kinds:
                return owner, kinds[owner]
            return "", "ids"  # ids.json, CHECKSUMS

        for path, size in _files(self.directory):
            parts = path.relative_to(self.directory).parts
            key = key_of(parts[0], parts[1:])
            out[key] = out.get(key, 0) + size
        return out

    # -------------------------------------------------------------- checkpoint

    def flush(self) -> None:
        """Checkpoint: save every index into a new segment generation, publish it, trim the WAL.

        A running SPANN merge is published first (the checkpoint waits for it).
        """
        with self._gate:
            with self.merger.idle(), self._flush_lock:
                self._checkpoint_or_fail()
            self.merger.maybe_start()  # one that came due while the checkpoint held merges off

    def _publish_merge(self, swap: Callable[[], None]) -> None:
        """Swap a merged SPANN segment in and checkpoint, so the manifest names it."""
        with self._flush_lock:
            if self._failed:
                raise self._refusal()
            with self._lock.write():
                swap()
            self._checkpoint_or_fail()

    def _checkpoint_or_fail(self) -> None:
        """Checkpoint; a failed one (a full disk) removes the generation it did not publish, so a
        retry can complete it, and fails the shard only when tantivy's commit broke its writer."""
        started = time.perf_counter()
        dirty_since, logged = self._dirty_since, self._logged_bytes
        generation = self._generation
        try:
            self._checkpoint()
            self.stats.checkpoints.record("checkpoint", "ok", time.perf_counter() - started)
        except BaseException as err:  # incl. tantivy's PanicException
            self.stats.checkpoints.record("checkpoint", "failed", time.perf_counter() - started)
            # Judged before the unpublished files go: removing them frees the space that ran out.
            disk_full = not isinstance(err, BraidError) and self._disk_full(err)
            self._discard_unpublished()
            if self._generation == generation:  # not published: the log still needs a checkpoint
                self._logged_bytes += logged
                if dirty_since is not None and (self._dirty_since is None or dirty_since < self._dirty_since):
                    self._dirty_since = dirty_since
            if self.text is not None and self.text.broken is not None:
                self._fail(f"tantivy commit in a checkpoint failed: {err}", err)
                raise self._refusal() from err
            if disk_full:
                raise DiskFull(f"disk full: shard {self.number}: checkpoint failed, nothing changed: {err}") from err
            raise

    def _discard_unpublished(self) -> None:
        """Remove ``segments/<gen>[.tmp]`` of a checkpoint that failed before MANIFEST.json named it."""
        generation = self._generation + 1  # _checkpoint advances _generation only after the manifest
        try:
            manifest = read_json(self.directory / "MANIFEST.json")
        except Exception:  # cannot tell what is published: leave the files to the next open
            return
        if manifest is not None and int(manifest["generation"]) >= generation:
            self._generation = int(manifest["generation"])  # published; only the steps after it failed
            return
        for name in (f"{generation}.tmp", str(generation)):
            shutil.rmtree(self.directory / "segments" / name, ignore_errors=True)

    def _checkpoint(self) -> None:
        """The checkpoint itself (caller holds the flush lock and no SPANN merge is running)."""
        assert self.wal is not None
        with self._apply_lock:  # no write lands meanwhile; searches go on (HNSW strands snapshot their parts)
            if self._failed:
                raise self._refusal()
            wal_seq = self._applied_seq
            self._logged_bytes = 0
            self._dirty_since = None
            generation = self._generation + 1
            segments = self.directory / "segments"
            staging = segments / f"{generation}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            live_labels = sorted(self._label_ids)
            ids = {
                "labels": live_labels,
                "ids": [self._label_ids[label] for label in live_labels],
                "has_vector": {name: index.present_labels().tolist() for name, index in self.dense.items()},
            }
            # Every file goes through a temporary name, is fsynced and checked by reading it back
            # (index/durable.py; hnswlib's by its structure, index/hnswfile.py), so a write a full
            # disk cut short fails the checkpoint here instead of being checksummed and published.
            durable.write_bytes(staging / "ids.json", json.dumps(ids, ensure_ascii=False).encode("utf-8"))
            self.payload.save(staging, self._size)  # a write being prepared may set labels past it
            self.metadata.save(staging, self._size)
            previous = segments / str(self._generation)  # unchanged HNSW graphs are linked from it
            for index in self.dense.values():
                if isinstance(index, HnswStrand):
                    index.save(staging, previous)
                else:
                    index.save(staging)
            for sparse in self.sparse.values():
                sparse.save(staging)
            write_checksums(staging)  # read back from the page cache; fsyncs the staging directory
            for path in staging.iterdir():
                _fsync_file(path)
            final = segments / str(generation)
            staging.rename(final)
            fsync_dir(segments)
            if self.text is not None:
                with self._commit_lock:
                    self.text.commit()
                    self._committed_seq = max(self._committed_seq, wal_seq)
            manifest = {
                "format": FORMAT_VERSION,
                "braid_version": self._version,
                "generation": generation,
                "wal_seq": wal_seq,
                # the label counter as of wal_seq: replay hands later writes the same labels
                "next_label": self._size,
            }
            wal_crc = self.wal.record_crc(wal_seq)  # lets recovery check the log agrees on where replay starts
            if wal_crc is not None:
                manifest["wal_crc32"] = wal_crc
            write_json_atomic(self.directory / "MANIFEST.json", manifest)
            self._generation = generation
            self._remove_unreferenced()
            self.wal.truncate_prefix(wal_seq)


def read_manifest(directory: Path, local_log: bool = True) -> dict[str, Any] | None:
    """A shard's MANIFEST.json, checked against its checksum and what it points at; None when absent.

    DataLoss naming the file: a bad checksum (or none in format 2), a field missing or of the
    wrong type, a generation whose directory is missing, a ``wal_seq`` with no log at all
    (only when ``local_log``: a follower's records live in its external log, not in ``wal/``).
    The files of the generation are checked later (``_load_checkpoint``), as is the log's
    agreement with ``wal_seq`` (index/wal.py).
    """
    path = directory / "MANIFEST.json"
    manifest, checked = load_json(path)
    if manifest is None:
        return None
    fmt = manifest.get("format")
    if fmt not in READ_FORMATS:
        raise DataLoss(f"{path}: unsupported format {fmt!r}; this version reads {READ_FORMATS}")
    if fmt >= 2 and not checked:
        raise DataLoss(f"{path}: a format {fmt} manifest without its crc32 checksum")
    for key in ("generation", "wal_seq", "next_label"):
        if type(manifest.get(key)) is not int or manifest[key] < 0:
            raise DataLoss(f"{path}: {key!r} is {manifest.get(key)!r}, expected an integer >= 0")
    if "wal_crc32" in manifest and type(manifest["wal_crc32"]) is not int:
        raise DataLoss(f"{path}: 'wal_crc32' is {manifest['wal_crc32']!r}, expected an integer")
    generation = directory / "segments" / str(manifest["generation"])
    if not generation.is_dir():
        raise DataLoss(f"{path}: generation {manifest['generation']} names {generation}, which is missing")
    wal = directory / "wal"
    if local_log and manifest["wal_seq"] > 0 and not (wal.is_dir() and any(p.suffix == ".wal" for p in wal.iterdir())):
        raise DataLoss(f"{path}: wal_seq is {manifest['wal_seq']} but {wal} holds no log: records may be lost")
    return manifest


class _ReadGuard:
    """The shard's read lock, refusing with the close error once the shard is closed (a plain
    class, like index/locks.py's guards: every search takes it)."""

    __slots__ = ("_shard",)

    def __init__(self, shard: Shard) -> None:
        self._shard = shard

    def __enter__(self) -> None:
        shard = self._shard
        shard._lock.acquire_read()
        if shard._closed:  # close sets it under the write lock: no reader sees a half-closed shard
            shard._lock.release_read()
            raise shard._gate.error()
        if shard._unrecovered is not None:  # memory holds part of the log at most: never answer from it
            shard._lock.release_read()
            shard._heal_in_background()  # a follower may get no write to heal it: a read asks too
            raise Unavailable(shard.read_problem())

    def __exit__(self, *exc: object) -> None:
        self._shard._lock.release_read()


@dataclass
class _Op:
    """A decoded write; ``first_label`` is handed out when it is prepared."""

    kind: int
    docs: list[DocumentWrite] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    filter: Filter | None = None
    first_label: int = -1
    dense: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # staged by _prepare


def _decode(kind: int, payload: bytes) -> _Op:
    if kind == records.UPSERT:
        return _Op(kind, docs=records.decode_upsert(payload))
    if kind == records.DELETE_IDS:
        return _Op(kind, ids=records.decode_delete_ids(payload))
    if kind == records.DELETE_FILTER:
        return _Op(kind, filter=records.decode_delete_filter(payload))
    raise DataLoss(f"unknown write-ahead log record kind {kind}")


def _new_dense(spec: DenseFieldSpec) -> HnswStrand | SpannStrand:
    return SpannStrand(spec) if spec.index is DenseIndexType.SPANN else HnswStrand(spec)


def _resized(array: np.ndarray, capacity: int) -> np.ndarray:
    grown = np.zeros(capacity, dtype=array.dtype)
    grown[: len(array)] = array
    return grown


def _files(directory: Path) -> list[tuple[Path, int]]:
    """(path, size) of every regular file under ``directory``; files that vanish meanwhile are skipped."""
    out: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return out
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                out += _files(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        except OSError:
            continue
    return out


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
