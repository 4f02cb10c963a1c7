"""One query's exact scan of many rows, sped up two ways: half the rows on a helper thread, and its
best few found through a sample of the scores.

Scoring one query against a filter view of 10,000 x 384 reads 15 MB: bound by memory at about
1.2 ms on one core of the 2-core benchmark machine, 0.64 ms when two threads read a half each
(numpy releases the GIL inside the product). The helper is one thread for the process; when it
is busy (another search's half) the caller takes its half back and scores it too, so a loaded
server pays a queue look-up, never a wait behind another search.

Finding the best ``want`` of 10,000 scores with ``argpartition`` took 75 us, more than the
product of a cached view. ``top_columns`` first takes a threshold from a strided sample of the
scores (a partition of 1/16 of them): when at least ``want`` scores reach it, the best ``want``
are all among those (exact, whatever the sample), and a partition of those few finds them;
otherwise (rare: the sample's threshold is set so that about 80 + 32 x want / 16 scores reach
it) the full partition runs.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

SPLIT_BYTES = 4 << 20  # rows read per query from which the product is split in two (~2,700 x 384)
SAMPLED_TOP_MIN = 4096  # scores a row from which its top is found through a sample
SAMPLE_STEP = 16  # every this many-th score goes into the sample

_helper: ThreadPoolExecutor | None = None
_helper_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _helper
    with _helper_lock:
        if _helper is None:
            _helper = ThreadPoolExecutor(1, thread_name_prefix="braid-scan")
        return _helper


def dot_rows(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """``queries @ vectors.T`` (float32): for one query over at least SPLIT_BYTES of rows, the
    second half of the rows on the helper thread unless it is busy (then on this one too)."""
    if len(queries) != 1 or vectors.nbytes < SPLIT_BYTES or (os.cpu_count() or 1) < 2:
        return queries @ vectors.T
    half = len(vectors) // 2
    out = np.empty((1, len(vectors)), np.float32)

    def second() -> None:
        np.matmul(queries, vectors[half:].T, out=out[:, half:])

    later = _pool().submit(second)
    np.matmul(queries, vectors[:half].T, out=out[:, :half])
    if later.cancel():  # the helper had not started it: busy with another search's half
        second()
    else:
        later.result()
    return out


def top_columns(scores: np.ndarray, want: int) -> np.ndarray:
    """Column indices of the ``want`` largest scores of each row, in no order (rows x want); ``want``
    below the column count."""
    n = scores.shape[1]
    if len(scores) == 1 and n >= SAMPLED_TOP_MIN:
        row = scores[0]
        sample = row[::SAMPLE_STEP]
        rank = min(len(sample), 2 * (want // SAMPLE_STEP) + 5)
        threshold = np.partition(sample, len(sample) - rank)[len(sample) - rank]
        above = np.flatnonzero(row >= threshold)
        if want <= len(above) < n // 2:  # the best `want` all reach the threshold
            best = np.argpartition(row[above], len(above) - want)[len(above) - want :]
            return above[best][None, :]
    return np.argpartition(scores, n - want, axis=1)[:, n - want :]
