"""The server process's memory settings: malloc that returns freed index memory, and a
garbage collector that does not stop searches.

**The collector.** CPython's full (generation 2) collection walks every tracked object, and
the modules a server imports (grpc, protobuf, numpy, tantivy, onnxruntime) are about 50,000
of them: 30-40 ms with the GIL held, during which no search runs. A bulk load allocates
enough to start one every few seconds: bench/realload.py saw 26-43 ms pauses, the tail of
search latency while ingesting. ``freeze_heap`` moves every object alive at that moment into
the collector's permanent generation (``gc.freeze``): once after the imports and once after
recovery. Later full collections walk only what came after (about a millisecond). What it
costs: a reference cycle among those objects that dies later is never freed; they are
modules, the catalog and its shards, which live as long as the process.

glibc's allocator raises its mmap threshold each time a large block allocated by mmap is
freed (up to 32 MiB), so after an HNSW field's first graph build has freed its buffers,
every later vector block, row copy and hnswlib build buffer under 32 MiB comes from a heap
arena instead; and each thread that allocates gets an arena of its own (up to 8 per core).
The builds free those buffers in a different order than they were taken, so the arenas
fragment and freed memory stays resident: bench/sizing.py measured an HNSW field at 4.25x
raw hnswlib's resident memory per vector with glibc's defaults and 2.23x with a fixed
128 KiB threshold and 2 arenas (the rest is the field's contiguous copy of its vectors,
which exact scans and re-scoring read). ``tune_malloc`` sets both through ``mallopt`` at
start, before the index loads; an operator's own ``MALLOC_*`` variables win. Elsewhere than
glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import os

log = logging.getLogger("braid.memory")

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, now fixed: blocks above it are mmap'd and returned on free
ARENA_MAX = 2


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold and cap its arenas; False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    done = True
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        done = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 and done
    if "MALLOC_ARENA_MAX" not in os.environ:
        done = mallopt(M_ARENA_MAX, ARENA_MAX) == 1 and done
    if not done:
        log.warning("mallopt refused Braid's malloc settings; freed index memory may stay resident")
    return done


def freeze_heap() -> None:
    """Move every object alive now out of the collector's reach (module docstring)."""
    gc.collect()
    gc.freeze()
