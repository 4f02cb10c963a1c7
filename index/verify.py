"""The offline scrub: check every checksum of a data directory and report every bad file.

What is checked, without changing a byte: ``aliases.json`` (its crc32, its entries, and that
every alias points at a collection that exists), and per collection (``verify_collection``):

    collection.json           its embedded crc32 (index/manifest.py), and that it parses
    shard-NNN/MANIFEST.json   crc32, fields, the generation directory exists (index/shard/recovery.py)
    segments/<gen>/           every file against CHECKSUMS (index/checksums.py), then each
                              hnswlib file's structure (index/hnswfile.py) and metadata.bin's
                              (index/metadata.py)
    segments/spann-*/         each sealed segment a generation names: spann.json's crc32,
                              centroids.hnsw's crc32 and structure, the posting file's header, offset table,
                              every list, the locator and its whole-file crc32 (index/spann.py)
    wal/                      every record's CRC, contiguity, that the log reaches the
                              checkpoint's wal_seq and agrees with its wal_crc32 (index/wal.py)
    text/                     tantivy's footer CRC of every file of every committed segment,
                              then a read-only open and a read of every segment (index/text.py)

A ``Problem`` names the file, the offset when it applies, and what is wrong; a torn WAL
tail (the normal trace of a crash, truncated by the next open) is reported as not fatal.
The scrub reads, it never repairs (the WAL's torn tail stays, leftover directories stay).

Run it with the server stopped. ``verify_data_dir`` refuses (FailedPrecondition) when a
shard's tantivy writer lock is held, which is what a running server holds for every shard
with text fields; for collections without text fields it cannot tell, and a checkpoint
or merge running during the scrub could make files vanish under it. The functions are
reusable by a background scrub in the server, which would take each shard's flush lock
instead.
"""

from __future__ import annotations

from pathlib import Path

from . import dirlock, hnswfile, text, wal
from .aliases import AliasTable
from .checksums import Problem, check_directory
from .errors import DataLoss, FailedPrecondition
from .manifest import read_json
from .metadata import FILE as METADATA_FILE
from .metadata import MetadataStore
from .schema import DenseIndexType, Schema
from .shard import read_manifest
from .spann import SpannSegment

__all__ = ["Problem", "check_not_served", "verify_collection", "verify_data_dir", "verify_shard"]


def verify_data_dir(data_dir: Path, collection: str | None = None) -> list[Problem]:
    """Every problem of every collection under ``data_dir`` (or of the one named ``collection``)."""
    root = Path(data_dir) / "collections"
    if not root.is_dir():
        return [Problem(str(root), "no collections directory: not a Braid data directory")]
    if collection is not None:
        path = root / collection
        if not path.is_dir():
            return [Problem(str(path), f"no collection {collection!r}")]
        paths = [path]
    else:  # hidden ones are unfinished creates and deletes, removed at the next start
        paths = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if dirlock.held(Path(data_dir)):
        raise FailedPrecondition(
            f"{Path(data_dir) / dirlock.LOCK_NAME} is held: a server is serving this data "
            "directory; stop it before `braid verify`"
        )
    check_not_served(paths)
    problems: list[Problem] = []
    if collection is None:
        problems += verify_aliases(Path(data_dir), {p.name for p in paths})
    for path in paths:
        problems += verify_collection(path)
    return problems


def verify_aliases(data_dir: Path, collections: set[str]) -> list[Problem]:
    """aliases.json (index/aliases.py): its crc32 and entries, and that each alias points at a
    collection that exists (a dangling alias answers NOT_FOUND until it is moved or deleted)."""
    table = AliasTable(data_dir)
    table.load()
    if table.problem is not None:
        return [Problem(str(table.path), str(table.problem))]
    return [
        Problem(str(table.path), f"alias {alias!r} points at {target!r}, which does not exist")
        for alias, target in table.items()
        if target not in collections
    ]


def check_not_served(collections: list[Path]) -> None:
    """FailedPrecondition when a server holds a shard of these collections (its tantivy writer lock)."""
    for collection in collections:
        for lock in sorted(collection.glob("shard-*/text/.tantivy-writer.lock")):
            if dirlock.flock_held(lock):
                raise FailedPrecondition(
                    f"{lock} is held: a server has this collection open; stop it before `braid verify`"
                )


def verify_collection(path: Path) -> list[Problem]:
    """Every problem of one collection directory (collection.json, then each shard)."""
    path = Path(path)
    meta_path = path / "collection.json"
    try:
        meta = read_json(meta_path)
    except DataLoss as err:
        return [Problem.of(err, meta_path)]
    if meta is None:
        return [Problem(str(meta_path), "missing: not a collection")]
    try:
        schema = Schema.from_json(meta["schema"])
        shards = int(meta["shards"])
    except Exception as err:  # a schema this version cannot read: nothing below can be checked
        return [Problem(str(meta_path), f"unreadable collection metadata: {type(err).__name__}: {err}")]
    problems: list[Problem] = []
    for number in range(shards):
        shard = path / f"shard-{number:03d}"
        if not shard.is_dir():
            problems.append(Problem(str(shard), "missing shard directory"))
            continue
        problems += verify_shard(shard, schema)
    return problems


def verify_shard(directory: Path, schema: Schema) -> list[Problem]:
    """Every problem of one shard directory: manifest, checkpoint, sealed SPANN segments, log, text."""
    problems: list[Problem] = []
    checkpoint_seq, checkpoint_crc = 0, None
    try:
        manifest = read_manifest(directory)
    except DataLoss as err:
        manifest = None
        problems.append(Problem.from_message(str(err)))
    if manifest is not None:
        checkpoint_seq, checkpoint_crc = manifest["wal_seq"], manifest.get("wal_crc32")
        generation = directory / "segments" / str(manifest["generation"])
        if manifest["format"] < 2:
            problems.append(
                Problem(str(generation), "written before checksums: not verifiable (a Flush writes one)", fatal=False)
            )
        generation_problems = check_directory(generation, required=manifest["format"] >= 2)
        problems += generation_problems
        if not generation_problems:
            problems += _check_hnsw(generation, schema)
            problems += _check_metadata(generation)
            problems += _check_sealed(directory, generation, schema)
    problems += wal.check(directory / "wal", checkpoint_seq, checkpoint_crc)
    if schema.text_fields and (directory / "text").is_dir():
        problems += text.check(directory / "text", schema.text_fields)
    return problems


def _check_hnsw(generation: Path, schema: Schema) -> list[Problem]:
    """The structure of each hnswlib file (index/hnswfile.py): a file a full disk cut short
    before checkpoints checked it carries a CHECKSUMS entry of its cut bytes, which matches."""
    problems: list[Problem] = []
    dims = {spec.name: spec.dim for spec in schema.dense_fields}
    for path in sorted(generation.glob("*.hnsw")):  # <field>.hnsw (before segments) or <field>.g<id>.hnsw
        dim = dims.get(path.name.split(".", 1)[0])
        if dim is not None and (problem := hnswfile.check(path, dim)) is not None:
            problems.append(Problem(str(path), problem))
    return problems


def _check_metadata(generation: Path) -> list[Problem]:
    """The structure of metadata.bin (index/metadata.py): labels ascending, offsets within its text, UTF-8."""
    if not (generation / METADATA_FILE).exists():
        return []
    try:
        MetadataStore.load(generation)
    except DataLoss as err:
        return [Problem.from_message(str(err))]
    return []


def _check_sealed(shard: Path, generation: Path, schema: Schema) -> list[Problem]:
    problems: list[Problem] = []
    for spec in schema.dense_fields:
        if spec.index is not DenseIndexType.SPANN:
            continue
        path = generation / f"{spec.name}.strand.json"
        try:
            meta = read_json(path)
        except DataLoss as err:
            problems.append(Problem.of(err, path))
            continue
        if meta is None:
            continue
        sealed = meta.get("sealed")
        names = sealed if isinstance(sealed, list) else [sealed] if sealed else []
        for name in names:
            problems += SpannSegment.check(shard / "segments" / str(name))
    return problems
