"""Reading a shard back: its manifest, its checkpoint generation, and the log replayed after it.

Recovery (the shard's ``_recover``, index/shard/core.py, on open and on a reopen): load the
manifest's checkpoint (``read_manifest``, ``load_checkpoint``), replay log records after
its ``wal_seq`` (``replay``; the WAL itself truncates a torn last record), commit tantivy
(only if something was replayed), remove segment directories the manifest does not name
(an interrupted merge's). A follower replays what its external log's
``read_from(wal_seq)`` yields, the same way (it may yield nothing); so does its reopen after
a full disk.

Checksums (format 2; format 1 manifests, written before, still open unchecked): the
manifest carries its own ``crc32`` (index/manifest.py) and ``wal_crc32``, the stored CRC
of WAL record ``wal_seq`` (absent when ``wal_seq`` is 0). Before anything is parsed,
recovery checks the manifest, that ``segments/<generation>/`` exists, every file there
against its CHECKSUMS (so hnswlib never reads a corrupt file), that the log reaches
``wal_seq`` and that its record ``wal_seq`` has ``wal_crc32`` (index/wal.py), and
tantivy's file footers (index/text.py); any mismatch is DataLoss naming the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checksums import verify_directory
from ..errors import DataLoss
from ..hnsw_strand import HnswStrand
from ..log import ShardLog
from ..manifest import load_json
from ..metadata import MetadataStore
from ..payload import PayloadStore
from ..schema import DenseIndexType, Schema
from ..spann_strand import SpannStrand
from ..sparse import SparseIndex
from .indexes import Indexes
from .labels import LabelTable
from .ops import RECORD_OVERHEAD, Op, decode

READ_FORMATS = (1, 2)
PROGRESS_STEP_BYTES = 1 << 20  # report replay progress every MiB


def read_manifest(directory: Path, local_log: bool = True) -> dict[str, Any] | None:
    """A shard's MANIFEST.json, checked against its checksum and what it points at; None when absent.

    DataLoss naming the file: a bad checksum (or none in format 2), a field missing or of the
    wrong type, a generation whose directory is missing, a ``wal_seq`` with no log at all
    (only when ``local_log``: a follower's records live in its external log, not in ``wal/``).
    The files of the generation are checked later (``load_checkpoint``), as is the log's
    agreement with ``wal_seq`` (index/wal.py).
    """
    path = directory / "MANIFEST.json"
    manifest, checked = load_json(path)
    if manifest is None:
        return None
    fmt = manifest.get("format")
    if fmt not in READ_FORMATS:
        raise DataLoss(f"{path}: unsupported format {fmt!r}; this version reads {READ_FORMATS}")
    if fmt >= 2 and not checked:
        raise DataLoss(f"{path}: a format {fmt} manifest without its crc32 checksum")
    for key in ("generation", "wal_seq", "next_label"):
        if type(manifest.get(key)) is not int or manifest[key] < 0:
            raise DataLoss(f"{path}: {key!r} is {manifest.get(key)!r}, expected an integer >= 0")
    if "wal_crc32" in manifest and type(manifest["wal_crc32"]) is not int:
        raise DataLoss(f"{path}: 'wal_crc32' is {manifest['wal_crc32']!r}, expected an integer")
    generation = directory / "segments" / str(manifest["generation"])
    if not generation.is_dir():
        raise DataLoss(f"{path}: generation {manifest['generation']} names {generation}, which is missing")
    wal = directory / "wal"
    if local_log and manifest["wal_seq"] > 0 and not (wal.is_dir() and any(p.suffix == ".wal" for p in wal.iterdir())):
        raise DataLoss(f"{path}: wal_seq is {manifest['wal_seq']} but {wal} holds no log: records may be lost")
    return manifest


def load_checkpoint(directory: Path, manifest: dict[str, Any], schema: Schema) -> Indexes:
    """Load the checkpoint ``read_manifest`` checked, once its files pass their CHECKSUMS (its
    generation is the manifest's; tantivy is opened apart, by the shard)."""
    segment = directory / "segments" / str(int(manifest["generation"]))
    verify_directory(segment, required=manifest["format"] >= 2)
    try:
        return _load_generation(directory, manifest, segment, schema)
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, UnicodeDecodeError) as err:
        # Only reachable for a format 1 generation (no CHECKSUMS) or a bug: never a bare traceback.
        raise DataLoss(f"{segment}: cannot load checkpoint generation: {type(err).__name__}: {err}") from err


def _load_generation(directory: Path, manifest: dict[str, Any], segment: Path, schema: Schema) -> Indexes:
    live = json.loads((segment / "ids.json").read_text())
    labels = LabelTable.load(live, int(manifest["next_label"]))
    payload = PayloadStore.load(segment, schema.payload_fields)
    metadata = MetadataStore.load(segment)
    dense: dict[str, HnswStrand | SpannStrand] = {}
    for spec in schema.dense_fields:
        present = live.get("has_vector", {}).get(spec.name, [])
        if spec.index is DenseIndexType.SPANN:
            dense[spec.name] = SpannStrand.load(segment, directory / "segments", spec, present)
        else:
            dense[spec.name] = HnswStrand.load(segment, spec, present)
    sparse = {spec.name: SparseIndex.load(segment, spec.name) for spec in schema.sparse_fields}
    return Indexes(labels, payload, metadata, dense, sparse)


def replay(
    wal: ShardLog,
    start_seq: int,
    number: int,
    apply: Callable[[int, Op], None],
    progress: Callable[[int], None] | None = None,
) -> None:
    """Decode and ``apply(seq, op)`` every record of ``wal`` after ``start_seq``, in order.

    ``progress`` is called with the byte count of each stretch of log replayed. A seq that
    does not increase is DataLoss (never from the local WAL; an external log's promise).
    """
    replayed = 0
    last = start_seq
    for seq, kind, payload in wal.read_from(start_seq):
        if seq <= last:  # never from the local WAL; an external log's promise
            raise DataLoss(f"shard {number}: log record seq {seq} follows seq {last} in replay: seqs must increase")
        apply(seq, decode(kind, payload))
        last = seq
        replayed += len(payload) + RECORD_OVERHEAD
        if progress is not None and replayed >= PROGRESS_STEP_BYTES:
            progress(replayed)
            replayed = 0
    if progress is not None and replayed:
        progress(replayed)
