"""Plain counters of encoder work, for operators: no Prometheus here.

encoders/ imports neither index/ nor service/, so this keeps its own small histogram
(the same shape as index/stats.py's); service/metrics.py reads both at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    """Counts of observations per bucket (not cumulative), their count and sum. Thread-safe."""

    __slots__ = ("_lock", "bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one: above every bound
        self.count = 0
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += 1
            self.count += 1
            self.sum += value

    def snapshot(self) -> tuple[list[int], int, float]:
        """(per-bucket counts, count, sum), consistent with each other."""
        with self._lock:
            return list(self.counts), self.count, self.sum


@dataclass
class EncoderStats:
    """One model's calls: texts per call, how long texts waited to be batched, and the model's run time."""

    batch_size: Histogram = field(default_factory=lambda: Histogram(BATCH_SIZES))
    queue_wait_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS))
    inference_seconds: Histogram = field(default_factory=lambda: Histogram(SECONDS))
    failures: int = 0
