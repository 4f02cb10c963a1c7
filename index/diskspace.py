"""Free disk space: the floor a shard checks before it logs a write, and what "disk full" means.

The rule, per shard, for an upsert whose log record is ``b`` bytes::

    accept  iff  free >= min_free_bytes + b        free = statvfs.f_bavail * f_frsize

``f_bavail`` is what an unprivileged process may still write (root may dip into the
file system's reserved blocks, but Braid does not count on them). The floor keeps room
for what a full disk would otherwise block: checkpoints, merges and the files of a
collection being deleted. ``min_free_bytes = 0`` turns the check off; writes then meet
the file system's own ENOSPC, which index/shard/ also turns into "disk full".

"Disk full" is an error that says ENOSPC or EDQUOT (``is_disk_full``), or a failure that
does not say why while free space is below the floor, or below SLACK_BYTES when the floor
is 0 (``FreeSpace.exhausted``); a shard it made read-only reopens once that is no longer so.

statvfs costs a system call, so a reading is reused for ``CACHE_S``; meanwhile every
accepted batch is subtracted from it, so the estimate only errs towards refusing, and a
refusal is always confirmed by a fresh reading first.

Tests fake a full disk by replacing ``free_bytes`` (a module-level function, looked up on
every reading) rather than any of Braid's own code paths.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

from .errors import DiskFull

CACHE_S = 0.2
# Free space below which a failure that does not say why counts as a full disk when the floor is off.
SLACK_BYTES = 1 << 20
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# tantivy-py raises ValueError with the Rust io::Error's text, not an OSError.
_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "StorageFull", "Disk quota exceeded", "os error 122")


def free_bytes(directory: Path) -> int:
    """Bytes an unprivileged writer may still put on the file system holding ``directory``."""
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


def is_disk_full(err: BaseException | None) -> bool:
    """Whether ``err`` (or an error it was raised from) means the disk or the quota is full."""
    seen = 0
    while err is not None and seen < 16:
        if isinstance(err, DiskFull):
            return True
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(err)
        if any(marker in text for marker in _DISK_FULL_TEXTS):
            return True
        err = err.__cause__ or err.__context__
        seen += 1
    return False


class FreeSpace:
    """The free-space floor of one directory's file system, with a cached reading. Thread-safe."""

    def __init__(self, directory: Path, floor: int, max_age_s: float = CACHE_S) -> None:
        self.directory = directory
        self.floor = floor
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._free = 0
        self._read_at = float("-inf")  # time.monotonic() of the reading; never read yet

    def check(self, incoming: int) -> None:
        """Count ``incoming`` bytes as written, or raise DiskFull when they would cross the floor."""
        if self.floor <= 0:
            return
        with self._lock:
            free = self._estimate_locked(fresh=False)
            if free < self.floor + incoming:
                free = self._estimate_locked(fresh=True)  # refuse only on a fresh reading
                if free < self.floor + incoming:
                    raise DiskFull(self._message(free, incoming))
            self._free -= incoming

    def problem(self) -> str | None:
        """Why writes are refused now (the DiskFull message), or None; cheap enough for health checks."""
        if self.floor <= 0:
            return None
        with self._lock:
            free = self._estimate_locked(fresh=False)
        return self._message(free, 0) if free < self.floor else None

    def reading(self) -> int:
        """Free bytes now (a cached reading, at most ``CACHE_S`` old), for messages."""
        with self._lock:
            return max(self._estimate_locked(fresh=False), 0)

    def exhausted(self) -> bool:
        """A fresh reading is below the floor (below SLACK_BYTES when the check is off).

        What an error that does not say why most likely means: tantivy reports an indexing
        thread that hit ENOSPC only as "An index writer was killed" (tantivy-py 0.27).
        """
        with self._lock:
            return self._estimate_locked(fresh=True) < max(self.floor, SLACK_BYTES)

    def _estimate_locked(self, fresh: bool) -> int:
        now = time.monotonic()
        if fresh or now - self._read_at > self._max_age_s:
            try:
                self._free = free_bytes(self.directory)
            except OSError:  # cannot tell (the directory is going away): let the write meet the disk itself
                self._free = 1 << 62
            self._read_at = now
        return self._free

    def _message(self, free: int, incoming: int) -> str:
        batch = f" plus this batch's {incoming} bytes" if free >= self.floor else ""
        return (
            f"disk full: {max(free, 0)} bytes free under {self.directory}, below the floor of {self.floor} "
            f"(min_free_bytes){batch}; writes resume when space is freed"
        )
