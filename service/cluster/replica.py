"""A shard replica on a shard server: a follower Shard fed from its JetStream subject.

The replica opens an index/ Shard whose log is ``JetStreamLog`` (an external log: the
router appends, replicas only read), so recovery is the shard engine's own: load the
checkpoint, whose manifest's ``wal_seq`` is the last stream sequence applied, then replay
the subject after it. A follower thread then pulls new records in batches and applies
them in stream order (``Shard.apply_logged``); a failure (NATS away, a full disk) is retried
with backoff from the sequence the shard has applied, so nothing is skipped or applied twice.
The reader (nats_link.py ``LogReader``) vouches that no record of the subject is missing before
any it returns, checking doubtful deliveries against the stream, and re-reads instead (a record
lost in flight across a NATS node's death is read again, never skipped).

A replica whose files fail their checks at open (DataLoss) is quarantined: its directory is
moved aside (``<dir>.quarantined-<time>``) and it rebuilds from the subject, never serving
from the damaged files.

A replica serves reads once it has read its subject to the end once since it opened
(``caught_up``): to the last sequence the stream holds for the subject, not to where a consumer
says it ends, so a replica rebuilding from the log never answers with half its documents.
``lag_records`` (for /metrics) is how many records of the subject it has not applied yet.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from braid.index.errors import DataLoss, FailedPrecondition, Unavailable
from braid.index.policy import StoragePolicy
from braid.index.schema import Schema
from braid.index.shard import Shard

from .meta import CollectionMeta
from .nats_link import LogGap, LogReader, NatsLink

log = logging.getLogger("braid.replica")
FETCH_BATCH = 256
FOLLOW_WAIT_S = 1.0  # a fetch waits this long for a new record before asking again
REPLAY_WAIT_S = 0.2  # while recovering: an empty fetch this long means the subject's end was reached
RETRY_S = 0.5
REPLAY_GAP_RETRIES = 10  # gaps re-read in a row before a replay gives up (and the open is retried)


class JetStreamLog:
    """A shard's log kept by JetStream (index/log.py ShardLog, external): read-only here."""

    external = True

    def __init__(self, reader: LogReader) -> None:
        self.reader = reader

    def read_from(self, after_seq: int) -> Iterator[tuple[int, int, bytes]]:
        """Every record after ``after_seq`` that the subject holds now (recovery's replay): read
        until the last sequence the stream itself holds for the subject once the consumer says it
        has nothing more (a consumer's pending count alone can come from a node whose copy lags).
        A gap the reader found is re-read a few times before recovery gives up (and is retried)."""
        target: int | None = None
        gaps = 0
        while target is None or after_seq < target:
            try:
                batch = self.reader.fetch(after_seq, FETCH_BATCH, REPLAY_WAIT_S)
            except LogGap:
                gaps += 1
                if gaps > REPLAY_GAP_RETRIES:
                    raise
                time.sleep(RETRY_S)
                continue
            yield from batch
            if batch:
                after_seq = batch[-1][0]
            if target is None and (not batch or self.reader.pending == 0):
                target = self.reader.link.last_seqs(self.reader.stream, [self.reader.subject], timeout=5.0)[0]

    def append(self, kind: int, payload: bytes) -> int:
        raise FailedPrecondition("a replica's log is written by the router, never by the replica")

    def sync(self, seq: int) -> None:
        """JetStream stored the record before the router acknowledged it: nothing to do."""

    def record_crc(self, seq: int) -> int | None:
        return None

    def truncate_prefix(self, upto_seq: int) -> None:
        """The stream keeps every record until log trimming comes (snapshots)."""

    def size_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.reader.close()


class Replica:
    """One shard of one collection on this shard server."""

    def __init__(self, meta: CollectionMeta, number: int, directory: Path, link: NatsLink, policy: StoragePolicy):
        self.meta = meta
        self.number = number
        self.directory = directory
        self.link = link
        self.policy = policy
        self.schema = Schema.from_json(meta.schema)
        self.shard: Shard | None = None
        self.caught_up = threading.Event()
        self.problem: str | None = "opening"
        self.lag_records: int | None = None  # records of the subject not applied yet (None: not known yet)
        self._stop = threading.Event()
        self._quarantined = False  # a corrupt directory was moved aside once (_quarantine)
        self._thread = threading.Thread(target=self._run, name=f"braid-replica-{meta.name}-{number}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _open_log(self, directory: Path, first_seq: int, checkpoint_crc: int | None) -> JetStreamLog:
        return JetStreamLog(LogReader(self.link, self.meta.stream, self.meta.subject(self.number)))

    def _run(self) -> None:
        """Open (retrying until it works or the replica closes), then follow the subject."""
        while not self._stop.is_set() and self.shard is None:
            try:
                shard = Shard.open(self.directory, self.schema, self.number, self.policy, log_opener=self._open_log)
            except DataLoss as err:
                self.problem = f"cannot open: {err}"
                if not self._quarantined and self.directory.exists():
                    self._quarantine(err)  # the stream holds every record: rebuild from it, now
                    continue
                log.warning("replica %s/%d: %s", self.meta.name, self.number, self.problem)
                self._stop.wait(RETRY_S * 4)
                continue
            except BaseException as err:
                self.problem = f"cannot open: {err}"
                log.warning("replica %s/%d: %s", self.meta.name, self.number, self.problem)
                self._stop.wait(RETRY_S * 4)
                continue
            if self._stop.is_set():
                shard.close()
                return
            self.shard = shard
        # Open replayed the subject to its end, unless a full disk stopped the replay part way: then
        # the shard refuses reads (read_problem) and the replica is not caught up until it recovers.
        self.problem = self.shard.read_problem()
        if self.problem is None:
            self.caught_up.set()
        log.info("replica %s/%d open at log sequence %d", self.meta.name, self.number, self.applied_seq)
        self._follow()

    def _follow(self) -> None:
        assert self.shard is not None
        reader = LogReader(self.link, self.meta.stream, self.meta.subject(self.number))
        try:
            while not self._stop.is_set():
                try:
                    batch = reader.fetch(self.shard.applied_seq, FETCH_BATCH, FOLLOW_WAIT_S)
                    if batch:
                        self.lag_records = max(reader.pending, 0) + len(batch)  # fetched, not applied yet
                        self.shard.apply_logged(batch)
                    if reader.pending >= 0:
                        self.lag_records = reader.pending
                    self.problem = self.shard.read_problem()
                    if self.problem is None and not self.caught_up.is_set() and reader.at_end:
                        self.caught_up.set()  # recovered (a full disk had stopped its replay) and read to the end
                except Exception as err:  # NATS away, a consumer lost, a failed apply: retry
                    if self._stop.is_set():
                        return
                    self.problem = str(err)
                    log.warning("replica %s/%d: %s; retrying", self.meta.name, self.number, err)
                    self.shard.heal()  # a shard a full disk made read-only reopens once there is room
                    self._stop.wait(RETRY_S)
        finally:
            reader.close()

    def _quarantine(self, err: BaseException) -> None:
        """A corrupt replica directory (DataLoss at open) is moved aside, kept for operators, and the
        replica rebuilt from its subject, which holds every record (the stream is never trimmed):
        it never serves from the damaged files. Once per replica: a second DataLoss (the log itself)
        is retried like any other failure."""
        self._quarantined = True
        aside = self.directory.with_name(f"{self.directory.name}.quarantined-{int(time.time())}")
        self.directory.rename(aside)
        log.error(
            "replica %s/%d: %s; moved its files aside to %s and rebuilding it from the log",
            self.meta.name,
            self.number,
            err,
            aside,
        )

    @property
    def applied_seq(self) -> int:
        return self.shard.applied_seq if self.shard is not None else 0

    def serving(self, need_caught_up: bool) -> Shard:
        """The shard, if it may answer reads; else Unavailable saying why."""
        shard = self.shard
        if shard is None:
            raise Unavailable(f"collection {self.meta.name!r} shard {self.number}: replica {self.problem or 'opening'}")
        if need_caught_up and not self.caught_up.is_set():
            raise Unavailable(f"collection {self.meta.name!r} shard {self.number}: replica is catching up with the log")
        return shard

    def wait_applied(self, seq: int, deadline: float | None) -> Shard:
        """The shard once it has applied ``seq``; Unavailable naming the shard if it cannot by ``deadline``."""
        shard = self.serving(need_caught_up=seq == 0)
        if shard.applied_seq >= seq:
            return shard
        timeout = 30.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
        if not shard.wait_applied(seq, timeout):
            raise Unavailable(
                f"collection {self.meta.name!r} shard {self.number}: replica has applied log sequence "
                f"{shard.applied_seq} of {seq} and did not catch up before the deadline"
            )
        return shard

    def close(self, remove: bool = False) -> None:
        self._stop.set()
        self._thread.join(10)
        if self.shard is not None:
            self.shard.close()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)
