"""``LogReader``: one subject of a JetStream stream, read in stream order from a given sequence
through an ephemeral pull consumer, checking against the stream that it skips no record.

Replicas (service/cluster/replica.py) apply what it returns; it runs its NATS calls on the
process's ``NatsLink`` (service/cluster/nats_link.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import api

from braid.index.errors import Unavailable

from .meta import KIND_HEADER
from .nats_link import NatsLink, _describe

log = logging.getLogger("braid.nats")

# A consumer nobody pulls from for this long is removed by JetStream (a replica that died).
CONSUMER_IDLE_S = 30.0
# A LogReader whose consumer delivers nothing this many fetches in a row while the stream holds a
# record after the reader's position replaces the consumer (it lost the record, or lags).
BEHIND_FETCHES = 2
STREAM_ASK_S = 2.0  # how long a LogReader waits for the stream's answer about its next record
NO_MESSAGE_ERR_CODE = 10037  # JetStream: no message found (a stream that does not exist says 10059)


class LogGap(Unavailable):
    """A LogReader could not vouch that its records follow the caller's position with none missing
    (a delivery lost in flight, a consumer restarted, the stream holding a record the consumer did
    not deliver): nothing past the last vouched record is returned; the next fetch re-reads."""


class LogReader:
    """Reads one subject of a stream in order, from a sequence on, with an ephemeral pull consumer,
    and vouches for every record it returns: none on the subject is missing before it.

    ``fetch(after_seq, ...)`` returns the next records after ``after_seq``; when the caller's
    position does not follow the consumer's (a restart, a failed apply), the consumer is
    replaced by one that starts right after ``after_seq``. NATS failures raise Unavailable; the
    next fetch starts over with a new consumer.

    A pull consumer that acknowledges nothing (AckPolicy NONE) counts a record as delivered once
    it sent it: a record lost in flight (the connection cut, the client's buffer dropped) is
    never sent again, and the stream's sequences cannot show the hole, because a consumer of one
    subject skips the sequences of the others. So the reader checks, per record:

    - its consumer sequence follows the last one read from this consumer by exactly one (the
      consumer numbers its deliveries 1, 2, 3, ...), it was delivered once, and its stream
      sequence increases;
    - the first record of each new consumer is, by the stream (its leader), the next record on
      the subject after ``after_seq`` (``_next_in_stream``); records up to ``after_seq`` that a
      consumer on a lagging node sends first are passed over;
    - an empty fetch asks the stream whether the subject holds a record after ``after_seq``
      (the consumer may have lost the last delivery, or run on a node whose copy lags); after
      BEHIND_FETCHES such fetches in a row the consumer is replaced and the range re-read.

    On any doubt it drops the consumer and returns only the records before the doubt (LogGap when
    there are none), so the caller's next fetch re-reads from what it applied: it never advances
    past a record it did not get. A check the stream cannot answer (no leader yet) is a doubt for
    a new consumer's first record, and leaves ``at_end`` False for an end check.
    ``at_end`` is True only when the stream (not a consumer's pending count) said the subject holds
    nothing after the last record returned.
    """

    def __init__(self, link: NatsLink, stream: str, subject: str) -> None:
        self.link, self.stream, self.subject = link, stream, subject
        self._sub: Any = None
        self._next_seq = 0  # the stream sequence of the last record the consumer delivered (or its start - 1)
        self._delivered = 0  # the consumer sequence of the last record it delivered (0: none yet)
        self._started = False  # the consumer delivered a record after its start (checked against the stream)
        self._behind = 0  # empty fetches in a row while the stream held a record after the caller's position
        self.pending = -1  # records left after the last fetch, as the consumer counts them (-1: unknown)
        self.at_end = False  # the stream said nothing follows the last record returned
        self.gaps = 0  # doubts found (each made the reader re-read)

    def fetch(self, after_seq: int, batch: int, wait_s: float, check_end: bool = False) -> list[tuple[int, int, bytes]]:
        """The next records after ``after_seq`` (at most ``batch``; waiting up to ``wait_s`` for
        one), each vouched for. ``check_end``: when the consumer says nothing follows the batch,
        ask the stream too (``at_end``); an empty fetch always asks."""

        async def fetch() -> list[tuple[int, int, bytes]]:
            if self._sub is None or self._next_seq != after_seq:
                await self._reset(after_seq)
            self.at_end = False
            try:
                msgs = await self._sub.fetch(batch, timeout=wait_s)
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            out: list[tuple[int, int, bytes]] = []
            for msg in msgs:
                meta = msg.metadata
                seq, delivered = int(meta.sequence.stream), int(meta.sequence.consumer)
                doubt = None
                if delivered != self._delivered + 1:
                    doubt = f"the consumer's delivery {delivered} follows its delivery {self._delivered}"
                elif int(meta.num_delivered or 1) != 1:
                    doubt = f"record {seq} was delivered {meta.num_delivered} times"
                elif seq <= self._next_seq and not self._started:
                    # a new consumer on a node whose copy ends before its start sequence starts at
                    # that copy's end: records the caller holds, sent again; passed over
                    self._delivered = delivered
                    continue
                elif seq <= self._next_seq:
                    doubt = f"record {seq} follows record {self._next_seq}"
                elif not self._started:  # a new consumer: its start is checked against the stream
                    try:
                        first = await self._next_in_stream(self._next_seq)
                    except Exception as err:  # the stream cannot vouch now (electing a leader): re-read later
                        first, doubt = -1, f"the stream could not be asked for its next record: {_describe(err)}"
                    if first != seq and doubt is None:
                        doubt = (
                            f"a new consumer's first record is {seq}, but the stream's next after "
                            f"{self._next_seq} is {first or 'none'}"
                        )
                if doubt is not None:
                    return await self._doubt(doubt, out)
                out.append((seq, int((msg.headers or {}).get(KIND_HEADER, "0")), msg.data))
                self._next_seq, self._delivered, self._started = seq, delivered, True
                self.pending = int(meta.num_pending)
            if out and (self.pending > 0 or not check_end):
                self._behind = 0
                return out
            last = out[-1][0] if out else after_seq
            try:
                following = await self._next_in_stream(last)
            except Exception as err:  # the stream cannot answer now: the end is not known
                log.debug("log %s subject %s: no answer about its end: %s", self.stream, self.subject, _describe(err))
                self.pending = -1
                return out
            self.at_end = following is None
            if out or self.at_end:
                self._behind = 0
                self.pending = 0 if self.at_end else -1
                return out
            self.pending = -1  # the consumer delivered nothing, yet the stream holds record `following`
            self._behind += 1
            if self._behind >= BEHIND_FETCHES:
                return await self._doubt(
                    f"the stream holds record {following} after it, the consumer delivers none", out
                )
            return out

        try:
            return self.link.call(fetch(), wait_s + 5.0 + 2 * STREAM_ASK_S)
        except BaseException:
            self._drop()
            raise

    async def _next_in_stream(self, after_seq: int) -> int | None:
        """The sequence of the first record on the subject after ``after_seq``, as the stream's
        leader holds it (None: none). The leader holds every record it acknowledged, and any node
        that holds a record holds every one before it."""
        try:
            ask = self.link.js.get_msg(self.stream, seq=after_seq + 1, subject=self.subject, next=True)
            found = await asyncio.wait_for(ask, STREAM_ASK_S)
        except nats.js.errors.NotFoundError as err:
            if err.err_code == NO_MESSAGE_ERR_CODE:
                return None
            raise
        return int(found.seq)

    async def _doubt(self, why: str, vouched: list[tuple[int, int, bytes]]) -> list[tuple[int, int, bytes]]:
        """Drop the consumer, so the caller's next fetch re-reads from its position; the records
        vouched for before the doubt, or LogGap when there are none."""
        self.gaps += 1
        self._behind = 0
        self.pending = -1
        self.at_end = False
        await self._unsubscribe()
        message = (
            f"log {self.stream} subject {self.subject}: cannot vouch for the records after {self._next_seq} ({why})"
        )
        if not vouched:
            raise LogGap(f"{message}; re-reading")
        log.warning("%s; returning the %d before it, re-reading after them", message, len(vouched))
        return vouched

    async def _reset(self, after_seq: int) -> None:
        await self._unsubscribe()
        config = api.ConsumerConfig(
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=after_seq + 1,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=CONSUMER_IDLE_S,
            num_replicas=1,
            mem_storage=True,
        )
        self._sub = await self.link.js.pull_subscribe(self.subject, stream=self.stream, config=config)
        self._next_seq, self._delivered, self._behind, self._started = after_seq, 0, 0, False

    async def _unsubscribe(self) -> None:
        if self._sub is not None:
            sub, self._sub = self._sub, None
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    def _drop(self) -> None:
        if self._sub is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._unsubscribe(), self.link.loop).result(2)
            except Exception:
                self._sub = None

    def close(self) -> None:
        self._drop()
