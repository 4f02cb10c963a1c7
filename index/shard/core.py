"""The ``Shard``: one shard's lifecycle (open, recover, close), local write path and reads,
tying together its indexes and label table (indexes.py, labels.py), write sequencer
(sequencer.py), failure state (health.py), recovery (recovery.py) and checkpoint files
(checkpoint.py); the follower path, the reopen and the checkpoint schedule are mixins
(follower.py, health.py, checkpoint.py). The package doc has the overview.

Lock order (outer first): the gate (every write and flush) -> the merge lock
(``merger.idle``) -> the flush lock -> the write path -> the sequencer's condition -> the
apply lock -> the shard's read/write lock (and the tantivy commit lock beside it).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import pacing, records
from ..diskspace import FreeSpace
from ..errors import BraidError, FailedPrecondition, Unavailable
from ..filters import Filter
from ..hnsw_strand import HnswStrand
from ..locks import Gate, ReadWriteLock
from ..log import LogOpener, ShardLog, open_local_wal, opens_external
from ..merger import Merger
from ..metadata import MetadataStore
from ..payload import PayloadStore
from ..policy import StoragePolicy
from ..records import DocumentWrite
from ..schema import Schema
from ..spann_strand import SpannStrand
from ..sparse import SparseIndex
from ..stats import ShardStats
from ..text import TextIndex
from ..wal import WalError, WriteAheadLog
from .checkpoint import CheckpointMixin, remove_unreferenced
from .follower import FollowerMixin
from .footprint import footprint
from .health import DiskState, ReopenMixin
from .indexes import Indexes
from .labels import LabelTable
from .ops import RECORD_OVERHEAD, Op, decode
from .reads import ReadsMixin
from .recovery import load_checkpoint, read_manifest, replay
from .sequencer import Sequencer

log = logging.getLogger("braid.shard")

# A shard checkpoints by itself (in the background) once its log grows past the policy's
# checkpoint_log_bytes, so restarts replay a bounded tail even if clients never call Flush.
DEFAULT_POLICY = StoragePolicy()


class Shard(ReadsMixin, FollowerMixin, ReopenMixin, CheckpointMixin):
    """One shard (the package doc), index/shard_api.py's ``ShardHandle`` in process; its reads,
    follower path, reopen and checkpoints are mixins (reads.py, follower.py, health.py,
    checkpoint.py), its state the objects ``__init__`` makes."""

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
        apply_cond = threading.Condition()
        self._space = FreeSpace(directory, policy.min_free_bytes)
        self._disk = DiskState(number, directory, self._space, apply_cond)
        self._sequencer = Sequencer(number, self._disk, self._gate, apply_cond)
        self._flush_lock = threading.Lock()
        # Applying a write takes this, then the write lock; a checkpoint takes only this, so it sees
        # no write land while it saves, yet searches (the read lock) go on beside it.
        self._apply_lock = threading.Lock()
        self.policy = policy
        self._checkpointing = threading.Event()
        self._logged_bytes = 0  # appended since the last checkpoint began
        self._dirty_since: float | None = None  # time.monotonic() of the first write since then
        self._generation = 0
        self.indexes = Indexes.empty(schema)
        self._log_opener: LogOpener = log_opener or open_local_wal
        self._external = opens_external(self._log_opener)  # a follower: apply_logged, not upsert
        self.wal: ShardLog | None = None
        # Writes hold this shared from their first check to their acknowledgement; reopening
        # after a full disk holds it exclusively, so no write straddles the swap.
        self._write_path = ReadWriteLock()
        self._replayed_whole = False  # _recover read and applied the log to its end
        self.stats = ShardStats()  # what operators see (index/stats.py); kept across a reopen
        self.merger = Merger(
            number, self._spann_strands, self._lock, directory / "segments", self._publish_merge, self.stats.merges
        )

    # Read through ``indexes`` each time, since a reopen swaps it whole: collections and the
    # servers use these names.

    @property
    def labels(self) -> LabelTable:
        return self.indexes.labels

    @property
    def payload(self) -> PayloadStore:
        return self.indexes.payload

    @property
    def metadata(self) -> MetadataStore:
        return self.indexes.metadata

    @property
    def dense(self) -> dict[str, HnswStrand | SpannStrand]:
        return self.indexes.dense

    @property
    def sparse(self) -> dict[str, SparseIndex]:
        return self.indexes.sparse

    @property
    def text(self) -> TextIndex | None:
        return self.indexes.text

    @property
    def _ids(self) -> dict[str, int]:
        """Document id -> label of every live document (the label table's; tests read it)."""
        return self.indexes.labels.ids

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
        one whose logs are external makes the shard a follower (see the package doc).
        """
        directory.mkdir(parents=True, exist_ok=True)
        shard = cls(directory, schema, number, policy, log_opener)
        try:
            shard._recover(progress)
        except BaseException as err:  # incl. tantivy's PanicException
            usable = shard.wal is not None and (shard.text is not None or not shard.schema.text_fields)
            shard._disk.opened_despite(err, usable, shard._replayed_whole, lambda: shard._release_files(commit=False))
        shard._start_strands()
        if shard._disk.unrecovered is None:  # else the checkpoint may not even be loaded: keep every file
            shard._remove_unreferenced()
        if not shard._disk.failed:
            shard.merger.maybe_start()
        return shard

    def _recover(self, progress: Callable[[int], None] | None = None) -> None:
        """Load the manifest's checkpoint, replay the log after it, commit tantivy (open and reopen)."""
        manifest = read_manifest(self.directory, local_log=not self._external)
        start_seq = 0
        if manifest is not None:
            self._generation = int(manifest["generation"])
            self.indexes = load_checkpoint(self.directory, manifest, self.schema)
            start_seq = int(manifest["wal_seq"])
        if self.schema.text_fields:
            self.indexes.text = TextIndex(self.directory / "text", self.schema.text_fields)
        checkpoint_crc = manifest.get("wal_crc32") if manifest is not None else None
        self.wal = self._log_opener(self.directory / "wal", start_seq + 1, checkpoint_crc)
        if self.wal.external != self._external:
            raise FailedPrecondition(
                f"shard {self.number}: its log opener said external={self._external}, "
                f"but the log it opened says external={self.wal.external}"
            )
        sequencer = self._sequencer
        sequencer.applied_seq = start_seq

        def apply(seq: int, op: Op) -> None:
            self.indexes.prepare(op)
            result = self.indexes.apply(op)
            if self._external:
                sequencer.remember(seq, result)
            sequencer.applied_seq = seq

        replay(self.wal, start_seq, self.number, apply, progress)
        # The replayed tail counts as unchecked-pointed log: the next checkpoint comes as soon as
        # it would have before the restart, and a clean shutdown checkpoints it.
        replayed_any = sequencer.applied_seq > start_seq
        # The whole log is in memory: enough to serve reads even if tantivy's commit below fails,
        # since a local write reaches tantivy's commit before it is acknowledged. Not a follower's:
        # its replay may hold records it never applied before, whose text no commit holds yet.
        self._replayed_whole = not (self._external and replayed_any and self.text is not None)
        self._logged_bytes = self.wal.size_bytes() if replayed_any else 0
        self._dirty_since = time.monotonic() if replayed_any else None
        sequencer.prepared_seq = sequencer.applied_seq
        # Documents of writes the log no longer holds (a damaged last record) leave tantivy too.
        stale = self.text is not None and self.text.remove_from(self.labels.next_label)
        if self.text is not None and (replayed_any or stale):  # nothing replayed: nothing to commit (nor disk)
            self.text.commit()
        self._replayed_whole = True
        sequencer.committed_seq = sequencer.applied_seq
        self._bind_stats()

    def _bind_stats(self) -> None:
        """Point the log and the SPANN strands recovery built at this shard's stats."""
        if isinstance(self.wal, WriteAheadLog):
            self.wal.stats = self.stats.wal
        for name, strand in self._spann_strands().items():
            strand.bind_stats(self.stats.spann_for(name))

    def _spann_strands(self) -> dict[str, SpannStrand]:
        return self.indexes.spann_strands()  # the merger calls it: always the current indexes

    def _hnsw_strands(self) -> list[HnswStrand]:
        return self.indexes.hnsw_strands()

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
        keep = {str(self._generation)}
        for strand in self._spann_strands().values():
            keep |= strand.referenced()
        remove_unreferenced(self.directory, keep)

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
        with self._sequencer.cond:
            self._sequencer.cond.notify_all()  # wait_applied callers get the close error now
        self.merger.close()
        for strand in self._hnsw_strands():  # before the lock: a maintainer may wait for it to swap
            strand.close()
        with self._flush_lock, self._lock.write():
            self._closed = True
            self._release_files(commit=not self._disk.failed)
            self._disk.failed = self._disk.failed or "shard is closed"

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
        """Log, then prepare, commit and apply in sequence order; see the package docstring."""
        if self._external:
            raise FailedPrecondition(f"shard {self.number} follows a replicated log; write through the router")
        with self._gate:  # a close waits for this write to finish, or refuses it before it starts
            if self._disk.failed_disk_full:
                self._reopen_if_room()
            with self._write_path.read():
                return self._write_admitted(kind, payload)

    def _write_admitted(self, kind: int, payload: bytes) -> int:
        if self._disk.failed:
            raise self._disk.refusal()
        assert self.wal is not None
        op = decode(kind, payload)
        if kind == records.UPSERT:  # deletes pass: they are tiny, and freeing space needs them
            self._space.check(len(payload) + RECORD_OVERHEAD)
            self._wait_for_room()
        try:
            seq = self.wal.append(kind, payload)  # DiskFull leaves the log as it was: the shard goes on
        except WalError as err:  # a failed roll's fsync, or an append that could not be undone
            self._disk.fail(f"write-ahead log unusable: {err}")
            raise Unavailable(f"shard {self.number}: write-ahead log unusable: {err}") from err
        self._logged_bytes += len(payload)
        try:
            self.wal.sync(seq)
        except (OSError, BraidError) as err:
            # The log refuses further writes after a failed fsync (the kernel may have
            # dropped the pages); the shard stops too, and a restart recovers from disk.
            self._disk.fail(f"write-ahead log fsync failed: {err}")
            raise Unavailable(f"shard {self.number}: write-ahead log fsync failed: {err}") from err
        self._sequencer.in_order(seq, "prepared_seq", lambda: self.indexes.prepare(op))
        self._sequencer.commit_text(seq, self.text)
        result = self._sequencer.in_order(seq, "applied_seq", lambda: self._apply_locked(op))
        self._maybe_checkpoint()
        self.merger.maybe_start()
        return result

    def _apply_locked(self, op: Op) -> int:
        with self._apply_lock, self._lock.write():
            result = self.indexes.apply(op)
            self._count_written(op, result)
            return result

    def _count_written(self, op: Op, result: int) -> None:
        """A live write's documents, for the ingest-rate metric (recovery's replay is not counted)."""
        if op.kind == records.UPSERT:
            self.stats.count_written("upsert", len(op.docs))
        else:
            self.stats.count_written("delete", result)

    def read_problem(self) -> str | None:
        """Why reads are refused now (the Unavailable they get), or None when the shard serves its
        data: recovery did not finish (the disk filled while it replayed the log). Cheap."""
        return self._disk.read_problem()

    def write_problem(self) -> str | None:
        """Why writes are refused now (the message they get), or None when they are accepted.

        Cheap (a cached free-space reading), so a health check may call it often.
        """
        return self._disk.write_problem(self._gate)

    # ----------------------------------------------------------------- queries

    def read(self) -> _ReadGuard:
        """Context manager: hold the shard's read lock while searching; raises the close error once closed."""
        return self._read_guard

    @property
    def live_count(self) -> int:
        return self.labels.live_count

    def allowed(self, flt: Filter | None) -> tuple[np.ndarray, int]:
        """Mask of live labels passing the filter, and how many there are (call under read())."""
        return self.indexes.allowed_count(flt)

    def ids_of(self, labels: np.ndarray) -> list[str]:
        return self.labels.ids_of(labels)

    def has_vector(self, field: str, label: int) -> bool:
        return self.dense[field].has(label)

    def label_of(self, doc_id: str) -> int | None:
        return self.labels.label_of(doc_id)

    def count(self, flt: Filter | None) -> int:
        with self.read():
            return self.allowed(flt)[1]

    def footprint(self) -> dict[tuple[str, str], list[int]]:
        """{(field, index): [estimated memory bytes, disk bytes]} of this shard, for operators
        (index/shard/footprint.py). No lock is taken: the numbers may be a write behind."""
        return footprint(self.directory, self._generation, self.indexes)


class _ReadGuard:
    """The shard's read lock, refusing with the close error once the shard is closed (a plain
    class, like index/locks.py's guards: every search takes it)."""

    __slots__ = ("_shard",)

    def __init__(self, shard: Shard) -> None:
        self._shard = shard

    def __enter__(self) -> None:
        shard = self._shard
        pacing.READS.stamp()
        shard._lock.acquire_read()
        if shard._closed:  # close sets it under the write lock: no reader sees a half-closed shard
            shard._lock.release_read()
            raise shard._gate.error()
        if shard._disk.unrecovered is not None:  # memory holds part of the log at most: never answer from it
            shard._lock.release_read()
            # a follower may get no write to heal it: a read asks too
            shard._disk.heal_in_background(shard.heal, shard._gate)
            raise Unavailable(shard.read_problem())

    def __exit__(self, *exc: object) -> None:
        self._shard._lock.release_read()
