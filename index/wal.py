"""Per-shard write-ahead log: segment files, record framing, recovery, group commit.

This module owns every byte under a shard's ``wal/`` directory. The directory
holds segment files named ``{first_seq:020d}.wal``, where ``first_seq`` is the
sequence number of the segment's first record; segments are contiguous (each
starts one past the previous segment's last record). Nothing else lives there.

Record layout, little-endian, packed, 17-byte header::

    offset  size  field
         0     4  u32 payload_len
         4     4  u32 crc32(seq bytes + kind byte + payload)   (zlib.crc32)
         8     8  u64 seq                                       (1, 2, 3, ... one per record)
        16     1  u8  kind                                      (meaning owned by the caller)
        17     n  payload bytes

Durability contract: ``append`` hands the record to the OS (visible to readers
and to any later fsync) but does not fsync; ``sync(seq)`` returns once every
record up to ``seq`` is on stable storage. Concurrent ``sync`` calls share one
fsync (group commit), and appends proceed while a sync is in its fsync.
A failed append leaves the log exactly as it was (a partial record is truncated
away) and raises DiskFull for ENOSPC/EDQUOT, so appends resume once there is room;
a failed fsync poisons the log (the kernel may have dropped the pages) until reopened.
``stats`` (index/stats.py) times every append and fsync for operators.

Recovery (``open``): a *torn* tail of the last segment is the normal result of a
crash and is truncated away (a WARNING); a damaged record anywhere (followed by
valid records, in an older segment, or a complete last record) is corruption and
raises ``WalError`` (a DataLoss) naming the file and offset. The tail after the
last valid record is torn when it is one of what an interrupted append leaves:
  - a record cut short: fewer than 17 header bytes, or a header promising more
    payload than the file holds, unless the bytes present are a complete record
    whose CRC matches (then its length field was damaged: corruption);
  - zeros a filesystem left for blocks a crash never wrote: the tail holds a
    512-byte-aligned stretch of zeros, or is zeros from an aligned offset to its end.
A record whose bytes are all present and non-zero but fail their CRC was written
in full (a write is one call, fsynced before it is acknowledged), so it is damage
of an acknowledged record, never truncated. Limit: a damaged record that itself
holds 512 aligned zero bytes passes for torn.
The caller's checkpoint is checked against the log: a log that ends before the
checkpoint's seq lost records (a checkpoint never trims the active segment), and
the checkpoint's record of ``record_crc(wal_seq)`` must match that record while it
is still in the log (else replay would start at the wrong record); both raise WalError.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .checksums import Problem
from .errors import DataLoss, DiskFull, InvalidArgument, Unavailable
from .manifest import fsync_dir
from .stats import WalStats

log = logging.getLogger("braid.wal")

DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
HEADER = struct.Struct("<IIQB")
HEADER_BYTES = HEADER.size  # 17
_SEQ_KIND = struct.Struct("<QB")
_SEQ = struct.Struct("<Q")
_SEQ_OFFSET = 8  # where the seq field sits inside the header
_MAX_PAYLOAD = 2**32 - 1
_SEGMENT_NAME = re.compile(r"\d{20}\.wal")
# How many sequence numbers past a bad record to look for a valid record before calling the damage a torn tail.
_RESYNC_WINDOW = 1024

_fsync_data = getattr(os, "fdatasync", os.fsync)  # data + size is all an append-only file needs
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)

Buffer = bytes | mmap.mmap


class WalError(DataLoss):
    """The write-ahead log is corrupt on disk, or an I/O failure left it unusable."""


class _BadRecord(Exception):
    """Internal: the bytes at an offset are not a complete, CRC-valid record."""


class _Record(NamedTuple):
    seq: int
    kind: int
    payload: bytes
    end: int  # offset just past the record


@dataclass
class _Segment:
    first_seq: int
    path: Path
    size: int


# ---------------------------------------------------------------------- framing


def _encode(seq: int, kind: int, payload: bytes) -> bytes:
    seq_kind = _SEQ_KIND.pack(seq, kind)
    crc = zlib.crc32(payload, zlib.crc32(seq_kind))
    return HEADER.pack(len(payload), crc, seq, kind) + payload


def _decode_at(buf: Buffer, off: int) -> _Record:
    """The record starting at ``off``; raises _BadRecord when it is torn or fails its CRC."""
    size = len(buf)
    if off + HEADER_BYTES > size:
        raise _BadRecord(f"torn header ({size - off} of {HEADER_BYTES} bytes)")
    length, crc, seq, kind = HEADER.unpack_from(buf, off)
    end = off + HEADER_BYTES + length
    if end > size:
        raise _BadRecord(f"torn payload (header promises {length} bytes, {size - off - HEADER_BYTES} present)")
    payload = bytes(buf[off + HEADER_BYTES : end])
    if zlib.crc32(payload, zlib.crc32(buf[off + _SEQ_OFFSET : off + HEADER_BYTES])) != crc:
        raise _BadRecord("crc mismatch")
    return _Record(seq, kind, payload, end)


def _check_record(kind: int, payload: bytes) -> None:
    if not 0 <= kind <= 255:
        raise InvalidArgument.field("kind", f"must be in 0..255, got {kind}")
    if len(payload) > _MAX_PAYLOAD:
        raise InvalidArgument.field("payload", f"at most {_MAX_PAYLOAD} bytes, got {len(payload)}")


# ------------------------------------------------------------------ file helpers


def _segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"{first_seq:020d}.wal"


def _open_for_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)


@contextmanager
def _mapped(path: Path, size: int) -> Iterator[Buffer]:
    """The first ``size`` bytes of ``path``, read-only, without copying the file into memory."""
    if size == 0:
        yield b""  # mmap refuses empty mappings
        return
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_READ) as view:
        yield view


def _truncate_durably(path: Path, size: int) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- recovery


def _find_following_record(buf: Buffer, bad_off: int, expected: int) -> int | None:
    """Offset of a valid record with seq in (expected, expected + window] after ``bad_off``, if any.

    Such a record means the damage is not a torn tail but corruption in the middle of the log.
    Searching for the seq's bytes keeps this fast even when the tail is megabytes of garbage.
    """
    limit = min(_RESYNC_WINDOW, (len(buf) - bad_off) // HEADER_BYTES - 1)
    for k in range(1, limit + 1):
        pattern = _SEQ.pack(expected + k)
        # Records expected .. expected+k-1 occupy at least HEADER_BYTES each before this one.
        pos = buf.find(pattern, bad_off + HEADER_BYTES * k + _SEQ_OFFSET)
        while pos != -1:
            try:
                if _decode_at(buf, pos - _SEQ_OFFSET).seq == expected + k:
                    return pos - _SEQ_OFFSET
            except _BadRecord:
                pass
            pos = buf.find(pattern, pos + 1)
    return None


_SECTOR = 512  # the unit a crash can leave unwritten (zeros) inside a file's last blocks


def _zero_filled(buf: Buffer, off: int) -> bool:
    """The tail from ``off`` holds a sector-aligned stretch of zeros (a whole sector, or from an
    aligned offset to the end of the file): blocks the filesystem sized but a crash never wrote."""
    size = len(buf)
    start = -(-off // _SECTOR) * _SECTOR  # first aligned offset at or after off
    if start >= size:
        return off < size and _all_zero(buf[off:size])  # a tail shorter than a sector
    return any(_all_zero(buf[sector : min(sector + _SECTOR, size)]) for sector in range(start, size, _SECTOR))


def _all_zero(chunk: bytes) -> bool:
    return chunk.count(0) == len(chunk)


def _damaged_tail(buf: Buffer, off: int, seq: int) -> str | None:
    """Why the bad tail at ``off`` (the record ``seq`` would be) is damage and not a torn append; None when torn.

    See the module doc for the rule. Called only when no valid record follows.
    """
    size = len(buf)
    if size - off < HEADER_BYTES or _zero_filled(buf, off):
        return None
    length, crc, stored_seq, _ = HEADER.unpack_from(buf, off)
    end = off + HEADER_BYTES + length
    # The rest of the file as one record: a match means every byte is here and only the length lies.
    rest_crc = zlib.crc32(
        bytes(buf[off + HEADER_BYTES : size]), zlib.crc32(buf[off + _SEQ_OFFSET : off + HEADER_BYTES])
    )
    if rest_crc == crc:
        return f"its length field says {length} bytes, the {size - off - HEADER_BYTES} bytes present match its crc"
    if end > size:
        return None  # cut short: the append never finished
    return f"all {HEADER_BYTES + length} bytes present (seq field {stored_seq}), crc mismatch"


def _scan_segment(path: Path, first_seq: int, is_last: bool, repair: bool = True) -> tuple[int, int]:
    """Validate one segment; returns (valid size, next expected seq). Truncates a torn tail of the last
    segment (unless not ``repair``: the read-only scrub)."""
    size = path.stat().st_size
    off, seq = 0, first_seq
    with _mapped(path, size) as buf:
        while off < size:
            try:
                record = _decode_at(buf, off)
            except _BadRecord as bad:
                if not is_last:
                    raise WalError(f"{path}: bad record at offset {off} in a sealed segment: {bad}") from None
                follower = _find_following_record(buf, off, seq)
                if follower is not None:
                    raise WalError(
                        f"{path}: bad record at offset {off} ({bad}) followed by a valid record at offset {follower}"
                    ) from None
                damage = _damaged_tail(buf, off, seq)
                if damage is not None:
                    raise WalError(
                        f"{path}: the last record (seq {seq}) at offset {off} is damaged, not torn ({damage}): "
                        "an acknowledged write may be lost"
                    ) from None
                break
            if record.seq != seq:
                raise WalError(f"{path}: record at offset {off} has seq {record.seq}, expected {seq}")
            off, seq = record.end, seq + 1
    if off < size and repair:
        log.warning("%s: truncating torn tail at offset %d (%d bytes dropped)", path, off, size - off)
        _truncate_durably(path, off)
    return off, seq


def _recover(directory: Path, repair: bool = True) -> tuple[list[_Segment], int]:
    """Validate every segment in order; returns the segments and the last valid seq (0 when empty)."""
    paths = sorted(p for p in directory.iterdir() if _SEGMENT_NAME.fullmatch(p.name))
    segments: list[_Segment] = []
    next_seq: int | None = None
    for i, path in enumerate(paths):
        first = int(path.name[:20])
        if first < 1:
            raise WalError(f"{path}: segment name gives first seq {first}; sequence numbers start at 1")
        if next_seq is not None and first != next_seq:
            raise WalError(f"{path}: segment starts at seq {first} but the previous one ends at {next_seq - 1}")
        size, next_seq = _scan_segment(path, first, is_last=i == len(paths) - 1, repair=repair)
        segments.append(_Segment(first, path, size))
    return segments, (next_seq - 1 if next_seq is not None else 0)


def _check_reaches(directory: Path, segments: list[_Segment], last_seq: int, first_seq: int) -> None:
    """A log must reach the caller's checkpoint (``first_seq - 1``): a checkpoint never trims the
    active segment, so a log that ends before it lost records, or the checkpoint's seq is wrong."""
    if segments and last_seq < first_seq - 1:
        raise WalError(
            f"{directory}: the log ends at seq {last_seq}, before the checkpoint's seq {first_seq - 1}: "
            "records are missing from the log, or the checkpoint's wal_seq is wrong"
        )


def _header_at(path: Path, size: int, first_seq: int, seq: int) -> tuple[int, int] | None:
    """(offset, stored crc) of record ``seq`` in a validated segment, walking the headers; None past its end."""
    off, at = 0, first_seq
    with _mapped(path, size) as buf:
        while off + HEADER_BYTES <= size:
            length, crc, _, _ = HEADER.unpack_from(buf, off)
            if at == seq:
                return off, crc
            off, at = off + HEADER_BYTES + length, at + 1
    return None


def _record_crc(segments: list[_Segment], last_seq: int, seq: int) -> int | None:
    if seq < 1 or seq > last_seq:
        return None
    for i, segment in enumerate(segments):
        end = segments[i + 1].first_seq - 1 if i + 1 < len(segments) else last_seq
        if segment.first_seq <= seq <= end:
            found = _header_at(segment.path, segment.size, segment.first_seq, seq)
            return None if found is None else found[1]
    return None


def _check_checkpoint(segments: list[_Segment], last_seq: int, seq: int, crc: int) -> None:
    actual = _record_crc(segments, last_seq, seq)
    if actual is not None and actual != crc:
        raise WalError(
            f"{segments[0].path.parent}: record {seq}, where the checkpoint says replay starts, has crc32 {actual}, "
            f"the checkpoint recorded {crc}: the checkpoint's wal_seq does not match the log"
        )


# --------------------------------------------------------------------- the log


class WriteAheadLog:
    """An append-only, segmented, CRC-checked log with group-committed fsync. Thread-safe."""

    external = False  # a shard's local log: it appends its own writes (index/log.py ShardLog)

    def __init__(self, directory: Path, segments: list[_Segment], last_seq: int, fd: int, segment_bytes: int) -> None:
        """Use ``WriteAheadLog.open``; this assumes recovery already ran and ``fd`` is the last segment."""
        self._dir = directory
        self._segments = segments
        self._segment_bytes = segment_bytes
        self._fd = fd
        self._last_seq = last_seq
        self._synced_seq = last_seq  # open() fsynced the active segment; sealed ones were fsynced on roll
        self._lock = threading.Lock()  # guards appends, the segment list and the fd
        self._sync_lock = threading.Lock()  # one fsync in flight; waiters usually find their seq covered
        self._closed = False
        self._failure: str | None = None  # set when an I/O error left the log in an unknown state
        self.fsync_count = 0  # fsyncs issued by sync() and close(); lets tests see group commit
        self.stats = WalStats()  # a shard replaces it with its own (index/stats.py), kept across reopens

    @classmethod
    def open(
        cls,
        directory: Path,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
        *,
        first_seq: int = 1,
        checkpoint_crc: int | None = None,
    ) -> WriteAheadLog:
        """Open or create the log in ``directory``, validating and repairing it as described in the module doc.

        ``first_seq`` is the first seq the caller has not checkpointed: an empty log starts numbering there,
        and a log that ends before ``first_seq - 1`` raises WalError (records are missing). ``checkpoint_crc``
        (``record_crc(first_seq - 1)`` when the checkpoint was written): if that record is still in the log,
        its CRC must match, else the checkpoint and the log disagree on where replay starts (WalError).
        """
        if segment_bytes < HEADER_BYTES:
            raise InvalidArgument.field("segment_bytes", f"must be at least {HEADER_BYTES}, got {segment_bytes}")
        if first_seq < 1:
            raise InvalidArgument.field("first_seq", f"must be at least 1, got {first_seq}")
        directory = Path(directory)
        if not directory.is_dir():
            directory.mkdir(parents=True, exist_ok=True)
            fsync_dir(directory.parent)
        segments, last_seq = _recover(directory)
        _check_reaches(directory, segments, last_seq, first_seq)
        if checkpoint_crc is not None:
            _check_checkpoint(segments, last_seq, first_seq - 1, checkpoint_crc)
        if not segments:
            last_seq = max(last_seq, first_seq - 1)
            segments = [_Segment(last_seq + 1, _segment_path(directory, last_seq + 1), 0)]
        fd = _open_for_append(segments[-1].path)
        try:
            os.fsync(fd)  # records that survived a process crash may still be only in the page cache
            fsync_dir(directory)
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, segments, last_seq, fd, segment_bytes)

    # ---------------------------------------------------------------- properties

    @property
    def last_seq(self) -> int:
        """Seq of the last appended record (0 when the log has never held one)."""
        return self._last_seq

    @property
    def synced_seq(self) -> int:
        """Every record with seq <= this is on stable storage."""
        return self._synced_seq

    def size_bytes(self) -> int:
        """Total bytes of all segment files."""
        with self._lock:
            return sum(segment.size for segment in self._segments)

    # ------------------------------------------------------------------- writes

    def append(self, kind: int, payload: bytes) -> int:
        """Write one record to the OS (no fsync) and return its seq."""
        return self.append_many([(kind, payload)])

    def append_many(self, records: list[tuple[int, bytes]]) -> int:
        """Write several records with one write call (no fsync); returns the last seq."""
        for kind, payload in records:
            _check_record(kind, payload)
        with self._lock:
            self._check_usable()
            if not records:
                return self._last_seq
            first = self._last_seq + 1
            data = b"".join(_encode(first + i, kind, payload) for i, (kind, payload) in enumerate(records))
            started = time.perf_counter()
            self._roll_if_needed(len(data))
            self._write(data)
            self.stats.append_seconds.observe(time.perf_counter() - started)
            self.stats.appended_bytes += len(data)
            self._last_seq = first + len(records) - 1
            return self._last_seq

    def _check_usable(self) -> None:
        if self._closed:
            raise Unavailable(f"write-ahead log {self._dir} is closed")
        if self._failure is not None:
            raise WalError(f"write-ahead log {self._dir} is unusable after an I/O failure: {self._failure}")

    def _fail(self, what: str, exc: OSError) -> WalError:
        """Poison the log: after a failed fsync the kernel may have dropped the dirty pages, so retrying lies."""
        self._failure = f"{what}: {exc}"
        return WalError(f"write-ahead log {self._dir}: {self._failure}")

    def _write(self, data: bytes) -> None:
        """Write all of ``data`` to the active segment, or leave it exactly as it was."""
        active = self._segments[-1]
        view = memoryview(data)
        written = 0
        try:
            while written < len(data):
                written += os.write(self._fd, view[written:])
        except OSError as exc:
            try:
                os.ftruncate(self._fd, active.size)  # a partial record followed by later ones would be corruption
            except OSError as undo:
                raise self._fail(f"{active.path}: write failed and could not be undone", undo) from exc
            if exc.errno in _DISK_FULL_ERRNOS:  # the log is as it was: appends work again once there is room
                raise DiskFull(f"disk full: write-ahead log append to {active.path} failed: {exc}") from exc
            raise Unavailable(f"{active.path}: write-ahead log append failed: {exc}") from exc
        active.size += len(data)

    def _roll_if_needed(self, incoming: int) -> None:
        """Start a new segment when the incoming bytes would push a non-empty active one past segment_bytes."""
        active = self._segments[-1]
        if active.size == 0 or active.size + incoming <= self._segment_bytes:
            return
        segment = _Segment(self._last_seq + 1, _segment_path(self._dir, self._last_seq + 1), 0)
        try:
            _fsync_data(self._fd)  # a sealed segment is never fsynced again, so it must be complete now
        except OSError as exc:
            raise self._fail(f"{active.path}: sealing segment failed", exc) from exc
        try:
            fd = _open_for_append(segment.path)
        except OSError as exc:  # nothing changed yet: the active segment stays active
            if exc.errno in _DISK_FULL_ERRNOS:
                raise DiskFull(f"disk full: cannot create write-ahead log segment {segment.path}: {exc}") from exc
            raise Unavailable(f"cannot create write-ahead log segment {segment.path}: {exc}") from exc
        try:
            fsync_dir(self._dir)
        except OSError as exc:
            os.close(fd)
            raise self._fail(f"{segment.path}: fsync of the new segment's directory entry failed", exc) from exc
        os.close(self._fd)  # sync() works on a dup, so closing here cannot pull the fd from under it
        self._fd = fd
        self._segments.append(segment)

    # ---------------------------------------------------------------- durability

    def sync(self, seq: int) -> None:
        """Return once every record with seq <= ``seq`` is on stable storage, sharing fsyncs between callers."""
        if seq <= self._synced_seq:
            return
        with self._sync_lock:
            if seq <= self._synced_seq:
                return  # the fsync we waited behind covered us
            with self._lock:
                self._check_usable()
                if seq > self._last_seq:
                    raise InvalidArgument.field("seq", f"{seq} has not been appended (last seq {self._last_seq})")
                target = self._last_seq
                fd = os.dup(self._fd)  # fsync outside the append lock, immune to a concurrent roll closing the fd
            started = time.perf_counter()
            try:
                _fsync_data(fd)
            except OSError as exc:
                with self._lock:
                    raise self._fail("fsync failed", exc) from exc
            finally:
                os.close(fd)
            self.stats.fsync_seconds.observe(time.perf_counter() - started)
            self.fsync_count += 1
            self._synced_seq = target

    def close(self) -> None:
        """Fsync and close. Idempotent; later appends and syncs raise Unavailable."""
        with self._sync_lock, self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                if self._failure is None:
                    _fsync_data(self._fd)
                    self.fsync_count += 1
                    self._synced_seq = self._last_seq
            except OSError as exc:
                raise self._fail("fsync at close failed", exc) from exc
            finally:
                os.close(self._fd)

    def __enter__(self) -> WriteAheadLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------- reading

    def record_crc(self, seq: int) -> int | None:
        """The stored CRC of record ``seq``, None when it is not (or no longer) in the log.

        A checkpoint records it, so the next open can check that the log and the checkpoint
        agree on where replay starts (``open(checkpoint_crc=...)``). Walks the headers of
        the record's segment: O(records before it in that segment), no payload read.
        """
        with self._lock:
            segments = [_Segment(s.first_seq, s.path, s.size) for s in self._segments]
            last_seq = self._last_seq
        return _record_crc(segments, last_seq, seq)

    def read_from(self, after_seq: int) -> Iterator[tuple[int, int, bytes]]:
        """Yield (seq, kind, payload) for every record with seq > ``after_seq``, in order, across segments.

        The set of records is fixed when this is called (later appends are not seen). Do not run
        ``truncate_prefix`` while iterating. Raises WalError when records after ``after_seq`` were already removed.
        """
        if after_seq < 0:
            raise InvalidArgument.field("after_seq", f"must be >= 0, got {after_seq}")
        with self._lock:
            segments = [_Segment(s.first_seq, s.path, s.size) for s in self._segments]
            last_seq = self._last_seq
        if segments[0].first_seq > after_seq + 1:
            raise WalError(
                f"{self._dir}: records {after_seq + 1}..{segments[0].first_seq - 1} were already truncated away"
            )
        return self._iter_records(segments, after_seq, last_seq)

    @staticmethod
    def _iter_records(segments: list[_Segment], after_seq: int, last_seq: int) -> Iterator[tuple[int, int, bytes]]:
        for i, segment in enumerate(segments):
            segment_last = segments[i + 1].first_seq - 1 if i + 1 < len(segments) else last_seq
            if segment_last <= after_seq:
                continue
            yield from _read_segment(segment, after_seq)

    # ----------------------------------------------------------------- trimming

    def truncate_prefix(self, upto_seq: int) -> None:
        """Delete sealed segments whose records all have seq <= ``upto_seq`` (never the active segment)."""
        with self._lock:
            keep_from = 0
            while keep_from + 1 < len(self._segments) and self._segments[keep_from + 1].first_seq - 1 <= upto_seq:
                keep_from += 1
            doomed = self._segments[:keep_from]
            del self._segments[:keep_from]
        for segment in doomed:  # oldest first, so a crash part way leaves a contiguous log
            segment.path.unlink(missing_ok=True)
        if doomed:
            fsync_dir(self._dir)


def _read_segment(segment: _Segment, after_seq: int) -> Iterator[tuple[int, int, bytes]]:
    """Records of one segment (up to its recorded size) with seq > after_seq, re-verified against their CRC."""
    off, seq = 0, segment.first_seq
    with _mapped(segment.path, segment.size) as buf:
        while off < segment.size:
            try:
                record = _decode_at(buf, off)
            except _BadRecord as bad:
                raise WalError(f"{segment.path}: bad record at offset {off}: {bad}") from None
            if record.seq != seq:
                raise WalError(f"{segment.path}: record at offset {off} has seq {record.seq}, expected {seq}")
            if seq > after_seq:
                yield record.seq, record.kind, record.payload
            off, seq = record.end, seq + 1


def check(directory: Path, checkpoint_seq: int = 0, checkpoint_crc: int | None = None) -> list[Problem]:
    """Read-only scrub of a log directory (nothing is truncated): what ``open`` would refuse or repair.

    A bad record that ``open`` would refuse (a damaged last record included) is a fatal problem;
    a torn tail (which ``open`` truncates) is reported as not fatal: the normal trace of a crash
    that cut an unacknowledged append short.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [Problem(str(directory), "missing write-ahead log directory")] if checkpoint_seq else []
    try:
        segments, last_seq = _recover(directory, repair=False)
        _check_reaches(directory, segments, last_seq, checkpoint_seq + 1)
        if checkpoint_crc is not None:
            _check_checkpoint(segments, last_seq, checkpoint_seq, checkpoint_crc)
    except WalError as err:
        return [Problem.from_message(str(err))]
    if not segments and checkpoint_seq:
        return [Problem(str(directory), f"no log segments, but the checkpoint is at seq {checkpoint_seq}")]
    if segments:
        last = segments[-1]
        size = last.path.stat().st_size
        if size > last.size:
            message = (
                f"torn tail ({size - last.size} bytes of an unfinished append after seq {last_seq}): "
                "the next open truncates it"
            )
            return [Problem(str(last.path), message, offset=last.size, fatal=False)]
    return []
