"""A shard's footprint for operators: estimated memory and disk bytes by (field, index).

index is hnsw, spann, sparse, payload (per field), bm25 (tantivy, every text field:
field ""), ids (id maps, ids.json, the manifest), wal (field "") or other (leftovers
of an interrupted checkpoint or merge). Memory is estimated from the structures'
sizes (each index's ``memory_bytes``; tantivy: its writer's arena budget, since its
segments are memory-mapped and live in the page cache, as do sealed SPANN lists);
disk is the size of the files under the shard directory (their layout: index/shard/).
"""

from __future__ import annotations

from pathlib import Path

from ..metadata import FILE as METADATA_FILE
from ..spann_strand import SpannStrand
from ..text import WRITER_HEAP_BYTES
from .checkpoint import files
from .indexes import Indexes


def footprint(directory: Path, generation: int, indexes: Indexes) -> dict[tuple[str, str], list[int]]:
    """{(field, index): [estimated memory bytes, disk bytes]} of one shard (module doc)."""
    dense, sparse, payload, metadata = indexes.dense, indexes.sparse, indexes.payload, indexes.metadata
    out: dict[tuple[str, str], list[int]] = {}

    def add(key: tuple[str, str], memory: int = 0, disk: int = 0) -> None:
        entry = out.setdefault(key, [0, 0])
        entry[0] += memory
        entry[1] += disk

    kinds: dict[str, str] = {}
    for name, index in list(dense.items()):
        kinds[name] = "spann" if isinstance(index, SpannStrand) else "hnsw"
        add((name, kinds[name]), index.memory_bytes())
    for name, sparse_index in list(sparse.items()):
        kinds[name] = "sparse"
        add((name, "sparse"), sparse_index.memory_bytes())
    for name, nbytes in payload.memory_bytes().items():
        add((name, "payload"), nbytes)
    if len(metadata):
        add(("", "metadata"), metadata.memory_bytes())
    if indexes.text is not None:
        add(("", "bm25"), WRITER_HEAP_BYTES)
    add(("", "ids"), indexes.labels.memory_bytes())
    for key, nbytes in disk_usage(directory, generation, kinds).items():
        add(key, disk=nbytes)
    return out


def disk_usage(directory: Path, generation: int, kinds: dict[str, str]) -> dict[tuple[str, str], int]:
    """Bytes of every file under the shard directory, by (field, index) as in ``footprint``."""
    out: dict[tuple[str, str], int] = {}
    current = str(generation)

    def key_of(top: str, parts: tuple[str, ...]) -> tuple[str, str]:
        if top == "wal":
            return "", "wal"
        if top == "text":
            return "", "bm25"
        if top != "segments" or len(parts) < 2:
            return "", "ids"  # MANIFEST.json
        segment, name = parts[0], parts[-1]
        if segment.startswith("spann-"):
            return segment[len("spann-") :].rpartition("-")[0], "spann"
        if segment != current:
            return "", "other"
        if name == METADATA_FILE:
            return "", "metadata"
        if name == "payload.json":
            return "", "ids"  # the payload columns' metadata
        if name.startswith("payload-"):  # payload-<field>.<part>.npy
            return name[len("payload-") :].rpartition(".")[0].rpartition(".")[0], "payload"
        owner = name.split(".", 1)[0]
        if owner in kinds:
            return owner, kinds[owner]
        return "", "ids"  # ids.json, CHECKSUMS

    for path, size in files(directory):
        parts = path.relative_to(directory).parts
        key = key_of(parts[0], parts[1:])
        out[key] = out.get(key, 0) + size
    return out
