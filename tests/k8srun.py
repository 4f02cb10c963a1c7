"""A small local "kubelet": the objects of a rendered overlay (tests/k8s.py) run as local processes.

This module owns turning Kubernetes objects into processes on 127.0.0.1 and nothing else: what
the pods should do is the manifests' business, what must hold is the tests'. :class:`LocalKube`
does what the kubelet, the endpoints controller, kube-proxy and cluster DNS would do, as far as
a test needs:

* **Pods.** Each replica of a StatefulSet (``name-0``...), Deployment (``name-<hash>-<id>``) or
  Indexed Job (``name-<index>-<id>``, with ``JOB_COMPLETION_INDEX``) is one process: the
  container's ``command`` (else the image's ENTRYPOINT, ``braid``) and ``args`` (else CMD), its
  environment as the kubelet builds it (the image's ENV, then ``envFrom`` ConfigMaps, then ``env``
  with ConfigMap/Secret keys, the downward API and ``$(VAR)`` expansion, via tests/k8s.py),
  ``workingDir``. The image is this checkout's venv: its bin/ comes first on PATH, so ``braid`` and
  ``nats-server`` are the ones the image installs from the same project.
* **Volumes.** ConfigMaps and Secrets (from a directory made by deploy/k8s/make-secrets.sh, one
  subdirectory per Secret, one file per key; ``items`` and ``defaultMode`` honoured) are written to
  a directory per pod; ``emptyDir`` is a fresh directory per pod; a ``volumeClaimTemplates`` claim
  is a directory per pod name that outlives restarts, like a PVC; a ``persistentVolumeClaim`` is a
  directory the test gives. Paths in env values, args, the working directory and mounted
  ConfigMap files (nats.conf) that start with a mount path (or an image path: /opt/braid/models,
  /dev/termination-log) are rewritten to those directories.
* **Network.** Every pod gets its own free 127.0.0.1 port for each container port (stable per pod
  name, as a StatefulSet pod keeps its DNS name). ``host:port`` in env values, args and mounted
  ConfigMap files is rewritten: ``0.0.0.0`` and ``localhost`` to the pod's own port, a pod's DNS
  name (``pod.svc[.ns[.svc[.cluster.local]]]``) to that pod's port, a ClusterIP Service's name to a
  TCP proxy on loopback that spreads new connections over its ready endpoints (round robin, like
  kube-proxy), and a cluster name that resolves to nothing to ``127.0.0.1:1`` (refused: nothing
  leaves the machine). An env value that is exactly one of the pod's container ports (BRAID_PORT,
  BRAID_HEALTH_PORT...) becomes the pod's port for it, and ``0.0.0.0`` becomes ``127.0.0.1``. A
  port the manifests get wrong therefore stays unmapped, and the pod is unreachable where its
  Service and probes look for it.
* **Probes.** A pod is Ready once its startup probe and then its readiness probe succeed: gRPC
  probes call grpc.health.v1 Check on the probe's port and service, httpGet probes GET the path on
  the probe's port (a 2xx). A background loop keeps probing (every second) and takes a pod out of
  its Services' endpoints after ``failureThreshold`` failures in a row.
* **Deleting a pod** takes it out of endpoints, runs its preStop hook (exec or sleep), sends
  SIGTERM and, after ``terminationGracePeriodSeconds``, SIGKILL (the process group).
  :meth:`LocalKube.rolling_restart` replaces the pods of a StatefulSet highest ordinal first (each
  next one only once the last is Ready) and of a Deployment one at a time with ``maxSurge``: the
  new pod Ready before an old one goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import itertools
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .k8s import Obj, Objects, SecretRef, Workload, container_env
from .test_deploy_image import DOCKERFILE, env_of, parse_dockerfile

HOST = "127.0.0.1"
REFUSED = f"{HOST}:1"  # where a name that resolves to nothing goes: a closed port, never off the machine
PROBE_PERIOD_S = 1.0
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: pods bind theirs only later, and a
    port from the ephemeral range could meanwhile become some connection's source port."""
    for _ in range(1000):
        port = random.randrange(20000, 32700)
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32700")


def image() -> tuple[list[str], list[str], dict[str, str]]:
    """ENTRYPOINT, CMD and the BRAID_* ENV of deploy/Dockerfile's runtime stage."""
    import json

    final = parse_dockerfile(DOCKERFILE.read_text())[-1]
    entrypoint = json.loads(final.all("ENTRYPOINT")[0])
    cmd = json.loads(final.all("CMD")[0])
    env = {k: v for k, v in env_of(final).items() if k.startswith("BRAID_")}
    return entrypoint, cmd, env


# ------------------------------------------------------------------ pods


@dataclass
class Pod:
    name: str
    workload: Workload
    ports: dict[int, int]  # containerPort -> local port
    ordinal: int = 0
    index: int | None = None  # an Indexed Job's completion index
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    started: bool = False  # the startup probe succeeded
    ready: bool = False
    terminating: bool = False
    failures: int = 0

    @property
    def container(self) -> Obj:
        return self.workload.containers[0]

    @property
    def labels(self) -> dict[str, str]:
        return self.workload.labels

    def port(self, name_or_number: int | str) -> int:
        """The local port of one of the container's ports (by number or name)."""
        for port in self.container.get("ports", []):
            if name_or_number in (port["containerPort"], port.get("name")):
                return self.ports[int(port["containerPort"])]
        raise KeyError(f"{self.name}: no container port {name_or_number!r}")

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, lines: int = 40) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------ Services: a loopback kube-proxy


class ServiceProxy:
    """A TCP proxy for one port of a ClusterIP Service: each new connection goes to the next ready
    endpoint (round robin); none ready: the connection is closed at once."""

    def __init__(self, kube: LocalKube, service: Obj, port: Obj) -> None:
        self.kube, self.service, self.spec_port = kube, service, port
        self.port = free_port()
        self.turn = itertools.count()
        self.server: asyncio.AbstractServer | None = None
        self.connections: dict[str, int] = {}  # pod name -> connections opened to it

    def endpoints(self) -> list[tuple[Pod, int]]:
        selector = self.service["spec"].get("selector", {})
        target = self.spec_port.get("targetPort", self.spec_port["port"])
        out = []
        for pod in self.kube.pods_matching(selector):
            if pod.ready and not pod.terminating and pod.alive:
                with contextlib.suppress(KeyError):
                    out.append((pod, pod.port(target)))
        return out

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        endpoints = self.endpoints()
        if not endpoints:
            writer.close()
            return
        pod, port = endpoints[next(self.turn) % len(endpoints)]
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, port)
        except OSError:
            writer.close()
            return
        self.connections[pod.name] = self.connections.get(pod.name, 0) + 1

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.handle, HOST, self.port)


# ------------------------------------------------------------------ the kubelet


class LocalKube:
    """Runs the workloads of ``objects`` as local processes (see the module doc)."""

    def __init__(
        self,
        objects: Objects,
        root: Path,
        secrets_dir: Path,
        models_dir: Path,
        namespace: str = "braid",
        claims: dict[str, Path] | None = None,
    ) -> None:
        self.objects = objects
        self.root = root
        self.secrets_dir = secrets_dir
        self.namespace = namespace
        self.claims = dict(claims or {})
        self.entrypoint, self.cmd, self.image_env = image()
        # Paths inside the image that are not volumes.
        self.image_paths = {"/opt/braid/models": models_dir}
        self.pods: dict[str, Pod] = {}
        self.port_book: dict[str, dict[int, int]] = {}  # pod name -> its ports, kept across restarts
        self.incarnations = itertools.count()
        self.lock = threading.RLock()
        self.proxies: dict[tuple[str, int], ServiceProxy] = {}
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, name="kube-proxy", daemon=True)
        self.loop_thread.start()
        for service in objects.of_kind("Service"):
            if service["spec"].get("clusterIP") != "None":
                for port in service["spec"]["ports"]:
                    proxy = ServiceProxy(self, service, port)
                    asyncio.run_coroutine_threadsafe(proxy.start(), self.loop).result(10)
                    self.proxies[(service["metadata"]["name"], int(port["port"]))] = proxy
        self.stopping = threading.Event()
        self.prober = threading.Thread(target=self._probe_loop, name="kubelet-probes", daemon=True)
        self.prober.start()

    # ---------------------------------------------------------- names and addresses

    def service_address(self, name: str, port: int) -> str:
        """The loopback address of a ClusterIP Service's port (what clients in the cluster dial)."""
        return f"{HOST}:{self.proxies[(name, port)].port}"

    def pods_matching(self, selector: dict[str, str]) -> list[Pod]:
        with self.lock:
            pods = list(self.pods.values())
        return [p for p in pods if selector and all(p.labels.get(k) == v for k, v in selector.items())]

    def _ports_of(self, name: str, workload: Workload) -> dict[int, int]:
        if name not in self.port_book:
            self.port_book[name] = {
                int(p["containerPort"]): free_port() for c in workload.containers for p in c.get("ports", [])
            }
        return self.port_book[name]

    def _resolve(self, host: str, port: int, own: Pod) -> str | None:
        """``host:port`` as seen from ``own``: the loopback address it reaches, or None (not a cluster name)."""
        if host in ("0.0.0.0", "localhost", "127.0.0.1", own.name):
            return f"{HOST}:{own.ports[port]}" if port in own.ports else None
        name = host
        for suffix in (".cluster.local", ".svc", f".{self.namespace}"):  # pod.svc.ns.svc.cluster.local
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        cluster_name = name != host or "." not in host
        parts = name.split(".")
        services = {s["metadata"]["name"]: s for s in self.objects.of_kind("Service")}
        if len(parts) == 2 and parts[1] in services:  # pod.service (a headless Service's pod)
            pod_name, service = parts
            book = self.port_book.get(pod_name)
            if book is None:
                workload = self._workload_of_pod(pod_name)
                book = self._ports_of(pod_name, workload) if workload else None
            if book and port in book:
                return f"{HOST}:{book[port]}"
            return REFUSED
        if len(parts) == 1 and parts[0] in services:
            service = services[parts[0]]
            if (parts[0], port) in self.proxies:
                return self.service_address(parts[0], port)
            # A headless Service's name: its first pod (DNS would list them all).
            for pod in self.pods_matching(service["spec"].get("selector", {})):
                target = next(
                    (p.get("targetPort", p["port"]) for p in service["spec"]["ports"] if p["port"] == port), port
                )
                try:
                    return f"{HOST}:{pod.port(target)}"
                except KeyError:
                    pass
            return REFUSED
        return REFUSED if cluster_name and host not in ("",) and not re.fullmatch(r"[\d.]+", host) else None

    def _workload_of_pod(self, pod_name: str) -> Workload | None:
        for workload in self.objects.workloads:
            if workload.kind == "StatefulSet" and re.fullmatch(re.escape(workload.name) + r"-\d+", pod_name):
                return workload
        return None

    def rewrite(self, text: str, pod: Pod, paths: dict[str, Path]) -> str:
        """Addresses and paths in ``text`` as this pod sees them locally (see the module doc)."""

        def address(match: re.Match[str]) -> str:
            resolved = self._resolve(match.group("host"), int(match.group("port")), pod)
            return resolved if resolved is not None else match.group(0)

        text = re.sub(
            r"(?<![\w.-])(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*|0\.0\.0\.0):(?P<port>\d{1,5})(?!\d)", address, text
        )
        if paths:
            prefixes = sorted(paths, key=len, reverse=True)
            pattern = "|".join(re.escape(p) for p in prefixes)
            text = re.sub(rf"(?<![\w./-])(?P<p>{pattern})(?=/|$|[\s,;:\"'])", lambda m: str(paths[m.group("p")]), text)
        return text

    # ---------------------------------------------------------- starting pods

    def _volumes(self, pod: Pod, pod_dir: Path) -> dict[str, Path]:
        """Materialise the pod's volumes; mount path -> local directory (or file)."""
        workload = pod.workload
        volumes = {v["name"]: v for v in workload.pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload.obj["spec"].get("volumeClaimTemplates", [])}
        out: dict[str, Path] = {}
        configmap_files: list[Path] = []
        for mount in pod.container.get("volumeMounts", []):
            name, path = mount["name"], mount["mountPath"]
            if name in claims:  # a StatefulSet's PVC: one per pod name, kept across restarts
                local = self.root / "pvc" / f"{name}-{pod.name}"
                local.mkdir(parents=True, exist_ok=True)
            elif name not in volumes:
                raise RuntimeError(f"{pod.name}: volumeMount {name!r} has no volume")
            else:
                volume = volumes[name]
                local = pod_dir / "volumes" / name
                if "emptyDir" in volume:
                    local.mkdir(parents=True, exist_ok=True)
                elif "persistentVolumeClaim" in volume:
                    claim = volume["persistentVolumeClaim"]["claimName"]
                    if claim not in self.claims:
                        raise RuntimeError(f"{pod.name}: PersistentVolumeClaim {claim!r} not given to LocalKube")
                    local = self.claims[claim]
                elif "secret" in volume:
                    source = self.secrets_dir / volume["secret"]["secretName"]
                    if not source.is_dir():
                        raise RuntimeError(f"{pod.name}: Secret {volume['secret']['secretName']!r} does not exist")
                    keys = {f.name: f.read_bytes() for f in source.iterdir() if f.is_file()}
                    self._write_items(local, keys, volume["secret"], pod.name)
                elif "configMap" in volume:
                    data = self.objects.config_map_data(volume["configMap"]["name"])
                    self._write_items(local, {k: v.encode() for k, v in data.items()}, volume["configMap"], pod.name)
                    configmap_files.extend(p for p in local.iterdir() if p.is_file())
                else:
                    raise RuntimeError(f"{pod.name}: volume {name!r}: unsupported kind {sorted(volume)}")
            if "subPath" in mount:
                local = local / mount["subPath"]
            out[path] = local
        # Kubernetes writes a container's termination message here.
        out.setdefault("/dev/termination-log", pod_dir / "termination-log")
        for image_path, local in self.image_paths.items():
            out.setdefault(image_path, local)
        for file in configmap_files:  # nats.conf: its listen addresses, routes and paths
            file.write_text(self.rewrite(file.read_text(), pod, out))
        return out

    @staticmethod
    def _write_items(local: Path, keys: dict[str, bytes], source: Obj, pod: str) -> None:
        local.mkdir(parents=True, exist_ok=True)
        items = source.get("items") or [{"key": k, "path": k} for k in keys]
        for item in items:
            if item["key"] not in keys:
                raise RuntimeError(f"{pod}: key {item['key']!r} missing from {source}")
            target = local / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(keys[item["key"]])
            target.chmod(int(item.get("mode", source.get("defaultMode", 0o644))))

    def _secret_value(self, ref: SecretRef) -> str:
        path = self.secrets_dir / ref.secret / ref.key
        if not path.is_file():
            raise RuntimeError(f"Secret {ref.secret!r} has no key {ref.key!r}")
        return path.read_text()

    def start_pod(self, pod: Pod) -> Pod:
        """Create the pod's volumes and start its process (not waiting for Ready)."""
        incarnation = next(self.incarnations)
        pod_dir = self.root / "pods" / f"{pod.name}.{incarnation}"
        pod_dir.mkdir(parents=True)
        pod.dir = pod_dir
        pod.started = pod.ready = pod.terminating = False
        pod.failures = 0
        paths = self._volumes(pod, pod_dir)
        container = pod.container
        env: dict[str, str] = dict(self.image_env)
        if pod.index is not None:
            env["JOB_COMPLETION_INDEX"] = str(pod.index)
        built = container_env(container, self.objects, {"name": pod.name, "namespace": self.namespace})
        for name, value in built.items():
            env[name] = self._secret_value(value) if isinstance(value, SecretRef) else value
        own_ports = {str(p) for p in pod.ports}
        for name, value in list(env.items()):
            if value in own_ports:
                env[name] = str(pod.ports[int(value)])
            elif value == "0.0.0.0":
                env[name] = HOST
            else:
                env[name] = self.rewrite(value, pod, paths)
        command = list(container.get("command") or self.entrypoint)
        args = list(container.get("args") if "args" in container or "command" in container else self.cmd)
        argv = [self.rewrite(a, pod, paths) for a in command + args]
        executable = shutil.which(argv[0], path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        if executable is None:
            raise RuntimeError(f"{pod.name}: {argv[0]!r} is not in the image")
        argv[0] = executable
        workdir = container.get("workingDir")
        cwd = Path(self.rewrite(workdir, pod, paths)) if workdir else pod_dir
        pod.env = {
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(paths.get("/tmp", pod_dir)),
            "HOSTNAME": pod.name,
            **env,
        }
        pod.argv = argv
        pod.log = pod_dir / "log"
        with open(pod.log, "wb") as log:
            pod.proc = subprocess.Popen(
                argv, env=pod.env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        with self.lock:
            self.pods[pod.name] = pod
        return pod

    def new_pod(self, workload: Workload, ordinal: int = 0, index: int | None = None) -> Pod:
        if workload.kind == "StatefulSet":
            name = f"{workload.name}-{ordinal}"
        elif workload.kind == "Job":
            name = f"{workload.name}-{index}-{secrets.token_hex(3)[:5]}"
        else:
            name = f"{workload.name}-{secrets.token_hex(5)[:10]}-{secrets.token_hex(3)[:5]}"
        return Pod(name, workload, self._ports_of(name, workload), ordinal=ordinal, index=index)

    def start(self, name: str) -> list[Pod]:
        """Every replica of a StatefulSet or Deployment, started (not waited for)."""
        workload = self.objects.workload(name)
        pods = [self.new_pod(workload, ordinal=i) for i in range(workload.replicas)]
        # Ports of every pod are booked before any starts: the pods' configs name each other.
        return [self.start_pod(pod) for pod in pods]

    def workload_pods(self, name: str) -> list[Pod]:
        with self.lock:
            return sorted((p for p in self.pods.values() if p.workload.name == name), key=lambda p: p.ordinal)

    # ---------------------------------------------------------- probes

    def _probe(self, pod: Pod, probe: Obj) -> bool:
        timeout = float(probe.get("timeoutSeconds", 1))
        try:
            if "grpc" in probe:
                port = pod.port(int(probe["grpc"]["port"]))
                with grpc.insecure_channel(f"{HOST}:{port}") as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")), timeout=timeout
                    )
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in probe:
                port = pod.port(probe["httpGet"]["port"])
                url = f"http://{HOST}:{port}{probe['httpGet'].get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as reply:
                    return 200 <= reply.status < 400
        except (grpc.RpcError, urllib.error.URLError, OSError, KeyError):
            return False
        raise RuntimeError(f"{pod.name}: unsupported probe {sorted(probe)}")

    def probe_once(self, pod: Pod) -> None:
        """One round of the kubelet's probes for ``pod``: startup until it succeeds, then readiness."""
        if not pod.alive:
            pod.ready = False
            return
        container = pod.container
        if not pod.started:
            startup = container.get("startupProbe") or container.get("readinessProbe")
            pod.started = startup is None or self._probe(pod, startup)
            if not pod.started:
                return
        readiness = container.get("readinessProbe")
        if readiness is None:
            pod.ready = True
            return
        if self._probe(pod, readiness):
            pod.ready, pod.failures = True, 0
        else:
            pod.failures += 1
            if pod.failures >= int(readiness.get("failureThreshold", 3)):
                pod.ready = False

    def _probe_loop(self) -> None:
        while not self.stopping.wait(PROBE_PERIOD_S):
            with self.lock:
                pods = [p for p in self.pods.values() if p.workload.kind != "Job"]
            for pod in pods:
                # Once started, a pod is probed all along: out of its Services after failureThreshold
                # failures, back in at the next success.
                if pod.started and not pod.terminating:
                    self.probe_once(pod)

    def wait_ready(self, pods: list[Pod], timeout: float) -> None:
        """Until every pod is Ready (probing each as the kubelet would); AssertionError with the logs if not."""
        deadline = time.monotonic() + timeout
        waiting = list(pods)
        while waiting:
            for pod in list(waiting):
                if not pod.alive:
                    raise AssertionError(f"{pod.name} exited {pod.proc.returncode if pod.proc else '?'}:\n{pod.tail()}")
                self.probe_once(pod)
                if pod.ready:
                    waiting.remove(pod)
            if waiting and time.monotonic() > deadline:
                tails = "\n".join(f"----- {p.name}:\n{p.tail()}" for p in waiting)
                raise AssertionError(f"not Ready after {timeout:.0f} s: {[p.name for p in waiting]}\n{tails}")
            if waiting:
                time.sleep(0.25)

    # ---------------------------------------------------------- deleting pods, rolling restarts

    def delete_pod(self, pod: Pod) -> int | None:
        """Out of endpoints, preStop, SIGTERM, SIGKILL after the grace period; the exit code."""
        pod.terminating, pod.ready = True, False
        grace = float(pod.workload.pod.get("terminationGracePeriodSeconds", 30))
        deadline = time.monotonic() + grace
        pre_stop = pod.container.get("lifecycle", {}).get("preStop")
        if pre_stop and pod.alive:
            if "sleep" in pre_stop:
                time.sleep(min(float(pre_stop["sleep"]["seconds"]), grace))
            elif "exec" in pre_stop:
                assert pod.dir is not None
                paths = self._volumes_paths(pod)
                argv = [self.rewrite(a, pod, paths) for a in pre_stop["exec"]["command"]]
                argv[0] = shutil.which(argv[0], path=pod.env["PATH"]) or argv[0]
                subprocess.run(argv, env=pod.env, capture_output=True, timeout=max(1.0, grace), check=False)
        if pod.alive:
            assert pod.proc is not None
            os.killpg(pod.proc.pid, signal.SIGTERM)
            try:
                pod.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(pod.proc.pid, signal.SIGKILL)
                pod.proc.wait(timeout=30)
        self._reap_group(pod)
        with self.lock:
            self.pods.pop(pod.name, None)
        return pod.proc.returncode if pod.proc else None

    def _volumes_paths(self, pod: Pod) -> dict[str, Path]:
        """The mount paths of a started pod (for its preStop hook)."""
        assert pod.dir is not None
        out: dict[str, Path] = {}
        claims = {c["metadata"]["name"] for c in pod.workload.obj["spec"].get("volumeClaimTemplates", [])}
        for mount in pod.container.get("volumeMounts", []):
            name = mount["name"]
            out[mount["mountPath"]] = (
                self.root / "pvc" / f"{name}-{pod.name}" if name in claims else pod.dir / "volumes" / name
            )
        return out

    @staticmethod
    def _reap_group(pod: Pod) -> None:
        """Children the pod's process left behind (a container's processes end with it)."""
        if pod.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pod.proc.pid, signal.SIGKILL)

    def rolling_restart(self, name: str, ready_timeout: float, between: Callable[[Pod], None] | None = None) -> None:
        """Replace every pod of a StatefulSet (highest ordinal first) or Deployment (surge first), one at a
        time, each next only once the last replacement is Ready. ``between`` runs after each replacement."""
        workload = self.objects.workload(name)
        if workload.kind == "StatefulSet":
            for old in sorted(self.workload_pods(name), key=lambda p: -p.ordinal):
                self.delete_pod(old)
                new = self.start_pod(self.new_pod(workload, ordinal=old.ordinal))
                self.wait_ready([new], ready_timeout)
                if between:
                    between(new)
        elif workload.kind == "Deployment":
            strategy = workload.obj["spec"].get("strategy", {}).get("rollingUpdate", {})
            assert int(strategy.get("maxUnavailable", 0)) == 0, "a rollout here keeps every replica up"
            for old in self.workload_pods(name):
                new = self.start_pod(self.new_pod(workload))
                self.wait_ready([new], ready_timeout)
                self.delete_pod(old)
                if between:
                    between(new)
        else:
            raise ValueError(f"{workload.key}: not a StatefulSet or Deployment")

    # ---------------------------------------------------------- Jobs

    def run_job(self, name: str, timeout: float) -> dict[int, list[int]]:
        """An Indexed Job: ``parallelism`` pods at a time, each index retried as its podFailurePolicy
        and ``backoffLimitPerIndex`` say (FailJob stops everything). Index -> the exit codes of its pods."""
        workload = self.objects.workload(name)
        spec = workload.obj["spec"]
        assert spec.get("completionMode") == "Indexed"
        completions, parallelism = int(spec["completions"]), int(spec.get("parallelism", 1))
        backoff = int(spec.get("backoffLimitPerIndex", spec.get("backoffLimit", 6)))
        rules = spec.get("podFailurePolicy", {}).get("rules", [])
        exits: dict[int, list[int]] = {i: [] for i in range(completions)}
        pending = list(range(completions))
        running: list[Pod] = []
        deadline = time.monotonic() + timeout
        while pending or running:
            while pending and len(running) < parallelism:
                running.append(self.start_pod(self.new_pod(workload, index=pending.pop(0))))
            for pod in list(running):
                assert pod.proc is not None and pod.index is not None
                code = pod.proc.poll()
                if code is None:
                    continue
                self._reap_group(pod)
                running.remove(pod)
                exits[pod.index].append(code)
                if code == 0:
                    continue
                action = next(
                    (
                        r["action"]
                        for r in rules
                        if "onExitCodes" in r
                        and (code in r["onExitCodes"]["values"]) == (r["onExitCodes"]["operator"] == "In")
                    ),
                    "Count",
                )
                if action == "FailJob":
                    for other in running:
                        self.delete_pod(other)
                    return exits
                if action == "Ignore" or len(exits[pod.index]) <= backoff:
                    pending.append(pod.index)
            if time.monotonic() > deadline:
                tails = "\n".join(f"----- {p.name}:\n{p.tail()}" for p in running)
                for pod in running:
                    self.delete_pod(pod)
                raise AssertionError(f"Job {name} not done after {timeout:.0f} s:\n{tails}")
            time.sleep(0.2)
        return exits

    def job_pods(self, name: str) -> Iterator[Pod]:
        with self.lock:
            yield from (p for p in self.pods.values() if p.workload.name == name)

    # ---------------------------------------------------------- the end

    def stop(self) -> None:
        """Every pod SIGTERMed at once (then SIGKILL after a short wait), the proxies closed."""
        self.stopping.set()
        with self.lock:
            pods = list(self.pods.values())
        for pod in pods:
            if pod.alive:
                assert pod.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pod.proc.pid, signal.SIGTERM)
        for pod in pods:
            if pod.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    pod.proc.wait(timeout=20)
                self._reap_group(pod)
                if pod.proc.poll() is None:
                    pod.proc.wait(timeout=10)

        async def close() -> None:
            for proxy in self.proxies.values():
                if proxy.server is not None:
                    proxy.server.close()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(10)

    def logs(self, lines: int = 30) -> str:
        with self.lock:
            pods = list(self.pods.values())
        return "\n".join(f"----- {p.name}:\n{p.tail(lines)}" for p in pods)


def with_env(workload: Workload, name: str, value: str) -> Workload:
    """A copy of ``workload`` whose first container has env ``name`` set to ``value`` (a manifest
    made wrong on purpose)."""
    obj = copy.deepcopy(workload.obj)
    container = obj["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [*(e for e in container.get("env", []) if e["name"] != name), {"name": name, "value": value}]
    return Workload(obj)
