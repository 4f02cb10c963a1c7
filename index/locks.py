"""A writer-preferring readers-writer lock, and a gate that closing waits behind.

Searches hold the lock shared, so they run in parallel with each other; applying a
write to the in-memory indexes holds it exclusively for the few microseconds
that takes (fsync and tantivy commit happen outside it). The guards are plain
classes rather than generator context managers: a search takes the lock on
every request, so the few microseconds matter.
"""

from __future__ import annotations

import threading


class _ReadGuard:
    __slots__ = ("_lock",)

    def __init__(self, lock: ReadWriteLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_read()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_read()


class _WriteGuard:
    __slots__ = ("_lock",)

    def __init__(self, lock: ReadWriteLock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        self._lock.acquire_write()

    def __exit__(self, *exc: object) -> None:
        self._lock.release_write()


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0
        self._read_guard = _ReadGuard(self)
        self._write_guard = _WriteGuard(self)

    def read(self) -> _ReadGuard:
        return self._read_guard

    def write(self) -> _WriteGuard:
        return self._write_guard

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class Gate:
    """Admits operations until it is closed; closing waits for the admitted ones to finish.

    ``with gate:`` around an operation either admits it (and the close that follows waits
    for it) or raises a fresh copy of the error the gate was closed with. A counter rather
    than a lock: operations may nest, and the close never lets a new one in while it waits.
    """

    __slots__ = ("_active", "_cond", "_error")

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._active = 0
        self._error: Exception | None = None

    def __enter__(self) -> None:
        with self._cond:
            if self._error is not None:
                raise self.error()
            self._active += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._error is not None

    def error(self) -> Exception:
        """A new instance of the close error (one exception object is never raised in two threads)."""
        assert self._error is not None
        return type(self._error)(*self._error.args)

    def close(self, error: Exception) -> bool:
        """Refuse new operations with ``error`` (the first close's error wins), then wait for the
        admitted ones. Returns whether this was the first close. Never call it inside the gate."""
        with self._cond:
            first = self._error is None
            if first:
                self._error = error
            while self._active:
                self._cond.wait()
        return first
