"""index/child_save.py: a big hnswlib graph is saved by a forked child, byte for byte what
hnswlib writes in process; a child that fails, or writes short on a full disk, is an error
and nothing is published; the child ignores the signals that stop the server and dies with it.

Real hnswlib graphs; ``SlowIndex`` stands in for a save that takes long (its ``save_index``
sleeps in the child), so a test can signal or kill around it."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import hnswlib
import numpy as np
import pytest

from braid.index import child_save, hnswfile

from .test_disk_full import fill, small_tmpfs

pytestmark = pytest.mark.skipif(child_save._PRCTL is None, reason="needs fork and prctl (Linux)")


def graph(n: int = 3000, dim: int = 32) -> hnswlib.Index:
    vectors = np.random.default_rng(5).normal(size=(n, dim)).astype(np.float32)
    index = hnswlib.Index(space="l2", dim=dim)
    index.init_index(max_elements=n, M=8, ef_construction=40)
    index.add_items(vectors, np.arange(n))
    index.mark_deleted(7)
    return index


def forks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids of the children os.fork makes from here on (the real fork, recorded)."""
    pids: list[int] = []
    real = os.fork

    def fork() -> int:
        pid = real()
        if pid:
            pids.append(pid)
        return pid

    monkeypatch.setattr(os, "fork", fork)
    return pids


def test_a_big_graph_is_saved_by_a_child_with_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    index = graph()
    assert child_save.graph_bytes(index) > 100_000
    monkeypatch.setattr(child_save, "CHILD_SAVE_BYTES", 100_000)
    children = forks(monkeypatch)
    hnswfile.save(index, tmp_path / "child.hnsw", 32)
    assert len(children) == 1
    index.save_index(str(tmp_path / "direct.hnsw"))
    assert (tmp_path / "child.hnsw").read_bytes() == (tmp_path / "direct.hnsw").read_bytes()
    loaded = hnswlib.Index(space="l2", dim=32)
    loaded.load_index(str(tmp_path / "child.hnsw"))
    assert loaded.get_current_count() == 3000
    assert not list(tmp_path.glob("*.tmp"))


def test_a_save_from_a_background_thread_goes_through_the_child(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Checkpoints save from their own thread, not the main one: the child (whose Python then
    sets its signal handlers) must work from there too."""
    monkeypatch.setattr(child_save, "CHILD_SAVE_BYTES", 1)
    children = forks(monkeypatch)
    failures: list[BaseException] = []

    def save() -> None:
        try:
            hnswfile.save(graph(300), tmp_path / "g.hnsw", 32)
        except BaseException as err:
            failures.append(err)

    saver = threading.Thread(target=save)
    saver.start()
    saver.join(120)
    assert not saver.is_alive() and failures == [] and len(children) == 1
    assert hnswfile.check(tmp_path / "g.hnsw", 32, 300) is None


def test_a_small_graph_is_saved_in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    children = forks(monkeypatch)
    hnswfile.save(graph(200), tmp_path / "small.hnsw", 32)
    assert children == [] and hnswfile.check(tmp_path / "small.hnsw", 32, 200) is None


class SlowIndex:
    """A graph whose save takes ``seconds`` in the child (then writes the real graph), or raises."""

    def __init__(self, real: hnswlib.Index, seconds: float = 0.0, fail: bool = False) -> None:
        self.real, self.seconds, self.fail = real, seconds, fail
        self.dim, self.M = real.dim, real.M

    def get_current_count(self) -> int:
        return self.real.get_current_count()

    def save_index(self, path: str) -> None:
        time.sleep(self.seconds)
        if self.fail:
            raise RuntimeError("Cannot open file")
        self.real.save_index(path)


def test_a_child_that_fails_is_an_error_and_nothing_is_published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(child_save, "CHILD_SAVE_BYTES", 1)
    with pytest.raises(OSError, match="the child saving the graph did not finish"):
        hnswfile.save(SlowIndex(graph(300), fail=True), tmp_path / "g.hnsw", 32)
    assert list(tmp_path.iterdir()) == []


def test_a_child_save_on_a_full_disk_is_enospc_and_nothing_is_published(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """hnswlib reports success after a short write; the parent's check of the child's file still
    says ENOSPC, and no graph file is left (a real, small tmpfs; skipped where none can be mounted)."""
    monkeypatch.setattr(child_save, "CHILD_SAVE_BYTES", 1)
    children = forks(monkeypatch)
    index = graph()
    with small_tmpfs(tmp_path / "mnt", size="4m") as mnt:
        filler = mnt / "filler"
        fill(filler)
        os.truncate(filler, filler.stat().st_size - 200_000)  # room for a third of the graph
        with pytest.raises(OSError) as info:
            hnswfile.save(index, mnt / "g.hnsw", 32)
        assert info.value.errno == errno.ENOSPC and "nothing was published" in str(info.value)
        assert len(children) == 1
        assert sorted(path.name for path in mnt.iterdir()) == ["filler"]


def test_the_child_ignores_sigterm_and_finishes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A SIGTERM to the process group (a pod's stop) must not end a save the server waits for.
    The save takes 3 s in the child: the signal lands inside it even on a loaded machine."""
    monkeypatch.setattr(child_save, "CHILD_SAVE_BYTES", 1)
    children = forks(monkeypatch)
    sent = []

    def terminate_the_child() -> None:
        deadline = time.monotonic() + 30
        while not children and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(children[0], signal.SIGTERM)
        sent.append(children[0])

    signaller = threading.Thread(target=terminate_the_child)
    signaller.start()
    hnswfile.save(SlowIndex(graph(300), seconds=3.0), tmp_path / "g.hnsw", 32)
    signaller.join()
    assert sent and hnswfile.check(tmp_path / "g.hnsw", 32, 300) is None


def test_the_child_dies_with_a_killed_parent(tmp_path: Path):
    """kill -9 of the server mid-save leaves no child writing behind it."""
    script = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from braid.index import child_save
        from tests.test_child_save import SlowIndex, graph
        real = os.fork
        def fork():
            pid = real()
            if pid:
                print(pid, flush=True)
            return pid
        os.fork = fork
        child_save.CHILD_SAVE_BYTES = 1
        child_save.save_index(SlowIndex(graph(300), seconds=120), {str(tmp_path / "g.hnsw")!r})
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=Path.cwd())
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(30)
        deadline = time.monotonic() + 30
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child), "the saving child outlived its killed parent"
    finally:
        parent.kill()
        parent.wait(30)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by init, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_child_saves_beside_a_grpc_server_finish_and_hold_no_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """In a process serving gRPC (the server's case), grpc's fork handlers may restart its poller
    threads in the child: closing their epoll set made the child abort (2 saves in 5). Four saves
    of 1.5 s each finish, and each child holds none of the inherited sockets while it saves."""
    monkeypatch.setattr(child_save, "CHILD_SAVE_BYTES", 1)
    children = forks(monkeypatch)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        for i in range(4):
            sockets_seen: list[list[str]] = []

            def watch(count: int = i, sockets_seen: list[list[str]] = sockets_seen) -> None:
                deadline = time.monotonic() + 30
                while len(children) <= count and time.monotonic() < deadline:
                    time.sleep(0.01)
                pid = children[count]
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # the child closes them as it starts
                    try:
                        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
                    except OSError:
                        continue  # a descriptor closed while listed
                    sockets_seen.append([link for link in links if link.startswith("socket:")])
                    if not sockets_seen[-1]:
                        return
                    time.sleep(0.02)

            watcher = threading.Thread(target=watch)
            watcher.start()
            hnswfile.save(SlowIndex(graph(300), seconds=1.5), tmp_path / f"g{i}.hnsw", 32)
            watcher.join()
            assert hnswfile.check(tmp_path / f"g{i}.hnsw", 32, 300) is None
            assert sockets_seen and not sockets_seen[-1], f"save {i}: the child kept sockets {sockets_seen[-1:]}"
    finally:
        server.stop(None)
