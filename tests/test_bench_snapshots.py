"""bench/snapshots.py runs end to end on a tiny collection, so the benchmark cannot rot unnoticed.

Its own asserts check what it measures is real (a restored collection and an imported
archive hold the snapshot); here: a quiet snapshot costs little disk beside the
collection (its big files are hard links), and its tar holds every listed byte.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "snapshots.py"


def test_snapshot_bench_runs_on_a_tiny_collection(capsys):
    spec = importlib.util.spec_from_file_location("bench_snapshots", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    args = "--parts 1 --sizes 400 --dim 128 --index hnsw,spann --spann-merge-threshold 150 --vectors random"
    args += " --writes 10 --snapshots 2 --max-snapshots 2 --gap 5 --repeat 1"
    results = bench.main(args.split())
    assert [(r.n, r.index) for r in results] == [(400, "hnsw"), (400, "spann")]
    for r in results:
        assert r.snapshots == 2 and len(r.quiet_ms) >= 10 and r.during_ms
        assert 0 < r.extra_mb < r.listed_mb / 4, (r.index, r.extra_mb, r.listed_mb)
        assert r.export_mb >= r.listed_mb
    out = capsys.readouterr().out
    assert "| 400 | spann | import (tar) |" in out and "p99 during" in out
