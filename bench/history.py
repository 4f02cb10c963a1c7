"""The long history check (issue 20): a seeded fault run with a history check, standalone or cluster.

    python bench/history.py --mode cluster --faults 50 --seed 1
    python bench/history.py --mode standalone --faults 50 --seed 1

Writers (per-key versions, deletes; in a cluster both ack modes) and readers (STRONG in a
cluster) record every call while ``--faults`` faults drawn from ``--seed`` hit real processes
(tests/history/: cluster: kill -9 and SIGSTOP/SIGCONT of shard servers, routers and NATS nodes,
the collection stream's leader most often, and snapshot faults: a snapshot and trim on demand,
kill -9 in a Snapshot call, a wiped disk, a byte-flipped snapshot before a wiped disk, while
the shard servers snapshot and trim every ``--snapshot-log-bytes`` of log; standalone: kill -9,
a disk that fills and empties, ENOSPC at a write step, kill -9 on a full disk, kill -9 in a
CreateSnapshot call). After healing it checks the history and the
state on every replica and router, and prints the report: operations, the faults with their
times, lost / stale / phantom / failed-visible / diverged / count-mismatch counts, the seed.
Exit status 0 when the check passed, 1 when it found something. The cluster defaults are the
issue's: 3 NATS nodes, 3 shard servers, 2 routers, replication factor 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.history.cluster import SNAPSHOT_LOG_BYTES, run_cluster
from tests.history.standalone import run_standalone


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("cluster", "standalone"), required=True)
    parser.add_argument("--faults", type=int, default=50, help="faults to inject, one at a time (default 50)")
    parser.add_argument("--seed", type=int, default=1, help="draws the faults and the workload (default 1)")
    parser.add_argument("--keys", type=int, default=40, help="keys written and read (default 40)")
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--min-run-s", type=float, default=30.0, help="run the workload at least this long")
    parser.add_argument("--shard-servers", type=int, default=3, help="cluster: shard servers (default 3)")
    parser.add_argument("--routers", type=int, default=2, help="cluster: routers (default 2)")
    parser.add_argument("--shards", type=int, default=3, help="cluster: shards of the collection (default 3)")
    parser.add_argument(
        "--snapshot-log-bytes",
        type=int,
        default=SNAPSHOT_LOG_BYTES,
        help=f"cluster: each shard snapshots and trims after this much log (default {SNAPSHOT_LOG_BYTES})",
    )
    parser.add_argument(
        "--no-snapshot-faults", action="store_true", help="cluster: leave the snapshot faults out of the menu"
    )
    parser.add_argument("--directory", type=Path, help="where the data and logs go (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs) afterwards")
    args = parser.parse_args()

    directory = args.directory or Path(tempfile.mkdtemp(prefix=f"braid-history-{args.mode}-"))
    began = time.monotonic()
    try:
        if args.mode == "cluster":
            report = run_cluster(
                directory / "cluster",
                args.seed,
                faults=args.faults,
                keys=args.keys,
                min_run_s=args.min_run_s,
                shard_servers=args.shard_servers,
                routers=args.routers,
                shards=args.shards,
                writers=args.writers,
                readers=args.readers,
                snapshot_faults=not args.no_snapshot_faults,
                snapshot_log_bytes=args.snapshot_log_bytes,
            )
        else:
            report = run_standalone(
                directory / "standalone",
                args.seed,
                faults=args.faults,
                keys=args.keys,
                min_run_s=args.min_run_s,
                writers=args.writers,
                readers=args.readers,
            )
    finally:
        keep = args.keep or args.directory is not None
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    print(report.text(examples=20))
    print(f"  took {time.monotonic() - began:.0f} s{'; data and logs in ' + str(directory) if keep else ''}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
