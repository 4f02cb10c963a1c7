"""Micro-batching: concurrent encode calls to one model gathered into one ONNX call.

Each caller's texts go on a queue with a Future. One worker thread per model
takes the first waiting request, then keeps gathering until ``max_batch`` texts
are collected or ``max_wait`` has passed since that first request, runs the
model once on all of them and hands each caller its rows. Under load the
queue also fills while the model runs, so batches grow without waiting.

Callers block only on their own Future (a gRPC worker thread), never on other
RPCs, and ONNX Runtime releases the GIL while it computes. ``stats`` (encoders/stats.py)
records each call's batch size, each request's wait for its batch, and the model's time.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

from .stats import EncoderStats

Row = TypeVar("Row")


class MicroBatcher(Generic[Row]):
    def __init__(
        self,
        run: Callable[[list[str]], Sequence[Row]],
        max_batch: int = 32,
        max_wait_s: float = 0.002,
        name: str = "encoder",
        stats: EncoderStats | None = None,
    ) -> None:
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.stats = stats if stats is not None else EncoderStats()
        self._pending: deque[tuple[list[str], Future, float]] = deque()  # texts, their future, when submitted
        self._ready = threading.Condition()
        self._closed = False
        self.calls = 0  # model calls made (for tests and benchmarks)
        self.texts = 0
        self._thread = threading.Thread(target=self._loop, name=f"braid-batcher-{name}", daemon=True)
        self._thread.start()

    def submit(self, texts: list[str]) -> Future:
        future: Future = Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("encoder batcher is closed")
            self._pending.append((texts, future, time.monotonic()))
            self._ready.notify()
        return future

    def encode(self, texts: list[str]) -> Sequence[Row]:
        return self.submit(texts).result()

    def close(self) -> None:
        with self._ready:
            self._closed = True
            self._ready.notify()
        self._thread.join()

    def _gather(self) -> list[tuple[list[str], Future, float]] | None:
        with self._ready:
            while not self._pending and not self._closed:
                self._ready.wait()
            if not self._pending:
                return None
            deadline = time.monotonic() + self.max_wait_s
            batch: list[tuple[list[str], Future, float]] = []
            count = 0
            while count < self.max_batch:
                if self._pending:
                    if batch and count + len(self._pending[0][0]) > self.max_batch:
                        break
                    request = self._pending.popleft()
                    if request[1].set_running_or_notify_cancel():  # False: the caller cancelled it
                        batch.append(request)
                        count += len(request[0])
                    continue
                if not batch:
                    return []
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._ready.wait(remaining)
            return batch

    def _loop(self) -> None:
        stats = self.stats
        while (batch := self._gather()) is not None:
            if not batch:
                continue
            texts = [text for request_texts, _, _ in batch for text in request_texts]
            started = time.monotonic()
            for _, _, submitted in batch:
                stats.queue_wait_seconds.observe(started - submitted)
            stats.batch_size.observe(len(texts))
            try:
                rows = self._run(texts)
                self.calls += 1
                self.texts += len(texts)
            except BaseException as err:  # every waiting caller gets the failure, the worker lives on
                stats.failures += 1
                for _, future, _ in batch:
                    future.set_exception(err)
                continue
            stats.inference_seconds.observe(time.monotonic() - started)
            start = 0
            for request_texts, future, _ in batch:
                future.set_result(rows[start : start + len(request_texts)])
                start += len(request_texts)
