"""Admission control: who gets a worker thread, and how many streams may be open.

The gRPC server runs on an asyncio event loop; everything that blocks (index work,
encoders) runs on ``workers`` threads owned here. A call first asks for admission:

- at most ``workers + max_queue`` calls may hold or wait for a worker; one more is
  refused with RESOURCE_EXHAUSTED and a ``grpc-retry-pushback-ms`` hint in the trailing
  metadata (the key gRPC's own client retry policy reads), instead of queueing without
  bound;
- a call whose deadline passes while it waits is dropped before it does any work;
- at most ``max_streams`` BulkUpsert streams may be open, ``max_streams_per_peer`` of
  them from one client address. A stream holds no worker while it waits for its next
  message, so idle streams never starve unary calls.

Health checks never come here: they answer on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from braid.index.errors import ResourceExhausted, Unavailable

T = TypeVar("T")
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


class Overloaded(ResourceExhausted):
    """Refused at admission; ``retry_after_ms`` is the hint sent to the client."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class TimedOut(Exception):
    """A deadline passed: the call's own while it waited for a worker, or a stream's idle timeout."""


_call_deadline = threading.local()


def call_deadline() -> float | None:
    """The time.monotonic() deadline of the call this worker thread is running (None: none set)."""
    return getattr(_call_deadline, "value", None)


@contextlib.contextmanager
def deadline_scope(deadline: float | None) -> Iterator[None]:
    """Within it, ``call_deadline`` on this thread is ``deadline``: work run on a thread other than
    an admitted worker (asyncio.to_thread) sees its call's deadline as a worker would."""
    _call_deadline.value = deadline
    try:
        yield
    finally:
        _call_deadline.value = None


def peer_host(peer: str) -> str:
    """The client address of a gRPC peer string, without the port: 'ipv4:10.0.0.7:5123' -> '10.0.0.7'."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")]
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    return peer


class Admission:
    def __init__(self, workers: int, max_queue: int, max_streams: int, max_streams_per_peer: int) -> None:
        self.workers = workers
        self.max_queue = max_queue
        self.max_streams = max_streams
        self.max_streams_per_peer = max_streams_per_peer
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="braid-worker")
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._outstanding = 0
        self._streams: Counter[str] = Counter()
        self._closed = False
        self._mean_seconds = 0.005  # moving average of one call's work, for the retry hint

    # ----------------------------------------------------------------- workers

    async def run(self, work: Callable[[], T], deadline: float | None = None) -> T:
        """Run ``work`` on a worker thread; ``deadline`` is a time.monotonic() instant or None."""
        future = self._submit(work, deadline)
        return await asyncio.wrap_future(future)

    def _submit(self, work: Callable[[], T], deadline: float | None) -> Future[T]:
        with self._lock:
            if self._closed:
                raise Unavailable("server is shutting down")
            if self._outstanding >= self.workers + self.max_queue:
                waiting = self._outstanding - self.workers
                hint = int(min(5000, max(10, 1000 * self._mean_seconds * (waiting + 1) / self.workers)))
                raise Overloaded(
                    f"server overloaded: {self.workers} workers busy and {waiting} calls queued "
                    f"(max_queue {self.max_queue}); retry after {hint} ms",
                    hint,
                )
            self._outstanding += 1
        context = contextvars.copy_context()  # the call's request id and search trace (service/logs.py)

        def timed() -> T:
            if deadline is not None and time.monotonic() >= deadline:
                raise TimedOut("deadline passed while the call waited for a worker")
            started = time.perf_counter()
            try:
                with deadline_scope(deadline):
                    return context.run(work)
            finally:
                self._mean_seconds += 0.05 * (time.perf_counter() - started - self._mean_seconds)

        try:
            future = self._pool.submit(timed)
        except RuntimeError:  # the pool shut down between the check and the submit
            self._release()
            raise Unavailable("server is shutting down") from None
        future.add_done_callback(lambda _: self._release())  # also when cancelled before it started
        return future

    def _release(self) -> None:
        with self._lock:
            self._outstanding -= 1
            if self._outstanding == 0:
                self._idle.notify_all()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def open_streams(self) -> int:
        with self._lock:
            return sum(self._streams.values())

    def close(self, timeout: float) -> bool:
        """Refuse new work, drop queued work, wait up to ``timeout`` s for running work; True if it all ended."""
        with self._lock:
            self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + timeout
        with self._lock:
            while self._outstanding and (left := end - time.monotonic()) > 0:
                self._idle.wait(left)
            return self._outstanding == 0

    # ----------------------------------------------------------------- streams

    @contextlib.contextmanager
    def stream(self, peer: str) -> Iterator[None]:
        """Hold one stream slot for the duration of the block; refused when a limit is reached."""
        host = peer_host(peer)
        with self._lock:
            total = sum(self._streams.values())
            if total >= self.max_streams:
                raise ResourceExhausted(f"max_streams: {total} streams are open, the server's limit")
            if self._streams[host] >= self.max_streams_per_peer:
                raise ResourceExhausted(
                    f"max_streams_per_peer: {self._streams[host]} streams are open from {host}, the limit per client"
                )
            self._streams[host] += 1
        try:
            yield
        finally:
            with self._lock:
                self._streams[host] -= 1
                if not self._streams[host]:
                    del self._streams[host]
