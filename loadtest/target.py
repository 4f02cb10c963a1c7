"""What the load is sent to, and how its processes are watched.

  standalone  a ``braid serve`` child on a fresh data directory and a free loopback port;
  cluster     a :class:`~braid.service.cluster.local.LocalCluster` (NATS, shard servers, one
              router; ``braid cluster up``), the load going to the router;
  address     a server that is already running (``--address``); its processes are the ones
              given with ``--server-pid``, else the one listening on the address's port, if
              this user can see it.

:class:`ProcessWatch` samples the resident memory, open file descriptors and CPU of a
target's processes (psutil; a cluster's routers, shard servers and NATS nodes alike).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import psutil

from braid.service.cluster.local import ROUTER_READY, Child, LocalCluster, child_env

TARGETS = ("standalone", "cluster")
DEFAULT_MODEL = "all-minilm-l6-v2"


def ensure_model(models_dir: Path, name: str) -> None:
    """Export a built-in model into ``models_dir`` unless it is there (``braid models export NAME``).

    Raises:
        ScenarioSkipped: the model is not built in, or its weights package is not installed.
    """
    from braid.encoders.errors import InvalidModel, UnknownModel
    from braid.encoders.export import export_builtin

    from .workload import ScenarioSkipped

    try:
        export_builtin(name, models_dir)
    except (InvalidModel, UnknownModel) as err:
        raise ScenarioSkipped(f"model {name!r} cannot be exported into {models_dir}: {err}") from err


class ProcessWatch:
    """RSS, open fds and CPU of named processes, sampled on demand."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.processes: dict[str, psutil.Process] = {}
        for name, pid in pids.items():
            try:
                self.processes[name] = psutil.Process(pid)
                self.processes[name].cpu_percent(None)  # starts its CPU measurement
            except psutil.Error:
                continue

    def __bool__(self) -> bool:
        return bool(self.processes)

    def sample(self) -> dict[str, Any]:
        """``{"rss_bytes", "fds", "per_process": {name: {rss_bytes, fds, cpu_percent}}}``, gone processes left out."""
        per: dict[str, dict[str, float]] = {}
        for name, process in self.processes.items():
            try:
                with process.oneshot():
                    times = process.cpu_times()
                    per[name] = {
                        "rss_bytes": process.memory_info().rss,
                        "fds": process.num_fds(),
                        "cpu_percent": process.cpu_percent(None),
                        "cpu_s": times.user + times.system,
                    }
            except psutil.Error:
                continue
        machine = psutil.cpu_times()
        return {
            "rss_bytes": sum(int(p["rss_bytes"]) for p in per.values()),
            "fds": sum(int(p["fds"]) for p in per.values()),
            "cpu_s": sum(p["cpu_s"] for p in per.values()),  # the target's CPU seconds so far
            # The machine's CPU seconds so far: busy (every process) and stolen by the hypervisor,
            # so a soak can tell a server that got slower from a machine that got busier.
            "machine_busy_s": sum(machine) - machine.idle - getattr(machine, "iowait", 0.0),
            "machine_steal_s": getattr(machine, "steal", 0.0),
            "machine_total_s": sum(machine),  # the shares' denominator, read with them (not a wall clock)
            "per_process": per,
        }


class Target:
    """A server or cluster to send load to; a context manager that stops what it started."""

    kind = "address"

    def __init__(self, address: str) -> None:
        self.address = address

    def pids(self) -> dict[str, int]:
        return {}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "address": self.address, "processes": self.pids()}

    def stop(self) -> None:
        pass

    def __enter__(self) -> Target:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Remote(Target):
    """A running server at ``address``: nothing to start or stop."""

    def __init__(self, address: str, server_pids: list[int] | None = None) -> None:
        super().__init__(address)
        self._pids = {f"pid-{pid}": pid for pid in server_pids or []}
        if not self._pids:
            found = _listening_pid(address)
            if found is not None:
                self._pids = {"server": found}

    def pids(self) -> dict[str, int]:
        return dict(self._pids)


def _listening_pid(address: str) -> int | None:
    """The pid listening on ``address``'s port, when this user may see it."""
    try:
        port = int(address.rsplit(":", 1)[1])
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return conn.pid
    except (ValueError, IndexError, psutil.Error, PermissionError):
        return None
    return None


class Standalone(Target):
    """``braid serve`` in a child process on ``directory``/data; its log in ``directory``/server.log."""

    kind = "standalone"

    def __init__(self, directory: Path, models_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "braid.service.cli",
            "serve",
            "--data-dir",
            str(directory / "data"),
            "--models-dir",
            str(models_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            *extra_args,
        ]
        began = time.monotonic()
        self.child = Child("braid", command, ROUTER_READY, env=child_env(), log_path=directory / "server.log")
        self.started_in_s = time.monotonic() - began
        super().__init__(self.child.address)

    def pids(self) -> dict[str, int]:
        return {"braid": self.child.proc.pid} if self.child.proc else {}

    def stop(self) -> None:
        self.child.stop()


class Cluster(Target):
    """A LocalCluster with ``shard_servers`` shard servers, ``routers`` routers and one NATS node."""

    kind = "cluster"

    def __init__(self, directory: Path, models_dir: Path, shard_servers: int = 2, routers: int = 1) -> None:
        began = time.monotonic()
        self.cluster = LocalCluster(
            directory / "cluster",
            shard_servers=shard_servers,
            routers=routers,
            nats_nodes=1,
            env={"BRAID_MODELS_DIR": str(models_dir)},
        )
        self.started_in_s = time.monotonic() - began
        super().__init__(self.cluster.router_address)

    def pids(self) -> dict[str, int]:
        out = {child.name: child.proc.pid for child in self.cluster.children if child.proc is not None}
        if self.cluster.nats is not None:
            for node in self.cluster.nats.nodes:
                if node.proc is not None:
                    out[node.name] = node.proc.pid
        return out

    def stop(self) -> None:
        self.cluster.stop()


def open_target(
    kind: str,
    directory: Path,
    models_dir: Path,
    address: str | None = None,
    server_pids: list[int] | None = None,
    shard_servers: int = 2,
    routers: int = 1,
) -> Target:
    """The target to use: ``address`` when given, else a fresh ``kind`` (standalone or cluster) started here."""
    if address:
        return Remote(address, server_pids)
    if kind == "standalone":
        return Standalone(directory, models_dir)
    if kind == "cluster":
        return Cluster(directory, models_dir, shard_servers, routers)
    raise ValueError(f"target {kind!r}; valid: {', '.join(TARGETS)}")
