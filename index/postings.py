"""The SPANN posting file: every posting list of one segment in one file, read with positioned reads.

Byte layout (version 1, all integers little-endian)::

    offset 0, header, 64 bytes:
       0  8s   magic b"BRDSPANN"
       8  u32  format version (1)
      12  u32  dim
      16  u32  vector dtype code (0 = float32)
      20  u32  n_lists
      24  u64  n_rows      rows over all lists (a replicated vector counts once per list)
      32  u64  n_labels    distinct labels (vectors) in the segment
      40  u64  locator_offset
      48  u32  crc32 of the offset table
      52  u32  crc32 of the locator
      56  u32  crc32 of header bytes 0..56
      60  u32  reserved (0)
    offset 64, offset table, n_lists x 16 bytes:
           u64 byte offset of the list | u32 row count | u32 crc32 of the list's bytes
    lists, each starting on a 4096-byte boundary (so a cold read of a list touches
    ceil(bytes / 4096) pages), zero padding between them:
           count x dim float32 vectors, row-major | count x i64 labels
    locator at locator_offset (4096-aligned), n_labels x 16 bytes, sorted by label:
           i64 label | u32 list | u32 row   (where the label's primary copy lives)
    end of file = locator_offset + 16 * n_labels

A list is one contiguous extent, so ``scan`` and ``read_lists`` fetch each with a
single ``os.preadv`` that scatters the vectors and the labels straight into numpy
arrays: the bytes come from the OS page cache (or the SSD) and nothing of the file
stays mapped in the process, so the index's resident memory is its offset table
(plus one ~2 MiB scan buffer per scan in flight, pooled process-wide).
``open`` checks the header, the table's CRC and the file size (a truncated or
corrupt file raises DataLoss). A list's CRC (in the offset table) is checked the
first time the process reads the list, before its rows are used: ``scan`` (queries)
checks it on the bytes it just read, ``read_rows`` (single rows) reads the whole list
once to check it, and one bit a list remembers it. ``read_lists`` (merges) checks every
time, so a merge never copies a bad list into a new segment. Why only once for queries:
CRC-32 runs at ~3-4 GB/s, slower than scoring the same bytes, and checking every read
measured 5.6 instead of 1.7 ms a query (20k x 384-d segment, default probe); the cost
of once is a list that rots on disk *after* its first read in this process and is then
evicted from the page cache, which the next start or ``verify`` catches. The
locator's CRC is checked whenever it is read. ``verify`` checks every list and the
locator (the whole file): the offline scrub, not ``open``, since reading a segment
of many GB at every start would be prohibitive. A mismatch is DataLoss naming the
file, the list and its offset.

Writing goes to ``<name>.tmp``, is fsynced, renamed onto the final name and the
directory fsynced, so a crash leaves either no file or a complete one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from .errors import DataLoss
from .manifest import fsync_dir

MAGIC = b"BRDSPANN"
VERSION = 1
DTYPE_FLOAT32 = 0
PAGE = 4096
_HEADER = struct.Struct("<8sIIIIQQQIIII")
_HEADER_CRC_END = 56
HEADER_SIZE = 64
TABLE_DTYPE = np.dtype([("offset", "<u8"), ("count", "<u4"), ("crc", "<u4")])
LOCATOR_DTYPE = np.dtype([("label", "<i8"), ("list", "<u4"), ("row", "<u4")])
# Vectors read per block by ``scan`` (a pooled, reused buffer): a block stays in the CPU cache.
SCAN_BUFFER_BYTES = 2 << 20


class _ScanBuffers:
    """Scan buffers shared by every posting file in the process: one per scan in flight.

    A scan takes a free buffer (or makes one) and gives it back, so the process holds as
    many buffers as it has ever run scans at once, whatever the count of segments and
    threads (thread-local buffers would cost segments x threads x 2 MiB).
    """

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def take(self, nbytes: int) -> Iterator[np.ndarray]:
        """A uint8 buffer of at least ``nbytes`` for the duration of the block."""
        if nbytes > self.nbytes:  # a list larger than a pooled buffer: a one-off
            yield np.empty(nbytes, dtype=np.uint8)
            return
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = np.empty(self.nbytes, dtype=np.uint8)
        try:
            yield buffer
        finally:
            with self._lock:
                self._free.append(buffer)


_SCAN_BUFFERS = _ScanBuffers(SCAN_BUFFER_BYTES)


def _align(offset: int) -> int:
    return -(-offset // PAGE) * PAGE


def write_postings(
    path: Path,
    vectors: np.ndarray,
    labels: np.ndarray,
    members: Sequence[np.ndarray],
    primary: np.ndarray,
) -> None:
    """Write a posting file atomically.

    Args:
        path: final file name (written as ``<path>.tmp`` first).
        vectors: n x dim float32, the segment's vectors (already normalised for cosine).
        labels: n int64 labels, distinct.
        members: per list, the row numbers (into ``vectors``) it holds, in list order.
        primary: n ints, the list holding each row's primary copy (the row must be in it).
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    n, dim = vectors.shape
    table = np.zeros(len(members), dtype=TABLE_DTYPE)
    locator = np.zeros(n, dtype=LOCATOR_DTYPE)
    locator["label"] = labels
    found = np.zeros(n, dtype=bool)
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            offset = _align(HEADER_SIZE + TABLE_DTYPE.itemsize * len(members))
            fh.seek(offset)
            for number, rows in enumerate(members):
                rows = np.asarray(rows, dtype=np.int64)
                data = vectors[rows].tobytes() + labels[rows].tobytes()
                table[number] = (offset, len(rows), zlib.crc32(data))
                fh.write(data)
                padded = _align(offset + len(data))
                fh.write(b"\0" * (padded - offset - len(data)))
                offset = padded
                mine = np.flatnonzero(primary[rows] == number)
                locator["list"][rows[mine]] = number
                locator["row"][rows[mine]] = mine
                found[rows[mine]] = True
            if not found.all():
                raise ValueError(f"{int((~found).sum())} rows are missing from their primary list")
            locator = locator[np.argsort(labels, kind="stable")]
            locator_bytes = locator.tobytes()
            table_bytes = table.tobytes()
            fh.write(locator_bytes)
            head = _HEADER.pack(
                MAGIC,
                VERSION,
                dim,
                DTYPE_FLOAT32,
                len(members),
                int(table["count"].sum()),
                n,
                offset,
                zlib.crc32(table_bytes),
                zlib.crc32(locator_bytes),
                0,
                0,
            )
            head = head[:_HEADER_CRC_END] + struct.pack("<II", zlib.crc32(head[:_HEADER_CRC_END]), 0)
            fh.seek(0)
            fh.write(head)
            fh.write(table_bytes)
            fh.flush()
            os.fsync(fh.fileno())
            expected = offset + len(locator_bytes)
            if os.fstat(fh.fileno()).st_size != expected:  # a write that failed without saying so
                raise OSError(errno.EIO, f"{path}: {os.fstat(fh.fileno()).st_size} bytes written, expected {expected}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class PostingFile:
    """An open posting file: header and offset table in memory, lists read on demand."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, HEADER_SIZE, 0)
        if len(head) < HEADER_SIZE:
            raise DataLoss(f"{self.path}: truncated posting file: {size} bytes, header needs {HEADER_SIZE}")
        (magic, version, dim, dtype, n_lists, n_rows, n_labels, locator_offset, table_crc, locator_crc, head_crc, _) = (
            _HEADER.unpack(head)
        )
        if magic != MAGIC:
            raise DataLoss(f"{self.path}: not a posting file: magic {magic!r}, expected {MAGIC!r}")
        if head_crc != zlib.crc32(head[:_HEADER_CRC_END]):
            raise DataLoss(f"{self.path}: posting file header checksum mismatch")
        if version != VERSION or dtype != DTYPE_FLOAT32:
            raise DataLoss(f"{self.path}: unsupported posting file version {version} / dtype {dtype}")
        expected = locator_offset + LOCATOR_DTYPE.itemsize * n_labels
        if size != expected:
            raise DataLoss(f"{self.path}: truncated or padded posting file: {size} bytes, expected {expected}")
        raw = os.pread(self._fd, TABLE_DTYPE.itemsize * n_lists, HEADER_SIZE)
        if zlib.crc32(raw) != table_crc:
            raise DataLoss(f"{self.path}: posting offset table checksum mismatch")
        self.dim = dim
        self.n_rows = n_rows
        self.n_labels = n_labels
        self._locator_offset = locator_offset
        self._locator_crc = locator_crc
        table = np.frombuffer(raw, dtype=TABLE_DTYPE)
        self.offsets = table["offset"].astype(np.int64)
        self.counts = table["count"].astype(np.int64)
        self._crcs = table["crc"].copy()
        self._crc_list = self._crcs.tolist()
        self._checked = np.zeros(len(self._crcs), dtype=bool)  # lists whose CRC this process has checked
        self._offsets = self.offsets.tolist()
        self._row_bytes = 4 * dim
        self._scan_rows = max(SCAN_BUFFER_BYTES // self._row_bytes, int(self.counts.max(initial=1)))

    @property
    def n_lists(self) -> int:
        return len(self.counts)

    def read_lists(self, lists: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows of the given lists, concatenated: (vectors n x dim, labels n, row start of each list + end)."""
        counts = self.counts[lists]
        bounds = np.zeros(len(lists) + 1, dtype=np.int64)
        np.cumsum(counts, out=bounds[1:])
        total = int(bounds[-1])
        vectors = np.empty((total, self.dim), dtype=np.float32)
        labels = np.empty(total, dtype=np.int64)
        fd, row_bytes, offsets, crcs = self._fd, self._row_bytes + 8, self._offsets, self._crc_list
        start = 0
        # The hot loop of a query: plain Python ints, one preadv per list.
        for number, end in zip(lists.tolist(), bounds[1:].tolist(), strict=True):
            if end > start:
                got = os.preadv(fd, (vectors[start:end], labels[start:end]), offsets[number])
                if got != (end - start) * row_bytes:
                    raise DataLoss(f"{self.path}: short read of list {number}: {got} bytes")
                if zlib.crc32(labels[start:end], zlib.crc32(vectors[start:end])) != crcs[number]:
                    raise self._bad_list(number)  # always checked: a merge must never copy a bad list
                self._checked[number] = True
            start = end
        return vectors, labels, bounds

    def scan(self, lists: np.ndarray, score: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``score`` of every row of the given lists (float32) and the rows' labels, list by list.

        Vectors go through one small pooled buffer (about 2 MiB, or the largest list) that
        is reused: each block is scored while it is still in the CPU cache, and no query
        allocates (and page-faults in) a buffer the size of everything it reads.
        """
        counts = self.counts[lists]
        total = int(counts.sum())
        scores = np.empty(total, dtype=np.float32)
        labels = np.empty(total, dtype=np.int64)
        capacity = self._scan_rows
        with _SCAN_BUFFERS.take(capacity * self._row_bytes) as raw:
            buffer = raw[: capacity * self._row_bytes].view(np.float32).reshape(capacity, self.dim)
            fd, row_bytes, offsets, crcs = self._fd, self._row_bytes + 8, self._offsets, self._crc_list
            checked = self._checked
            filled = done = 0  # rows in the buffer / rows scored
            for number, count in zip(lists.tolist(), counts.tolist(), strict=True):
                if filled + count > capacity:
                    scores[done : done + filled] = score(buffer[:filled])
                    done += filled
                    filled = 0
                if count:
                    row = done + filled
                    got = os.preadv(fd, (buffer[filled : filled + count], labels[row : row + count]), offsets[number])
                    if got != count * row_bytes:
                        raise DataLoss(f"{self.path}: short read of list {number}: {got} bytes")
                    if not checked[number]:  # first read of this list by the process: check its CRC
                        crc = zlib.crc32(labels[row : row + count], zlib.crc32(buffer[filled : filled + count]))
                        if crc != crcs[number]:
                            raise self._bad_list(number)
                        checked[number] = True
                    filled += count
            scores[done : done + filled] = score(buffer[:filled])
        return scores, labels

    def locator(self) -> np.ndarray:
        """The label -> (list, row) table of primary copies, sorted by label (read and checked now)."""
        raw = os.pread(self._fd, LOCATOR_DTYPE.itemsize * self.n_labels, self._locator_offset)
        if zlib.crc32(raw) != self._locator_crc:
            raise DataLoss(f"{self.path}: posting locator checksum mismatch")
        return np.frombuffer(raw, dtype=LOCATOR_DTYPE)

    def read_rows(self, lists: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """The vectors at (list, row) pairs, one positioned read each (each list CRC-checked once)."""
        for number in np.unique(lists[~self._checked[lists]]).tolist() if len(lists) else []:
            self._check_list(number)
        out = np.empty((len(lists), self.dim), dtype=np.float32)
        for i, (number, row) in enumerate(zip(lists.tolist(), rows.tolist(), strict=True)):
            got = os.preadv(self._fd, (out[i],), int(self.offsets[number]) + row * self._row_bytes)
            if got != self._row_bytes:
                raise DataLoss(f"{self.path}: short read of list {number} row {row}")
        return out

    def verify(self) -> None:
        """Check every list's CRC and the locator's (reads the whole file); DataLoss names the first bad list."""
        for number in range(self.n_lists):
            self._check_list(number)
        self.locator()

    def bad_lists(self) -> list[int]:
        """Numbers of every list whose bytes fail their CRC (reads every list; the offline scrub)."""
        bad = []
        for number in range(self.n_lists):
            try:
                self._check_list(number)
            except DataLoss:
                bad.append(number)
        return bad

    def _check_list(self, number: int) -> None:
        length = int(self.counts[number]) * (self._row_bytes + 8)
        raw = os.pread(self._fd, length, int(self.offsets[number]))
        if len(raw) != length or zlib.crc32(raw) != self._crc_list[number]:
            raise self._bad_list(number)
        self._checked[number] = True

    def _bad_list(self, number: int) -> DataLoss:
        return DataLoss(
            f"{self.path}: posting list {number} at offset {self._offsets[number]} "
            f"({int(self.counts[number])} rows) fails its crc32 checksum"
        )

    def drop_cache(self) -> None:
        """Ask the OS to evict this file from the page cache (cold-read benchmarks)."""
        os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
