"""Snapshot archives on a client's disk: what ``export_snapshot`` writes and ``import_snapshot`` sends.

ExportSnapshot streams a POSIX tar whose members sit under the snapshot's name
(index/snapshot.py ``tar_chunks``). ``ExportTarget`` puts it either

- in a file ``PATH`` (a ``.tar``), through a hidden ``.PATH.partial-<hex>`` beside it that is
  renamed into place once the whole stream arrived and is durable, so a broken export never
  leaves a file that looks whole; or
- when ``PATH`` is a directory or ends with ``/``, unpacked into it as ``PATH/<snapshot>/``
  (``SNAPSHOT.json``, ``shard-000/``, ...): the archive lands in a hidden file there, is
  unpacked with the same checks an import makes (regular files only, under one directory)
  and every file is checked against the manifest's crc32 before the directory is renamed
  into place.

A failed export leaves nothing, not even the directory it made.

``archive_chunks`` reads what ``import_snapshot`` sends: a tar file in pieces, or a snapshot
directory (one holding ``SNAPSHOT.json``) tarred on the fly, never staged whole.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from braid.index import snapshot
from braid.index.manifest import fsync_dir

# One SnapshotChunk: big enough that framing costs nothing, far below the default max_message_bytes.
CHUNK_BYTES = 1 << 20


def rechunk(pieces: Iterator[bytes], size: int = CHUNK_BYTES) -> Rechunked:
    """``pieces`` joined and cut again into ``size`` bytes each (the last one shorter): a tar
    stream's headers and paddings are 512 bytes, too small to be messages of their own."""
    return Rechunked(pieces, size)


class Rechunked:
    """The iterator ``rechunk`` returns. ``close`` closes ``pieces`` (an export's open file, a
    router's scratch copy) even before the first piece was asked for, which a generator's close
    would not (its ``finally`` never ran)."""

    def __init__(self, pieces: Iterator[bytes], size: int) -> None:
        self._pieces = iter(pieces)
        self._source = pieces
        self._size = size
        self._buffer = bytearray()
        self._done = False

    def __iter__(self) -> Rechunked:
        return self

    def __next__(self) -> bytes:
        size, buffer = self._size, self._buffer
        while not self._done and len(buffer) < size:
            piece = next(self._pieces, None)
            if piece is None:
                self._done = True
                self.close()
            else:
                buffer += piece
        if not buffer:
            raise StopIteration
        out = bytes(buffer[:size])
        del buffer[:size]
        return out

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()


def archive_chunks(path: str | Path, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """The archive to import from ``path``: a tar file, or a snapshot directory tarred on the fly."""
    path = Path(path)
    if path.is_dir():
        if not (path / snapshot.MANIFEST).is_file():
            raise FileNotFoundError(f"{path}: not a snapshot directory (no {snapshot.MANIFEST})")
        return rechunk(snapshot.tar_chunks(path, path.name), size)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such snapshot archive or directory")
    return _file_chunks(path, size)


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    with open(path, "rb") as fh:
        while data := fh.read(size):
            yield data


class ExportTarget:
    """Where an exported snapshot goes (module doc): ``write`` each chunk, then ``finish`` (the
    path written: the .tar file or the snapshot's directory), or ``abort`` (nothing is left)."""

    def __init__(self, path: str | Path) -> None:
        text = os.fspath(path)
        self.path = Path(text)
        self.unpack = text.endswith(("/", os.sep)) or self.path.is_dir()
        tag = uuid.uuid4().hex[:8]
        self._made_dir = self.unpack and not self.path.exists()  # removed again if the export fails
        if self.unpack:
            self.path.mkdir(parents=True, exist_ok=True)
            self.partial = self.path / f".export-{tag}.tar"
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.partial = self.path.parent / f".{self.path.name}.partial-{tag}"
        self.staging = self.path / f".unpacking-{tag}"
        self._file = open(self.partial, "xb")  # noqa: SIM115 (closed by finish or abort)

    def write(self, data: bytes) -> None:
        self._file.write(data)

    def finish(self) -> Path:
        done = False
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if not self.unpack:
                self.partial.replace(self.path)
                fsync_dir(self.path.parent)
                done = True
                return self.path
            top = snapshot.extract_tar(self.partial, self.staging)
            snapshot.verify(top)  # every file against SNAPSHOT.json: what arrived is what was taken
            final = self.path / top.name
            if final.exists():
                raise FileExistsError(f"{final}: exists already; export into another directory or remove it")
            top.rename(final)
            fsync_dir(self.path)
            done = True
            return final
        finally:
            self._clean(failed=not done)

    def abort(self) -> None:
        """Remove whatever this export left (the partial archive, an unpacking directory, the
        directory it made)."""
        self._clean(failed=True)

    def _clean(self, failed: bool) -> None:
        if not self._file.closed:
            self._file.close()
        self.partial.unlink(missing_ok=True)
        shutil.rmtree(self.staging, ignore_errors=True)
        if failed and self._made_dir:
            with contextlib.suppress(OSError):  # only while empty
                self.path.rmdir()
