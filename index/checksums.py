"""Whole-file checksums of a directory: the ``CHECKSUMS`` file of a checkpoint generation.

A checkpoint generation (``segments/<gen>/``, index/shard/checkpoint.py) holds files written by
several owners, some of which cannot carry a checksum of their own (hnswlib's index
files, numpy's ``.npy``). After every file of the generation is written and before
the directory is fsynced and renamed into place, the shard writes one ``CHECKSUMS``
file listing each of them::

    CHECKSUMS   a JSON manifest (index/manifest.py, so itself carrying a "crc32"):
                {"format": 1, "algorithm": "crc32",
                 "files": {"<name>": {"bytes": <size>, "crc32": <zlib.crc32 of the whole file>}, ...}}

It is fsynced with the generation's other files, before ``MANIFEST.json`` names the
generation. Opening a generation verifies every listed file (size, then CRC) before
anything parses it: hnswlib trusts its input and segfaults on a corrupt link list, so
the check must come first. Cost: one extra sequential read of the generation at open
and after each checkpoint is written (from the page cache), ~4 GB/s of CRC.

CRC-32 (zlib) rather than sha256 / blake2b: the threat is accidental corruption (a
flipped bit, a torn or truncated file, a stale block), not an adversary; CRC-32
catches every error burst up to 32 bits and is 2-4x faster than the hashes here.

Verification never stops at the first bad file when asked for ``problems``: the
offline scrub (index/verify.py) reports every one. A ``Problem`` names the file,
the byte offset when one applies, and what is wrong; ``Problem.error()`` is the
DataLoss an open raises.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from .errors import DataLoss
from .manifest import read_json, write_json_atomic

NAME = "CHECKSUMS"
FORMAT_VERSION = 1
ALGORITHM = "crc32"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Problem:
    """One bad file (or record) found by a check."""

    file: str
    message: str
    offset: int | None = None
    fatal: bool = True  # False: worth reporting, repaired by the next open (a torn log tail)

    def __str__(self) -> str:
        where = f" at offset {self.offset}" if self.offset is not None and "offset" not in self.message else ""
        return f"{self.file}{where}: {self.message}"

    def error(self) -> DataLoss:
        return DataLoss(str(self))

    @classmethod
    def from_message(cls, text: str, fatal: bool = True) -> Problem:
        """A problem from a DataLoss message of the form ``"<file>: <what>"`` (``at offset N`` is picked out)."""
        file, _, message = text.partition(": ")
        found = re.search(r"at offset (\d+)", message)
        return cls(file, message or text, int(found.group(1)) if found else None, fatal)

    @classmethod
    def of(cls, err: DataLoss, file: Path | str) -> Problem:
        """A problem from a DataLoss whose message already names the file."""
        text = str(err)
        prefix = f"{file}: "
        return cls(str(file), text[len(prefix) :] if text.startswith(prefix) else text)


def crc32_file(path: Path) -> tuple[int, int]:
    """(size, zlib.crc32) of the whole file, read in 1 MiB chunks."""
    crc = size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, crc


def write_checksums(directory: Path) -> None:
    """Write ``CHECKSUMS`` for every regular file now in ``directory`` (fsynced, published by rename)."""
    files = {}
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.name != NAME and not path.name.endswith(".tmp"):
            size, crc = crc32_file(path)
            files[path.name] = {"bytes": size, "crc32": crc}
    write_json_atomic(directory / NAME, {"format": FORMAT_VERSION, "algorithm": ALGORITHM, "files": files})


def check_directory(directory: Path, required: bool = True) -> list[Problem]:
    """Every problem with the files ``CHECKSUMS`` lists in ``directory`` (empty: all intact).

    Without ``CHECKSUMS``: a problem when ``required``, else nothing (a generation written
    before checksums).
    """
    path = directory / NAME
    try:
        meta = read_json(path, require_checksum=True)
    except DataLoss as err:
        return [Problem.of(err, path)]
    if meta is None:
        return [Problem(str(path), "missing: the generation's files cannot be verified")] if required else []
    files = meta.get("files")
    if meta.get("format") != FORMAT_VERSION or meta.get("algorithm") != ALGORITHM or not isinstance(files, dict):
        return [Problem(str(path), f"unsupported checksum list (format {meta.get('format')!r})")]
    problems = []
    for name, expected in sorted(files.items()):
        problem = _check_file(directory / name, expected)
        if problem is not None:
            problems.append(problem)
    return problems


def verify_directory(directory: Path, required: bool = True) -> None:
    """Raise DataLoss for the first problem ``check_directory`` finds."""
    problems = check_directory(directory, required)
    if problems:
        raise problems[0].error()


def _check_file(path: Path, expected: object) -> Problem | None:
    if not isinstance(expected, dict) or not {"bytes", "crc32"} <= expected.keys():
        return Problem(str(path), f"malformed {NAME} entry {expected!r}")
    try:
        size, crc = crc32_file(path)
    except FileNotFoundError:
        return Problem(str(path), f"missing (listed in {NAME})")
    except OSError as err:
        return Problem(str(path), f"unreadable: {err}")
    if size != expected["bytes"]:
        return Problem(str(path), f"size {size} bytes, {NAME} says {expected['bytes']} (truncated or extended)")
    if crc != expected["crc32"]:
        return Problem(str(path), f"crc32 {crc} does not match {expected['crc32']} in {NAME} ({size} bytes)")
    return None
