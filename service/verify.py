"""``braid verify DIR [--collection NAME]``: the offline scrub of a data directory, on the command line.

Checks every checksum Braid keeps (index/verify.py lists them), prints one line per bad
file (``BAD``; ``WARN`` for what the next open repairs or cannot check) and a summary.
Exit status: 0 when nothing is bad, 1 when a file is, 2 when the scrub was refused (a
server holds the data directory: stop it first). It only reads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO


def run_verify(data_dir: Path, collection: str | None = None, out: TextIO = sys.stdout) -> int:
    """Scrub ``data_dir`` and print what was found; returns the exit status."""
    # Imported here, not at the top: the CLI must not load numpy before `braid serve` sets
    # OPENBLAS_NUM_THREADS (service/cli.py).
    from braid.index.errors import BraidError
    from braid.index.verify import verify_data_dir

    try:
        problems = verify_data_dir(Path(data_dir), collection)
    except BraidError as err:
        print(f"braid verify: refused: {err}", file=sys.stderr)
        return 2
    for problem in problems:
        print(f"{'BAD ' if problem.fatal else 'WARN'} {problem}", file=out)
    bad = sum(problem.fatal for problem in problems)
    if bad:
        print(
            f"braid verify: {bad} bad file(s) under {data_dir}: restore the collection from a snapshot, "
            "or rebuild it from the source (docs/design.md, Checksums and corruption)",
            file=out,
        )
        return 1
    print(f"braid verify: {data_dir}: every checksum matches", file=out)
    return 0


def _verify(args: argparse.Namespace) -> int:
    return run_verify(Path(args.dir), args.collection)


def add_verify_command(commands: Any) -> None:
    """Register ``braid verify DIR [--collection NAME]`` on the argparse subparsers object."""
    verify = commands.add_parser("verify", help="check every checksum of a data directory (server stopped)")
    verify.add_argument("dir", help="the data directory (--data-dir of braid serve)")
    verify.add_argument("--collection", help="only this collection")
    verify.set_defaults(run=_verify)
