"""One seeded history run against a standalone ``braid serve`` in a child process.

The server's data lives on a small tmpfs of the run's own where it may mount one (root), else
on the machine's disk; it runs with a free-space floor (on the machine's disk, just below its
free space), so a fill file makes the disk full for real (tests/history/faults.py), with
ENOSPC seams it reads from flag files (tests/diskfaults.py) and frequent checkpoints.
Writers and readers (tests/history/workload.py) run while the faults hit: kill -9 and a
restart on the same data directory, the disk filling and emptying, ENOSPC at the log's
write, its fsync (then a restart, as an operator would: the log refuses writes after a
failed fsync), a checkpoint or tantivy's commit, kill -9 on a full disk with the restart on
it, (on the tmpfs) a disk full to the last byte, and kill -9 in a CreateSnapshot call (at a
random delay inside it; after the restart no snapshot is listed with an error and no
unfinished one is left: a problem of the run otherwise). After healing, every key is read back,
then once more after a last kill -9 and restart; the history and both readings are checked
(tests/history/checker.py).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import grpc

from braid.service.cluster.local import Child, child_env
from braid.v1 import braid_pb2 as pb
from braid.v1 import braid_pb2_grpc

from .. import diskfaults
from . import faults as f
from .checker import Fault, Final, Report, check
from .model import ABSENT, Recorder
from .workload import COLLECTION, Endpoint, Endpoints, Workload, keys_of, read_strong, schema

SERVING = r"serving braid\.v1\.Braid on [\d.]+:(\d+)"
HEAL_S = 120.0  # a restarted server answers within this (a loaded 2-core machine included)


TMPFS_SIZE = "128m"
TMPFS_FLOOR = 8 << 20  # the server's --min-free-bytes on its own tmpfs


def _mount_tmpfs(directory: Path) -> Path | None:
    """A small tmpfs at ``directory`` for the data (a disk the run may fill to the last byte), or
    None where it cannot be mounted (not root, no mount): the run then fills the machine's disk
    only below the server's floor."""
    if os.geteuid() != 0:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs", str(directory)], capture_output=True
    )
    return directory if mounted.returncode == 0 else None


def _unmount(directory: Path) -> None:
    if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def _server(directory: Path, data: Path, floor: int, flags: Path) -> Child:
    site = diskfaults.sitecustomize_dir(directory / "site")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    command = [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(data)]
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
        self.mount = _mount_tmpfs(directory / "disk")
        if self.mount is not None:
            self.filler = f.DiskFiller(self.mount, floor=TMPFS_FLOOR)
        else:
            self.filler = f.DiskFiller(directory / "fill")
        self.data = (self.mount or directory) / "data"
        self.server = _server(directory, self.data, self.filler.floor, self.flags)
        self.snapshot_s = 0.1  # the last CreateSnapshot that answered took this long (a small collection)
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
                lambda _: f"{filler.fill(0 if self.mount else None) >> 20} MiB fill",
                lambda _: self.restart(),
                lambda rng: time.sleep(rng.uniform(0.5, 2.0)),
                lambda _: filler.empty(),
            ])),
            # Without a tmpfs of its own the run never fills the machine's disk to the last byte:
            # below the floor instead (the same draws from a seed either way).
            (1, filler.fault((1.0, 3.0), leave=0 if self.mount else None)),
            (1, self.kill_mid_snapshot),
        ]  # fmt: skip
        self.injector = f.Injector(menu, seed, faults)
        self.injector.healers += [filler.empty, self._clear_flags]

    def kill_mid_snapshot(self, rng: random.Random) -> Fault:
        """CreateSnapshot, kill -9 at a random delay inside the call (below the last call's
        duration), restart; then no snapshot is listed with an error, none unfinished is left."""
        began = time.monotonic()
        store = self.data / "snapshots"
        delay, hold = rng.uniform(0.0, 0.9 * self.snapshot_s), rng.uniform(0.1, 1.0)
        caught = None  # the hidden directory of the snapshot being written, if one was seen
        with grpc.insecure_channel(self.server.address) as channel:
            request = pb.CreateSnapshotRequest(collection=COLLECTION)
            call = braid_pb2_grpc.BraidStub(channel).CreateSnapshot.future(request, timeout=60)
            called = time.monotonic()
            while time.monotonic() - called < delay and not call.done():
                caught = caught or next((p.name for p in store.glob(".creating-*")), None)
                time.sleep(0.002)
            answered = call.done()
            self.server.kill()
        if answered and call.exception() is None:
            self.snapshot_s = time.monotonic() - called
        time.sleep(hold)
        self.start()
        with grpc.insecure_channel(self.server.address) as channel:
            stub = braid_pb2_grpc.BraidStub(channel)
            listed = _call("ListSnapshots", lambda: stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=10)).snapshots
        damaged = [f"{s.name}: {s.error}" for s in listed if s.error]
        leftovers = sorted(p.name for p in store.glob(".*")) if store.exists() else []
        if damaged or leftovers:
            self.report.problems.append(
                f"kill -9 mid-CreateSnapshot: listed with an error {damaged}, unfinished left {leftovers}"
            )
        if answered:
            when = "after the answer"
        elif caught is None:
            when = "mid-call, before its .creating- directory was seen"
        else:
            finished = caught.removeprefix(".creating-") in {s.name for s in listed}
            when = f"mid-call, {caught} seen: {'finished before the kill' if finished else 'not listed'}"
        note = f"killed {delay:.2f} s into the call ({when}), down {hold:.1f} s; {len(listed)} snapshots listed"
        return Fault("kill -9 mid-CreateSnapshot", "braid serve", began, time.monotonic(), note)

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

        def setup() -> None:
            self.start()
            with grpc.insecure_channel(self.server.address) as channel:
                request = pb.CreateCollectionRequest(name=COLLECTION, schema=schema(), shards=2)
                braid_pb2_grpc.BraidStub(channel).CreateCollection(request, timeout=30)

        f.drive(report, setup, self.workload, self.injector, self.endpoints, 90.0, 60.0, min_run_s)
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
        if self.mount is not None:
            _unmount(self.mount)


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
