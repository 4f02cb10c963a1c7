"""The ``Shard``: one shard's write path, reads, close, reopen and checkpoints, tying together
its label table (labels.py), write sequencer (sequencer.py), failure state (health.py),
recovery (recovery.py) and checkpoint files (checkpoint.py); the package doc has the
overview.

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

from .. import records
from ..diskspace import FreeSpace
from ..errors import BraidError, DataLoss, DiskFull, FailedPrecondition, Unavailable
from ..filters import Filter
from ..hnsw_strand import HnswStrand
from ..locks import Gate, ReadWriteLock
from ..log import LogOpener, ShardLog, open_local_wal, opens_external
from ..merger import Merger
from ..metadata import MetadataStore
from ..payload import PayloadStore
from ..policy import StoragePolicy
from ..records import DocumentWrite
from ..schema import DenseFieldSpec, DenseIndexType, Schema
from ..spann_strand import SpannStrand
from ..sparse import SparseIndex
from ..stats import ShardStats
from ..text import TextIndex
from ..wal import WalError, WriteAheadLog
from . import checkpoint
from .footprint import footprint
from .health import DiskState
from .labels import LabelTable
from .ops import RECORD_OVERHEAD, Op, decode
from .recovery import load_checkpoint, read_manifest, replay
from .sequencer import Sequencer

log = logging.getLogger("braid.shard")

# A shard checkpoints by itself (in the background) once its log grows past the policy's
# checkpoint_log_bytes, so restarts replay a bounded tail even if clients never call Flush.
DEFAULT_POLICY = StoragePolicy()
# What recovery builds: the attributes ``_reopen`` takes from a freshly recovered shard (and
# the sequencer's counters, ``Sequencer.adopt``). Everything else in __init__ (locks, gate,
# merger, policy, failure state) stays.
_RECOVERED_STATE = (
    "_logged_bytes",
    "_dirty_since",
    "labels",
    "_generation",
    "payload",
    "metadata",
    "dense",
    "sparse",
    "text",
    "wal",
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
        self.labels = LabelTable()
        self._generation = 0
        self.payload = PayloadStore(schema.payload_fields)
        self.metadata = MetadataStore()
        self.dense: dict[str, HnswStrand | SpannStrand] = {f.name: _new_dense(f) for f in schema.dense_fields}
        self.sparse = {f.name: SparseIndex(f.name) for f in schema.sparse_fields}
        self.text: TextIndex | None = None
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
            loaded = load_checkpoint(self.directory, manifest, self.schema)
            self._generation, self.labels = loaded.generation, loaded.labels
            self.payload, self.metadata = loaded.payload, loaded.metadata
            self.dense, self.sparse = loaded.dense, loaded.sparse
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
        sequencer = self._sequencer
        sequencer.applied_seq = start_seq

        def apply(seq: int, op: Op) -> None:
            self._prepare(op)
            result = self._apply(op)
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
        if not (self.directory / "segments").is_dir():
            return
        keep = {str(self._generation)}
        for strand in self._spann_strands().values():
            keep |= strand.referenced()
        checkpoint.remove_unreferenced(self.directory, keep)

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
        self._sequencer.in_order(seq, "prepared_seq", lambda: self._prepare(op))
        self._sequencer.commit_text(seq, self.text)
        result = self._sequencer.in_order(seq, "applied_seq", lambda: self._apply_locked(op))
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

    def _apply_locked(self, op: Op) -> int:
        with self._apply_lock, self._lock.write():
            result = self._apply(op)
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

    # ------------------------------------------------ following an external log

    def apply_logged(self, records: list[tuple[int, int, bytes]]) -> list[int]:
        """Apply (seq, kind, payload) records already durable in the external log, in order.

        For a follower (package doc), from its one applier thread. Records with seq <=
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
            if self._disk.failed_disk_full:
                self._reopen_if_room()
            with self._write_path.read():
                return self._apply_logged_admitted(records)

    def _apply_logged_admitted(self, batch: list[tuple[int, int, bytes]]) -> list[int]:
        if self._disk.failed:
            raise self._disk.refusal()
        sequencer = self._sequencer
        ops: list[tuple[int, Op]] = []
        previous: int | None = None
        upserted_bytes = logged_bytes = 0
        for seq, kind, payload in batch:
            if previous is not None and seq <= previous:
                raise DataLoss(f"shard {self.number}: log record seq {seq} follows seq {previous}: seqs must increase")
            previous = seq
            if seq <= sequencer.applied_seq:
                continue  # applied already: a re-delivery
            try:
                op = decode(kind, payload)
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
        sequencer.prepared_seq = last
        sequencer.commit_text(last, self.text)  # compares seqs only: gaps between them are fine
        results: list[int] = []
        try:
            with self._apply_lock, self._lock.write():
                for seq, op in ops:
                    result = self._apply(op)
                    self._count_written(op, result)
                    results.append(result)
                    sequencer.remember(seq, result)  # before applied_seq: a waiter that sees it finds the result
                    sequencer.applied_seq = seq
        except BaseException as err:  # incl. tantivy's PanicException
            raise self._fail_logged(ops[0][0], last, "apply", err) from err
        with sequencer.cond:
            sequencer.committed_seq = max(sequencer.committed_seq, last)
            sequencer.cond.notify_all()
        self._maybe_checkpoint()
        self.merger.maybe_start()
        return results

    def _fail_logged(self, first: int, last: int, step: str, err: BaseException) -> BraidError:
        """Records durable in the external log could not be applied: memory no longer matches
        the log, so the shard stops (a full disk: read-only until a reopen replays them).
        Returns the refusal to raise."""
        self._disk.fail(f"log records {first}..{last} failed in {step}: {err!r}", err)
        return self._disk.refusal()

    @property
    def applied_seq(self) -> int:
        """The seq of the last log record applied (what a checkpoint records as ``wal_seq``)."""
        return self._sequencer.applied_seq

    def result_of(self, seq: int) -> int | None:
        """What applying record ``seq`` did (``Sequencer.result_of``); a follower's, else None."""
        return self._sequencer.result_of(seq)

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Block until record ``seq`` is applied (True) or ``timeout_s`` passes (False); raises the
        close error, or Unavailable while the shard is failed (``Sequencer.wait_applied``)."""
        return self._sequencer.wait_applied(seq, timeout_s)

    # ------------------------------------------------------------- reopening

    def heal(self) -> None:
        """A watchdog's nudge: reopen now if a full disk made the shard read-only and room is back."""
        if self._disk.failed_disk_full:
            self._reopen_if_room()

    def _reopen_if_room(self) -> None:
        """Reopen a shard that a full disk made read-only, once free space is above the floor
        (above diskspace.SLACK_BYTES when the floor is 0).

        Called by a write before it takes the write path; at most one try a REOPEN_BACKOFF_S
        (index/shard/health.py). A failed try leaves the shard read-only (with the new reason
        when it was not the disk).
        """
        disk = self._disk
        if not disk.reopen_due():
            return
        with self.merger.idle(), self._flush_lock, self._write_path.write():
            if not disk.failed_disk_full or self._gate.closed:
                return  # another write reopened it meanwhile, or a close is waiting
            disk.reopen_tried()
            try:
                self._reopen()
            except BaseException as err:  # incl. tantivy's PanicException
                log.warning("shard %d: reopening after a full disk failed: %s", self.number, err)
                if not disk.disk_full(err):
                    disk.stop(f"reopening after a full disk failed: {err}")
                    if disk.unrecovered is not None:
                        disk.unrecovered = f"recovery failed: {err}"
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
                self._disk.stop(f"write-ahead log fsync failed: {err}")
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
            self._sequencer.adopt(fresh._sequencer)
            self._disk.unrecovered = None  # the whole log is replayed: reads are answered again
        self._disk.recovered()
        for strand in old_strands.values():
            strand.close()
        for old in old_hnsw:
            old.close()
        self._start_strands()
        self._remove_unreferenced()

    # ------------------------------------------------- preparing and applying

    def _prepare(self, op: Op) -> None:
        """Hand out labels and stage new versions in tantivy, the payload columns and the dense
        vectors; nothing becomes visible yet (the labels are past ``labels.size``).

        The new labels are not alive until ``_apply``, so searches skip them even after
        the tantivy commit; old versions leave tantivy only after apply hides them, so a
        document being replaced never drops out of BM25 results.
        """
        if op.kind != records.UPSERT:
            return
        op.first_label = first = self.labels.hand_out(len(op.docs))
        if self.text is not None:
            for offset, doc in enumerate(op.docs):
                if doc.text:
                    self.text.add(first + offset, doc.text)
        # Staged here, outside the write lock, for labels no search looks at yet (past ``size``):
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

    def _apply(self, op: Op) -> int:
        """Make a prepared write visible to every strand at once (caller holds the write lock)."""
        if op.kind == records.UPSERT:
            return self._apply_upsert(op)
        if op.kind == records.DELETE_IDS:
            return self._remove_ids(op.ids)
        mask = self._allowed(op.filter)
        return self._remove_ids([self.labels.doc_id(int(label)) for label in np.flatnonzero(mask)])

    def _apply_upsert(self, op: Op) -> int:
        docs, first, table = op.docs, op.first_label, self.labels
        table.grow(first + len(docs))
        for offset, doc in enumerate(docs):
            label = first + offset
            old = table.label_of(doc.id)
            if old is not None:
                self._remove_label(old)
            table.assign(doc.id, label)
            for name, value in doc.sparse.items():
                index = self.sparse[name]
                keys = index.keys_for(
                    value.indices.tolist() if value.indices is not None else None, value.tokens, intern=True
                )
                index.add(label, keys, value.values)
        table.size = first + len(docs)
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
            label = self.labels.pop(doc_id)
            if label is not None:
                self._remove_label(label)
                removed += 1
        return removed

    def _remove_label(self, label: int) -> None:
        self.labels.kill(label)
        self.metadata.remove(label)
        for index in self.dense.values():
            index.remove(label)
        for index in self.sparse.values():
            index.remove(label)
        if self.text is not None:
            self.text.remove(label)

    # ----------------------------------------------------------------- queries

    def read(self) -> _ReadGuard:
        """Context manager: hold the shard's read lock while searching; raises the close error once closed."""
        return self._read_guard

    @property
    def live_count(self) -> int:
        return self.labels.live_count

    @property
    def _ids(self) -> dict[str, int]:
        """Document id -> label of every live document (the label table's; tests read it)."""
        return self.labels.ids

    def _allowed(self, flt: Filter | None) -> np.ndarray:
        size = self.labels.size
        alive = self.labels.alive[:size]
        if flt is None or flt.is_empty():
            return alive
        return self.payload.evaluate(flt, size, self.metadata) & alive

    def allowed(self, flt: Filter | None) -> tuple[np.ndarray, int]:
        """Mask of live labels passing the filter, and how many there are (call under read())."""
        mask = self._allowed(flt)
        return mask, int(np.count_nonzero(mask)) if flt is not None and not flt.is_empty() else self.live_count

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
        return footprint(
            self.directory,
            self._generation,
            self.labels,
            self.payload,
            self.metadata,
            self.dense,
            self.sparse,
            self.text,
        )

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
            if self._disk.failed:
                raise self._disk.refusal()
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
            disk_full = not isinstance(err, BraidError) and self._disk.disk_full(err)
            # _checkpoint advances _generation only after the manifest
            published = checkpoint.discard_unpublished(self.directory, self._generation + 1)
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

    def _checkpoint(self) -> None:
        """The checkpoint itself (caller holds the flush lock and no SPANN merge is running)."""
        assert self.wal is not None
        with self._apply_lock:  # no write lands meanwhile; searches go on (HNSW strands snapshot their parts)
            if self._disk.failed:
                raise self._disk.refusal()
            sequencer = self._sequencer
            wal_seq = sequencer.applied_seq
            self._logged_bytes = 0
            self._dirty_since = None
            generation = self._generation + 1
            segments = self.directory / "segments"
            checkpoint.write_generation(
                segments, generation, self.labels, self.payload, self.metadata, self.dense, self.sparse
            )
            if self.text is not None:
                with sequencer.commit_lock:
                    self.text.commit()
                    sequencer.committed_seq = max(sequencer.committed_seq, wal_seq)
            checkpoint.write_manifest(
                self.directory,
                self._version,
                generation,
                wal_seq,
                self.labels.size,
                self.wal.record_crc(wal_seq),  # lets recovery check the log agrees on where replay starts
            )
            self._generation = generation
            self._remove_unreferenced()
            self.wal.truncate_prefix(wal_seq)


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
        if shard._disk.unrecovered is not None:  # memory holds part of the log at most: never answer from it
            shard._lock.release_read()
            # a follower may get no write to heal it: a read asks too
            shard._disk.heal_in_background(shard.heal, shard._gate)
            raise Unavailable(shard.read_problem())

    def __exit__(self, *exc: object) -> None:
        self._shard._lock.release_read()


def _new_dense(spec: DenseFieldSpec) -> HnswStrand | SpannStrand:
    return SpannStrand(spec) if spec.index is DenseIndexType.SPANN else HnswStrand(spec)
