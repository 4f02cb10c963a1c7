"""Writing one checkpoint file so that a write that failed is never published.

A checkpoint (index/shard/checkpoint.py) checksums its files by reading them back (index/checksums.py);
a file that a full disk cut short would get a checksum of its truncated bytes and be
published as if whole. So every checkpoint file is written here:

1. to ``<name>.tmp`` beside its final name, counting the bytes handed to the writer and
   their zlib.crc32 as they pass;
2. flushed and fsynced (an error from either is raised: ENOSPC, EIO);
3. read back whole: its size and CRC must equal what was handed over, else OSError(EIO)
   naming the file and both sizes (a short or failed write the writer did not report);
4. renamed onto ``<name>``. The caller fsyncs the directory (the checkpoint's staging
   directory is fsynced when its CHECKSUMS is written, before the rename that publishes it).

On any failure ``<name>.tmp`` is removed and nothing is renamed. Writers Braid does not
control (hnswlib's ``save_index``, which never reports a failed write) are checked
structurally instead (index/hnswfile.py).
"""

from __future__ import annotations

import errno
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .checksums import crc32_file


class _Counting:
    """A binary file that counts what passes through it and its CRC-32."""

    def __init__(self, fh: Any) -> None:
        self._fh = fh
        self.size = 0
        self.crc = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        written = self._fh.write(view)
        if written is not None and written != len(view):  # a raw file's short write
            raise OSError(errno.EIO, f"short write: {written} of {len(view)} bytes")
        return len(view)

    def flush(self) -> None:
        self._fh.flush()


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def write_with(path: Path, produce: Callable[[Any], None]) -> tuple[int, int]:
    """Write ``path`` through ``produce(file)`` (steps 1-4 above); returns (size, crc32)."""
    path = Path(path)
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            counting = _Counting(fh)
            produce(counting)
            fh.flush()
            os.fsync(fh.fileno())
        verify_written(tmp, counting.size, counting.crc, path)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return counting.size, counting.crc


def write_bytes(path: Path, data: bytes) -> tuple[int, int]:
    """Write ``data`` to ``path`` durably and verified (see the module docstring)."""
    return write_with(path, lambda fh: fh.write(data))


def write_npy(path: Path, array: np.ndarray) -> tuple[int, int]:
    """``np.save`` of ``array`` (no pickles) to ``path``, durably and verified."""
    array = np.ascontiguousarray(array)
    return write_with(path, lambda fh: np.save(fh, array, allow_pickle=False))


def verify_written(tmp: Path, size: int, crc: int, name: Path | None = None) -> None:
    """OSError(EIO) unless ``tmp`` reads back as ``size`` bytes with CRC-32 ``crc``."""
    got_size, got_crc = crc32_file(tmp)
    if got_size != size or got_crc != crc:
        raise OSError(
            errno.EIO,
            f"{name or tmp}: read back {got_size} bytes (crc32 {got_crc}) after writing {size} bytes "
            f"(crc32 {crc}): the write failed without an error; nothing was published",
        )
