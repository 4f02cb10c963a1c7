"""Atomic replacement of small metadata files (manifests) and directory fsync.

This module owns the crash-safe publish step used by every on-disk structure:
write ``<name>.tmp``, fsync it, ``os.replace`` it onto ``<name>``, fsync the
directory. A reader therefore sees either the old complete file or the new
complete file, never a mix, and a leftover ``.tmp`` from a crash is ignored.

Byte layout of a JSON manifest: UTF-8 JSON text, keys sorted, ``indent=1``,
one trailing newline. Writers of one path must be serialised by the caller
(they share the ``.tmp`` name).

Checksum: every JSON manifest Braid writes (``write_json_atomic``, ``dumps_checked``)
carries a top-level ``"crc32"``: zlib.crc32 of the *canonical* form of the object
without that key (``json.dumps(obj, sort_keys=True, separators=(",", ":"))``, ASCII).
``read_json`` recomputes it and raises DataLoss naming the file on a mismatch (or when
the key itself is one character off, e.g. ``"crc33"``), and returns the object without
it. A canonical form rather than the file's bytes, so the check does not depend on the
layout; a flip in the layout's whitespace cannot parse to the same object (JSON allows
only four whitespace bytes). A file without the key (written
before checksums, format change of this version) still reads; that is logged once per
file name at INFO, and ``require_checksum=True`` refuses it. CRC-32 rather than a
cryptographic hash: the threat is accidental corruption, not an adversary, and
zlib.crc32 detects every burst of up to 32 bits at ~4 GB/s (the same choice as the WAL
and the posting files).
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any

from .errors import DataLoss

log = logging.getLogger("braid.manifest")

CHECKSUM_KEY = "crc32"
_UNCHECKED_LOGGED: set[str] = set()  # file names already reported as written without a checksum


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


def _one_char_off(key: str, expected: str) -> bool:
    return len(key) == len(expected) and sum(a != b for a, b in zip(key, expected, strict=True)) == 1


def content_crc32(obj: dict[str, Any]) -> int:
    """CRC-32 of the canonical JSON form of ``obj`` without its checksum key."""
    content = {key: value for key, value in obj.items() if key != CHECKSUM_KEY}
    return zlib.crc32(json.dumps(content, sort_keys=True, separators=(",", ":")).encode("ascii"))


def dumps_checked(obj: dict[str, Any]) -> bytes:
    """``obj`` as a JSON manifest's bytes (sorted keys, indent 1, newline) with its ``crc32`` embedded."""
    content = {key: value for key, value in obj.items() if key != CHECKSUM_KEY}
    content[CHECKSUM_KEY] = content_crc32(content)
    return (json.dumps(content, sort_keys=True, indent=1) + "\n").encode("utf-8")


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Serialise ``obj`` as JSON (sorted keys, indent 1, a ``crc32``) and publish it atomically at ``path``."""
    write_atomic(path, dumps_checked(obj))


def read_json(path: Path, *, require_checksum: bool = False) -> dict[str, Any] | None:
    """The JSON object at ``path`` without its ``crc32``; None when the file does not exist.

    DataLoss (naming the file) when it is not a JSON object or its checksum does not match;
    with ``require_checksum``, also when it has none.
    """
    return load_json(path, require_checksum=require_checksum)[0]


def load_json(path: Path, *, require_checksum: bool = False) -> tuple[dict[str, Any] | None, bool]:
    """``read_json``, and whether the file carried a checksum (a reader that knows its format
    version can then refuse a new-format file whose checksum went missing)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None, False
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataLoss(f"{path}: unparsable JSON manifest: {exc}") from exc
    if not isinstance(obj, dict):
        raise DataLoss(f"{path}: expected a JSON object, got {type(obj).__name__}")
    if CHECKSUM_KEY not in obj:
        damaged = [key for key in obj if _one_char_off(key, CHECKSUM_KEY)]
        if damaged:  # the checksum's own key took the flip: the content is unverifiable
            raise DataLoss(f"{path}: damaged checksum key {damaged[0]!r} (expected {CHECKSUM_KEY!r})")
        if require_checksum:
            raise DataLoss(f"{path}: no {CHECKSUM_KEY!r} checksum, and this file must carry one")
        if path.name not in _UNCHECKED_LOGGED:
            _UNCHECKED_LOGGED.add(path.name)
            log.info("%s: written without a checksum (before format checksums); read unchecked", path)
        return obj, False
    stored = obj.pop(CHECKSUM_KEY)
    actual = content_crc32(obj)
    if stored != actual:
        raise DataLoss(f"{path}: checksum mismatch: {CHECKSUM_KEY} {stored!r} stored, content has {actual}")
    return obj, True
