"""A full disk at one write step, switched on and off by files, for tests/test_disk_full.py.

``install(flags)`` wraps the real object at each step's seam; while ``flags/<step>`` exists
that step raises OSError(ENOSPC), as a full disk would. Only the seam is wrapped, never
Braid's own control flow, so the error travels every layer a real one would.

The same module serves an in-process server (``install`` / ``uninstall``) and a child
process: ``sitecustomize_dir`` writes a sitecustomize.py that installs it at the child's
start when BRAID_TEST_DISK_FAULTS names the flag directory.

| step           | seam                                   | what fails                              |
|----------------|----------------------------------------|-----------------------------------------|
| wal_write      | ``os`` as index/wal.py sees it         | half the record is written, then ENOSPC |
| wal_fsync      | index/wal.py's ``_fsync_data``         | the group fsync                         |
| tantivy_commit | each TextIndex's tantivy IndexWriter   | its commit, as tantivy-py reports ENOSPC|
| apply          | ``HnswStrand.add``, ``DenseIndex.add`` | the apply step (and replay)             |
| checkpoint     | ``HnswStrand.save``, ``DenseIndex.save``| a checkpoint's file writes (Flush)     |
| merge          | ``SpannSegment.build``                 | a SPANN seal or compaction              |

One more flag frees space instead of failing: while ``flags/free_after_save`` exists, the
file it names is deleted right after a ``HnswStrand.save`` (or ``DenseIndex.save``) returns or raises (once: the flag
goes too), as a concurrent writer undoing its own failed write would free space on a real
full disk; the checkpoint's later files then find room, as they did when a truncated
``.hnsw`` was published (issue 20, finding 1).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

STEPS = ("wal_write", "wal_fsync", "tantivy_commit", "apply", "checkpoint", "merge")
ENV = "BRAID_TEST_DISK_FAULTS"
_undo: list[tuple[Any, str, Any]] = []


def full_disk() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _OsWithFaults:
    """``os`` for index/wal.py only: ``write`` writes half the data, then fails, while the flag is set."""

    def __init__(self, flags: Path) -> None:
        self._flags = flags

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, fd: int, data: Any) -> int:
        if not (self._flags / "wal_write").exists():
            return os.write(fd, data)
        if len(data) > 1:
            os.write(fd, bytes(data[: len(data) // 2]))  # a torn record for the log to undo
        raise full_disk()


class _WriterWithFaults:
    """A TextIndex's tantivy IndexWriter whose commit fails while the flag is set, with the
    ValueError tantivy-py raises for ENOSPC, so TextIndex's own error handling runs."""

    def __init__(self, writer: Any, flags: Path) -> None:
        self._writer = writer
        self._flags = flags

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def commit(self) -> Any:
        if (self._flags / "tantivy_commit").exists():
            raise ValueError("An IO error occurred: 'No space left on device (os error 28)'")
        return self._writer.commit()


def _wrap_text_writers(flags: Path) -> None:
    from braid.index.text import TextIndex

    real_init = TextIndex.__init__

    def init(self: TextIndex, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        self._writer = _WriterWithFaults(self._writer, flags)

    _undo.append((TextIndex, "__init__", real_init))
    TextIndex.__init__ = init  # type: ignore[method-assign]


def _wrap(owner: Any, name: str, flags: Path, step: str) -> None:
    real = getattr(owner, name)

    def faulty(*args: Any, **kwargs: Any) -> Any:
        if (flags / step).exists():
            raise full_disk()
        return real(*args, **kwargs)

    _undo.append((owner, name, real))
    setattr(owner, name, faulty)


def _free_after_save(owner: Any, name: str, flags: Path) -> None:
    real = getattr(owner, name)

    def freeing(*args: Any, **kwargs: Any) -> Any:
        try:
            return real(*args, **kwargs)
        finally:
            flag = flags / "free_after_save"
            if flag.exists():
                Path(flag.read_text().strip()).unlink(missing_ok=True)
                flag.unlink(missing_ok=True)

    _undo.append((owner, name, real))
    setattr(owner, name, freeing)


def install(flags: Path) -> None:
    """Wrap every seam; each fails while ``flags/<step>`` exists. Idempotent per process."""
    if _undo:
        return
    from braid.index import wal
    from braid.index.dense import DenseIndex
    from braid.index.hnsw_strand import HnswStrand
    from braid.index.spann import SpannSegment

    flags.mkdir(parents=True, exist_ok=True)
    _undo.append((wal, "os", wal.os))
    wal.os = _OsWithFaults(flags)  # type: ignore[assignment]
    _wrap(wal, "_fsync_data", flags, "wal_fsync")
    _wrap_text_writers(flags)
    for dense in (HnswStrand, DenseIndex):  # an HNSW field's strand; a SPANN field's growing graph
        _wrap(dense, "add", flags, "apply")
        _wrap(dense, "save", flags, "checkpoint")
        _free_after_save(dense, "save", flags)
    _wrap(SpannSegment, "build", flags, "merge")


def uninstall() -> None:
    while _undo:
        owner, name, real = _undo.pop()
        setattr(owner, name, real)


def sitecustomize_dir(directory: Path) -> Path:
    """A directory whose sitecustomize.py installs the faults in a child Python (put it on PYTHONPATH)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(
        "import importlib.util, os, pathlib\n"
        f"if os.environ.get({ENV!r}):\n"
        f"    spec = importlib.util.spec_from_file_location('diskfaults', {str(Path(__file__).resolve())!r})\n"
        "    module = importlib.util.module_from_spec(spec)\n"
        "    spec.loader.exec_module(module)\n"
        f"    module.install(pathlib.Path(os.environ[{ENV!r}]))\n"
    )
    return directory
