"""hnswlib's ``save_index`` run in a forked child, so that a big graph's save stalls no search.

hnswlib's Python binding holds the GIL for the whole of ``save_index``: a checkpoint that
saves a 100,000 x 384 graph stops every other thread of the server for 46-545 ms (20,000 x
384: 9-84 ms; docs/benchmarks.md, "Graph saves in a child, and the stall probe on the frozen
heap"). A forked child has the graph's memory as it was at the fork (copy-on-write) and a GIL
of its own: it writes the file while the server's threads go on, and the parent waits for it
in ``os.waitpid``, which releases the GIL. The fork itself holds the GIL for a few
milliseconds (5-18 ms at 630 MB resident), so graphs under ``CHILD_SAVE_BYTES`` are saved in
process.

The child does nothing but the save: it closes every inherited socket and file
(``_close_inherited``: it holds none of the server's connections, listeners, files or locks),
ignores SIGTERM, SIGINT and SIGHUP (a signal to the process group stops the server, whose own
handlers must not run in the child), dies with its parent (``PR_SET_PDEATHSIG``: a kill -9 of the server leaves no
writer behind) and leaves with ``os._exit``, running no Python cleanup. The file is the
same bytes either way. Where ``fork`` is missing or fails, the save runs in process.

Python 3.12 warns about ``fork`` in a threaded process because the child may find a lock held
by a thread that no longer exists; this child takes none: it runs hnswlib's save (glibc keeps
malloc usable across fork) and exits.

Callers check what was written (index/hnswfile.py ``save``): the child's exit status says
only that ``save_index`` returned.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger("braid.index")

CHILD_SAVE_BYTES = 16 << 20  # a graph at least this big (about 10,000 x 384) is saved by a child
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
_fork_lock = threading.Lock()  # one child at a time: two saves at once would double the copy-on-write


def _prctl() -> Any:
    """libc's prctl, found while this process starts (the child must not load anything)."""
    if not hasattr(os, "fork"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # the process's own symbols: libc's among them
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def graph_bytes(index: Any) -> int:
    """About what hnswlib's level-0 block of ``index`` takes: per element its vector, 2M links and its label."""
    return int(index.get_current_count()) * (4 * int(index.dim) + 4 * (2 * int(index.M) + 1) + 8)


def save_index(index: Any, path: Path) -> None:
    """``index.save_index(path)``, in a forked child when the graph is big (module docstring).

    OSError(EIO) naming ``path`` when the child did not finish (killed, or hnswlib raised).
    """
    if graph_bytes(index) < CHILD_SAVE_BYTES or _PRCTL is None:
        index.save_index(str(path))
        return
    with _fork_lock:
        parent = os.getpid()
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)  # none arrives in the child before it ignores them
        try:
            pid = os.fork()
        except OSError as err:  # no memory for the page tables, or no more processes
            log.warning("hnswlib save of %s in process: fork failed (%s)", path, err)
            pid = -1
        if pid == 0:
            _child(index, path, parent)  # never returns
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if pid < 0:
            index.save_index(str(path))
            return
        _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
        raise OSError(errno.EIO, f"{path}: the child saving the graph did not finish ({how})")


def _child(index: Any, path: Path, parent: int) -> None:
    """The forked child: save, then leave without running anything else of the server."""
    code = 1
    try:
        for number in _SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SIGNALS)
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the line above: nobody waits for this save
            os._exit(1)
        _close_inherited()
        index.save_index(str(path))
        code = 0
    finally:
        os._exit(code)


def _close_inherited() -> None:
    """Close the child's inherited sockets and files; keep anonymous descriptors (epoll, eventfd,
    timerfd) and pipes. grpc's fork handlers may restart its poller threads in the child on an
    epoll set of their own; closing that under them made the child abort (``epoll_wait`` EBADF,
    2 saves in 5 with a gRPC server in the process). Without /proc nothing is closed."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return
    for name in names:
        fd = int(name)
        if fd < 3:
            continue
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the listing's own descriptor, closed since
            continue
        if not target.startswith(("anon_inode:", "pipe:")):
            with contextlib.suppress(OSError):
                os.close(fd)
