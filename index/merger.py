"""Background merges of a shard's SPANN strands: one at a time, published by a checkpoint.

A merge (index/spann_strand.py) is a seal (the growing segment, frozen, becomes a new
sealed segment) or a compaction (several sealed segments' live vectors become one).
Its snapshot is taken under the shard's write lock; for the first merge of a run that
happens in the writer's thread (``maybe_start``), so a growing segment that reached
its threshold is frozen before the write returns. The new segment is built into
``segments/spann-<field>-<id>/`` with no lock held (searches read the old segments
and the frozen one; writes go to the new growing one), then the shard runs the swap
under its write lock followed by a checkpoint: the new MANIFEST.json names a
generation whose ``<field>.strand.json`` lists the new set of sealed segments. Until
that manifest is in place the old manifest and the WAL are the truth, so a crash at
any moment of a merge loses nothing acknowledged; the unfinished segment directory is
removed when the shard opens (or at its next checkpoint), and so are the inputs of a
published compaction.

The merge lock is held from the start of a merge until it is published; a
checkpoint takes it first (``idle``), so a checkpoint never sees a frozen segment
and waits for a running merge. A failed seal gives the frozen vectors back to the
growing segment and the strand waits for twice as many before trying again; after a
failed compaction the strand compacts again only after its next successful seal.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .locks import ReadWriteLock
from .pacing import background_priority
from .spann_strand import MergeJob, SpannStrand
from .stats import JobStats

log = logging.getLogger("braid.merge")


class Merger:
    def __init__(
        self,
        number: int,
        strands: Callable[[], dict[str, SpannStrand]],
        lock: ReadWriteLock,
        segments: Path,
        publish: Callable[[Callable[[], None]], None],
        stats: JobStats | None = None,
    ) -> None:
        """``strands()`` gives the shard's SPANN strands by field; ``publish(swap)`` runs ``swap``
        under the shard's write lock, then checkpoints. ``stats`` counts merges by kind and outcome."""
        self._number = number
        self._strands = strands
        self._lock = lock
        self._segments = segments
        self._publish = publish
        self.stats = stats if stats is not None else JobStats()
        self._merge_lock = threading.Lock()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def idle(self) -> Iterator[None]:
        """Hold off merges (waiting for a running one to be published) inside the block."""
        with self._merge_lock:
            yield

    def maybe_start(self) -> None:
        """Start a background merge when a strand is due and none is running.

        The merge's snapshot (a seal freezes the growing segment) is taken here, in the
        caller's thread, so the growing segment stops taking writes at once.
        """
        if self._closing.is_set() or not any(s.wants_merge() for s in self._strands().values()):
            return
        if not self._merge_lock.acquire(blocking=False):
            return
        try:
            first = self._begin()
            if first is None:
                self._merge_lock.release()
                return
            self._thread = threading.Thread(
                target=self._run, args=(first,), name=f"braid-merge-{self._number}", daemon=True
            )
        except BaseException:
            self._merge_lock.release()
            raise
        try:
            self._thread.start()
        except BaseException:
            with self._lock.write():
                first[1].abort_merge(first[2])
            self._merge_lock.release()
            raise

    def _begin(self) -> tuple[str, SpannStrand, MergeJob] | None:
        """Snapshot the first due merge of any strand (write lock); None when none is due."""
        with self._lock.write():
            for name, strand in self._strands().items():
                directory = self._segments / f"spann-{name}-{uuid.uuid4().hex[:12]}"
                job = strand.begin_merge(directory)
                if job is not None:
                    return name, strand, job
        return None

    def _run(self, first: tuple[str, SpannStrand, MergeJob]) -> None:
        background_priority()  # serving threads first (index/pacing.py)
        try:
            job: tuple[str, SpannStrand, MergeJob] | None = first
            while job is not None:
                self._merge(*job)
                job = None if self._closing.is_set() else self._begin()
        except Exception:
            log.exception("shard %d: merge failed", self._number)
        finally:
            self._merge_lock.release()

    def _merge(self, name: str, strand: SpannStrand, job: MergeJob) -> None:
        started = time.perf_counter()
        try:
            if self._closing.is_set():
                raise _Cancelled
            strand.build_merge(job)
            if self._closing.is_set():
                raise _Cancelled
        except BaseException as err:
            with self._lock.write():
                strand.abort_merge(job)
            shutil.rmtree(job.directory, ignore_errors=True)
            outcome = "cancelled" if isinstance(err, _Cancelled) else "failed"
            self.stats.record(job.kind, outcome, time.perf_counter() - started)
            if isinstance(err, _Cancelled):
                return
            raise
        # From here the new segment serves searches; if the checkpoint fails, a later one
        # publishes it (it is named by the strand, so cleanup keeps it).
        try:
            self._publish(lambda: strand.finish_merge(job))
        except BaseException:
            self.stats.record(job.kind, "failed", time.perf_counter() - started)
            raise
        self.stats.record(job.kind, "ok", time.perf_counter() - started)
        log.info(
            "shard %d: %s of field %s into %s: %d vectors from %d segments in %.2f s",
            self._number,
            job.kind,
            name,
            job.directory.name,
            0 if job.labels is None else len(job.labels),
            len(job.inputs),
            time.perf_counter() - started,
        )

    def close(self) -> None:
        """Stop merging: a running merge is abandoned (unless it is publishing) and joined."""
        self._closing.set()
        thread = self._thread
        if thread is not None:
            thread.join()


class _Cancelled(Exception):
    pass
