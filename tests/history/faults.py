"""Faults on real processes, chosen at random from a seed, one at a time, each healed before the next.

A fault is a function ``(rng) -> Fault`` that breaks something, holds it for a while drawn
from ``rng``, heals it and returns what it did (kind, target, start and end times). The
``Injector`` draws ``count`` faults from a weighted menu with ``random.Random(seed)``, with a
pause between two, in a thread of its own; whatever a fault leaves broken when the run
stops (or a fault raises) is healed by ``heal_all``.

Faults:

* ``kill9(process)``: SIGKILL, then start it again (same data directory, same command) and
  wait until it serves;
* ``pause(process)``: SIGSTOP, then SIGCONT (a process that hangs: calls to it time out);
* ``DiskFiller``: a disk that fills and empties for real: filling allocates a file
  (``posix_fallocate``, so the blocks are taken at once), emptying deletes it. On a small
  tmpfs of the run's own (when it may mount one: root) it fills below the server's free-space
  floor (``--min-free-bytes``) or to the last byte; on the machine's disk, the server's floor
  sits a little below the free space at the start and a fill leaves less than the floor;
* ``enospc(step)``: ENOSPC at one write step (tests/diskfaults.py: the server's seam fails
  while its flag file exists).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .checker import Fault

FaultFn = Callable[[random.Random], Fault]


class Injector:
    """``count`` faults drawn from ``menu`` ((weight, fault) pairs) with ``random.Random(seed)``."""

    def __init__(
        self,
        menu: list[tuple[float, FaultFn]],
        seed: int,
        count: int,
        gap_s: tuple[float, float] = (0.5, 2.0),
    ) -> None:
        self.menu = menu
        self.rng = random.Random(f"{seed}/faults")
        self.count = count
        self.gap_s = gap_s
        self.faults: list[Fault] = []
        self.error: str | None = None
        self.stop = threading.Event()
        self.healers: list[Callable[[], None]] = []  # heal whatever is still broken
        self._thread = threading.Thread(target=self._run, name="faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        """Wait until every fault was injected and healed; False if it is still going."""
        if self._thread.ident is None:
            return True  # never started
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        weights = [weight for weight, _ in self.menu]
        try:
            for _ in range(self.count):
                if self.stop.wait(self.rng.uniform(*self.gap_s)):
                    return
                (fault,) = self.rng.choices([fn for _, fn in self.menu], weights)
                self.faults.append(fault(self.rng))
        except Exception as err:  # a process that would not come back: the run reports it
            self.error = f"fault {len(self.faults) + 1}: {err!r}"

    def heal_all(self) -> None:
        for heal in self.healers:
            with contextlib.suppress(Exception):
                heal()


def drive(
    report: Any,
    setup: Callable[[], None],
    workload: Any,
    injector: Injector,
    endpoints: Any,
    per_fault_s: float,
    stop_join_s: float,
    min_run_s: float,
) -> None:
    """One run's common course: ``setup`` (create the collection), then the workload and the
    faults together for at least ``min_run_s``; whatever happened, the faults stop, every
    process is healed and the workload drains. Fills ``report`` (checker.Report) with the
    run's start, the faults injected and the problems met."""
    try:
        setup()
        began = report.since = time.monotonic()
        workload.start()
        injector.start()
        if not injector.join(timeout=injector.count * per_fault_s + 60):
            report.problems.append("the faults did not finish in time")
        time.sleep(max(0.0, began + min_run_s - time.monotonic()))  # the load's window, not a wait
    finally:
        injector.stop.set()
        injector.join(timeout=stop_join_s)
        injector.heal_all()
        workload.finish()
        endpoints.close()
    report.faults = injector.faults
    report.problems += [injector.error] if injector.error else []
    report.problems += workload.crashes


def kill9(name: str, kill: Callable[[], None], start: Callable[[], None], hold_s: tuple[float, float]) -> FaultFn:
    """SIGKILL (``kill``), hold, then ``start`` (which waits until the process serves)."""

    def fault(rng: random.Random) -> Fault:
        began = time.monotonic()
        kill()
        hold = rng.uniform(*hold_s)
        time.sleep(hold)
        restarted = time.monotonic()
        start()
        return Fault(
            "kill -9", name, began, time.monotonic(), f"down {hold:.1f} s, restart {time.monotonic() - restarted:.1f} s"
        )

    return fault


def pause(name: str, pid: Callable[[], int | None], hold_s: tuple[float, float]) -> FaultFn:
    """SIGSTOP the process ``pid()``, hold, SIGCONT."""

    def fault(rng: random.Random) -> Fault:
        target = pid()
        began = time.monotonic()
        if target is None:
            return Fault("pause", name, began, began, "not running: skipped")
        os.kill(target, signal.SIGSTOP)
        try:
            time.sleep(rng.uniform(*hold_s))
        finally:
            os.kill(target, signal.SIGCONT)
        return Fault("pause", name, began, time.monotonic(), f"SIGSTOP/SIGCONT pid {target}")

    return fault


def continue_all(pids: list[int | None]) -> None:
    for target in pids:
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target, signal.SIGCONT)


class DiskFiller:
    """A real full disk for a server whose floor is ``floor`` bytes: ``fill(leave)`` allocates a file
    that leaves ``leave`` bytes free on the file system of ``directory``, ``empty`` deletes it.

    Without a file system of its own (``floor`` None: the machine's disk), the floor sits
    HEADROOM below the free space at the start and a fill leaves 256 MiB less than the floor;
    on a small tmpfs of its own, a fill may leave nothing at all (a real ENOSPC at every step)."""

    HEADROOM = 1 << 30

    def __init__(self, directory: Path, floor: int | None = None) -> None:
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "fill.bin"
        self.floor = floor if floor is not None else max(self._free() - self.HEADROOM, 64 << 20)
        self.below_floor = max(self.floor - (256 << 20), 0) if floor is None else self.floor // 4

    def _free(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int | None = None) -> int:
        """Allocate what leaves ``leave`` bytes free (default: well below the floor); the bytes taken."""
        leave = self.below_floor if leave is None else leave
        size = self._free() - leave
        with open(self.path, "ab") as out:
            while size > 0:
                try:
                    os.posix_fallocate(out.fileno(), out.tell(), size)
                    return size
                except OSError:  # a file system that cannot give it all at once: take a little less
                    size -= 64 << 10
        return 0

    def empty(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def fault(self, hold_s: tuple[float, float], leave: int | None = None) -> FaultFn:
        def run(rng: random.Random) -> Fault:
            began = time.monotonic()
            size = self.fill(leave)
            try:
                time.sleep(rng.uniform(*hold_s))
            finally:
                self.empty()
            what = "to the last byte" if leave == 0 else "below the floor"
            return Fault(
                "disk full", what, began, time.monotonic(), f"{size >> 20} MiB fill, floor {self.floor >> 20} MiB"
            )

        return run


def enospc(flags: Path, step: str, hold_s: tuple[float, float]) -> FaultFn:
    """ENOSPC at ``step`` (tests/diskfaults.py) while its flag file exists."""

    def run(rng: random.Random) -> Fault:
        began = time.monotonic()
        flag = flags / step
        flag.touch()
        try:
            time.sleep(rng.uniform(*hold_s))
        finally:
            flag.unlink(missing_ok=True)
        return Fault("ENOSPC", step, began, time.monotonic())

    return run


def sequence(kind: str, name: str, steps: list[Callable[[random.Random], Any]]) -> FaultFn:
    """Several steps as one fault (e.g. fill the disk, kill -9, restart on the full disk, empty)."""

    def run(rng: random.Random) -> Fault:
        began = time.monotonic()
        notes = []
        for step in steps:
            done = step(rng)
            notes.append(
                f"{done.kind} {done.target} {done.end - done.start:.1f} s"
                if isinstance(done, Fault)
                else str(done or "")
            )
        return Fault(kind, name, began, time.monotonic(), "; ".join(note for note in notes if note))

    return run
