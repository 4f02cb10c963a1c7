"""Whether a shard takes writes and serves reads: failed, read-only after a full disk, unrecovered.

``DiskState`` owns that state (why writes stopped, whether a full disk caused it, why
recovery did not finish), the refusals it answers, and when a reopen is due; the shard
(index/shard/core.py) does the reopening itself, since it rebuilds every index.

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
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ..diskspace import FreeSpace, is_disk_full
from ..errors import BraidError, DiskFull, Unavailable
from ..locks import Gate

if TYPE_CHECKING:
    from .core import Shard

log = logging.getLogger("braid.shard")

REOPEN_BACKOFF_S = 1.0  # a shard read-only after a full disk tries to reopen at most this often
# What recovery builds: the attributes ``_reopen`` takes from a freshly recovered shard (and
# the sequencer's counters, ``Sequencer.adopt``). Everything else in __init__ (locks, gate,
# merger, policy, failure state) stays.
_RECOVERED_STATE = (
    "_logged_bytes",
    "_dirty_since",
    "_generation",
    "indexes",
    "wal",
    "_replayed_whole",
)


class DiskState:
    """A shard's failure state. ``failed`` and ``failed_disk_full`` change under ``cond``, the
    sequencer's condition (index/shard/sequencer.py): failing wakes every writer waiting its
    turn there."""

    def __init__(self, number: int, directory: Path, space: FreeSpace, cond: threading.Condition) -> None:
        self.number = number
        self.directory = directory
        self.space = space
        self._cond = cond
        self.failed: str | None = None
        self.failed_disk_full = False  # failed was caused by a full disk: a write reopens the shard
        # Why recovery did not finish (replay stopped part way): set, reads are refused with it, since
        # memory holds only part of the log; a reopen that recovers the whole log clears it.
        self.unrecovered: str | None = None
        self._healing = threading.Event()  # a heal_in_background thread runs
        self._next_reopen = 0.0  # time.monotonic() before which no reopen is tried again

    def fail(self, reason: str, err: BaseException | None = None) -> None:
        """Stop taking writes (the first reason wins) and wake every writer waiting its turn.

        A full disk (``err`` says ENOSPC/EDQUOT) makes the shard read-only until a write finds
        room again and reopens it; anything else (an fsync failure included) until a restart.
        Never call it holding the commit lock or the shard's lock (writers wait on those
        while holding the sequencer's condition).
        """
        with self._cond:
            if self.failed is None:
                self.failed = reason
                self.failed_disk_full = err is not None and self.disk_full(err)
            self._cond.notify_all()

    def fail_held(self, reason: str, err: BaseException) -> None:
        """A write's step failed after its record was logged (caller holds the condition):
        this reason replaces any earlier one."""
        self.failed = reason
        self.failed_disk_full = self.disk_full(err)

    def stop(self, reason: str) -> None:
        """Fail for a reason no free space cures (only a restart does)."""
        with self._cond:
            self.failed, self.failed_disk_full = reason, False

    def recovered(self) -> None:
        """A reopen replayed the whole log: writes are taken again."""
        with self._cond:
            self.failed, self.failed_disk_full = None, False
            self._cond.notify_all()

    def disk_full(self, err: BaseException) -> bool:
        """Whether ``err`` says the disk is full, or (a foreign error that does not say why, such
        as tantivy's "index writer was killed") the disk is full now. Braid's own errors
        (DataLoss, ...) say why: a corrupt log on a full disk is still corrupt."""
        if is_disk_full(err):
            return True
        return not isinstance(err, BraidError) and self.space.exhausted()

    def refusal(self) -> BraidError:
        """The error a write to this failed shard gets."""
        if self.failed_disk_full:
            return DiskFull(
                f"disk full: shard {self.number} under {self.directory} is read-only ({self.failed}); "
                "writes resume when space is freed"
            )
        return Unavailable(f"shard {self.number}: {self.failed}")

    def read_problem(self) -> str | None:
        """Why reads are refused now (the Unavailable they get), or None when the shard serves its
        data: recovery did not finish (the disk filled while it replayed the log). Cheap."""
        reason = self.unrecovered
        if reason is None:
            return None
        full = " (disk full: " if self.failed_disk_full else " ("
        return (
            f"shard {self.number} under {self.directory} is not serving: {reason}{full}"
            f"{self.space.reading()} bytes free); it recovers by itself once there is room"
        )

    def write_problem(self, gate: Gate) -> str | None:
        """Why writes are refused now (the message they get), or None when they are accepted.

        Cheap (a cached free-space reading), so a health check may call it often.
        """
        if gate.closed:
            return str(gate.error())
        if self.failed:
            return str(self.refusal())
        return self.space.problem()

    def opened_despite(
        self, err: BaseException, usable: bool, replayed_whole: bool, release: Callable[[], None]
    ) -> None:
        """Recovery failed. When a full disk stopped it after the whole log was replayed (only
        tantivy's closing commit failed: every acknowledged local write was committed there
        before its acknowledgement; a follower's replay must be committed too, the shard's
        ``_recover``), the shard opens read-only: reads see every write, the first write or heal
        once there is room reopens it. When a full disk stopped it before, memory holds
        part of the log at most: the shard opens unrecovered, every read refused (Unavailable,
        ``read_problem``), until a reopen with room recovers the whole log. Otherwise it lets
        go of the shard's files (``release``) and raises. ``usable``: the log was opened, and
        tantivy where the schema has text."""
        disk_full = self.disk_full(err)
        if usable and disk_full and replayed_whole:
            log.warning("shard %d (%s): opened read-only, the disk is full: %s", self.number, self.directory, err)
            self.fail(f"recovery could not write: {err}", err)
            return
        if disk_full:
            self.unrecovered = f"recovery stopped part way through its log: {err}"
            log.warning(
                "shard %d (%s): not serving: a full disk stopped recovery (%d bytes free); it retries once "
                "there is room: %s",
                self.number,
                self.directory,
                self.space.reading(),
                err,
            )
            self.fail(f"recovery could not finish: {err}", err)
            return
        release()
        if disk_full and not isinstance(err, BraidError):
            raise DiskFull(f"disk full: shard {self.number} under {self.directory} cannot open: {err}") from err
        raise err

    def reopen_due(self) -> bool:
        """Whether a read-only shard may try to reopen now: free space is above the floor (above
        diskspace.SLACK_BYTES when the floor is 0), and its last try is REOPEN_BACKOFF_S old."""
        return time.monotonic() >= self._next_reopen and not self.space.exhausted()

    def reopen_tried(self) -> None:
        """A reopen is being tried: the next waits REOPEN_BACKOFF_S."""
        self._next_reopen = time.monotonic() + REOPEN_BACKOFF_S

    def heal_in_background(self, heal: Callable[[], None], gate: Gate) -> None:
        """``heal`` on a thread of its own (one at a time, at most one try a REOPEN_BACKOFF_S), so
        the read that asks for it is answered at once."""
        if self._healing.is_set() or time.monotonic() < self._next_reopen or gate.closed:
            return
        self._healing.set()

        def run() -> None:
            try:
                heal()
            except BaseException as err:  # incl. tantivy's PanicException; the next read tries again
                log.warning("shard %d: healing failed: %s", self.number, err)
            finally:
                self._healing.clear()

        threading.Thread(target=run, name=f"braid-heal-{self.number}", daemon=True).start()


class ReopenMixin:
    """Reopening a read-only shard in place once there is room (a mixin of ``Shard``,
    index/shard/core.py): it drains the shard's writes, flushes and merges, recovers a fresh
    shard and swaps every index in, so an object would need the shard's internals everywhere."""

    def heal(self: Shard) -> None:
        """A watchdog's nudge: reopen now if a full disk made the shard read-only and room is back."""
        if self._disk.failed_disk_full:
            self._reopen_if_room()

    def _reopen_if_room(self: Shard) -> None:
        """Reopen a shard that a full disk made read-only, once free space is above the floor
        (above diskspace.SLACK_BYTES when the floor is 0).

        Called by a write before it takes the write path; at most one try a REOPEN_BACKOFF_S
        (``DiskState.reopen_due``). A failed try leaves the shard read-only (with the new reason
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

    def _reopen(self: Shard) -> None:
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
        fresh = type(self)(self.directory, self.schema, self.number, self.policy, self._log_opener)
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
