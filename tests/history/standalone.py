"""One seeded history run against a standalone ``braid serve`` in a child process.

The server runs with a free-space floor just below the disk's free space (so a fill file
makes the disk full for real), ENOSPC seams it reads from flag files (tests/diskfaults.py)
and frequent checkpoints. Writers and readers (tests/history/workload.py) run while the
faults hit: kill -9 and a restart on the same data directory, the disk filling and emptying,
ENOSPC at the log's write, its fsync (then a restart, as an operator would: the log refuses
writes after a failed fsync), a checkpoint or tantivy's commit, and kill -9 on a full disk
with the restart on it. After healing, every key is read back, then once more after a last
kill -9 and restart; the history and both readings are checked (tests/history/checker.py).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import grpc

from braid.service.cluster.local import Child, child_env
from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from .. import diskfaults
from . import faults as f
from .checker import Final, Report, check
from .model import ABSENT, Recorder
from .workload import COLLECTION, Endpoint, Endpoints, Workload, keys_of, read_strong, schema

SERVING = r"serving braid\.v1\.Braid on [\d.]+:(\d+)"
HEAL_S = 120.0  # a restarted server answers within this (a loaded 2-core machine included)


def _server(directory: Path, floor: int, flags: Path) -> Child:
    site = diskfaults.sitecustomize_dir(directory / "site")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(directory / "data")]
    command += ["--port", "0", "--min-free-bytes", str(floor), "--checkpoint-interval-s", "2"]
    env = child_env({diskfaults.ENV: str(flags), "PYTHONPATH": path})
    return Child("braid", command, SERVING, env=env, log_path=directory / "server.log", start=False)


def _call(what: str, call, timeout: float = HEAL_S):  # type: ignore[no-untyped-def]
    """``call()`` until it answers (the server may still be starting or reopening)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            if time.monotonic() > deadline:
                raise AssertionError(f"{what}: {err.code().name} {err.details()}") from err
        time.sleep(0.2)


def _read_all(server: Child, keys: list[str], where: str) -> Final:
    with grpc.insecure_channel(server.address) as channel:
        stub = braid_pb2_grpc.BraidStub(channel)
        values: dict[str, int] = {}
        for start in range(0, len(keys), 50):
            chunk = keys[start : start + 50]
            found = _call(f"{where}: Get", lambda chunk=chunk: read_strong(stub, chunk, 10.0, cluster=False))
            values.update({key: found.get(key, ABSENT) for key in chunk})
        count = _call(f"{where}: Count", lambda: stub.Count(pb.CountRequest(collection=COLLECTION), timeout=10).count)
    return Final(where, values, int(count))


class StandaloneRun:
    """The server, its disk faults, the workload and the injector of one run."""

    def __init__(self, directory: Path, seed: int, faults: int, keys: int, writers: int, readers: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.seed, self.faults, self.keys = seed, faults, keys_of(keys)
        self.flags = directory / "flags"
        self.flags.mkdir(exist_ok=True)
        self.filler = f.DiskFiller(directory / "fill")
        self.server = _server(directory, self.filler.floor, self.flags)
        self.recorder = Recorder()
        self.report = Report(seed=seed, mode="standalone")
        self.endpoints = Endpoints([Endpoint("server", lambda: self.server.address if self.server.port else None)])
        self.workload = Workload(
            self.endpoints, self.recorder, self.keys, seed, cluster=False, writers=writers, readers=readers
        )
        server, filler, flags, hold = self.server, self.filler, self.flags, (0.2, 1.5)
        menu: list[tuple[float, f.FaultFn]] = [
            (4, f.kill9("braid serve", server.kill, self.start, (0.1, 1.0))),
            (2, filler.fault((1.0, 3.0))),
            (1, f.enospc(flags, "wal_write", hold)),
            (1, f.sequence("ENOSPC, then kill -9", "wal_fsync", [
                f.enospc(flags, "wal_fsync", hold), lambda _: self.restart()
            ])),
            (1, f.enospc(flags, "checkpoint", (1.0, 3.0))),
            (1, f.enospc(flags, "tantivy_commit", hold)),
            (1, f.sequence("kill -9 on a full disk", "braid serve", [
                lambda _: f"{filler.fill() >> 20} MiB fill",
                lambda _: self.restart(),
                lambda rng: time.sleep(rng.uniform(0.5, 2.0)),
                lambda _: filler.empty(),
            ])),
        ]  # fmt: skip
        self.injector = f.Injector(menu, seed, faults)
        self.injector.healers += [filler.empty, self._clear_flags]

    def _clear_flags(self) -> None:
        for flag in self.flags.iterdir():
            flag.unlink(missing_ok=True)

    def start(self) -> None:
        self.server.start()
        self.server.wait_ready(HEAL_S)

    def restart(self) -> None:
        self.server.kill()
        self.start()

    def run(self, min_run_s: float) -> Report:
        report = self.report
        try:
            self.start()
            with grpc.insecure_channel(self.server.address) as channel:
                request = pb.CreateCollectionRequest(name=COLLECTION, schema=schema(), shards=2)
                braid_pb2_grpc.BraidStub(channel).CreateCollection(request, timeout=30)
            began = report.since = time.monotonic()
            self.workload.start()
            self.injector.start()
            if not self.injector.join(timeout=self.faults * 90.0 + 60):
                report.problems.append("the faults did not finish in time")
            time.sleep(max(0.0, began + min_run_s - time.monotonic()))
        finally:
            self.injector.stop.set()
            self.injector.join(timeout=60)
            self.injector.heal_all()
            self.workload.finish()
            self.endpoints.close()
        report.faults = self.injector.faults
        report.problems += [self.injector.error] if self.injector.error else []
        report.problems += self.workload.crashes
        finals: list[Final] = []
        try:
            if not self.server.alive:
                self.start()
            finals.append(_read_all(self.server, self.keys, "after healing"))
            self.restart()
            finals.append(_read_all(self.server, self.keys, "after a last kill -9 and restart"))
        except Exception as err:
            report.problems.append(f"healing: {err}")
        report.errors = dict(self.recorder.errors)
        report.notes.append(
            f"reads that failed (not in the history): {self.recorder.failed_reads}; server log {self.server.log_path}"
        )
        return check(self.recorder.snapshot(), finals, report)

    def close(self) -> None:
        self.injector.stop.set()
        self.injector.heal_all()
        self.server.stop()
        self.endpoints.close()


def run_standalone(
    directory: Path,
    seed: int,
    faults: int = 5,
    keys: int = 40,
    min_run_s: float = 10.0,
    writers: int = 3,
    readers: int = 2,
) -> Report:
    """Run the workload under ``faults`` seeded faults (at least ``min_run_s`` seconds); the report."""
    run = StandaloneRun(directory, seed, faults, keys, writers, readers)
    try:
        return run.run(min_run_s)
    finally:
        run.close()
