"""Shared fixtures: a real Braid server on a free loopback port, in-process or as a child process."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.service.client import BraidClient
from braid.service.config import ServerConfig
from braid.service.server import BraidServer, create_server
from braid.v1 import braid_pb2 as pb

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def pytest_configure(config: pytest.Config) -> None:
    """An uncaught exception in any thread (an assert in a worker, an RPC error nobody caught)
    fails the test it happened in. By default pytest only warns
    (PytestUnhandledThreadExceptionWarning) and the test passes; as an error, pytest's own
    threading.excepthook raises it at the end of the phase (setup, call or teardown) the
    thread died in. A thread that dies after its test ended fails the test running then;
    pytest's message names the thread and its target function. A test that expects a thread
    to die catches the exception inside the thread and checks it."""
    config.addinivalue_line("filterwarnings", "error::pytest.PytestUnhandledThreadExceptionWarning")


@dataclass
class Running:
    client: BraidClient
    port: int
    data_dir: Path

    @property
    def stub(self):  # type: ignore[no-untyped-def]
        return self.client.stub


def start_in_process(data_dir: Path, **config: object) -> tuple[BraidServer, Running]:
    server = create_server(ServerConfig(data_dir=data_dir, host="127.0.0.1", port=0, **config))
    server.start()
    assert server.wait_recovered(timeout=120), "the server did not finish recovery"
    return server, Running(BraidClient(f"127.0.0.1:{server.port}"), server.port, data_dir)


def stop_in_process(server: BraidServer, running: Running, grace: float = 0) -> None:
    """Stop the server (closing encoders and every shard) and the client."""
    running.client.close()
    server.stop(grace=grace)


@pytest.fixture
def braid(tmp_path: Path) -> Iterator[Running]:
    """A fresh in-process server with its own data directory."""
    server, running = start_in_process(tmp_path / "data")
    yield running
    stop_in_process(server, running)


# What ``braid serve`` prints once recovery is done, and as soon as its port is bound.
SERVING = r"serving braid\.v1\.Braid on [\d.]+:(\d+)"
LISTENING = r"listening on [\d.]+:(\d+)"


class ChildServer:
    """``braid serve`` in a child process, so tests can SIGKILL it; ready once ``ready`` (a pattern
    whose group 1 is the port) appears in its log. ``output`` keeps the whole log."""

    def __init__(self, data_dir: Path, *args: str, env: dict[str, str] | None = None, ready: str = SERVING) -> None:
        self.data_dir = data_dir
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "braid.service.cli", "serve", "--data-dir", str(data_dir), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        self.output: list[str] = []
        for line in self.proc.stdout:
            self.output.append(line)
            found = re.search(ready, line)
            if found:
                self.port = int(found.group(1))
                break
        else:
            raise RuntimeError(f"server exited with {self.proc.wait()} before serving: {''.join(self.output)}")
        # Keep reading the log, so a chatty server never blocks on a full pipe.
        threading.Thread(target=self.output.extend, args=(self.proc.stdout,), daemon=True).start()
        self.client = BraidClient(f"127.0.0.1:{self.port}")

    def kill(self) -> None:
        """SIGKILL the server. The client stays open (threads may still be calling it);
        the fixture closes it at teardown."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> int:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


@pytest.fixture
def child_server(tmp_path: Path) -> Iterator[type[ChildServer]]:
    started: list[ChildServer] = []

    def factory(
        data_dir: Path | None = None, *args: str, env: dict[str, str] | None = None, ready: str = SERVING
    ) -> ChildServer:
        server = ChildServer(data_dir or tmp_path / "data", *args, env=env, ready=ready)
        started.append(server)
        return server

    yield factory  # type: ignore[misc]
    for server in started:
        if server.proc.poll() is None:
            server.kill()
        server.client.close()


# ------------------------------------------------------------------ helpers


def schema(
    dim: int = 8,
    metric: int = pb.COSINE,
    payload: dict[str, int] | None = None,
    text: bool = True,
    sparse: bool = True,
    m: int = 16,
    ef_construction: int = 100,
    ef_search: int = 64,
) -> pb.Schema:
    out = pb.Schema(
        dense_fields=[
            pb.DenseVectorField(
                name="emb",
                dim=dim,
                metric=metric,
                hnsw=pb.HnswParams(m=m, ef_construction=ef_construction, ef_search=ef_search),
            )
        ],
        payload_fields=[pb.PayloadField(name=n, type=t) for n, t in (payload or {}).items()],
    )
    if text:
        out.text_fields.add(name="title")
        out.text_fields.add(name="body")
    if sparse:
        out.sparse_fields.add(name="splade")
    return out


def random_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def status_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def wait_for(check: Callable[[], bool], timeout: float = 30.0, what: str = "condition") -> None:
    """Poll ``check`` every 0.1 s until it holds; AssertionError naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def rpc_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in models exported to ONNX once per test session (fp32 + int8), as `braid models export` does."""
    from braid.encoders.export import BUILTIN_MODELS, export_builtin

    directory = tmp_path_factory.mktemp("models")
    for name in BUILTIN_MODELS:
        export_builtin(name, directory)
    return directory
