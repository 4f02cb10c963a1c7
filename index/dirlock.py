"""The data directory's lock: one process serves a data directory at a time.

``<data_dir>/LOCK`` holds an exclusive ``flock`` for as long as a catalog has the directory
open, and the pid of its holder as text (for the error message only; the flock is the
lock, so a holder killed with -9 never leaves a stale lock). ``braid verify`` checks it
to refuse a directory that is being served.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from .errors import FailedPrecondition

LOCK_NAME = "LOCK"


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        data_dir.mkdir(parents=True, exist_ok=True)
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(self._fd)
            os.close(self._fd)
            self._fd = None
            raise FailedPrecondition(
                f"data directory {data_dir} is in use by another Braid process{holder}; stop it first"
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None


def held(data_dir: Path) -> bool:
    """Whether some process holds ``data_dir``'s lock now."""
    return flock_held(data_dir / LOCK_NAME)


def flock_held(path: Path) -> bool:
    """Whether some process holds an exclusive flock on ``path`` (ours, or tantivy's writer lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
