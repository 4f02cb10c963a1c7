"""Storage policy: how shards guard free disk space, bound their recovery time and pace writes.

One frozen dataclass, built by service/config.py from flags and BRAID_* variables and
handed down catalog -> collection -> shard; index/ never reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoragePolicy:
    # Upserts are refused (RESOURCE_EXHAUSTED "disk full") while the data directory's file
    # system has less free space than this plus the batch, so checkpoints, merges and
    # DeleteCollection always have room (index/diskspace.py). Deletes still pass: they are
    # tiny, and freeing space needs them. 0 turns the check off.
    min_free_bytes: int = 256 * 1024 * 1024
    # A shard checkpoints in the background once this much log was written since its last
    # checkpoint, or once its oldest unchecked-pointed write is this old: bounds replay on restart.
    checkpoint_log_bytes: int = 32 * 1024 * 1024
    checkpoint_interval_s: float = 300.0
    # While searches run, upserts take at most this share of the time they would take alone:
    # each batch rests for its own time x (1 / share - 1) when a read was served meanwhile
    # (index/pacing.py; the server applies it). 1 turns it off.
    write_share: float = 0.5
