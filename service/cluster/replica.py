"""A shard replica on a shard server: a follower Shard fed from its JetStream subject, its
snapshots in the object store, and its bootstrap from them.

The replica opens an index/ Shard whose log is ``JetStreamLog`` (an external log: the
router appends, replicas only read), so recovery is the shard engine's own: load the
checkpoint, whose manifest's ``wal_seq`` is the last stream sequence applied, then replay
the subject after it. A follower thread then pulls new records in batches and applies
them in stream order (``Shard.apply_logged``); a failure (NATS away, a full disk) is retried
with backoff from the sequence the shard has applied, so nothing is skipped or applied twice.
The reader (log_reader.py ``LogReader``) vouches that no record of the subject is missing before
any it returns, checking doubtful deliveries against the stream, and re-reads instead (a record
lost in flight across a NATS node's death is read again, never skipped).

Snapshots (service/cluster/snapshot_objects.py): ``take_snapshot`` checkpoints the shard and
links its files into a scratch directory beside it (``Shard.snapshot``: the follower waits no
longer than for a checkpoint), uploads that as one object ``auto/<uid>/<shard>/<wal_seq>``,
reads it back and verifies it, keeps the newest ``SnapshotPolicy.keep`` (2) and deletes the
older ones, then trims the subject below the OLDEST one kept (so a damaged newest snapshot
still has its predecessor and the log tail after it). The shard server runs it on a schedule
(``snapshot_due``) on one replica per shard, and on demand (the Snapshot RPC).

The log is trimmed, so a replica cannot count on replaying it from anywhere. The trim point
(``braid-trims``) is recorded before each purge; a batch whose first record does not follow
the replica's position by one (the subject's sequences have holes anyway: other shards'
records) is checked against the trim point read fresh from NATS, and a replica whose
position is below it (it was stopped, or fell behind, while a trim ran past it) raises
``LogTrimmed`` instead of applying: it closes its shard, discards the directory and
bootstraps. The check happens after the fetch, and the point is written before the purge,
so a purge the fetch may have seen is always seen by the check.

Bootstrap: a replica whose directory holds no checkpoint (a new node, a wiped disk, a
quarantined or discarded directory) restores the newest snapshot of its shard that downloads
and verifies before it opens (``restore_shard(..., keep_seq=True)``), then replays the subject
after the snapshot's sequence; a snapshot failing its checks is skipped for the one before,
with a WARNING naming the object. With no valid snapshot it replays from the start, which
works only while the subject was never trimmed: otherwise it does not open, says why
(``problem``) and retries.

A restored collection (``CollectionMeta.restore_from``: a user's snapshot, service/cluster/
router/snapshots.py) is bootstrapped the same way while its shard has no replica snapshot of
its own yet: the replica downloads ``user/<snapshot>/shard-NNN`` (every file verified), lays
it in as a new shard (``restore_shard(..., keep_seq=False)``: its manifest covers sequence 0)
and follows the collection's new stream from sequence 1. The files are laid into a scratch
directory renamed into place once complete, so a replica killed mid-restore finds no
checkpoint at restart and restores again (the scratch directory is removed). A snapshot that
is gone or fails its checks is not opened empty: ``restore_failure`` holds why (its Status:
``problem`` and ``restore_error``, the code: DATA_LOSS naming the damaged file,
FAILED_PRECONDITION for a deleted snapshot; its reads answer UNAVAILABLE, so a router fails
over to another replica) and the restore is retried after a pause.

A replica whose files fail their checks at open (DataLoss) is quarantined: its directory is
moved aside (``<dir>.quarantined-<time>``) and it bootstraps as above, never serving from the
damaged files.

A replica serves reads once it has read its subject to the end once since it opened
(``caught_up``): to the last sequence the stream holds for the subject, not to where a consumer
says it ends, so a replica rebuilding from the log never answers with half its documents.
``lag_records`` (for /metrics) is how many records of the subject it has not applied yet.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from braid.index import snapshot
from braid.index.errors import BraidError, DataLoss, FailedPrecondition, NotFound, Unavailable
from braid.index.manifest import fsync_dir
from braid.index.policy import StoragePolicy
from braid.index.schema import Schema
from braid.index.shard import Shard

from .log_reader import LogGap, LogReader
from .meta import CollectionMeta
from .nats_link import NatsLink
from .snapshot_objects import (
    SnapshotObjects,
    StoredObject,
    auto_name,
    fetch_newest_valid,
    scratch_dir,
    user_shard_name,
)

log = logging.getLogger("braid.replica")
FETCH_BATCH = 256
FOLLOW_WAIT_S = 1.0  # a fetch waits this long for a new record before asking again
REPLAY_WAIT_S = 0.2  # while recovering: an empty fetch this long means the subject's end was reached
RETRY_S = 0.5
RESTORE_RETRY_S = 5.0  # a restore whose snapshot is gone or damaged is tried again after this
REPLAY_GAP_RETRIES = 10  # gaps re-read in a row before a replay gives up (and the open is retried)
APPLIED_MARKS = 4096  # (seq, log bytes) marks kept of the batches applied, for bytes_since
SNAPSHOT_LIST_S = 60.0  # snapshot_due lists the object store at least this often (others' snapshots)
RESTORED_LIST_S = 2.0  # a restored shard with no snapshot of its own yet looks this often ...
RESTORED_STAND_IN_S = 30.0  # ... and a replica of rank r takes it after r times this long
Batch = list[tuple[int, int, bytes]]
Guard = Callable[[int, Batch], None]


class LogTrimmed(Unavailable):
    """Records a replica still needs were trimmed from its subject: it must bootstrap from a snapshot."""


class RestoreFailed(Exception):
    """The user snapshot a restored collection starts from cannot be laid in (``error`` says why)."""

    def __init__(self, error: BraidError) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(frozen=True)
class SnapshotPolicy:
    """When a replica snapshots its shard (service/config.py snapshot_interval_s, snapshot_log_bytes)."""

    interval_s: float = 3600.0  # this long since the newest snapshot, with records applied since ...
    log_bytes: int = 256 * 1024 * 1024  # ... or this much log applied since it
    keep: int = 2  # snapshots kept per shard; the log is trimmed below the oldest of them


class JetStreamLog:
    """A shard's log kept by JetStream (index/log.py ShardLog, external): read-only here.

    ``guard(after_seq, batch)`` runs on every batch before it is returned (the replica's trim
    check: it raises LogTrimmed); ``counted`` is told of each batch."""

    external = True

    def __init__(
        self, reader: LogReader, guard: Guard | None = None, counted: Callable[[Batch], None] | None = None
    ) -> None:
        self.reader = reader
        self.guard = guard
        self.counted = counted

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
            if self.guard is not None:
                self.guard(after_seq, batch)
            if self.counted is not None:
                self.counted(batch)
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
        """The subject is trimmed after a snapshot is in the object store (Replica.take_snapshot),
        not after a replica's own checkpoint: other replicas may still need the records."""

    def size_bytes(self) -> int:
        return 0

    def close(self) -> None:
        self.reader.close()


class Replica:
    """One shard of one collection on this shard server.

    ``snapshots`` (None: no object store, as in tests of the log alone) holds its shard's
    snapshots; ``snapshot_policy`` says when ``snapshot_due``."""

    def __init__(
        self,
        meta: CollectionMeta,
        number: int,
        directory: Path,
        link: NatsLink,
        policy: StoragePolicy,
        snapshots: SnapshotObjects | None = None,
        snapshot_policy: SnapshotPolicy | None = None,
    ):
        self.meta = meta
        self.number = number
        self.directory = directory
        self.link = link
        self.policy = policy
        self.snapshots = snapshots
        self.snapshot_policy = snapshot_policy or SnapshotPolicy()
        self.schema = Schema.from_json(meta.schema)
        self.shard: Shard | None = None
        self.caught_up = threading.Event()
        self.problem: str | None = "opening"
        self.lag_records: int | None = None  # records of the subject not applied yet (None: not known yet)
        self.restored_from: str | None = None  # the snapshot object the last bootstrap restored
        self.restores = 0  # bootstraps from a snapshot since the process started
        self.snapshots_taken = 0  # snapshots of the shard this replica stored (its own and users') since then
        self.restore_failure: BraidError | None = None  # why the user snapshot it restores cannot be laid in
        self._stop = threading.Event()
        self._quarantined = False  # a corrupt directory was moved aside once (_quarantine)
        self._trim_seen = 0  # the highest trim point read from NATS
        self._snapshot_lock = threading.Lock()  # one snapshot of this replica at a time
        self._newest: tuple[int, float] | None = None  # (seq, unix time) of the newest snapshot known
        self._own_snapshot = False  # the object store held an auto/ snapshot of the shard at the last look
        self._newest_checked = 0.0  # monotonic time the object store was last listed for it
        self._applied_bytes: deque[tuple[int, int]] = deque(maxlen=APPLIED_MARKS)  # (seq, log bytes to it)
        self._total_bytes = 0  # log bytes applied since the replica started
        self.wake: Callable[[], None] | None = None  # told when enough log was applied for a snapshot
        self._opened_at = time.time()
        self._thread = threading.Thread(target=self._run, name=f"braid-replica-{meta.name}-{number}", daemon=True)

    @property
    def what(self) -> str:
        return f"replica {self.meta.name}/{self.number}"

    def start(self) -> None:
        self._thread.start()

    def _open_log(self, directory: Path, first_seq: int, checkpoint_crc: int | None) -> JetStreamLog:
        reader = LogReader(self.link, self.meta.stream, self.meta.subject(self.number))
        return JetStreamLog(reader, self._check_trim, self._count)

    def _count(self, batch: Batch) -> None:
        """Remember how much log was applied up to the batch's last record (snapshot_due's measure)."""
        if batch:
            self._total_bytes += sum(len(payload) for _, _, payload in batch)
            self._applied_bytes.append((batch[-1][0], self._total_bytes))

    def _maybe_wake(self) -> None:
        """Tell the snapshot thread at once when the log applied since the newest snapshot calls for one."""
        newest = self._newest
        if (
            self.wake is not None
            and newest is not None
            and self.bytes_since(newest[0]) >= self.snapshot_policy.log_bytes
        ):
            self.wake()

    def bytes_since(self, seq: int) -> int:
        """Log bytes this replica applied after sequence ``seq`` (all it applied since it started when
        ``seq`` is older than that)."""
        base = 0
        for mark_seq, total in list(self._applied_bytes):
            if mark_seq > seq:
                break
            base = total
        return self._total_bytes - base

    def _check_trim(self, after_seq: int, batch: Batch) -> None:
        """LogTrimmed when a purge may have taken records this replica has not applied: a hole in the
        sequences from ``after_seq`` through ``batch`` spans the subject's trim point. Holes are
        normal (other shards' records): only a batch with one asks NATS for the trim point, after
        the fetch; the point is raised before each purge, so every purge the fetch met is seen.
        A hole wholly below the point is genuine: a record below it that was delivered was not
        purged yet, nor (the purge takes the whole range at once) was any record before it."""
        if not batch or self.snapshots is None:
            return
        seqs = [after_seq, *(seq for seq, _, _ in batch)]
        holes = [(a, b) for a, b in itertools.pairwise(seqs) if b != a + 1]
        if not holes:
            return

        def spanned(point: int) -> tuple[int, int] | None:
            return next(((a, b) for a, b in holes if a + 1 < point <= b), None)

        hole = spanned(self._trim_seen)
        if hole is None:
            self._trim_seen = max(self._trim_seen, self.snapshots.trim_point(self.meta.uid, self.number))
            hole = spanned(self._trim_seen)
        if hole is not None:
            raise LogTrimmed(
                f"{self.what}: the log was trimmed below sequence {self._trim_seen} while this replica had "
                f"applied {after_seq} (records after {hole[0]} may be gone): it restores a snapshot instead"
            )

    # ------------------------------------------------------------ open / follow

    def _run(self) -> None:
        """Open (restoring a snapshot into an empty directory), follow the subject; bootstrap again
        whenever the log was trimmed past the replica."""
        self._clean_scratch()
        while not self._stop.is_set():
            if not self._open():
                return
            try:
                self._follow()
                return
            except LogTrimmed as err:
                self._discard(err)

    def _open(self) -> bool:
        """Open the shard (retrying until it works or the replica closes); False once closed."""
        while not self._stop.is_set() and self.shard is None:
            restored: bool | None = None  # None: the directory had a checkpoint, no restore was tried
            try:
                if not (self.directory / "MANIFEST.json").exists():
                    restored = self._restore()
                shard = Shard.open(self.directory, self.schema, self.number, self.policy, log_opener=self._open_log)
            except RestoreFailed as err:
                self.restore_failure = err.error
                self.problem = f"cannot open: {err.error}"
                log.error("%s: %s; retrying", self.what, self.problem)
                self._stop.wait(RESTORE_RETRY_S)
                continue
            except LogTrimmed as err:
                self._discard(err)
                if restored is False:  # the log was trimmed and no snapshot covers it: it cannot open
                    self.problem = f"cannot open: {err}, and no valid snapshot of the shard was found; retrying"
                    log.error("%s: %s", self.what, self.problem)
                    self._stop.wait(RETRY_S * 4)
                continue
            except DataLoss as err:
                self.problem = f"cannot open: {err}"
                if not self._quarantined and self.directory.exists():
                    self._quarantine(err)  # rebuild now, from a snapshot and the log
                    continue
                log.warning("%s: %s", self.what, self.problem)
                self._stop.wait(RETRY_S * 4)
                continue
            except BaseException as err:
                self.problem = f"cannot open: {err}"
                log.warning("%s: %s", self.what, self.problem)
                self._stop.wait(RETRY_S * 4)
                continue
            if self._stop.is_set():
                shard.close()
                return False
            self.shard = shard
            self.restore_failure = None
        if self.shard is None:
            return False
        # Open replayed the subject to its end, unless a full disk stopped the replay part way: then
        # the shard refuses reads (read_problem) and the replica is not caught up until it recovers.
        self.problem = self.shard.read_problem()
        if self.problem is None:
            self.caught_up.set()
        log.info("%s open at log sequence %d", self.what, self.applied_seq)
        return True

    def _follow(self) -> None:
        """Apply the subject's new records until the replica closes; LogTrimmed when it must bootstrap."""
        assert self.shard is not None
        reader = LogReader(self.link, self.meta.stream, self.meta.subject(self.number))
        try:
            while not self._stop.is_set():
                try:
                    after = self.shard.applied_seq
                    batch = reader.fetch(after, FETCH_BATCH, FOLLOW_WAIT_S)
                    if batch:
                        self._check_trim(after, batch)
                        self.lag_records = max(reader.pending, 0) + len(batch)  # fetched, not applied yet
                        self.shard.apply_logged(batch)
                        self._count(batch)
                        self._maybe_wake()
                    if reader.pending >= 0:
                        self.lag_records = reader.pending
                    self.problem = self.shard.read_problem()
                    if self.problem is None and not self.caught_up.is_set() and reader.at_end:
                        self.caught_up.set()  # recovered (a full disk had stopped its replay) and read to the end
                except LogTrimmed:
                    raise
                except Exception as err:  # NATS away, a consumer lost, a failed apply: retry
                    if self._stop.is_set():
                        return
                    self.problem = str(err)
                    log.warning("%s: %s; retrying", self.what, err)
                    try:
                        self.shard.heal()  # a shard a full disk made read-only reopens once there is room
                    except LogTrimmed:
                        raise
                    except Exception as heal_err:
                        log.warning("%s: reopening failed: %s", self.what, heal_err)
                    self._stop.wait(RETRY_S)
        finally:
            reader.close()

    def _discard(self, err: BaseException) -> None:
        """The log was trimmed past this replica: close its shard, drop its directory (nothing in it is
        damaged, only behind) and let the next open bootstrap from a snapshot."""
        self.problem = str(err)
        self.caught_up.clear()
        with self._snapshot_lock:  # a snapshot of the shard finishes first
            shard, self.shard = self.shard, None
            if shard is not None:
                shard.close()
        log.warning("%s: %s", self.what, err)
        self._drop_directory()

    def _drop_directory(self) -> None:
        """Remove the replica's directory (renamed aside first, so a crash never leaves half of it)."""
        if self.directory.exists():
            doomed = self.directory.with_name(f".behind-{self.directory.name}-{uuid.uuid4().hex[:8]}")
            self.directory.rename(doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _quarantine(self, err: BaseException) -> None:
        """A corrupt replica directory (DataLoss at open) is moved aside, kept for operators, and the
        replica rebuilt from a snapshot and the log: it never serves from the damaged files. Once
        per replica: a second DataLoss (the log itself) is retried like any other failure."""
        self._quarantined = True
        aside = self.directory.with_name(f"{self.directory.name}.quarantined-{int(time.time())}")
        self.directory.rename(aside)
        log.error(
            "%s: %s; moved its files aside to %s and rebuilding it from a snapshot and the log", self.what, err, aside
        )

    # ------------------------------------------------------------ snapshots

    def _scratch(self, kind: str) -> Path:
        """A scratch directory beside the shard's (same file system: links and renames work)."""
        return scratch_dir(self.directory.parent, f".{kind}-{self.directory.name}-")

    def _clean_scratch(self) -> None:
        """Scratch directories a killed process left (a snapshot, a restore, a discard)."""
        parent = self.directory.parent
        if parent.exists():
            for kind in ("snapshot", "restore", "behind"):
                for leftover in parent.glob(f".{kind}-{self.directory.name}-*"):
                    shutil.rmtree(leftover, ignore_errors=True)

    def _restore(self) -> bool:
        """Lay the newest valid snapshot of the shard into its (checkpoint-less) directory; whether
        one was. With none, the directory is left for a replay from the start, which LogTrimmed
        stops when the subject was trimmed."""
        if self.snapshots is None:
            return False
        self.problem = "restoring a snapshot"
        candidates = self.snapshots.replica_snapshots(self.meta.uid, self.number)
        if not candidates:
            return self._restore_user()
        scratch = self._scratch("restore")
        try:
            found = fetch_newest_valid(self.snapshots, candidates, scratch / "download", self.what)
            if found is None:
                if self.meta.restore_from:
                    return self._restore_user()
                log.warning("%s: no valid snapshot of %d; replaying the log from the start", self.what, len(candidates))
                return False
            obj, top, manifest = found
            entries = manifest["shards"]
            if manifest.get("uid") != self.meta.uid or [int(e.get("shard", -1)) for e in entries] != [self.number]:
                log.warning("%s: snapshot %s holds another shard (%r); not restored", self.what, obj.name, entries)
                return False
            self._lay_in(top, scratch, obj.name, keep_seq=True)
            self._newest = (obj.seq, obj.mtime or time.time())
            self._own_snapshot = True
            log.info(
                "%s restored snapshot %s (log sequence %d, %d documents); replaying the log after it",
                self.what,
                obj.name,
                entries[0].get("wal_seq", obj.seq),
                entries[0].get("documents", 0),
            )
            return True
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _restore_user(self) -> bool:
        """Lay the user snapshot a restored collection starts from into the (checkpoint-less)
        directory as a new shard (its manifest covers sequence 0); False for a collection that
        restores nothing. RestoreFailed when the snapshot is gone or fails its checks."""
        source = self.meta.restore_from
        if not source or self.snapshots is None:
            return False
        name = user_shard_name(source, self.number)
        scratch = self._scratch("restore")
        try:
            try:
                top, manifest = self.snapshots.get_dir(name, scratch / "download")
            except NotFound as err:
                raise RestoreFailed(
                    FailedPrecondition(f"snapshot {source!r} it restores from no longer exists: {err}")
                ) from err
            except DataLoss as err:
                raise RestoreFailed(err) from err
            entries = manifest["shards"]
            if [int(e.get("shard", -1)) for e in entries] != [self.number]:
                raise RestoreFailed(DataLoss(f"snapshot object {name!r} holds shards {entries!r}, not {self.number}"))
            self._lay_in(top, scratch, name, keep_seq=False)
            log.info(
                "%s restored user snapshot %s (%d documents); following the new log from sequence 1",
                self.what,
                name,
                entries[0].get("documents", 0),
            )
            return True
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _lay_in(self, top: Path, scratch: Path, name: str, keep_seq: bool) -> None:
        """Lay the shard of the snapshot unpacked at ``top`` (object ``name``) into the replica's
        directory: staged in ``scratch``, then renamed into place over a checkpoint-less directory
        (it holds nothing the snapshot and the log do not: no checkpoint of this incarnation)."""
        staged = scratch / "shard"
        snapshot.restore_shard(top / snapshot.SHARD_DIR.format(self.number), staged, keep_seq=keep_seq)
        self._drop_directory()
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        staged.rename(self.directory)
        fsync_dir(self.directory.parent)
        self.restored_from = name
        self.restores += 1

    def newest_snapshot(self, refresh_s: float = 0.0) -> tuple[int, float]:
        """(log sequence, unix time) of the shard's newest snapshot; (0, the replica's start) when
        there is none. Lists the object store when the last look is older than ``refresh_s``."""
        assert self.snapshots is not None
        if self._newest is None or time.monotonic() - self._newest_checked >= refresh_s:
            found = self.snapshots.replica_snapshots(self.meta.uid, self.number)
            self._newest_checked = time.monotonic()
            self._newest = (found[-1].seq, found[-1].mtime) if found else (0, self._opened_at)
            self._own_snapshot = bool(found)
        return self._newest

    def snapshot_due(self, rank: int = 0) -> bool:
        """Whether the schedule calls for a snapshot now: ``log_bytes`` applied since the shard's
        newest snapshot, or ``interval_s`` since it with records applied since. ``rank``: how many
        replicas of the shard should take it first; each waits that many periods more, so a stuck
        first one is stood in for, but two rarely snapshot at once. The object store is listed
        only when the last known newest snapshot says it is due (another replica may have taken one)."""
        shard = self.shard
        if self.snapshots is None or shard is None or not self.caught_up.is_set() or self.problem:
            return False
        factor = 1 + rank
        policy = self.snapshot_policy

        def due(seq: int, at: float) -> bool:
            if shard.applied_seq <= seq:
                return False
            return self.bytes_since(seq) >= policy.log_bytes * factor or time.time() - at >= policy.interval_s * factor

        if self.meta.restore_from and not self._own_snapshot:
            # A restored collection's data lives only in the user's snapshot until the shard's first
            # own one: take that at once (the first replica; others stand in after a while), so a
            # rebuilt replica no longer needs the user's snapshot, which its owner may delete.
            self.newest_snapshot(refresh_s=RESTORED_LIST_S)
            return not self._own_snapshot and time.time() - self._opened_at >= RESTORED_STAND_IN_S * rank
        if not due(*self.newest_snapshot(refresh_s=SNAPSHOT_LIST_S)):
            return False
        return due(*self.newest_snapshot())

    def take_snapshot(self, object_name: str = "", label: str = "") -> StoredObject:
        """Snapshot the shard now: upload, read back, keep the newest few, trim the log (module doc).
        Returns the object; Unavailable when the replica has not caught up. With ``object_name``
        (a user's snapshot, named ``label`` in its manifest) it is stored under that name and
        neither retained nor trimmed below; ``self.last_entry`` is its manifest's shard entry."""
        if self.snapshots is None:
            raise FailedPrecondition(f"{self.what}: no snapshot store")
        with self._snapshot_lock:
            shard = self.serving(need_caught_up=True)
            scratch = self._scratch("snapshot")
            try:
                started = time.monotonic()
                entry = shard.snapshot(scratch / "snap" / snapshot.SHARD_DIR.format(self.number))
                seq = int(entry["wal_seq"])
                name = object_name or auto_name(self.meta.uid, self.number, seq)
                from braid import __version__

                manifest = snapshot.write_manifest(
                    scratch / "snap",
                    {
                        "name": label or name.replace("/", "-").lower(),
                        "collection": self.meta.name,
                        "uid": self.meta.uid,
                        "schema": self.meta.schema,
                        "shard_count": self.meta.shards,
                        "created_at": time.time(),
                        "shards": [entry],
                        "braid_version": __version__,
                    },
                )
                stored = self.snapshots.put_dir(name, scratch / "snap", arcroot="snapshot")
                self.snapshots.get_dir(name, scratch / "check")  # read back intact before the log is trimmed
                self.snapshots_taken += 1
                if object_name:
                    log.info("%s: user snapshot %s at log sequence %d (%d bytes)", self.what, name, seq, stored.bytes)
                    return StoredObject(name, stored.bytes, time.time(), entry)
                self._newest = (seq, time.time())
                self._newest_checked = time.monotonic()
                self._own_snapshot = True
                log.info(
                    "%s: snapshot %s (%d files, %d bytes) in %.2f s",
                    self.what,
                    name,
                    len(manifest["files"]),
                    stored.bytes,
                    time.monotonic() - started,
                )
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            self._retain_and_trim(name)
            return StoredObject(name, stored.bytes, time.time(), entry)

    def _retain_and_trim(self, newest: str) -> None:
        """Keep the newest ``keep`` snapshots, trim the subject below the oldest of them, then delete
        the others (the trim point is recorded first: snapshot_objects.py)."""
        assert self.snapshots is not None
        found = self.snapshots.replica_snapshots(self.meta.uid, self.number)
        keep = found[-self.snapshot_policy.keep :]
        if not any(obj.name == newest for obj in keep):  # listed late: never trim past what was read back
            return
        oldest = keep[0]
        if oldest.seq > 0:
            point = self.snapshots.trim(
                self.meta.stream, self.meta.subject(self.number), self.meta.uid, self.number, oldest.seq, oldest.name
            )
            log.info("%s: log trimmed below sequence %d (snapshot %s)", self.what, point, oldest.name)
        for obj in found[: -self.snapshot_policy.keep]:
            self.snapshots.delete(obj.name)
        try:
            self.snapshots.sweep_orphans()
        except Exception as err:  # housekeeping: the next snapshot tries again
            log.warning("%s: cannot sweep the chunks of uploads cut short: %s", self.what, err)

    # ------------------------------------------------------------ reads

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
        with self._snapshot_lock:  # a snapshot running on another thread finishes first
            if self.shard is not None:
                self.shard.close()
        if remove:
            shutil.rmtree(self.directory, ignore_errors=True)
