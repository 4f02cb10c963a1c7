"""Background merges of a shard's SPANN strands: one at a time, published by a checkpoint.

A merge (index/spann_strand.py) freezes a field's growing segment under the shard's
write lock, builds a new sealed segment into ``segments/spann-<field>-<id>/`` with no
lock held (searches read the old sealed, frozen and new growing segments; writes go
to the new growing one), then hands the shard a swap to run under its write lock
followed by a checkpoint: the new MANIFEST.json names a generation whose
``<field>.strand.json`` names the new segment. Until that manifest is in place the
old manifest and the WAL are the truth, so a crash at any moment of a merge loses
nothing acknowledged; the unfinished segment directory is removed when the shard
opens (or at its next checkpoint).

The merge lock is held from the start of a merge until it is published; a
checkpoint takes it first (``idle``), so a checkpoint never sees a frozen segment
and waits for a running merge. A failed merge gives the frozen vectors back to the
growing segment and the strand waits for twice as many before trying again.
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
from .spann_strand import SpannStrand

log = logging.getLogger("braid.merge")


class Merger:
    def __init__(
        self,
        number: int,
        strands: Callable[[], dict[str, SpannStrand]],
        lock: ReadWriteLock,
        segments: Path,
        publish: Callable[[Callable[[], None]], None],
    ) -> None:
        """``strands()`` gives the shard's SPANN strands by field; ``publish(swap)`` runs ``swap``
        under the shard's write lock, then checkpoints."""
        self._number = number
        self._strands = strands
        self._lock = lock
        self._segments = segments
        self._publish = publish
        self._merge_lock = threading.Lock()
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def idle(self) -> Iterator[None]:
        """Hold off merges (waiting for a running one to be published) inside the block."""
        with self._merge_lock:
            yield

    def maybe_start(self) -> None:
        """Start a background merge when a strand is due and none is running."""
        if self._closing.is_set() or not any(s.wants_merge() for s in self._strands().values()):
            return
        if not self._merge_lock.acquire(blocking=False):
            return
        try:
            self._thread = threading.Thread(target=self._run, name=f"braid-merge-{self._number}", daemon=True)
            self._thread.start()
        except BaseException:
            self._merge_lock.release()
            raise

    def _run(self) -> None:
        try:
            while not self._closing.is_set():
                name = next((n for n, s in self._strands().items() if s.wants_merge()), None)
                if name is None:
                    return
                self._merge(name)
        except Exception:
            log.exception("shard %d: merge failed", self._number)
        finally:
            self._merge_lock.release()

    def _merge(self, name: str) -> None:
        strand = self._strands()[name]
        directory = self._segments / f"spann-{name}-{uuid.uuid4().hex[:12]}"
        started = time.perf_counter()
        with self._lock.write():
            job = strand.begin_merge(directory)
        try:
            if self._closing.is_set():
                raise _Cancelled
            strand.build_merge(job)
            if self._closing.is_set():
                raise _Cancelled
        except BaseException as err:
            with self._lock.write():
                strand.abort_merge(job)
            shutil.rmtree(directory, ignore_errors=True)
            if isinstance(err, _Cancelled):
                return
            raise
        # From here the new segment serves searches; if the checkpoint fails, a later one
        # publishes it (it is named by the strand, so cleanup keeps it).
        self._publish(lambda: strand.finish_merge(job))
        log.info(
            "shard %d: merged field %s into %s: %d vectors in %.2f s",
            self._number,
            name,
            directory.name,
            0 if job.labels is None else len(job.labels),
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
