"""A full disk is an ordinary, recoverable error: RESOURCE_EXHAUSTED "disk full", never a hang.

A full disk is faked at each write step by wrapping the real object at its seam
(tests/diskfaults.py), in a child server so it can be SIGKILLed, or for real on a small
tmpfs when this runs as root and may mount one. The free-space floor is faked through
``braid.index.diskspace.free_bytes``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.index import diskspace
from braid.index.errors import DiskFull
from braid.index.records import DocumentWrite
from braid.index.schema import DenseFieldSpec, Schema, TextFieldSpec
from braid.index.shard import Shard
from braid.index.shard.health import _RECOVERED_STATE
from braid.v1 import braid_pb2 as pb

from . import diskfaults
from .conftest import schema, start_in_process, stop_in_process, wait_for

DIM = 8
DEADLINE_S = 15.0  # every call of these tests: a hang shows up as DEADLINE_EXCEEDED, not a stuck test
WRITE_STEPS = ("wal_write", "wal_fsync", "tantivy_commit", "apply")


def make_doc(i: int, sparse: bool = True) -> dict:
    doc = {
        "id": f"doc-{i}",
        "text": {"body": f"word{i} common"},
        "dense": {"emb": np.random.default_rng(i).standard_normal(DIM).astype(np.float32)},
    }
    if sparse:
        doc["sparse"] = {"splade": {f"t{i}": 1.0}}
    return doc


def spann_text_schema(merge_threshold: int) -> pb.Schema:
    spann = pb.SpannParams(merge_threshold=merge_threshold)
    return pb.Schema(
        dense_fields=[pb.DenseVectorField(name="emb", dim=DIM, metric=pb.COSINE, index="spann", spann=spann)],
        text_fields=[pb.TextField(name="body")],
    )


class Writer:
    """Upserts through a client, remembering what was acknowledged and what was only tried."""

    def __init__(self, client, sparse: bool = True) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.sparse = sparse
        self.acked: set[int] = set()
        self.tried: set[int] = set()

    def upsert(self, ids: range) -> grpc.RpcError | None:
        self.tried |= set(ids)
        started = time.monotonic()
        try:
            self.client.upsert("docs", [make_doc(i, self.sparse) for i in ids])
        except grpc.RpcError as err:
            assert err.code() is not grpc.StatusCode.DEADLINE_EXCEEDED, "a write hung"
            assert time.monotonic() - started < DEADLINE_S
            return err
        self.acked |= set(ids)
        return None

    def upsert_until_accepted(self, ids: range, seconds: float = 10.0) -> None:
        """Writes resume by themselves: retry (bounded) while a reopen is backing off."""
        deadline = time.monotonic() + seconds
        for _ in range(200):
            err = self.upsert(ids)
            if err is None:
                return
            assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
            assert time.monotonic() < deadline, f"writes did not resume: {err.details()}"
            time.sleep(0.1)
        raise AssertionError("writes did not resume")

    def check_intact(self, client) -> None:  # type: ignore[no-untyped-def]
        """Every acknowledged write is there, and nothing that was never tried."""
        got = {d.id for d in client.get("docs", [f"doc-{i}" for i in sorted(self.tried)])}
        missing = sorted(i for i in self.acked if f"doc-{i}" not in got)
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        assert client.count("docs") == len(got)
        some = min(self.acked)
        assert [h.id for h in client.search("docs", bm25=f"word{some}")] == [f"doc-{some}"]
        hit = client.search("docs", dense=("emb", make_doc(some)["dense"]["emb"]), limit=1)
        assert hit[0].id == f"doc-{some}"


def assert_disk_full(err: grpc.RpcError | None, step: str) -> None:
    assert err is not None, f"a write went through with a full disk at {step}"
    if step == "wal_fsync":  # the kernel may have dropped the pages: a restart must re-read the log
        assert err.code() is grpc.StatusCode.UNAVAILABLE and "fsync" in err.details(), err.details()
    else:
        assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
        assert "disk full" in err.details(), err.details()


def faulty_child(child_server, data: Path, flags: Path):  # type: ignore[no-untyped-def]
    site = diskfaults.sitecustomize_dir(flags.parent / "site")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    server = child_server(data, env={diskfaults.ENV: str(flags), "PYTHONPATH": path})
    server.client.timeout = DEADLINE_S
    return server


# --------------------------------------------------------------- each write step


@pytest.mark.parametrize("step", diskfaults.STEPS)
def test_a_full_disk_at_each_write_step(step, child_server, tmp_path):
    data, flags = tmp_path / "data", tmp_path / "faults"
    server = faulty_child(child_server, data, flags)
    merge = step == "merge"
    server.client.create_collection("docs", spann_text_schema(100) if merge else schema(dim=DIM))
    server.client.create_collection("other", schema(dim=DIM))
    server.client.upsert("other", [make_doc(i) for i in range(5)])
    writer = Writer(server.client, sparse=not merge)
    assert writer.upsert(range(20)) is None

    (flags / step).touch()
    if step in WRITE_STEPS:
        assert_disk_full(writer.upsert(range(20, 30)), step)
        for attempt in range(3):  # later writes are refused too, promptly: no sequence gap to wait on
            assert_disk_full(writer.upsert(range(30 + 5 * attempt, 35 + 5 * attempt)), step)
    elif step == "checkpoint":
        with pytest.raises(grpc.RpcError) as info:
            server.client.flush("docs")
        assert_disk_full(info.value, step)
        assert not list((data / "collections" / "docs" / "shard-000" / "segments").glob("*.tmp"))
        assert writer.upsert(range(20, 30)) is None  # the shard keeps taking writes
    else:  # a seal is due past 100 vectors; it fails in the background and gives its vectors back
        assert writer.upsert(range(20, 150)) is None
        server.client.flush("docs")  # waits for the failed merge, then checkpoints
        assert not list((data / "collections" / "docs" / "shard-000" / "segments").glob("spann-*"))
        assert writer.upsert(range(150, 160)) is None

    writer.check_intact(server.client)  # reads answer from memory
    server.client.delete_collection("other")  # frees space even now
    assert [c.name for c in server.client.list_collections()] == ["docs"]

    read_only = step in ("tantivy_commit", "apply")  # the steps after which memory no longer matches the log
    if read_only:
        _wait_health(server.port, "braid.writes", health_pb2.HealthCheckResponse.NOT_SERVING)
    (flags / step).unlink()
    if step == "wal_fsync":
        assert_disk_full(writer.upsert(range(100, 110)), step)  # needs a restart, by design
    elif read_only:
        # The server's storage watchdog reopens the shard by itself once the disk has room: no write needed.
        _wait_health(server.port, "braid.writes", health_pb2.HealthCheckResponse.SERVING, timeout=20)
        assert writer.upsert(range(100, 110)) is None
    else:
        writer.upsert_until_accepted(range(100, 110))
    if step == "checkpoint":
        server.client.flush("docs")
    if merge:  # twice the threshold after the failed seal: the next one succeeds
        assert writer.upsert(range(200, 420)) is None
        server.client.flush("docs")
        assert list((data / "collections" / "docs" / "shard-000" / "segments").glob("spann-*"))
    if step != "wal_fsync":
        writer.check_intact(server.client)

    server.kill()
    server = faulty_child(child_server, data, flags)
    writer.client = server.client
    writer.check_intact(server.client)
    assert writer.upsert(range(500, 510)) is None
    assert server.stop() == 0
    server = faulty_child(child_server, data, flags)
    writer.client = server.client
    writer.check_intact(server.client)
    assert server.stop() == 0


def test_start_on_a_full_disk_serves_reads_and_writes_resume(child_server, tmp_path):
    data, flags = tmp_path / "data", tmp_path / "faults"
    server = faulty_child(child_server, data, flags)
    server.client.create_collection("docs", schema(dim=DIM))
    writer = Writer(server.client)
    assert writer.upsert(range(30)) is None
    server.kill()  # the log holds writes the checkpoint does not: the next start replays and commits them

    (flags / "tantivy_commit").touch()
    server = faulty_child(child_server, data, flags)
    writer.client = server.client
    writer.check_intact(server.client)
    assert_disk_full(writer.upsert(range(30, 40)), "tantivy_commit")
    (flags / "tantivy_commit").unlink()
    writer.upsert_until_accepted(range(40, 50))
    writer.check_intact(server.client)
    assert server.stop() == 0


# ------------------------------------------------------------------ the floor


def test_the_free_space_floor(tmp_path, monkeypatch):
    floor = 64 * 1024 * 1024
    server, running = start_in_process(tmp_path / "d", min_free_bytes=floor)
    try:
        client = running.client
        client.timeout = DEADLINE_S
        client.create_collection("docs", schema(dim=DIM))
        writer = Writer(client)
        assert writer.upsert(range(10)) is None
        collection = server.catalog.get("docs")
        assert collection.write_problem() is None

        fake = {"free": 1000}
        monkeypatch.setattr(diskspace, "free_bytes", lambda directory: fake["free"])
        time.sleep(diskspace.CACHE_S * 1.5)  # the cached reading expires
        err = writer.upsert(range(10, 20))
        assert err is not None and err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "disk full: 1000 bytes free" in err.details() and "floor of 67108864 (min_free_bytes)" in err.details()
        assert (collection.write_problem() or "").startswith("disk full: 1000 bytes free")
        assert client.get_collection("docs").write_problem.startswith("disk full: 1000 bytes free")
        _wait_health(running.port, "braid.writes", health_pb2.HealthCheckResponse.NOT_SERVING)
        _wait_health(running.port, "", health_pb2.HealthCheckResponse.SERVING)  # reads go on: no restart wanted
        with pytest.raises(grpc.RpcError) as info:
            client.create_collection("more", schema(dim=DIM))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "disk full" in info.value.details()
        writer.check_intact(client)
        assert client.delete("docs", ids=["doc-0"]) == 1  # deletes still pass: freeing space needs them
        writer.acked.discard(0)

        fake["free"] = floor + 100  # above the floor, but not by a whole batch
        err = writer.upsert(range(10, 20))
        assert err is not None and "plus this batch's" in err.details()

        monkeypatch.undo()  # space freed: the very next write takes a fresh reading
        assert writer.upsert(range(20, 30)) is None
        time.sleep(diskspace.CACHE_S * 1.5)
        assert collection.write_problem() is None
        assert client.get_collection("docs").write_problem == ""
        _wait_health(running.port, "braid.writes", health_pb2.HealthCheckResponse.SERVING)
        writer.check_intact(client)
    finally:
        stop_in_process(server, running)


def test_the_floor_counts_batches_between_readings(tmp_path, monkeypatch):
    """Within one cached reading, accepted batches are subtracted; a refusal takes a fresh reading."""
    free = {"bytes": 10_000, "readings": 0}

    def fake(directory: Path) -> int:
        free["readings"] += 1
        return free["bytes"]

    monkeypatch.setattr(diskspace, "free_bytes", fake)
    space = diskspace.FreeSpace(tmp_path, floor=4_000, max_age_s=60)
    space.check(3_000)  # a reading: 10,000 free, 7,000 once this batch is written
    space.check(2_000)  # from the estimate alone: 5,000 left
    assert free["readings"] == 1
    free["bytes"] = 5_500
    with pytest.raises(DiskFull, match=r"5500 bytes free .* plus this batch.s 2000 bytes"):
        space.check(2_000)  # the estimate (5,000) is short: a fresh reading (5,500) confirms it
    assert free["readings"] == 2
    free["bytes"] = 3_000
    with pytest.raises(DiskFull, match=r"3000 bytes free under .*, below the floor of 4000 \(min_free_bytes\); writes"):
        diskspace.FreeSpace(tmp_path, floor=4_000).check(1)
    assert diskspace.FreeSpace(tmp_path, floor=0).problem() is None  # 0 turns the check off


# ------------------------------------------------------------- shard level


@pytest.fixture
def faults(tmp_path):  # type: ignore[no-untyped-def]
    flags = tmp_path / "faults"
    diskfaults.install(flags)
    yield flags
    diskfaults.uninstall()


@pytest.fixture
def no_backoff(monkeypatch):  # type: ignore[no-untyped-def]
    """A read-only shard tries to reopen on the very next write (not a second after its last try)."""
    from braid.index.shard import health

    monkeypatch.setattr(health, "REOPEN_BACKOFF_S", 0.0)


def text_schema() -> Schema:
    return Schema(dense_fields=(DenseFieldSpec("emb", DIM),), text_fields=(TextFieldSpec("body"),))


def shard_docs(ids: range) -> list[DocumentWrite]:
    return [
        DocumentWrite(id=f"d{i}", text={"body": f"w{i}"}, dense={"emb": np.full(DIM, i + 1, np.float32)}) for i in ids
    ]


def test_concurrent_writers_all_get_an_answer_when_the_commit_fails(faults, no_backoff, tmp_path):
    shard = Shard.open(tmp_path / "s", text_schema(), 0)
    shard.upsert(shard_docs(range(10)))
    (faults / "tantivy_commit").touch()
    outcomes: list[object] = []

    def write(t: int) -> None:
        try:
            outcomes.append(shard.upsert(shard_docs(range(100 + 10 * t, 110 + 10 * t))))
        except Exception as err:
            outcomes.append(err)

    threads = [threading.Thread(target=write, args=(t,), daemon=True) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=DEADLINE_S)
    assert not any(thread.is_alive() for thread in threads), "a writer waits for ever"
    assert len(outcomes) == 8 and all(isinstance(o, DiskFull) for o in outcomes), outcomes
    assert (shard.write_problem() or "").startswith("disk full: shard 0")
    assert shard.count(None) == 10  # reads answer

    (faults / "tantivy_commit").unlink()
    assert shard.upsert(shard_docs(range(200, 210))) == 10
    assert shard.write_problem() is None
    # Writes answered "disk full" after their record was logged were applied by the reopen.
    assert 20 <= shard.count(None) <= 100
    shard.close()
    reopened = Shard.open(tmp_path / "s", text_schema(), 0)
    assert reopened.label_of("d0") is not None and reopened.label_of("d209") is not None
    reopened.close()


def test_close_of_a_read_only_shard_needs_no_disk(faults, tmp_path):
    shard = Shard.open(tmp_path / "s", text_schema(), 0)
    shard.upsert(shard_docs(range(5)))
    (faults / "apply").touch()
    with pytest.raises(DiskFull):
        shard.upsert(shard_docs(range(5, 10)))
    (faults / "wal_fsync").touch()  # even the log's closing fsync fails: close logs it and finishes
    done = threading.Event()
    threading.Thread(target=lambda: (shard.close(), done.set()), daemon=True).start()
    assert done.wait(DEADLINE_S), "close hung"
    (faults / "apply").unlink()
    (faults / "wal_fsync").unlink()
    reopened = Shard.open(tmp_path / "s", text_schema(), 0)
    assert reopened.live_count in (5, 10)  # the refused write may have been logged
    reopened.close()


def test_a_failed_wal_append_leaves_the_log_as_it_was(faults, tmp_path):
    from braid.index.wal import WriteAheadLog

    log = WriteAheadLog.open(tmp_path / "wal")
    log.append(1, b"first")
    size = log.size_bytes()
    (faults / "wal_write").touch()
    with pytest.raises(DiskFull, match="disk full: write-ahead log append"):
        log.append(1, b"x" * 1000)  # half of it reaches the file, then ENOSPC
    assert log.size_bytes() == size and log.last_seq == 1
    assert sum(p.stat().st_size for p in (tmp_path / "wal").iterdir()) == size  # the torn half is gone
    (faults / "wal_write").unlink()
    assert log.append(1, b"second") == 2
    log.sync(2)
    log.close()
    with WriteAheadLog.open(tmp_path / "wal") as reopened:
        assert [payload for _, _, payload in reopened.read_from(0)] == [b"first", b"second"]


def test_a_checkpoint_whose_tantivy_commit_fails(faults, no_backoff, tmp_path):
    """The writer may have dropped staged documents: read-only, no half-written generation left."""
    shard = Shard.open(tmp_path / "s", text_schema(), 0)
    shard.upsert(shard_docs(range(5)))
    (faults / "tantivy_commit").touch()
    with pytest.raises(DiskFull, match=r"disk full: shard 0 .* read-only"):
        shard.flush()
    assert sorted(p.name for p in (tmp_path / "s" / "segments").iterdir()) == []
    assert not (tmp_path / "s" / "MANIFEST.json").exists()
    with pytest.raises(DiskFull):
        shard.upsert(shard_docs(range(5, 10)))
    assert shard.count(None) == 5
    (faults / "tantivy_commit").unlink()
    assert shard.upsert(shard_docs(range(10, 15))) == 5
    shard.flush()
    shard.close()
    reopened = Shard.open(tmp_path / "s", text_schema(), 0)
    assert reopened.label_of("d14") is not None and reopened.count(None) in (10, 15)
    reopened.close()


def test_a_replay_a_full_disk_stopped_part_way_refuses_reads_until_it_heals(faults, no_backoff, tmp_path):
    """Issue 20, finding 2, in process: the replay stops at its first record (ENOSPC while
    applying it), so memory holds none of the log. Before the fix the shard opened read-only
    and Count said 0 of 30; now every read is refused with Unavailable naming the shard and
    why, and the first read once there is room starts a reopen (no write, no watchdog needed:
    a follower may get neither), after which every document is served."""
    from braid.index.errors import Unavailable

    shard = Shard.open(tmp_path / "s", text_schema(), 0)
    for start in range(0, 30, 10):
        shard.upsert(shard_docs(range(start, start + 10)))
    shard.close()  # no checkpoint: the log holds all 30
    (faults / "apply").touch()
    shard = Shard.open(tmp_path / "s", text_schema(), 0)
    try:
        for read in (lambda: shard.count(None), lambda: shard.read().__enter__()):
            with pytest.raises(Unavailable) as info:
                read()
            message = str(info.value)
            assert "shard 0" in message and "recovery stopped part way" in message and "disk full" in message, message
        assert shard.read_problem() is not None and shard.write_problem() is not None
        (faults / "apply").unlink()

        def served() -> bool:
            try:
                return shard.count(None) == 30
            except Unavailable:
                return False

        wait_for(served, timeout=30, what="the shard to recover once the disk has room")
        assert shard.read_problem() is None and shard.write_problem() is None
        assert shard.label_of("d29") is not None
    finally:
        shard.close()


def test_a_follower_whose_replay_tantivy_cannot_commit_refuses_reads(faults, no_backoff, tmp_path):
    """A follower restarts behind its log (records 4 and 6 were never applied here, so tantivy
    never committed their text); the replay reaches the log's end but tantivy's commit meets a
    full disk. Unlike a local log's shard (whose every acknowledged write was committed to
    tantivy before its acknowledgement), memory now holds documents whose text no commit has:
    Get would return them without their text and BM25 would miss them. So the shard refuses
    reads until a reopen with room commits them; then BM25 finds them."""
    from braid.index.errors import Unavailable

    from .test_shard_log import ListLog, bm25_top, follower, upsert

    log = ListLog()
    shard = follower(tmp_path / "s", log)
    shard.apply_logged([upsert(log, 2, range(5))])
    shard.close()
    upsert(log, 4, range(5, 8))
    upsert(log, 6, range(8, 10))
    (faults / "tantivy_commit").touch()
    shard = follower(tmp_path / "s", log)
    try:
        with pytest.raises(Unavailable, match="recovery stopped part way"):
            shard.count(None)
        (faults / "tantivy_commit").unlink()

        def served() -> bool:
            try:
                return shard.count(None) == 10  # a refused read starts the heal
            except Unavailable:
                return False

        wait_for(served, timeout=30, what="the follower to recover with room")
        assert shard.read_problem() is None and shard.applied_seq == 6
        assert bm25_top(shard, 9)[0] == "d9"
    finally:
        shard.close()


def test_reopen_takes_every_attribute_recovery_builds(tmp_path):
    """``_RECOVERED_STATE`` must name all that ``_recover`` sets, or a reopen would keep stale state."""
    shard = Shard.open(tmp_path / "s", text_schema(), 0)
    shard.upsert(shard_docs(range(5)))
    shard.flush()
    shard.upsert(shard_docs(range(5, 10)))
    shard.delete_ids(["d1"])
    shard.close()
    fresh = Shard(tmp_path / "s", text_schema(), 0)
    before = {name: value for name, value in vars(fresh).items()}
    fresh._recover()
    try:
        changed = {name for name, value in vars(fresh).items() if name not in before or before[name] is not value}
        assert changed <= set(_RECOVERED_STATE), f"recovery sets {sorted(changed - set(_RECOVERED_STATE))} too"
    finally:
        fresh._release_files(commit=False)


# ------------------------------------------------------------ a real full disk


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str = "40m"):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield directory
    finally:
        if subprocess.run(["umount", str(directory)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(directory)], capture_output=True)


def fill(path: Path) -> None:
    """Write ``path`` until the file system is full (bounded: a 40 MiB tmpfs takes ~40 rounds)."""
    with open(path, "ab", buffering=0) as fh:
        for chunk in (1 << 20, 1 << 12, 1):
            for _ in range(200):
                try:
                    fh.write(b"\0" * chunk)
                except OSError:
                    break


def test_a_real_full_disk(child_server, tmp_path):
    with small_tmpfs(tmp_path / "mnt") as mnt:
        data, filler = mnt / "data", mnt / "filler"
        servers = []

        def start():  # type: ignore[no-untyped-def]
            server = child_server(data, env={"BRAID_MIN_FREE_BYTES": "0"})  # meet the file system's own ENOSPC
            server.client.timeout = DEADLINE_S
            servers.append(server)
            return server

        try:
            server = start()
            server.client.create_collection("docs", schema(dim=DIM))
            server.client.create_collection("big", schema(dim=DIM))
            server.client.upsert("big", [make_doc(i) for i in range(200)])
            writer = Writer(server.client)
            assert writer.upsert(range(50)) is None

            fill(filler)
            errors = [writer.upsert(range(50 + 10 * k, 60 + 10 * k)) for k in range(4)]
            assert all(err is not None for err in errors), "a write was acknowledged on a full disk"
            for err in errors:
                assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "disk full" in err.details(), err.details()
            writer.check_intact(server.client)
            server.client.delete_collection("big")  # needs no disk

            filler.unlink()
            writer.upsert_until_accepted(range(100, 110))
            writer.check_intact(server.client)

            fill(filler)
            assert_disk_full(writer.upsert(range(110, 120)), "tmpfs")
            started = time.monotonic()
            assert server.stop() == 0  # SIGTERM finishes on a full disk
            assert time.monotonic() - started < 60

            server = start()  # on the full disk: reads are served
            writer.client = server.client
            writer.check_intact(server.client)
            # The stop may have freed a little (tantivy removes the temporary file of a commit that
            # failed): fill that too, so the disk is full again when the write comes.
            fill(mnt / "filler-2")
            assert_disk_full(writer.upsert(range(120, 130)), "tmpfs")
            (mnt / "filler-2").unlink()
            filler.unlink()
            writer.upsert_until_accepted(range(130, 140))
            writer.check_intact(server.client)
            assert server.stop() == 0
        except BaseException:
            for number, server in enumerate(servers):  # pytest shows it with the failure
                print(f"----- server {number} log:\n{''.join(server.output)}")
            raise
        finally:
            for server in servers:
                if server.proc.poll() is None:
                    server.kill()
                server.client.close()


def _wait_health(port: int, service: str, status: int, timeout: float = 10) -> None:
    """Health of ``service`` reaches ``status`` (the server refreshes braid.writes every second)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        end = time.monotonic() + timeout
        while True:
            try:
                seen = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status
            except grpc.RpcError as err:  # NOT_FOUND before the first refresh
                seen = err.code()
            if seen == status:
                return
            assert time.monotonic() < end, f"health of {service!r} is {seen}, not {status}"
            time.sleep(0.1)
