"""A bulk job's corpus: which files, in what format, split into which partitions.

Formats (``--format auto`` picks by file name and first record):

- ``braid``: JSONL, one braid.v1 Document per line in the protobuf JSON mapping that
  ``braid ingest`` reads (docs/cli.md): ``{"id": ..., "text": {...}, "payload": {...}}``.
- ``beir``: a BEIR corpus.jsonl, ``{"_id", "title", "text", "metadata"}``. Title and text go
  to text fields named ``title`` and ``text`` when the collection has them, else joined by a
  space into its one text field (or ``--text-field``); ``metadata`` keys that name payload
  fields become payload.
- ``parquet``: one row per document; column ``id`` and columns named like the collection's
  text, payload and dense vector fields (a dense column holds a list of floats).

Rows are read in a fixed order (files sorted by path, then line or row order), and each
document belongs to partition ``hash(id) % partitions``, a stable hash independent of the
process. Splitting by id rather than by line keeps every version of a document in one
partition, in corpus order, so the last version in the corpus is the one that stays, and
a resumed partition sees exactly the documents it saw before. A partition's position is
the count of its rows read so far: the resume point of a checkpoint.

The corpus fingerprint (names, sizes, first and last MiB of every file) tells a resumed
job that the corpus it checkpointed is still the one it reads.
"""

from __future__ import annotations

import glob
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMATS = ("auto", "braid", "beir", "parquet")
_EDGE_BYTES = 1 << 20


class CorpusError(ValueError):
    """A corpus that cannot be read at all: no such file, not Parquet (bad input). A bad row
    is not an error here: it comes as a Row with a ``problem``."""


@dataclass(frozen=True)
class Row:
    """One document as read: where it came from and its fields, not yet a braid.v1 Document."""

    file: str  # the file's name (for messages)
    line: int  # 1-based line (JSONL) or row (Parquet) number
    id: str  # "" when ``problem`` is set
    fields: dict[str, Any]  # format-specific: see to_document in encode.py
    problem: str = ""  # why the row is not a document (bad JSON, no id): a reject, never sent


def expand(paths: list[str]) -> list[Path]:
    """The corpus files ``paths`` names (files or globs), sorted; CorpusError when none exist."""
    files: set[Path] = set()
    for pattern in paths:
        matched = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
        found = [Path(m) for m in matched if Path(m).is_file()]
        if not found:
            raise CorpusError(f"corpus: no file matches {pattern!r}")
        files.update(found)
    return sorted(files)


def detect_format(path: Path, requested: str) -> str:
    """``requested`` unless it is auto: parquet by suffix, else beir when the first record has ``_id``."""
    if requested != "auto":
        return requested
    if path.suffix == ".parquet":
        return "parquet"
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                try:
                    first = json.loads(line)
                except ValueError:
                    return "braid"  # the reader reports the line
                return "beir" if isinstance(first, dict) and "_id" in first and "id" not in first else "braid"
    return "braid"


def fingerprint(files: list[Path]) -> str:
    """A digest of the corpus as a job sees it, cheap at any size: each file's name, size and edges."""
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as src:
            digest.update(src.read(_EDGE_BYTES))
            if size > _EDGE_BYTES:
                src.seek(max(_EDGE_BYTES, size - _EDGE_BYTES))
                digest.update(src.read())
    return digest.hexdigest()[:32]


def partition_of(doc_id: str, partitions: int) -> int:
    """The partition of a document id: stable across processes, machines and Python versions."""
    if partitions == 1:
        return 0
    key = hashlib.blake2b(doc_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(key, "big") % partitions


def rows(files: list[Path], fmt: str) -> Iterator[Row]:
    """Every row of the corpus in its fixed order."""
    for path in files:
        kind = detect_format(path, fmt)
        if kind == "parquet":
            yield from _parquet_rows(path)
        else:
            yield from _jsonl_rows(path, kind)


def partition_rows(files: list[Path], fmt: str, partition: int, partitions: int) -> Iterator[Row]:
    """The rows of one partition, in corpus order; rows with a problem (no id to hash) belong
    to partition 0, so each is reported once."""
    for row in rows(files, fmt):
        if (partition_of(row.id, partitions) if not row.problem else 0) == partition:
            yield row


def count_lines(files: list[Path]) -> int:
    """Rows in the corpus (non-empty JSONL lines, Parquet rows): the progress bar's total."""
    total = 0
    for path in files:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            total += pq.ParquetFile(path).metadata.num_rows
        else:
            with path.open("rb") as src:
                total += sum(1 for line in src if line.strip())
    return total


def _jsonl_rows(path: Path, kind: str) -> Iterator[Row]:
    id_key = "_id" if kind == "beir" else "id"
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                fields = json.loads(line)
            except ValueError as err:
                yield Row(path.name, number, "", {}, f"not JSON: {err}")
                continue
            doc_id = fields.get(id_key) if isinstance(fields, dict) else None
            if not isinstance(doc_id, (str, int)) or isinstance(doc_id, bool) or doc_id == "":
                yield Row(path.name, number, "", {}, f"no {id_key!r}: a document is a JSON object with a non-empty id")
                continue
            yield Row(path.name, number, str(doc_id), {"format": kind, **fields})


def _parquet_rows(path: Path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path.name}: reading Parquet needs pyarrow (pip install 'braidsearch[jobs]')") from None
    try:
        table = pq.ParquetFile(path)
    except Exception as err:  # ArrowInvalid and friends: a damaged or foreign file
        raise CorpusError(f"{path.name}: not a readable Parquet file: {err}") from None
    if "id" not in table.schema_arrow.names:
        raise CorpusError(f"{path.name}: Parquet corpus needs an 'id' column; it has {table.schema_arrow.names}")
    number = 0
    for batch in table.iter_batches(batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            doc_id = record.get("id")
            if doc_id is None or doc_id == "":
                yield Row(path.name, number, "", {}, "empty 'id'")
                continue
            yield Row(path.name, number, str(doc_id), {"format": "parquet", **record})
