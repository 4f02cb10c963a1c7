"""Wait until server processes are idle before timing searches: what a bulk load leaves behind.

A BulkUpsert returns once its writes are durable and visible; HNSW fields then build their
graphs on background threads (seals, tiered merges, and 5 s after the last seal a merge of
every graph into one), and tantivy merges segments. Searches timed meanwhile would measure
those builds, so a load test or a benchmark that loads and then times searches calls
``settle`` first and reports how long it took (bench/ scripts import it as ``settle``).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

IDLE_SHARE = 0.05  # of one core
SETTLE_QUIET_S = 7.0  # longer than the 5 s after which an HNSW field merges its graphs into one
SETTLE_TIMEOUT_S = 1800.0


def settle(pids: list[int], quiet_s: float = SETTLE_QUIET_S, timeout_s: float = SETTLE_TIMEOUT_S) -> float:
    """Block until every process in ``pids`` used under IDLE_SHARE of a core for ``quiet_s`` in a
    row (7 s: longer than the 5 s after which an HNSW field merges its graphs into one, so the
    window cannot end just before that merge starts); returns the seconds waited."""
    tick = os.sysconf("SC_CLK_TCK")

    def cpu(pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited: idle
            return 0.0
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime

    started = idle_since = time.monotonic()
    while time.monotonic() - started < timeout_s:
        before = [cpu(pid) for pid in pids]
        time.sleep(0.5)
        if any(cpu(pid) - b >= IDLE_SHARE * 0.5 for pid, b in zip(pids, before, strict=True)):
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since >= quiet_s:
            return time.monotonic() - started
    print(f"servers still busy after {timeout_s:.0f} s; measuring anyway", file=sys.stderr, flush=True)
    return time.monotonic() - started
