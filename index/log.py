"""The log a shard takes its records from: the one interface between index/shard/ and a log.

This module owns that interface (``ShardLog``), how a shard is told which log to open
(``LogOpener``) and the default opener, the shard's local write-ahead log (index/wal.py).
Two kinds of log satisfy it:

- local (``external`` False): index/wal.py's WriteAheadLog under the shard's ``wal/``; the
  shard appends its own writes to it and replays it on open. Seqs are 1, 2, 3, ...;
- external (``external`` True): a replicated log kept elsewhere (a JetStream consumer,
  service/); records are appended through the router, and the shard only follows them
  (``Shard.apply_logged``) and replays them after its checkpoint on open. Seqs increase
  but may skip numbers (those of other shards' records in a shared stream), so the shard
  cannot see a record missing from what it is given: the external log vouches that it skips
  none of this shard's (service/cluster/nats_link.py ``LogReader`` checks against the
  stream), and its ``read_from`` reads to the end the log holds, not to where a reader's
  position happens to stop. ``append`` and ``sync`` are never called, and ``record_crc`` may
  return None and ``truncate_prefix`` do nothing.

index/ holds no network code: an external log is built outside it and handed to
``Shard.open`` as a ``LogOpener``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

from .wal import WriteAheadLog


class ShardLog(Protocol):
    """What a shard uses of its log."""

    external: bool
    """True: records are appended elsewhere and the shard only follows them (``append`` unused)."""

    def append(self, kind: int, payload: bytes) -> int:
        """Write one record and return its seq (a local log only; no fsync yet)."""
        ...

    def sync(self, seq: int) -> None:
        """Return once every record up to ``seq`` is durable (a local log only)."""
        ...

    def read_from(self, after_seq: int) -> Iterator[tuple[int, int, bytes]]:
        """(seq, kind, payload) of every record with seq > ``after_seq`` the log holds, seqs
        increasing, none of the shard's left out (a log that cannot vouch for one raises)."""
        ...

    def record_crc(self, seq: int) -> int | None:
        """A checksum of record ``seq`` that the checkpoint stores, or None (none kept, or gone)."""
        ...

    def truncate_prefix(self, upto_seq: int) -> None:
        """Records up to ``upto_seq`` are checkpointed: the log may drop them (or do nothing)."""
        ...

    def size_bytes(self) -> int:
        """The bytes the log holds for this shard (what replay would read, roughly)."""
        ...

    def close(self) -> None:
        """Release the log; a shard never uses it after."""
        ...


LogOpener = Callable[[Path, int, int | None], ShardLog]
"""Opens a shard's log: (the shard's ``wal/`` directory, the first seq the checkpoint does not
cover, the checkpoint's ``wal_crc32`` or None). An opener tells whether its logs are external
by an ``external`` attribute (see ``opens_external``)."""


def open_local_wal(directory: Path, first_seq: int, checkpoint_crc: int | None) -> ShardLog:
    """The shard's local write-ahead log (index/wal.py), checked against the checkpoint."""
    return WriteAheadLog.open(directory, first_seq=first_seq, checkpoint_crc=checkpoint_crc)


open_local_wal.external = False  # type: ignore[attr-defined]


def opens_external(opener: LogOpener) -> bool:
    """Whether ``opener`` opens an external log: its ``external`` attribute, True when it has none
    (``open_local_wal`` says False). Known before the log is opened, so a shard knows whether its
    manifest may expect a local ``wal/`` (index/shard/recovery.py ``read_manifest``)."""
    return bool(getattr(opener, "external", True))
