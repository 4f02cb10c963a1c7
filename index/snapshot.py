"""Snapshots: a consistent, self-checking copy of a collection's shards, and its byte layout.

A snapshot of one shard is what its checkpoint leaves on disk at one moment: the manifest,
the checkpoint generation it names, the SPANN sealed segments that generation uses, and
tantivy's committed files. ``Shard.snapshot`` (index/shard/checkpoint.py) checkpoints and,
still holding the shard's apply and tantivy commit locks, calls ``capture_shard`` here, so
no write lands and no tantivy commit runs between the checkpoint and the capture; searches
go on, and writes wait only for that checkpoint. Every file but the small JSON ones is
immutable once published (a generation, a sealed graph or segment, a tantivy segment), so
the capture hard-links them (a copy where the snapshot lives on another file system) and
costs no more than a checkpoint; the JSON files are copied.

Layout of a snapshot directory (a collection's, standalone; one shard's in a cluster)::

    SNAPSHOT.json                 the snapshot manifest, a JSON manifest (index/manifest.py: own crc32):
        {"format": 1, "kind": "braid-snapshot", "name", "collection", "schema", "shard_count",
         "created_at", "braid_version",
         "shards": [{"shard", "wal_seq", "next_label", "generation", "documents"}, ...],
         "files": {"<relative path>": {"bytes": <size>, "crc32": <zlib.crc32>}, ...},
         "bytes": <sum of the files' sizes>}
    shard-000/MANIFEST.json       the shard's manifest (index/shard/checkpoint.py), as published
    shard-000/segments/<gen>/...  the checkpoint generation (with its own CHECKSUMS)
    shard-000/segments/<seg>/...  SPANN sealed segments the generation names
    shard-000/text/...            tantivy's meta.json and the segment files it names
    shard-001/...

``shards`` lists the shards the snapshot holds (a cluster's per-shard snapshot holds one).
Each shard is captured at its own log sequence (``wal_seq``): every write acknowledged
before the snapshot began is in it; a batch spanning shards is no more atomic here than in
the log. ``format`` is checked before anything else: a snapshot of a later, unknown format
is FailedPrecondition naming it; a file missing or failing its size or crc32 is DataLoss
naming it (``check`` lists every such problem, ``verify`` raises the first).

Restoring (``restore_shard``) lays a shard's files into a new shard directory. As a new
collection (``keep_seq=False``: a user's restore, possibly into another cluster whose log
starts afresh) the manifest is rewritten to cover log sequence 0, so the shard replays
nothing and numbers its writes from 1; a replica rebuilding its own shard keeps the
manifest's ``wal_seq`` and replays the log after it.

Export (``tar_chunks``) streams the snapshot as a POSIX tar whose members sit under the
snapshot's name; import (``extract_tar``) accepts only regular files and directories under
one top directory, no links, no absolute or parent paths, then ``check`` decides.
"""

from __future__ import annotations

import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .checksums import Problem, crc32_file
from .errors import DataLoss, FailedPrecondition, InvalidArgument
from .manifest import fsync_dir, load_json, write_atomic, write_json_atomic

MANIFEST = "SNAPSHOT.json"
FORMAT_VERSION = 1
READ_FORMATS = (1,)
KIND = "braid-snapshot"
NAME_PATTERN = re.compile(r"[a-z0-9_-][a-z0-9_.-]{0,127}")
SHARD_DIR = "shard-{:03d}"
_CAPTURE_TRIES = 8  # a tantivy merge may retire a segment file between reading meta.json and linking it
_COPIED = {"MANIFEST.json", "meta.json", ".managed.json"}  # rewritten in place by their owners: never linked
TAR_BLOCK = 512


def check_name(name: str, field: str = "snapshot") -> None:
    if not NAME_PATTERN.fullmatch(name or ""):
        raise InvalidArgument.field(field, f"snapshot name {name!r} must match {NAME_PATTERN.pattern}")


def new_name(collection: str, now: float | None = None) -> str:
    """``<collection>-<UTC date>-<UTC time>-<4 hex>``: sorts by time within a collection, and unique."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now is None else now))
    return f"{collection}-{stamp}-{os.urandom(2).hex()}"


# ------------------------------------------------------------------ capture


def _link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if source.name in _COPIED:
        shutil.copyfile(source, target)
        return
    try:
        os.link(source, target)
    except OSError:  # another file system (EXDEV) or one without hard links
        shutil.copyfile(source, target)


def _link_tree(source: Path, target: Path) -> None:
    for path in sorted(source.rglob("*")):
        if path.is_file() and not path.name.endswith(".tmp"):
            _link_or_copy(path, target / path.relative_to(source))


def capture_shard(shard_dir: Path, generation: int, referenced: set[str], dest: Path) -> None:
    """Lay the published state of the shard in ``shard_dir`` into ``dest`` (created).

    The caller holds the shard's apply and tantivy commit locks: MANIFEST.json names
    ``generation``, which uses the SPANN segment directories ``referenced``.
    """
    dest.mkdir(parents=True)
    _link_or_copy(shard_dir / "MANIFEST.json", dest / "MANIFEST.json")
    segments = shard_dir / "segments"
    for name in sorted({str(generation), *referenced}):
        _link_tree(segments / name, dest / "segments" / name)
    text = shard_dir / "text"
    if (text / "meta.json").exists():
        _capture_text(text, dest / "text")


def _capture_text(text: Path, target: Path) -> None:
    """tantivy's meta.json and the files it names. Commits are held off by the caller, but a
    background merge may still publish a new meta.json and retire the files it merged: then
    the capture starts again from the new meta.json."""
    from .text import segment_files  # here: clients read archives through this module, without tantivy

    for _ in range(_CAPTURE_TRIES):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        meta = (text / "meta.json").read_bytes()
        files, problems = segment_files(text)
        if problems:
            raise problems[0].error()
        try:
            for path in files:
                _link_or_copy(path, target / path.name)
        except FileNotFoundError:
            continue
        if (text / "meta.json").read_bytes() != meta:
            continue
        write_atomic(target / "meta.json", meta)
        return
    raise FailedPrecondition(f"{text}: tantivy kept merging while the snapshot read it; try again")


# ----------------------------------------------------------------- manifest


def list_files(root: Path) -> dict[str, dict[str, int]]:
    """{relative path: {"bytes", "crc32"}} of every file under ``root`` but the snapshot manifest."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            size, crc = crc32_file(path)
            files[path.relative_to(root).as_posix()] = {"bytes": size, "crc32": crc}
    return files


def write_manifest(root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Checksum every file under ``root`` and publish SNAPSHOT.json; returns the manifest."""
    files = list_files(root)
    manifest = {
        "format": FORMAT_VERSION,
        "kind": KIND,
        **info,
        "files": files,
        "bytes": sum(entry["bytes"] for entry in files.values()),
    }
    for path in root.rglob("*"):  # the links and copies are durable before the manifest names them
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    for path in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fsync_dir(path)
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def read_manifest(root: Path) -> dict[str, Any]:
    """The checked SNAPSHOT.json of ``root``: DataLoss when damaged or missing, FailedPrecondition
    for a format this version does not read."""
    path = root / MANIFEST
    try:
        manifest, _ = load_json(path, require_checksum=True)
    except (OSError, ValueError) as err:
        raise DataLoss(f"{path}: unreadable snapshot manifest: {err}") from err
    if manifest is None:
        raise DataLoss(f"{path}: missing: {root.name} is not a complete snapshot")
    if manifest.get("kind") != KIND:
        raise DataLoss(f"{path}: not a Braid snapshot manifest (kind {manifest.get('kind')!r})")
    if manifest.get("format") not in READ_FORMATS:
        raise FailedPrecondition(
            f"{path}: snapshot format {manifest.get('format')!r} is not one this version reads "
            f"{READ_FORMATS}: restore it with the Braid version that wrote it ({manifest.get('braid_version')!r}) "
            f"or a later one"
        )
    for key, kind in (("files", dict), ("shards", list), ("schema", dict), ("shard_count", int)):
        if not isinstance(manifest.get(key), kind):
            raise DataLoss(f"{path}: {key!r} is {manifest.get(key)!r}, expected a {kind.__name__}")
    return manifest


def check(root: Path) -> list[Problem]:
    """Every problem with the snapshot in ``root`` (empty: intact). A format this version cannot
    read raises FailedPrecondition instead: that is no damage."""
    try:
        manifest = read_manifest(root)
    except DataLoss as err:
        return [Problem.of(err, root / MANIFEST)]
    problems = []
    for name, expected in sorted(manifest["files"].items()):
        path = root / name
        if ".." in Path(name).parts or Path(name).is_absolute():
            problems.append(Problem(str(path), "names a path outside the snapshot"))
            continue
        try:
            size, crc = crc32_file(path)
        except FileNotFoundError:
            problems.append(Problem(str(path), f"missing (listed in {MANIFEST})"))
            continue
        except OSError as err:
            problems.append(Problem(str(path), f"unreadable: {err}"))
            continue
        if not isinstance(expected, dict) or size != expected.get("bytes") or crc != expected.get("crc32"):
            problems.append(Problem(str(path), f"size {size} / crc32 {crc} do not match {MANIFEST}: {expected!r}"))
    return problems


def verify(root: Path) -> dict[str, Any]:
    """The manifest of the snapshot in ``root`` once every file passed; DataLoss naming the first bad one."""
    problems = check(root)
    if problems:
        raise problems[0].error()
    return read_manifest(root)


# ------------------------------------------------------------------ restore


def restore_shard(source: Path, target: Path, keep_seq: bool) -> None:
    """Lay a snapshot's shard directory ``source`` into the new shard directory ``target``.

    ``keep_seq`` False: the restored shard starts a log of its own (see the module doc);
    True: it replays its log after the snapshot's ``wal_seq``.
    """
    _link_tree(source, target)
    if not keep_seq:
        path = target / "MANIFEST.json"
        manifest, _ = load_json(path, require_checksum=True)
        if manifest is None:
            raise DataLoss(f"{source / 'MANIFEST.json'}: missing from the snapshot")
        manifest = {k: v for k, v in manifest.items() if k != "wal_crc32"}
        manifest["wal_seq"] = 0
        write_json_atomic(path, manifest)
    fsync_dir(target)


# ---------------------------------------------------------- export / import


def tar_chunks(root: Path, arcroot: str, chunk_bytes: int = 1 << 20) -> Iterator[bytes]:
    """The snapshot in ``root`` as a POSIX tar stream, members under ``arcroot/``, in chunks."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    now = int(time.time())
    for path in paths:
        size = path.stat().st_size
        info = tarfile.TarInfo(f"{arcroot}/{path.relative_to(root).as_posix()}")
        info.size, info.mode, info.mtime = size, 0o644, now
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        sent = 0
        with open(path, "rb") as fh:
            while sent < size and (data := fh.read(min(chunk_bytes, size - sent))):
                sent += len(data)
                yield data
        if sent != size:  # snapshot files never change: a shorter one is damage
            raise DataLoss(f"{path}: shrank from {size} to {sent} bytes while it was exported")
        if size % TAR_BLOCK:
            yield bytes(TAR_BLOCK - size % TAR_BLOCK)
    yield bytes(2 * TAR_BLOCK)


def extract_tar(archive: Path, into: Path) -> Path:
    """Unpack a snapshot tar into the new directory ``into``; returns its one top directory.

    InvalidArgument for anything but regular files and directories under one top directory
    whose name is a valid snapshot name (links, devices, absolute or parent paths)."""
    into.mkdir(parents=True)
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            members = tar.getmembers()
            tops = {Path(m.name).parts[0] for m in members if Path(m.name).parts}
            if len(tops) != 1:
                found = sorted(tops)[:5]
                raise InvalidArgument.field("archive", f"expected one snapshot directory at the top, found {found}")
            top = tops.pop()
            check_name(top, "archive")
            for member in members:
                parts = Path(member.name).parts
                if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
                    raise InvalidArgument.field("archive", f"member {member.name!r} is not a plain file under {top}/")
            for member in members:
                if member.isfile():
                    target = into / member.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None
                    with source, open(target, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
    except tarfile.TarError as err:
        raise InvalidArgument.field("archive", f"not a readable tar archive: {err}") from err
    except EOFError as err:
        raise InvalidArgument.field("archive", f"the tar archive ends early: {err}") from err
    return into / top


def unpack(archive: Path, into: Path) -> tuple[Path, dict[str, Any]]:
    """Extract a snapshot tar into the new directory ``into`` and verify it: (its top directory, its
    manifest). InvalidArgument for what is no snapshot archive, DataLoss for a bad file or a
    manifest naming another snapshot than its directory."""
    top = extract_tar(archive, into)
    manifest = verify(top)
    if manifest.get("name") != top.name:
        raise DataLoss(f"{top.name}/{MANIFEST}: names snapshot {manifest.get('name')!r}")
    return top, manifest
