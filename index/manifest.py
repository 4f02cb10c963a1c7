"""Atomic replacement of small metadata files (manifests) and directory fsync.

This module owns the crash-safe publish step used by every on-disk structure:
write ``<name>.tmp``, fsync it, ``os.replace`` it onto ``<name>``, fsync the
directory. A reader therefore sees either the old complete file or the new
complete file, never a mix, and a leftover ``.tmp`` from a crash is ignored.

Byte layout of a JSON manifest: UTF-8 JSON text, keys sorted, ``indent=1``,
one trailing newline. Writers of one path must be serialised by the caller
(they share the ``.tmp`` name).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import DataLoss


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves either the old or the new content."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # do not leave a half-written .tmp behind on a clean failure
        raise
    fsync_dir(path.parent)  # the rename itself is only durable once the directory is


def write_json_atomic(path: Path, obj: Any) -> None:
    """Serialise ``obj`` as JSON (sorted keys, indent 1) and publish it atomically at ``path``."""
    write_atomic(path, (json.dumps(obj, sort_keys=True, indent=1) + "\n").encode("utf-8"))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object at ``path``; None when the file does not exist; DataLoss when it is not a JSON object."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataLoss(f"{path}: unparsable JSON manifest: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataLoss(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
