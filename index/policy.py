"""Storage policy: how shards guard free disk space and bound their recovery time.

One frozen dataclass, built by service/config.py from flags and BRAID_* variables and
handed down catalog -> collection -> shard; index/ never reads the environment.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StoragePolicy:
    # Writes are refused (RESOURCE_EXHAUSTED) while the data directory's file system has
    # less free space than this, so checkpoints, merges and DeleteCollection always have room.
    min_free_bytes: int = 256 * 1024 * 1024
    # A shard checkpoints in the background once this much log was written since its last
    # checkpoint, or once its oldest unchecked-pointed write is this old: bounds replay on restart.
    checkpoint_log_bytes: int = 64 * 1024 * 1024
    checkpoint_interval_s: float = 300.0
