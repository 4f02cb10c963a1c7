"""The open-loop load generator, parent side: start the client processes, merge what they report.

    run_load(plan, processes) -> LoadResult

Starts ``processes`` workers (multiprocessing, spawn: never fork a process holding gRPC
state), waits until each has connected, hands them one start time t0, then merges their
window reports (per second, by completion time) and their totals (calls due after the
warm-up) into HdrHistograms. ``on_tick(seconds since t0, windows so far)`` is called about
every ``tick_s`` while the load runs (the soak samples the server's memory there). Every wait is bounded:
workers that do not connect, die, or outlive the plan by more than their drain time are
stopped and a :class:`LoadError` says which.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import queue as queue_module
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
from hdrh.histogram import HdrHistogram

from . import stats
from .worker import BULK_OP, START_TIMEOUT_S, Plan, worker_main

JOIN_TIMEOUT_S = 10.0


class LoadError(RuntimeError):
    """The generator itself failed (a worker died, did not connect, or did not finish)."""


@dataclass
class OpResult:
    """One op's merged results: latencies of OK calls from the due time (``hist``) and from the send."""

    hist: HdrHistogram = field(default_factory=stats.histogram)
    sent_hist: HdrHistogram = field(default_factory=stats.histogram)
    ok: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)

    def add(self, report: dict[str, Any]) -> None:
        self.hist.add(stats.decode(report["hist"]))
        if "sent_hist" in report:
            self.sent_hist.add(stats.decode(report["sent_hist"]))
        self.ok += report["ok"]
        self.errors.update(report["errors"])

    @property
    def completed(self) -> int:
        return self.ok + sum(self.errors.values())


@dataclass
class Window:
    index: int
    ops: dict[str, OpResult] = field(default_factory=dict)
    lag_max_s: float = 0.0
    cpu_s: float = 0.0


@dataclass
class LoadResult:
    plan: Plan
    processes: int
    t0_wall: float  # time.time() at t0
    totals: dict[str, OpResult]
    windows: dict[int, Window]
    workers: list[dict[str, Any]]
    lag: HdrHistogram
    machine_cpu_percent: float
    loadavg_before: tuple[float, float, float]
    loadavg_after: tuple[float, float, float]

    @property
    def request_ops(self) -> list[str]:
        """The ops the arrival rate applies to (every op but BulkUpsert streams)."""
        return [op for op in self.totals if op != BULK_OP]


def _loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def run_load(
    plan: Plan,
    processes: int,
    on_tick: Callable[[float, dict[int, Window]], None] | None = None,
    tick_s: float = 1.0,
) -> LoadResult:
    """Run ``plan`` from ``processes`` client processes; see the module docstring."""
    if processes < 1:
        raise ValueError(f"processes must be >= 1, got {processes}")
    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    go = context.Event()
    start_value = context.Value("d", 0.0)
    workers = [
        context.Process(
            target=worker_main,
            args=(plan, k, processes, messages, start_value, go),
            name=f"loadtest-worker-{k}",
            daemon=True,
        )
        for k in range(processes)
    ]
    totals: dict[str, OpResult] = collections.defaultdict(OpResult)
    windows: dict[int, Window] = {}
    results: dict[int, dict[str, Any]] = {}
    lag = stats.histogram()

    def receive(timeout: float) -> tuple[str, int, Any] | None:
        try:
            return messages.get(timeout=timeout)
        except queue_module.Empty:
            return None

    def fail_if_dead(stage: str) -> None:
        for k, worker in enumerate(workers):
            if not worker.is_alive() and k not in results:
                raise LoadError(f"worker {k} exited with {worker.exitcode} {stage}")

    def handle(message: tuple[str, int, Any]) -> None:
        kind, k, body = message
        if kind == "error":
            raise LoadError(f"worker {k} failed:\n{body}")
        if kind == "window":
            window = windows.setdefault(body["index"], Window(body["index"]))
            for op, report in body["ops"].items():
                window.ops.setdefault(op, OpResult()).add(report)
            window.lag_max_s = max(window.lag_max_s, body["lag_max_s"])
            window.cpu_s += body["cpu_s"]
        elif kind == "done":
            for op, report in body.pop("totals").items():
                totals[op].add(report)
            lag.add(stats.decode(body.pop("lag_hist")))
            results[k] = body

    loadavg_before = _loadavg()
    try:
        for worker in workers:
            worker.start()
        ready: set[int] = set()
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(ready) < processes:
            if time.monotonic() > deadline:
                raise LoadError(f"only {len(ready)} of {processes} workers connected to {plan.address} in time")
            message = receive(0.1)
            if message is None:
                fail_if_dead("before it connected")
            elif message[0] == "ready":
                ready.add(message[1])
            else:
                handle(message)
        psutil.cpu_percent(None)  # starts the machine's CPU measurement
        t0 = time.monotonic() + 0.05
        t0_wall = time.time() + 0.05
        start_value.value = t0
        go.set()
        deadline = t0 + plan.profile.end_s + plan.drain_s + 20.0  # the workers' own drain, then a margin
        next_tick = t0 + tick_s
        while len(results) < processes:
            now = time.monotonic()
            if now > deadline:
                raise LoadError(f"workers {sorted(set(range(processes)) - set(results))} did not finish in time")
            if on_tick is not None and now >= next_tick:
                on_tick(now - t0, windows)
                next_tick += tick_s
            message = receive(min(0.1, max(next_tick - now, 0.001)))
            if message is None:
                fail_if_dead("before it finished")
            else:
                handle(message)
        machine_cpu = psutil.cpu_percent(None)
    finally:
        go.set()  # a worker still waiting for the start must not wait out its timeout
        for worker in workers:
            if worker.pid is None:
                continue  # never started
            worker.join(JOIN_TIMEOUT_S)
            if worker.is_alive():
                worker.terminate()
                worker.join(JOIN_TIMEOUT_S)
        messages.close()
    return LoadResult(
        plan=plan,
        processes=processes,
        t0_wall=t0_wall,
        totals=dict(totals),
        windows=dict(sorted(windows.items())),
        workers=[results[k] for k in range(processes)],
        lag=lag,
        machine_cpu_percent=machine_cpu,
        loadavg_before=loadavg_before,
        loadavg_after=_loadavg(),
    )
