"""One shard: a write-ahead log, a manifest, and the in-memory indexes it recovers.

The log is a ``ShardLog`` (index/log.py), opened by the ``log_opener`` given to ``open``:
by default the local write-ahead log under ``wal/``. A follower shard (an external log, such
as a replicated one in cluster mode) refuses the local writes (FailedPrecondition) and takes
records already durable in its log through ``apply_logged``, in seq order (seqs increase but
may skip numbers; re-delivered ones are skipped); ``wait_applied`` and ``result_of`` tell a
writer when its record is applied and what it did. Its manifest's ``wal_seq`` is the last
seq of the external log that the checkpoint covers, and ``wal/`` is the external log's to use.

Directory layout::

    MANIFEST.json         {"format": 2, "braid_version", "generation", "wal_seq", "next_label",
                           "wal_crc32", "crc32"}, replaced by atomic rename
    wal/                  write-ahead log segments (index/wal.py)
    segments/<gen>/       checkpoint of generation <gen>: ids.json (live labels, their ids, and
                          per dense field the labels holding a vector),
                          payload columns, metadata.bin (index/metadata.py), <field>.hnsw, <field>.sparse.* files,
                          <field>.strand.json for SPANN fields (index/spann_strand.py),
                          CHECKSUMS (size and crc32 of each of them, index/checksums.py)
    segments/spann-<field>-<id>/  a sealed SPANN segment (index/spann.py), named by the
                          generations that use it; merges build new ones (index/merger.py)
    text/                 tantivy index (its own commits; replay onto it is idempotent)

Documents are stored as versions, each under a fresh integer label (labels.py: the label
table and its ``alive`` mask, the single source of truth for visibility).

Write path (per operation), each step in sequence order across concurrent writers
(sequencer.py):
[an upsert waits, holding no lock, while an HNSW field's background builds are far behind]
-> encode -> WAL append -> group fsync -> prepare (hand out labels, stage new versions
in tantivy, the payload columns and the dense vectors, still invisible) -> group tantivy
commit -> apply under the apply lock and the write lock (the new versions become alive
and the old ones dead in every strand at once; an HNSW field only copies vectors into its
growing block; old versions leave tantivy at a later commit) -> acknowledge.
A checkpoint (checkpoint.py) holds the apply lock (no write lands while it saves), not the
read lock: searches go on beside it.
Close: refuse new writes, flushes and reads with the close error (NotFound for a deleted
collection, Unavailable at shutdown) -> wait for the writes and flushes already admitted ->
stop merges and the HNSW fields' background builds -> close tantivy, the WAL and the SPANN
strands under the write lock.
Recovery (recovery.py: the order, and the checksums it checks first): load the manifest's
checkpoint, replay the log after its ``wal_seq``, commit tantivy, remove segment
directories the manifest does not name.
A full disk (health.py: the rules) is an ordinary error, answered DiskFull; a failure after
a record is logged makes the shard read-only until a write (or ``heal``) finds room and
reopens it in place.

Modules: core.py (the ``Shard``: lifecycle, local writes, reads), indexes.py (the indexes a
write changes: prepare, apply), labels.py (the label table), sequencer.py (log order),
health.py (failed, read-only, unrecovered; the reopen), follower.py (``apply_logged``),
recovery.py, checkpoint.py, footprint.py, ops.py (decoded log records).
"""

from .checkpoint import FORMAT_VERSION
from .core import DEFAULT_POLICY, Shard
from .recovery import READ_FORMATS, read_manifest

__all__ = ["DEFAULT_POLICY", "FORMAT_VERSION", "READ_FORMATS", "Shard", "read_manifest"]
