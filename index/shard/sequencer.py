"""A shard's write sequencing: each step of a write runs in log order across concurrent writers.

The counters say how far the log is prepared, committed to tantivy and applied
(``prepared_seq``, ``committed_seq``, ``applied_seq``); a writer waits on ``cond`` for the
write before its own to finish a step (``in_order``), and one tantivy commit covers every
write prepared before it started (``commit_text``). A follower shard (one taking records
from an external log through ``apply_logged``) also keeps what each of its last
RESULTS_KEPT records did (``result_of``), for the writer waiting on another node, and its
readers wait for a record to be applied (``wait_applied``). Failing the shard
(index/shard/health.py) wakes every waiter on ``cond``.

Lock order: a writer holds ``cond`` while it runs a step, and a step takes the shard's apply
lock and write lock (or ``commit_lock``) inside it; so nothing may wait for ``cond`` holding
those (``DiskState.fail`` is never called under them).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ..errors import Unavailable
from ..locks import Gate
from ..text import TextIndex
from .health import DiskState

RESULTS_KEPT = 4096  # a follower keeps the results of this many of the last applied records (result_of)


class Sequencer:
    """Log order for one shard's writes; see the module doc."""

    def __init__(self, number: int, health: DiskState, gate: Gate, cond: threading.Condition) -> None:
        self.number = number
        self.cond = cond
        self.commit_lock = threading.Lock()  # one tantivy commit at a time
        self._health = health
        self._gate = gate
        self.prepared_seq = 0
        self.applied_seq = 0
        self.committed_seq = 0
        self._results: OrderedDict[int, int] = OrderedDict()  # a follower's last applied seqs -> result

    def adopt(self, other: Sequencer) -> None:
        """Take the counters and results a fresh shard's recovery reached (a reopen's swap)."""
        self.prepared_seq = other.prepared_seq
        self.applied_seq = other.applied_seq
        self.committed_seq = other.committed_seq
        for seq, result in other._results.items():  # what the replay applied (a follower's)
            self.remember(seq, result)

    def in_order(self, seq: int, counter: str, step: Callable[[], int | None]) -> int:
        """Run one write's step after the same step of every earlier write, then advance the counter
        (``prepared_seq`` or ``applied_seq``)."""
        health = self._health
        with self.cond:
            while getattr(self, counter) != seq - 1 and not health.failed:
                self.cond.wait()
            if health.failed:
                raise health.refusal()
            try:
                result = step()
                setattr(self, counter, seq)
            except BaseException as err:  # incl. tantivy's PanicException, so later writers never wait forever
                # The record is durable but could not be applied: memory no longer
                # matches the log, so stop taking writes; a reopen (or restart) replays it.
                health.fail_held(f"write {seq} failed in {counter}: {err!r}", err)
                raise health.refusal() from err
            finally:
                self.cond.notify_all()
        return result or 0

    def commit_text(self, seq: int, text: TextIndex | None) -> None:
        """Group commit of tantivy: one commit covers every write prepared before it started.

        A failed commit fails the shard (waking every writer waiting its turn) instead of
        leaving a sequence gap that later writers would wait on for ever.
        """
        if text is None:
            return
        health = self._health
        with self.commit_lock:
            if self.committed_seq >= seq:
                return
            if health.failed:
                raise health.refusal()
            target = self.prepared_seq
            try:
                text.commit()
                self.committed_seq = target
                return
            except BaseException as err:  # incl. tantivy's PanicException
                failure = err
        health.fail(f"tantivy commit of write {seq} failed: {failure}", failure)  # outside the commit lock
        raise health.refusal() from failure

    def remember(self, seq: int, result: int) -> None:
        self._results[seq] = result
        while len(self._results) > RESULTS_KEPT:
            self._results.popitem(last=False)

    def result_of(self, seq: int) -> int | None:
        """What applying record ``seq`` did (documents upserted, or deleted), while it is one of
        the last RESULTS_KEPT records a follower applied (``apply_logged`` or replay); else None."""
        return self._results.get(seq)

    def wait_applied(self, seq: int, timeout_s: float) -> bool:
        """Block until record ``seq`` is applied (True) or ``timeout_s`` passes (False).

        Raises the close error once the shard is closing, and Unavailable while it is failed,
        quoting the write refusal ("disk full: ..."): the record is in the log, this shard
        cannot apply it now, and a reader (or a writer waiting for the apply) may ask another
        replica; RESOURCE_EXHAUSTED would read as a refused write.
        """
        deadline = time.monotonic() + timeout_s
        health = self._health
        with self.cond:
            while self.applied_seq < seq:
                if self._gate.closed:
                    raise self._gate.error()
                if health.failed:
                    raise Unavailable(
                        f"shard {self.number} cannot apply log record {seq} now (applied to "
                        f"{self.applied_seq}): {health.refusal()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(remaining)
            return True
