"""Searches first: what keeps a bulk load from taking the CPU searches need.

On a busy node three kinds of work share the cores and the GIL: searches, the Python work of
applying writes, and the background graph builds those writes cause. Left alone, a full-speed
BulkUpsert and its builds take both cores of a small machine and every search waits for CPU
(docs/benchmarks.md, "Real load"). Two rules here:

- **Writes rest while searches run.** Every read a shard serves stamps ``READS`` (one float
  store, no lock). An upsert batch that finds a read within ``RECENT_S`` of its end rests,
  holding no lock, for ``elapsed * (1 / share - 1)`` (service/rpcs.py: the batch's decoding,
  encoders and shard writes all count): while searches run, writers get at most ``share`` of
  the time they would take alone (``StoragePolicy.write_share``; 1 turns it off). A node that
  only ingests never rests, and a rest is bounded by ``MAX_REST_S``. A stream rests on the
  event loop (``rest_async``), a unary write on its worker (``rest``).
- **Background builds run at a lower CPU priority** (``BUILD_NICE``): HNSW seals and merges
  and SPANN merges give way to serving threads when the cores are busy and use them fully
  when they are not. Their backlog is bounded elsewhere (writers wait for room), so a build
  that falls behind slows ingest, never searches.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger("braid.pacing")

RECENT_S = 0.25  # a read this recent counts as "searches are running"
MAX_REST_S = 1.0  # no write rests longer than this, however long it took
BUILD_NICE = 10  # Linux nice of background build threads (CFS weight 110 against 1024 at 0)


class _Reads:
    """When the last read was served (time.monotonic()); written by every search, read by writers."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last = -1e9

    def stamp(self) -> None:
        self.last = time.monotonic()


READS = _Reads()
# Tests record the rests instead of taking them.
_sleep = time.sleep
_sleep_async = asyncio.sleep


def rest_for(started: float, now: float, last_read: float, share: float) -> float:
    """Seconds a write that ran from ``started`` to ``now`` rests, the last read served at
    ``last_read`` (all time.monotonic()); ``share`` in (0, 1] as ``StoragePolicy.write_share``."""
    if share >= 1.0 or now - last_read > RECENT_S:
        return 0.0
    return min((now - started) * (1.0 / share - 1.0), MAX_REST_S)


def rest_due(started: float, share: float) -> float:
    """Seconds a write that began at ``started`` (time.monotonic()) and ends now rests (0: none)."""
    return rest_for(started, time.monotonic(), READS.last, share)


def rest(seconds: float) -> None:
    """Take a rest on this thread (a unary write's worker)."""
    if seconds > 0:
        _sleep(seconds)


async def rest_async(seconds: float) -> None:
    """Take a rest on the event loop (a write stream's handler): no thread is held meanwhile."""
    if seconds > 0:
        await _sleep_async(seconds)


def background_priority() -> None:
    """Lower this thread's CPU priority to ``BUILD_NICE`` (call at the start of a build thread).

    Linux sets nice per thread; raising it needs no privilege. Elsewhere, or when refused, the
    thread keeps its priority.
    """
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BUILD_NICE)
    except (AttributeError, OSError) as err:  # not Linux, or a sandbox that forbids it
        log.debug("build thread keeps its CPU priority: %s", err)


def background_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Start a daemon thread that runs ``target`` at ``background_priority``."""

    def run() -> None:
        background_priority()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread
