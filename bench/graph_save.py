"""How long a graph save stops the server's other threads: hnswlib's save_index in process (the
reference) against index/child_save.py's forked child, side by side, on graphs of the shared
vector set.

While each save runs, a probe thread sleeps 1 ms at a time and records how late it wakes: a
thread that cannot get the GIL wakes late by as long as the save holds it, as every search
thread of a server would. Prints a table (save wall time, the probe's worst and total
lateness, the ratio child / in process) and writes bench/results/graph_save.json.

    .venv/bin/python bench/graph_save.py --sizes 20000 100000 --dim 384
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import hnswlib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from braid.index import child_save  # noqa: E402
from loadtest.vectors import load_vectors  # noqa: E402

M, EF_CONSTRUCTION = 16, 200


class Probe:
    """A thread waking every millisecond; ``window()`` yields the lateness seen meanwhile."""

    def __init__(self) -> None:
        self.late: list[float] = []
        self.recording = False
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            started = time.perf_counter()
            time.sleep(0.001)
            if self.recording:
                self.late.append((time.perf_counter() - started - 0.001) * 1000)

    def measure(self, work) -> tuple[float, float, float]:  # type: ignore[no-untyped-def]
        """(wall ms of ``work()``, the worst wake's lateness ms, the sum of lateness ms)."""
        self.late = []
        self.recording = True
        started = time.perf_counter()
        work()
        wall = (time.perf_counter() - started) * 1000
        time.sleep(0.01)  # the wake the save delayed lands inside the window
        self.recording = False
        late = self.late or [0.0]
        return wall, max(late), float(sum(late))


def in_process(index: hnswlib.Index, path: Path) -> None:
    index.save_index(str(path))


def measure(probe: Probe, base: np.ndarray, n: int, tmp: Path, repeats: int) -> dict[str, object]:
    """Both saves of one graph of the set's first ``n`` rows, ``repeats`` times each (medians)."""
    index = hnswlib.Index(space="ip", dim=base.shape[1])
    index.init_index(max_elements=n, M=M, ef_construction=EF_CONSTRUCTION)
    index.add_items(base[:n], np.arange(n), num_threads=os.cpu_count() or 1)
    row: dict[str, object] = {"n": n, "dim": base.shape[1], "graph_mb": child_save.graph_bytes(index) / 2**20}
    for how, save in (("in process", in_process), ("child", child_save.save_index)):
        runs = []
        for repeat in range(repeats):
            path = tmp / f"{n}-{repeat}.hnsw"
            runs.append(probe.measure(lambda path=path, save=save: save(index, path)))
            path.unlink()
        wall, worst, total = (float(np.median([r[i] for r in runs])) for i in range(3))
        row[how] = {"wall_ms": wall, "worst_late_ms": worst, "late_total_ms": total}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    probe = Probe()
    biggest = max(args.sizes)
    base, _, _ = load_vectors(max(biggest, 1000), args.dim, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(probe, base, n, Path(tmp), args.repeats) for n in args.sizes]
    probe.stop = True
    print(f"\n### Graph save: how long other threads wait (median of {args.repeats}, {args.dim} dims)\n")
    print(
        "| graph | MiB | save in process ms | worst wake late, in process ms | save by child ms "
        "| worst wake late, child ms | worst late child / in process |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        inp, child = row["in process"], row["child"]
        ratio = child["worst_late_ms"] / max(inp["worst_late_ms"], 1e-9)  # type: ignore[index]
        print(
            f"| {row['n']:,} x {row['dim']} | {row['graph_mb']:.0f} | {inp['wall_ms']:.1f} "  # type: ignore[index]
            f"| {inp['worst_late_ms']:.1f} | {child['wall_ms']:.1f} | {child['worst_late_ms']:.1f} "  # type: ignore[index]
            f"| {ratio:.2f}x |"
        )
    out = ROOT / "bench" / "results" / "graph_save.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
