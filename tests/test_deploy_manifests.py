"""The Kubernetes manifests (deploy/k8s), statically: issue 22's items 1, 2 and 3's NetworkPolicies.

Every overlay renders with ``kubectl kustomize`` and validates strictly against the
Kubernetes 1.37 schemas; a platform team's checks hold for every workload (probes, resources,
security context, anti-affinity, PDBs, grace periods, configuration, Secrets, metrics); the
manifests agree with the code (every BRAID_* variable is one the program reads, and the
container's args and environment make a valid ``braid serve`` / ``braid job index``
configuration with the parsers the image runs), with each other (ports, Service names,
advertised and NATS addresses, one image tag) and with deploy/k8s/make-secrets.sh (every
Secret and key a pod uses). NetworkPolicies are evaluated for who may reach which port.
The test that runs the rendered overlays as processes is tests/test_deploy_run.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from braid.service.config import ServerConfig
from braid.service.server import LIVE_HEALTH_NAME

from . import k8s
from .k8s import Objects, SecretRef, Workload

KUBERNETES_VERSION = "1.37.0"
IMAGE = "ghcr.io/braid-search/braid"
NAMESPACE = "ns-under-test"  # not the overlays' own, so nothing depends on it by accident
HEALTH_PORT, METRICS_PORT = 50060, 9090
RECOVERY_S = 600  # a shard server or standalone server may take 10 minutes to recover
# (overlay, workload): every workload, so each policy test runs on all of them; a workload
# added without being listed here fails test_every_workload_is_checked.
WORKLOADS = [
    ("standalone", "braid"),
    ("cluster", "braid-nats"),
    ("cluster", "braid-shard"),
    ("cluster", "braid-router"),
    ("bulk-job", "braid-index"),
]
SERVERS = [pair for pair in WORKLOADS if pair[1] not in ("braid-nats", "braid-index")]
# Environment variables that are not configuration (the downward API, nats.conf's $VARs).
NOT_CONFIG = {"POD_NAME", "POD_NAMESPACE", "NATS_BRAID_NKEY"}
# Values from a Secret as a variable, not a file: the job's client takes its key only so
# (docs/security.md, "Client pods"), and the NATS servers take the public nkey of Braid's user.
SECRET_VARIABLES = {("braid-index", "BRAID_API_KEY"), ("braid-nats", "NATS_BRAID_NKEY")}


@pytest.fixture(scope="module")
def rendered() -> dict[str, Objects]:
    return {overlay: k8s.render(overlay) for overlay in k8s.OVERLAYS}


def workload(rendered: dict[str, Objects], overlay: str, name: str) -> Workload:
    return rendered[overlay].workload(name)


def pod_env(rendered: dict[str, Objects], overlay: str, name: str, ordinal: int = 1) -> dict[str, Any]:
    w = workload(rendered, overlay, name)
    pod = {"name": f"{name}-{ordinal}", "namespace": NAMESPACE}
    return k8s.container_env(w.containers[0], rendered[overlay], pod)


def ids(pairs: list[tuple[str, str]]) -> list[str]:
    return [f"{overlay}/{name}" for overlay, name in pairs]


def _cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def _bytes(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    assert match, value
    return float(match.group(1)) * _UNITS.get(match.group(2), 1)


def _port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise KeyError(f"container {container['name']} has no port named {port!r}")


def _container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: int(p["containerPort"]) for p in container.get("ports", [])}


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) against labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


# ---------------------------------------------------------------- render and validate


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_overlay_renders_and_validates_strictly(rendered: dict[str, Objects], overlay: str) -> None:
    objects = rendered[overlay]
    assert objects.workloads, f"{overlay} renders no workload"
    for obj in objects:
        where = f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{where}: {err.message} at {'/'.join(map(str, err.path))}")
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "braid", where
        assert labels.get("app.kubernetes.io/part-of") == "braid", where


def test_strict_validation_rejects_an_unknown_field(rendered: dict[str, Objects]) -> None:
    """The validation above can fail: a misspelt field (here in a probe) is refused."""
    shard = workload(rendered, "cluster", "braid-shard").obj
    broken = {**shard, "spec": {**shard["spec"], "replica": 3}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_every_workload_is_checked(rendered: dict[str, Objects]) -> None:
    found = sorted((overlay, w.name) for overlay, objects in rendered.items() for w in objects.workloads)
    assert found == sorted(WORKLOADS)


def test_names_and_shapes(rendered: dict[str, Objects]) -> None:
    """The names, kinds and replica counts the docs, the run test and users rely on."""
    standalone, cluster, job = rendered["standalone"], rendered["cluster"], rendered["bulk-job"]
    assert standalone.get("StatefulSet", "braid")["spec"]["serviceName"] == "braid-headless"
    assert standalone.get("Service", "braid-headless")["spec"]["clusterIP"] == "None"
    assert workload(rendered, "standalone", "braid").replicas == 1
    assert not [w for w in standalone.workloads if w.name.startswith("braid-nats")], "standalone runs no NATS"
    assert workload(rendered, "cluster", "braid-nats").replicas == 3
    assert workload(rendered, "cluster", "braid-shard").replicas == 3
    assert workload(rendered, "cluster", "braid-router").kind == "Deployment"
    assert workload(rendered, "cluster", "braid-router").replicas == 2
    for name in ("braid-nats", "braid-shard"):
        sts = cluster.get("StatefulSet", name)
        assert sts["spec"]["serviceName"] == name
        assert cluster.get("Service", name)["spec"]["clusterIP"] == "None"
        # Peers that do their own readiness: NATS routes form before any server is ready, and
        # routers call a restarted shard server's new address at once (it says itself what it
        # can serve).
        assert cluster.get("Service", name)["spec"]["publishNotReadyAddresses"] is True
        claims = [c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]]
        assert claims == ["data"], f"{name}: a PVC each"
    assert standalone.get("StatefulSet", "braid")["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    hpa = cluster.get("HorizontalPodAutoscaler", "braid-router")["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("Deployment", "braid-router")
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 8)
    for objects in (standalone, cluster):
        assert objects.get("Service", "braid")["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert job.get("Job", "braid-index")["spec"]["completionMode"] == "Indexed"
    for overlay, objects in rendered.items():
        for obj in objects:
            assert obj["metadata"].get("namespace") == "braid", f"{overlay}: {obj['metadata']['name']}"


@pytest.mark.parametrize("server", ["cluster", "standalone"])
def test_bulk_job_applies_beside_a_server(rendered: dict[str, Objects], server: str) -> None:
    """The bulk job is applied into the namespace of a running cluster or standalone server: an
    object both overlays hold must be the same object, or one apply would change the other's."""
    mine = {(o["kind"], o["metadata"]["name"]): o for o in rendered["bulk-job"]}
    for obj in rendered[server]:
        other = mine.get((obj["kind"], obj["metadata"]["name"]))
        assert other is None or other == obj, f"{obj['kind']}/{obj['metadata']['name']} differs"


def test_one_image_everywhere(rendered: dict[str, Objects]) -> None:
    """One image name and tag in every container, the tag the pyproject version."""
    version = tomllib.loads((k8s.ROOT / "pyproject.toml").read_text())["project"]["version"]
    images = set()
    for objects in rendered.values():
        for w in objects.workloads:
            for container in w.containers + w.pod.get("initContainers", []):
                images.add(container["image"])
    assert images == {f"{IMAGE}:{version}"}


# ---------------------------------------------------------------- item 2, every workload


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_liveness_and_readiness_probes(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """Braid servers: native gRPC probes on grpc.health.v1 at the plaintext health port
    (liveness and startup on braid.live, readiness on ""); NATS: its monitoring /healthz; the
    index job has none (a Job's health is its exit code)."""
    w = workload(rendered, overlay, name)
    container = w.containers[0]
    if name == "braid-index":
        assert not any(key.endswith("Probe") for key in container), "nothing in a job answers probes"
        return
    services = {"livenessProbe": LIVE_HEALTH_NAME, "readinessProbe": "", "startupProbe": LIVE_HEALTH_NAME}
    for kind, service in services.items():
        probe = container[kind]
        if name == "braid-nats":
            assert _port_number(container, probe["httpGet"]["port"]) == _container_ports(container)["monitor"] == 8222
            assert probe["httpGet"]["path"].startswith("/healthz"), kind
            continue
        assert set(probe) & {"grpc", "exec", "httpGet", "tcpSocket"} == {"grpc"}, f"{kind}: a native gRPC probe"
        assert probe["grpc"]["port"] == HEALTH_PORT == _container_ports(container)["health"], kind
        # Liveness: the process answers (a replay is no hang); readiness: recovered, caught up.
        assert probe["grpc"].get("service", "") == service, kind
    if name == "braid-nats":
        assert container["readinessProbe"]["httpGet"]["path"] == "/healthz?js-enabled-only=true"
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz", "ready only once JetStream is current"


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_startup_probe_allows_recovery(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """Liveness must not kill a server that is still recovering: the startup probe waits long enough."""
    container = workload(rendered, overlay, name).containers[0]
    if name == "braid-index":
        return
    probe = container["startupProbe"]
    allowed = probe.get("failureThreshold", 3) * probe.get("periodSeconds", 10)
    needed = 120 if name == "braid-router" else RECOVERY_S  # a router loads models and reads metadata
    assert allowed >= needed, f"{name}: startup probe gives {allowed} s"


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_requests_and_limits(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    w = workload(rendered, overlay, name)
    for container in w.containers + w.pod.get("initContainers", []):
        resources = container.get("resources", {})
        requests, limits = resources.get("requests", {}), resources.get("limits", {})
        for resource in ("cpu", "memory"):
            assert resource in requests and resource in limits, f"{container['name']}: {resource}"
        assert _cpu(requests["cpu"]) <= _cpu(limits["cpu"])
        assert _bytes(requests["memory"]) <= _bytes(limits["memory"])


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_security_context(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    w = workload(rendered, overlay, name)
    pod_context = w.pod.get("securityContext", {})
    assert pod_context.get("runAsNonRoot") is True
    assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert w.pod.get("automountServiceAccountToken") is False, "no pod needs the Kubernetes API"
    assert w.pod.get("hostNetwork", False) is False and w.pod.get("hostPID", False) is False
    for container in w.containers + w.pod.get("initContainers", []):
        context = {**pod_context, **container.get("securityContext", {})}
        assert context.get("runAsNonRoot") is True
        assert int(context.get("runAsUser", 0)) > 0
        assert container["securityContext"].get("readOnlyRootFilesystem") is True
        assert container["securityContext"].get("allowPrivilegeEscalation") is False
        assert container["securityContext"].get("privileged", False) is False
        assert container["securityContext"].get("capabilities", {}).get("drop") == ["ALL"]
        assert not container["securityContext"].get("capabilities", {}).get("add")
        assert context.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        # A read-only root filesystem: what the program writes goes to a volume.
        mounted = {mount["mountPath"] for mount in container.get("volumeMounts", [])}
        assert "/tmp" in mounted, f"{container['name']}: /tmp must be a volume"
        if w.is_braid_server:
            data = pod_env(rendered, overlay, name)["BRAID_DATA_DIR"]
            assert data in mounted, f"{name}: BRAID_DATA_DIR {data} is not a volume"


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_no_service_links(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """The client Service is named `braid`: Kubernetes' service links would set BRAID_PORT to
    tcp://IP:50051 in every pod of the namespace, which `braid serve` reads as its port."""
    assert workload(rendered, overlay, name).pod.get("enableServiceLinks") is False


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_anti_affinity_over_nodes(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """Replicas of one kind spread over nodes: a podAntiAffinity term over kubernetes.io/hostname
    that selects this workload's pods and no other workload's."""
    w = workload(rendered, overlay, name)
    anti = w.pod.get("affinity", {}).get("podAntiAffinity", {})
    terms = list(anti.get("requiredDuringSchedulingIgnoredDuringExecution", []))
    terms += [t["podAffinityTerm"] for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])]
    others = [o.labels for objects in rendered.values() for o in objects.workloads if o.name != name]
    good = [
        t
        for t in terms
        if t["topologyKey"] == "kubernetes.io/hostname"
        and _selects(t["labelSelector"], w.labels)
        and not any(_selects(t["labelSelector"], labels) for labels in others)
    ]
    assert good, f"{name}: no anti-affinity over kubernetes.io/hostname by its own labels"
    if name in ("braid-nats", "braid-shard"):
        # A quorum (NATS) or a shard's replicas (placement puts them on distinct node ids) on one
        # Kubernetes node would be lost together: hard anti-affinity.
        assert anti.get("requiredDuringSchedulingIgnoredDuringExecution"), name


@pytest.mark.parametrize("name", ["braid-nats", "braid-shard", "braid-router"])
def test_pod_disruption_budgets(rendered: dict[str, Objects], name: str) -> None:
    """A drain takes one NATS server or one shard server at a time (the NATS quorum and every
    shard's other replica stay), and leaves a router serving."""
    cluster = rendered["cluster"]
    w = cluster.workload(name)
    budgets = [p for p in cluster.of_kind("PodDisruptionBudget") if _selects(p["spec"]["selector"], w.labels)]
    assert len(budgets) == 1, f"{name}: {len(budgets)} PodDisruptionBudgets"
    spec = budgets[0]["spec"]
    if "maxUnavailable" in spec:
        assert spec["maxUnavailable"] == 1
    else:
        assert 1 <= spec["minAvailable"] <= w.replicas - 1
    others = [o for o in cluster.workloads if o.name != name]
    assert not any(_selects(spec["selector"], o.labels) for o in others), "a budget counts one workload's pods"


def _nats_conf(rendered: dict[str, Objects]) -> str:
    return rendered["cluster"].config_map_data(_nats_config_map(rendered))["nats.conf"]


def _nats_config_map(rendered: dict[str, Objects]) -> str:
    nats = workload(rendered, "cluster", "braid-nats")
    return str(nats.volume("config")["configMap"]["name"])


def _duration_s(conf: str, key: str) -> float:
    match = re.search(rf"^\s*{key}:\s*\"?(\d+)(s|m)\"?", conf, re.MULTILINE)
    assert match, f"nats.conf has no {key}"
    return float(match.group(1)) * (60 if match.group(2) == "m" else 1)


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_termination_grace_above_drain_time(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """The kubelet's SIGKILL comes after the program's own drain: BRAID_SHUTDOWN_GRACE_S (plus a
    preStop sleep) for servers, NATS's lame-duck time, the job's last batches (a few seconds)."""
    w = workload(rendered, overlay, name)
    grace = w.pod.get("terminationGracePeriodSeconds", 30)
    container = w.containers[0]
    sleep = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    if w.is_braid_server:
        drain = float(pod_env(rendered, overlay, name)["BRAID_SHUTDOWN_GRACE_S"])
        assert grace > sleep + drain + 10, f"{name}: {grace} s for {sleep} s preStop + {drain} s drain"
    elif name == "braid-nats":
        conf = _nats_conf(rendered)
        lame = _duration_s(conf, "lame_duck_duration") + _duration_s(conf, "lame_duck_grace_period")
        assert grace > lame, f"NATS: {grace} s for {lame} s of lame duck"
        assert "ldm" in " ".join(container["lifecycle"]["preStop"]["exec"]["command"])
    else:
        assert grace >= 30


@pytest.mark.parametrize(("overlay", "name"), SERVERS, ids=ids(SERVERS))
def test_prometheus_annotations(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    w = workload(rendered, overlay, name)
    env = pod_env(rendered, overlay, name)
    annotations = w.annotations
    assert annotations.get("prometheus.io/scrape") == "true"
    assert annotations.get("prometheus.io/path") == "/metrics"
    assert int(annotations["prometheus.io/port"]) == int(env["BRAID_METRICS_PORT"]) == METRICS_PORT
    assert _container_ports(w.containers[0])["metrics"] == METRICS_PORT


# ---------------------------------------------------------------- configuration


def _serve_variables() -> set[str]:
    return {f"BRAID_{f.name.upper()}" for f in fields(ServerConfig) if f.init}


def _job_variables() -> set[str]:
    """The variables `braid job index` reads, from its sources: BRAID_JOB_<X> of each
    ``_env("X", ...)``/``_flag("X")``, and every BRAID_* read by name in the job and in the
    client options it shares with the other client commands."""
    job_src = (k8s.ROOT / "service" / "jobs" / "index_job.py").read_text()
    cli_src = (k8s.ROOT / "service" / "cli.py").read_text()
    names = {f"BRAID_JOB_{x}" for x in re.findall(r"_(?:env|flag)\(\"([A-Z_]+)\"", job_src)}
    address = cli_src[cli_src.index("address = argparse.ArgumentParser") :]
    address = address[: address.index("\n\n")]
    for src in (job_src, address):
        names |= set(re.findall(r"\"(BRAID_[A-Z_]+)\"", src))
    return names


def test_the_variable_sets_are_derived() -> None:
    """The sets below come from the code: check they hold what docs/jobs.md and config.py name."""
    assert {"BRAID_PORT", "BRAID_HEALTH_PORT", "BRAID_NATS_CREDS", "BRAID_CLUSTER_TLS_CA"} <= _serve_variables()
    job = _job_variables()
    assert {"BRAID_JOB_PARTITIONS", "BRAID_JOB_NAME", "BRAID_ADDRESS", "BRAID_API_KEY", "BRAID_MODELS_DIR"} <= job
    assert "BRAID_JOB_PARTITION" in job


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_every_variable_is_read(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """Every variable a manifest sets is one the program reads (a misspelt one would be ignored)."""
    env = pod_env(rendered, overlay, name)
    readable = {"braid-index": _job_variables(), "braid-nats": set()}.get(name, _serve_variables())
    unread = sorted(set(env) - readable - NOT_CONFIG)
    assert not unread, f"{name} sets variables nothing reads: {unread}"
    if name == "braid-index":
        # The partition must come from JOB_COMPLETION_INDEX, which a fixed variable would override.
        assert "BRAID_JOB_PARTITION" not in env


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_variable_references_resolve(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """Kubernetes expands $(VAR) only from variables defined before it (envFrom, then env in
    order); a reference it cannot expand stays literally in the value."""
    w = workload(rendered, overlay, name)
    env = pod_env(rendered, overlay, name)
    for key, value in env.items():
        if isinstance(value, str):
            assert "$(" not in value, f"{name}: {key}={value} keeps a reference Kubernetes cannot expand"
    for arg in w.containers[0].get("args", []) + w.containers[0].get("command", []):
        unresolved = [ref for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg) if ref not in env]
        assert not unresolved, f"{name}: args use undefined {unresolved}"


@pytest.mark.parametrize(("overlay", "name"), SERVERS, ids=ids(SERVERS))
def test_serve_configuration_is_valid(
    rendered: dict[str, Objects], secrets_dir: Path, overlay: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`braid serve` with exactly the container's args and environment makes the configuration
    the manifests mean (the real parser and ServerConfig's checks: a setting a role refuses,
    a bad number, a missing NATS URL, a credentials file that is not one fail here; the files come
    from make-secrets.sh), with nothing on the command line that has a variable."""
    from braid.service.cli import SERVE_SETTINGS, build_parser
    from braid.service.config import load_config

    container = workload(rendered, overlay, name).containers[0]
    assert not container.get("command"), "the image's entrypoint is braid"
    assert container["args"] == ["serve"], "configuration only through BRAID_* variables"
    w = workload(rendered, overlay, name)
    env = with_secret_files(w, pod_env(rendered, overlay, name, ordinal=2), secrets_dir)
    for key in [k for k in os.environ if k.startswith("BRAID_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        assert not isinstance(value, SecretRef), f"{key}: a server reads Secrets as files"
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(container["args"])
    config = load_config(**{setting: getattr(args, setting) for setting in SERVE_SETTINGS})
    role = {"braid": "standalone", "braid-shard": "shard", "braid-router": "router"}[name]
    assert config.role == role
    assert config.health_port == HEALTH_PORT and config.metrics_port == METRICS_PORT
    assert config.host == "0.0.0.0"
    assert str(config.models_path) == "/opt/braid/models", "the models baked into the image"
    if role == "standalone":
        assert config.tls and config.api_keys is not None
    if role == "router":
        assert config.tls and config.api_keys is not None and config.cluster_tls
        assert config.nats_creds is not None and config.nats_tls_ca is not None
    if role == "shard":
        assert config.cluster_tls and config.nats_creds is not None and config.nats_tls_ca is not None
        assert config.cluster_node_id == f"{name}-2", "the pod name is the node id"


def test_job_configuration_is_valid(rendered: dict[str, Objects], monkeypatch: pytest.MonkeyPatch) -> None:
    """`braid job index` with the Job's args and environment, in the pod Kubernetes gives index 2:
    partition 2 of `completions`, from JOB_COMPLETION_INDEX; every option from a variable."""
    from braid.service.cli import build_parser

    w = workload(rendered, "bulk-job", "braid-index")
    container = w.container("index")
    env = pod_env(rendered, "bulk-job", "braid-index")
    for key in [k for k in os.environ if k.startswith("BRAID_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, "key-from-secret" if isinstance(value, SecretRef) else value)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    args = build_parser().parse_args(container["args"])
    assert (args.command, args.job_kind) == ("job", "index")
    assert args.partition == 2
    assert args.partitions == w.obj["spec"]["completions"] == 3
    assert args.job, "a fixed job name: a retried pod resumes its partition"
    assert args.report == "/dev/termination-log"
    assert args.api_key == "key-from-secret" and args.tls_ca
    assert _cpu(container["resources"]["requests"]["cpu"]) == args.workers, "a CPU per encoder worker"
    # Flags only where no variable exists: the collection and corpus are arguments.
    flags = [arg for arg in container["args"] if arg.startswith("-")]
    assert flags == ["--no-progress"], flags
    corpus = container["args"][3]
    assert any(corpus.startswith(mount + "/") for mount, _ in k8s.mounts(container)), "the corpus is on a volume"


def test_job_failure_policy_matches_exit_codes(rendered: dict[str, Objects]) -> None:
    """docs/jobs.md: exit 2 cannot succeed on a rerun (fail the Job), 75 is retryable (count it)."""
    from braid.service.jobs.sender import EXIT_BAD_INPUT, EXIT_RETRYABLE

    job = rendered["bulk-job"].get("Job", "braid-index")["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["parallelism"] <= job["completions"]
    assert job["template"]["spec"]["restartPolicy"] == "Never"
    actions = {}
    for rule in job["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes:
            assert codes["operator"] == "In" and codes["containerName"] == "index"
            for code in codes["values"]:
                actions[code] = rule["action"]
    assert actions == {EXIT_BAD_INPUT: "FailJob", EXIT_RETRYABLE: "Count"}
    volume = Workload(rendered["bulk-job"].get("Job", "braid-index")).volume("corpus")
    assert volume["persistentVolumeClaim"] == {"claimName": "braid-corpus", "readOnly": True}


# ---------------------------------------------------------------- ports and addresses


@pytest.mark.parametrize(("overlay", "name"), SERVERS, ids=ids(SERVERS))
def test_ports_agree(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """The port each server listens on (its variables) is the container port the Services and
    probes use."""
    container = workload(rendered, overlay, name).containers[0]
    env = pod_env(rendered, overlay, name)
    ports = _container_ports(container)
    main = "shard-grpc" if name == "braid-shard" else "grpc"
    assert int(env["BRAID_PORT"]) == ports[main] == (50052 if main == "shard-grpc" else 50051)
    assert int(env["BRAID_HEALTH_PORT"]) == ports["health"]
    assert int(env["BRAID_METRICS_PORT"]) == ports["metrics"]
    assert len(set(ports.values())) == len(ports)


@pytest.mark.parametrize("overlay", k8s.OVERLAYS)
def test_services_reach_container_ports(rendered: dict[str, Objects], overlay: str) -> None:
    """Every Service selects pods of a workload, and each targetPort is a port those pods declare."""
    objects = rendered[overlay]
    for service in objects.of_kind("Service"):
        selected = [w for w in objects.workloads if _selects({"matchLabels": service["spec"]["selector"]}, w.labels)]
        assert len(selected) == 1, f"Service {service['metadata']['name']} selects {len(selected)} workloads"
        container = selected[0].containers[0]
        for port in service["spec"]["ports"]:
            target = _port_number(container, port.get("targetPort", port["port"]))
            assert target in _container_ports(container).values()
            assert port["port"] == target, "a Service port is the container port: one number per port"


def test_cluster_addresses_agree(rendered: dict[str, Objects]) -> None:
    """A shard server advertises its own pod DNS name under its headless Service and its shard
    port; every Braid process lists the NATS pods by their names on the client port; NATS routes
    name every NATS pod on the cluster port."""
    cluster = rendered["cluster"]
    shard_sts, nats_sts = cluster.get("StatefulSet", "braid-shard"), cluster.get("StatefulSet", "braid-nats")
    nats = cluster.workload("braid-nats").containers[0]
    nats_ports = _container_ports(nats)
    assert (nats_ports["client"], nats_ports["cluster"], nats_ports["monitor"]) == (4222, 6222, 8222)
    expected_nats = [
        f"nats://braid-nats-{i}.{nats_sts['spec']['serviceName']}.{NAMESPACE}.svc.cluster.local:{nats_ports['client']}"
        for i in range(cluster.workload("braid-nats").replicas)
    ]
    shard_port = _container_ports(cluster.workload("braid-shard").containers[0])["shard-grpc"]
    for ordinal in range(3):
        env = pod_env(rendered, "cluster", "braid-shard", ordinal)
        pod = f"braid-shard-{ordinal}"
        assert env["BRAID_NODE_ID"] == pod
        service = shard_sts["spec"]["serviceName"]
        assert env["BRAID_ADVERTISE"] == f"{pod}.{service}.{NAMESPACE}.svc.cluster.local:{shard_port}"
        assert env["BRAID_NATS"].split(",") == expected_nats
    assert pod_env(rendered, "cluster", "braid-router")["BRAID_NATS"].split(",") == expected_nats
    routes = re.findall(r"nats-route://([a-z0-9.-]+):(\d+)", _nats_conf(rendered))
    assert sorted(routes) == [(f"braid-nats-{i}.braid-nats", str(nats_ports["cluster"])) for i in range(3)]
    assert re.search(rf"^listen:\s*0\.0\.0\.0:{nats_ports['client']}$", _nats_conf(rendered), re.MULTILINE)
    assert re.search(rf"^http:\s*0\.0\.0\.0:{nats_ports['monitor']}\b", _nats_conf(rendered), re.MULTILINE)


def test_job_reaches_the_client_service(rendered: dict[str, Objects]) -> None:
    """The job's BRAID_ADDRESS is the Service `braid` (routers, or the standalone server) on its port."""
    env = pod_env(rendered, "bulk-job", "braid-index")
    host, port = env["BRAID_ADDRESS"].rsplit(":", 1)
    assert host == f"braid.{NAMESPACE}.svc.cluster.local"
    for overlay in ("cluster", "standalone"):
        service = rendered[overlay].get("Service", "braid")
        assert int(port) in [p["port"] for p in service["spec"]["ports"]]


# ---------------------------------------------------------------- Secrets and ConfigMaps


@pytest.fixture(scope="module")
def secrets_dir() -> Path:
    """What deploy/k8s/make-secrets.sh makes: a directory per Secret, a file per key."""
    out, done = k8s.make_secrets(NAMESPACE)
    made = {d.name for d in out.iterdir() if d.is_dir() and d.name != "private"}
    # The commands it prints load exactly these directories.
    printed = re.findall(r"create secret generic (\S+) --from-file=(\S+)", done.stdout)
    assert {name: Path(path).name for name, path in printed} == {name: name for name in made}
    return out


@pytest.fixture(scope="module")
def made_secrets(secrets_dir: Path) -> dict[str, set[str]]:
    """The Secrets make-secrets.sh makes: name -> its keys."""
    return {d.name: {f.name for f in d.iterdir()} for d in secrets_dir.iterdir() if d.is_dir() and d.name != "private"}


def with_secret_files(w: Workload, env: dict[str, Any], secrets: Path) -> dict[str, Any]:
    """``env`` with each path into a Secret mount pointing at that key's file under ``secrets``."""
    volumes = {v["name"]: v for v in w.pod.get("volumes", [])}
    by_path = {
        path: volumes[mount["name"]]["secret"]["secretName"]
        for path, mount in k8s.mounts(w.containers[0])
        if "secret" in volumes.get(mount["name"], {})
    }
    out = dict(env)
    for key, value in env.items():
        if isinstance(value, str) and str(Path(value).parent) in by_path:
            out[key] = str(secrets / by_path[str(Path(value).parent)] / Path(value).name)
    return out


def _secret_uses(w: Workload) -> Iterator[tuple[str, str, str]]:
    """(secret, key, how) for every Secret key a workload's pods use."""
    volumes = {v["name"]: v for v in w.pod.get("volumes", [])}
    for container in w.containers:
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], ref["key"], f"env {entry['name']}"
        for mount in container.get("volumeMounts", []):
            secret = volumes.get(mount["name"], {}).get("secret")  # a claim template is no volume here
            if secret:
                keys = [item["key"] for item in secret.get("items", [])] or ["*"]
                for key in keys:
                    yield secret["secretName"], key, f"mount {mount['mountPath']}"


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_secrets_are_read_only_files(rendered: dict[str, Objects], overlay: str, name: str) -> None:
    """TLS material and API keys come from Secrets mounted read-only as whole volumes (no subPath:
    a rotated Secret reaches the pod), never from variables (except the two SECRET_VARIABLES);
    every path a setting names is a file such a mount holds."""
    w = workload(rendered, overlay, name)
    volumes = {v["name"]: v for v in w.pod.get("volumes", [])}
    secret_mounts: dict[str, dict[str, Any]] = {}
    for container in w.containers:
        for mount in container.get("volumeMounts", []):
            secret = volumes.get(mount["name"], {}).get("secret")
            if secret:
                assert mount.get("readOnly") is True, f"{mount['mountPath']} must be read-only"
                assert "subPath" not in mount, f"{mount['mountPath']}: a subPath mount never sees a rotation"
                secret_mounts[mount["mountPath"]] = secret
        for entry in container.get("env", []):
            if "secretKeyRef" in entry.get("valueFrom", {}):
                assert (name, entry["name"]) in SECRET_VARIABLES, f"{entry['name']}: mount the Secret as a file"
    env = pod_env(rendered, overlay, name)
    file_settings = [k for k, v in env.items() if isinstance(v, str) and v.startswith("/etc/braid/")]
    if w.is_braid_server:
        assert file_settings, "TLS and keys are files"
    for key in file_settings:
        path = Path(env[key])
        secret = secret_mounts.get(str(path.parent))
        assert secret is not None, f"{key}={path}: not in a Secret mount"
        items = [item["path"] for item in secret.get("items", [])]
        assert not items or path.name in items, f"{key}={path}: the mount holds only {items}"
    nats_secrets = {s["secretName"]: s for s in secret_mounts.values()}
    if name in ("braid-shard", "braid-router"):
        tls = nats_secrets["braid-nats-tls"]
        assert [item["key"] for item in tls["items"]] == ["ca.crt"], "a NATS client gets the CA, not the server key"


@pytest.mark.parametrize(("overlay", "name"), WORKLOADS, ids=ids(WORKLOADS))
def test_every_secret_and_config_map_exists(
    rendered: dict[str, Objects], made_secrets: dict[str, set[str]], overlay: str, name: str
) -> None:
    """Every ConfigMap a pod uses is in the overlay; every Secret (and key) one uses is one that
    deploy/k8s/make-secrets.sh makes, except the corpus, which is the user's PVC."""
    objects = rendered[overlay]
    w = workload(rendered, overlay, name)
    for secret, key, how in _secret_uses(w):
        assert secret in made_secrets, f"{how}: Secret {secret} is made by nothing"
        assert key == "*" or key in made_secrets[secret], f"{how}: Secret {secret} has no key {key}"
    env = pod_env(rendered, overlay, name)
    volumes = {v["name"]: v for v in w.pod.get("volumes", [])}
    for mount_path, mount in k8s.mounts(w.containers[0]):
        secret = volumes.get(mount["name"], {}).get("secret")
        if secret and not secret.get("items"):
            for key, value in env.items():
                if isinstance(value, str) and Path(value).parent == Path(mount_path):
                    assert Path(value).name in made_secrets[secret["secretName"]], f"{key}={value}"
    for container in w.containers:
        for source in container.get("envFrom", []):
            assert objects.has("ConfigMap", source["configMapRef"]["name"])
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {}).get("configMapKeyRef")
            if ref:
                assert ref["key"] in objects.config_map_data(ref["name"])
    for volume in volumes.values():
        if "configMap" in volume:
            assert objects.has("ConfigMap", volume["configMap"]["name"])
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] == "braid-corpus", "the only PVC users provide"


def _names(cert_path: Path) -> tuple[Any, list[str]]:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return cert, sans.get_values_for_type(x509.DNSName)


def _matches(host: str, names: list[str]) -> bool:
    """TLS host name matching: exact, or a wildcard for exactly the leftmost label."""
    return any(
        host == name or (name.startswith("*.") and "." in host and host.split(".", 1)[1] == name[2:]) for name in names
    )


def _issued_by(secret: Path) -> Any:
    from cryptography import x509

    cert, names = _names(secret / "tls.crt")
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate((secret / "ca.crt").read_bytes()))
    return cert, names


def test_certificates_name_the_addresses(rendered: dict[str, Objects], secrets_dir: Path) -> None:
    """Each certificate make-secrets.sh makes is signed by the CA the clients get and names the
    host they check: routers check shard servers against BRAID_CLUSTER_TLS_SERVER_NAME (one
    certificate for both ends of mutual TLS), Braid checks NATS at every BRAID_NATS host (and
    NATS routes check each other at their route hosts), the job checks the Service `braid`."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    router = pod_env(rendered, "cluster", "braid-router")
    _, internal = _issued_by(secrets_dir / "braid-internal-tls")
    assert _matches(router["BRAID_CLUSTER_TLS_SERVER_NAME"], internal)
    cert, _ = _names(secrets_dir / "braid-internal-tls" / "tls.crt")
    usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= usages, "both ends of mutual TLS"
    _, nats_names = _issued_by(secrets_dir / "braid-nats-tls")
    for url in router["BRAID_NATS"].split(","):
        assert _matches(url.split("://", 1)[1].rsplit(":", 1)[0], nats_names), url
    for host, _port in re.findall(r"nats-route://([a-z0-9.-]+):(\d+)", _nats_conf(rendered)):
        assert _matches(host, nats_names), host
    _, api_names = _issued_by(secrets_dir / "braid-tls")
    job = pod_env(rendered, "bulk-job", "braid-index")
    assert _matches(job["BRAID_ADDRESS"].rsplit(":", 1)[0], api_names)
    assert _matches(f"braid.{NAMESPACE}.svc", api_names) and _matches("braid", api_names)


def test_nats_conf_is_valid_for_the_pod(rendered: dict[str, Objects], secrets_dir: Path, tmp_path: Path) -> None:
    """nats-server accepts the ConfigMap's nats.conf with the pod's environment and the files its
    mounts hold (TLS from make-secrets.sh, the nkey user's public key), and refuses it without
    the user's key: a NATS that would take any client never starts."""
    from braid.service.cluster.natsproc import find_nats_server

    secrets = secrets_dir
    nats = workload(rendered, "cluster", "braid-nats")
    container = nats.containers[0]
    conf = re.sub(r"#.*", "", _nats_conf(rendered))
    mounts = dict(k8s.mounts(container))
    volumes = {v["name"]: v for v in nats.pod.get("volumes", [])}
    for path in set(re.findall(r"(?<![\w:/])(/[\w./-]+)", conf)):
        mount_path = next((m for m in mounts if path.startswith(m + "/")), None)
        assert mount_path is not None, f"nats.conf: {path} is on no volume (the root filesystem is read-only)"
        secret = volumes.get(mounts[mount_path]["name"], {}).get("secret")  # `data` is a claim template
        if secret:
            assert mounts[mount_path].get("readOnly") is True
            local = secrets / secret["secretName"] / Path(path).name
        else:
            local = tmp_path / "volumes" / path.lstrip("/")
        conf = conf.replace(path, str(local))
    assert container["command"] == ["nats-server"]
    config_arg = container["args"][container["args"].index("--config") + 1]
    assert Path(config_arg).parent.as_posix() in mounts
    (tmp_path / "nats.conf").write_text(conf)
    env = {**pod_env(rendered, "cluster", "braid-nats")}
    env["NATS_BRAID_NKEY"] = (secrets / "braid-nats-creds" / "braid.pub").read_text().strip()
    check = [find_nats_server(), "-t", "-c", str(tmp_path / "nats.conf")]
    done = subprocess.run(check, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr + done.stdout
    without = {k: v for k, v in {**os.environ, **env}.items() if k != "NATS_BRAID_NKEY"}
    assert subprocess.run(check, env=without, capture_output=True, timeout=60).returncode != 0
    assert "authorization" in conf and "verify: true" in conf, "an nkey user on clients, mutual TLS on routes"


# ---------------------------------------------------------------- NetworkPolicies


def _allowed(objects: Objects, src: dict[str, str], src_namespace: str, dst: Workload, port: int) -> bool:
    """NetworkPolicy ingress semantics: a pod no Ingress policy selects takes everything; else a
    connection is allowed if some rule of some policy selecting it allows its source and port.
    ``src_namespace`` is the source's namespace name ("braid" is the overlays' own)."""
    policies = [
        p
        for p in objects.of_kind("NetworkPolicy")
        if "Ingress" in p["spec"].get("policyTypes", ["Ingress"]) and _selects(p["spec"]["podSelector"], dst.labels)
    ]
    if not policies:
        return True
    container = dst.containers[0]
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(_port_number(container, p["port"]) == port for p in ports):
                continue
            peers = rule.get("from")
            if not peers:
                return True
            for peer in peers:
                ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
                ns_ok = (
                    _selects(ns_sel, {"kubernetes.io/metadata.name": src_namespace})
                    if ns_sel is not None
                    else src_namespace == "braid"
                )
                pod_ok = pod_sel is None or _selects(pod_sel, src)
                if ns_ok and pod_ok and "ipBlock" not in peer:
                    return True
    return False


ROUTER = {
    "app.kubernetes.io/name": "braid",
    "app.kubernetes.io/part-of": "braid",
    "app.kubernetes.io/component": "router",
}
SHARD = {**ROUTER, "app.kubernetes.io/component": "shard"}
NATS = {**ROUTER, "app.kubernetes.io/component": "nats"}
INDEX = {**ROUTER, "app.kubernetes.io/component": "index"}
CLIENT = {"app": "web-frontend"}
# (source labels, source namespace, destination workload, port, allowed)
CLUSTER_FLOWS = [
    (CLIENT, "shop", "braid-router", 50051, True),
    (CLIENT, "braid", "braid-router", 50051, True),
    (INDEX, "braid", "braid-router", 50051, True),
    (CLIENT, "shop", "braid-shard", 50052, False),
    (CLIENT, "braid", "braid-shard", 50052, False),
    (INDEX, "braid", "braid-shard", 50052, False),
    (SHARD, "braid", "braid-shard", 50052, False),  # shard servers never call each other
    (ROUTER, "braid", "braid-shard", 50052, True),
    (ROUTER, "shop", "braid-shard", 50052, False),  # a pod with the labels, in another namespace
    (ROUTER, "braid", "braid-nats", 4222, True),
    (SHARD, "braid", "braid-nats", 4222, True),
    (INDEX, "braid", "braid-nats", 4222, False),
    (CLIENT, "braid", "braid-nats", 4222, False),
    (CLIENT, "shop", "braid-nats", 4222, False),
    (NATS, "braid", "braid-nats", 6222, True),
    (ROUTER, "braid", "braid-nats", 6222, False),
    (SHARD, "braid", "braid-nats", 6222, False),
    (CLIENT, "shop", "braid-router", 50052, False),
    ({"app": "prometheus"}, "monitoring", "braid-router", 9090, True),
    ({"app": "prometheus"}, "monitoring", "braid-shard", 9090, True),
    ({"app": "prometheus"}, "monitoring", "braid-shard", 50060, True),
    ({"app": "prometheus"}, "monitoring", "braid-nats", 8222, True),
    ({"app": "prometheus"}, "monitoring", "braid-nats", 4222, False),
    (CLIENT, "braid", "braid-shard", 9090, True),
    (CLIENT, "shop", "braid-shard", 9090, False),
    (CLIENT, "shop", "braid-router", 50060, False),
    (CLIENT, "shop", "braid-nats", 8222, False),
]


@pytest.mark.parametrize(
    ("src", "namespace", "dst", "port", "allowed"),
    CLUSTER_FLOWS,
    ids=[f"{s.get('app.kubernetes.io/component', s.get('app'))}@{n}->{d}:{p}" for s, n, d, p, _ in CLUSTER_FLOWS],
)
def test_cluster_network_policies(
    rendered: dict[str, Objects], src: dict[str, str], namespace: str, dst: str, port: int, allowed: bool
) -> None:
    """Clients reach routers only (50051); shard servers' 50052 only from routers; NATS only from
    routers and shard servers (4222) and NATS (6222); health, metrics and the NATS monitor from
    this namespace or the `monitoring` namespace."""
    cluster = rendered["cluster"]
    assert _allowed(cluster, src, namespace, cluster.workload(dst), port) is allowed


def test_every_braid_pod_is_isolated(rendered: dict[str, Objects]) -> None:
    """Every Braid pod is selected by some Ingress policy (else it takes any connection), and no
    port outside the ones above is open to anyone."""
    for overlay, objects in rendered.items():
        for w in objects.workloads:
            assert not _allowed(objects, CLIENT, "shop", w, 12345), f"{overlay}/{w.name} is not isolated"
            for declared in _container_ports(w.containers[0]).values():
                if declared in (50051,):
                    continue
                assert not _allowed(objects, CLIENT, "shop", w, declared), f"{overlay}/{w.name}:{declared}"


def test_standalone_network_policy(rendered: dict[str, Objects]) -> None:
    standalone = rendered["standalone"]
    server = standalone.workload("braid")
    assert _allowed(standalone, CLIENT, "shop", server, 50051)
    assert _allowed(standalone, {"app": "prometheus"}, "monitoring", server, 9090)
    assert not _allowed(standalone, CLIENT, "shop", server, 9090)
    assert not _allowed(standalone, CLIENT, "shop", server, 50060)
