"""Writing a shard's checkpoint: a generation of durable files, its CHECKSUMS, the manifest.

A checkpoint (the shard's ``_checkpoint``, index/shard/core.py, under its apply lock) writes
``segments/<gen>.tmp/`` (``write_generation``), renames it to ``segments/<gen>/``, commits
tantivy, then publishes it by replacing MANIFEST.json (``write_manifest``) and trims the log.

A checkpoint never publishes a file a full disk cut short: each file is written under a
temporary name, fsynced and read back (index/durable.py; hnswlib's files, whose writer
reports no error, are checked by structure, index/hnswfile.py) before CHECKSUMS is computed
and the generation renamed into place; a failed checkpoint leaves the previous generation
and the whole log in force, and ``discard_unpublished`` removes what it wrote.

Segment directories the current generation does not use (older generations, a merge that
never published) are removed when the shard opens and after every checkpoint
(``remove_unreferenced``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import durable
from ..checksums import write_checksums
from ..hnsw_strand import HnswStrand
from ..manifest import fsync_dir, read_json, write_json_atomic
from ..metadata import MetadataStore
from ..payload import PayloadStore
from ..spann_strand import SpannStrand
from ..sparse import SparseIndex
from .labels import LabelTable

FORMAT_VERSION = 2  # 2: the manifest carries crc32 and wal_crc32, a generation carries CHECKSUMS


def write_generation(
    segments: Path,
    generation: int,
    labels: LabelTable,
    payload: PayloadStore,
    metadata: MetadataStore,
    dense: dict[str, HnswStrand | SpannStrand],
    sparse: dict[str, SparseIndex],
) -> None:
    """Save every index into ``segments/<generation>/``, durable and checksummed (not yet published).

    Caller holds the shard's apply lock: no write lands meanwhile, while searches go on
    (HNSW strands snapshot their parts).
    """
    staging = segments / f"{generation}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    ids = {
        **labels.saved(),
        "has_vector": {name: index.present_labels().tolist() for name, index in dense.items()},
    }
    # Every file goes through a temporary name, is fsynced and checked by reading it back
    # (index/durable.py; hnswlib's by its structure, index/hnswfile.py), so a write a full
    # disk cut short fails the checkpoint here instead of being checksummed and published.
    durable.write_bytes(staging / "ids.json", json.dumps(ids, ensure_ascii=False).encode("utf-8"))
    payload.save(staging, labels.size)  # a write being prepared may set labels past it
    metadata.save(staging, labels.size)
    previous = segments / str(generation - 1)  # unchanged HNSW graphs are linked from it
    for index in dense.values():
        if isinstance(index, HnswStrand):
            index.save(staging, previous)
        else:
            index.save(staging)
    for index in sparse.values():
        index.save(staging)
    write_checksums(staging)  # read back from the page cache; fsyncs the staging directory
    for path in staging.iterdir():
        fsync_file(path)
    final = segments / str(generation)
    staging.rename(final)
    fsync_dir(segments)


def write_manifest(
    directory: Path, version: str, generation: int, wal_seq: int, next_label: int, wal_crc: int | None
) -> None:
    """Publish ``generation`` as covering the log up to ``wal_seq`` (an atomic replace)."""
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "braid_version": version,
        "generation": generation,
        "wal_seq": wal_seq,
        # the label counter as of wal_seq: replay hands later writes the same labels
        "next_label": next_label,
    }
    if wal_crc is not None:  # lets recovery check the log agrees on where replay starts
        manifest["wal_crc32"] = wal_crc
    write_json_atomic(directory / "MANIFEST.json", manifest)


def discard_unpublished(directory: Path, generation: int) -> int | None:
    """Remove ``segments/<generation>[.tmp]`` of a checkpoint that failed before MANIFEST.json named
    it. Returns the manifest's generation when it did name it (only the steps after it failed),
    else None."""
    try:
        manifest = read_json(directory / "MANIFEST.json")
    except Exception:  # cannot tell what is published: leave the files to the next open
        return None
    if manifest is not None and int(manifest["generation"]) >= generation:
        return int(manifest["generation"])
    for name in (f"{generation}.tmp", str(generation)):
        shutil.rmtree(directory / "segments" / name, ignore_errors=True)
    return None


def remove_unreferenced(directory: Path, keep: set[str]) -> None:
    """Delete segment directories not named in ``keep`` (old generations, unfinished merges)."""
    segments = directory / "segments"
    if not segments.is_dir():
        return
    for path in segments.iterdir():
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def files(directory: Path) -> list[tuple[Path, int]]:
    """(path, size) of every regular file under ``directory``; files that vanish meanwhile are skipped."""
    out: list[tuple[Path, int]] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return out
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                out += files(Path(entry.path))
            elif entry.is_file(follow_symlinks=False):
                out.append((Path(entry.path), entry.stat(follow_symlinks=False).st_size))
        except OSError:
            continue
    return out


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())
