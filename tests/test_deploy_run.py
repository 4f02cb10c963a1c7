"""The manifests run: the rendered `cluster` and `bulk-job` overlays as local processes (tests/k8srun.py).

One cluster for the module, as `kubectl apply -k deploy/k8s/overlays/cluster` would make it:
NATS (3 pods, TLS, the nkey user), shard servers (3, mutual TLS inside), routers (2, TLS and API
keys for clients), with the Secrets deploy/k8s/make-secrets.sh makes. Every client call goes
through the router Service's loopback proxy, as a client in the cluster would.

* a client scenario (a collection of 2 shards x RF 2: upsert, search, get), then a rolling restart
  of NATS, the shard servers and the routers in the order the controllers use, under a steady
  search and write load: 0 failed searches, 0 lost acknowledged writes;
* the bulk-job overlay's Indexed Job (3 completions) indexing a corpus through that Service;
* a router whose BRAID_NATS is wrong never becomes Ready while a correct one does.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from braid.service.client import BraidClient
from braid.service.errors import server_away
from braid.v1 import braid_pb2 as pb

from .k8s import make_secrets, render
from .k8srun import LocalKube, with_env

READY_S = 180.0  # a pod's startup on a loaded 2-core machine, NATS catch-up and shard recovery included
RETRY_S = 60.0  # how long the load's client keeps retrying one call through the Service
DOCS = 40
WRITE_IDS = 20

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def kube(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[LocalKube]:
    root = tmp_path_factory.mktemp("k8s")
    models = models_dir  # the image's /opt/braid/models (exported once per session)
    secrets, _ = make_secrets()
    corpus = root / "corpus"
    corpus.mkdir()
    objects = render("cluster")
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in objects}
    for obj in render("bulk-job"):  # the Job runs against this cluster, with its own (hashed) ConfigMaps
        if obj["kind"] in ("Job", "ConfigMap") and (obj["kind"], obj["metadata"]["name"]) not in names:
            objects.append(obj)
    kube = LocalKube(objects, root / "run", secrets, models, claims={"braid-corpus": corpus})
    try:
        kube.wait_ready(kube.start("braid-nats"), READY_S)
        kube.wait_ready(kube.start("braid-shard") + kube.start("braid-router"), READY_S)
        yield kube
    except BaseException:
        print(kube.logs())
        raise
    finally:
        kube.stop()


def client(kube: LocalKube, timeout: float = 30.0) -> BraidClient:
    """A client in the cluster: the Service `braid`, its TLS CA and the admin key from make-secrets.sh."""
    return BraidClient(
        kube.service_address("braid", 50051),
        timeout=timeout,
        tls_ca=kube.secrets_dir / "braid-tls" / "ca.crt",
        api_key=(kube.secrets_dir / "admin.key").read_text().strip(),
    )


def vector(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(8).astype(np.float32)


def schema() -> pb.Schema:
    return pb.Schema(
        text_fields=[pb.TextField(name="body")],
        dense_fields=[pb.DenseVectorField(name="emb", dim=8, metric=pb.COSINE)],
        payload_fields=[pb.PayloadField(name="v", type=pb.INT)],
    )


class Load:
    """Steady searches and writes through the Service, each call retried with a fresh connection
    (as a client behind a Service reconnects to another pod), up to RETRY_S, when the server did
    not take it: UNAVAILABLE, or dropped by a stopping router (service/errors.py server_away)."""

    def __init__(self, kube: LocalKube) -> None:
        self.kube = kube
        self.stop = threading.Event()
        self.searches = self.failed_searches = self.wrong_results = self.retries = 0
        self.acked: dict[str, int] = {}
        self.errors: list[str] = []
        self.threads = [threading.Thread(target=self._search, daemon=True), threading.Thread(target=self._write)]

    def _call(self, state: dict[str, BraidClient], call, what: str):  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                return call(state["client"])
            except grpc.RpcError as err:
                if not server_away(err) or time.monotonic() > deadline:
                    raise
                self.retries += 1
                state["client"].close()
                time.sleep(0.1)
                state["client"] = client(self.kube, timeout=15)

    def _search(self) -> None:
        state = {"client": client(self.kube, timeout=15)}
        i = 0
        while not self.stop.is_set():
            n = i % DOCS
            i += 1
            try:
                hits = self._call(state, lambda c, n=n: c.search("docs", bm25=f"tok{n}", limit=3), "search")
                self.searches += 1
                if not hits or hits[0].id != f"s-{n}":
                    self.wrong_results += 1
                    self.errors.append(f"search tok{n}: {[h.id for h in hits]}")
            except grpc.RpcError as err:
                self.failed_searches += 1
                self.errors.append(f"search tok{n}: {err.code().name} {err.details()}")
            time.sleep(0.02)
        state["client"].close()

    def _write(self) -> None:
        state = {"client": client(self.kube, timeout=15)}
        k = 0
        while not self.stop.is_set():
            doc_id = f"w-{k % WRITE_IDS}"
            doc = {"id": doc_id, "text": {"body": f"written {k}"}, "dense": {"emb": vector(k)}, "payload": {"v": k}}
            # A write that may have been stored is sent again until acknowledged: the value of an
            # id is only ever the last acknowledged one.
            while True:
                try:
                    self._call(state, lambda c, doc=doc: c.upsert("docs", [doc]), "upsert")
                    self.acked[doc_id] = k
                    break
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        self.errors.append(f"upsert {doc_id}={k}: {err.code().name} {err.details()}")
                        raise
                    self.retries += 1
            k += 1
            time.sleep(0.05)
        state["client"].close()

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(RETRY_S * 2)


def test_cluster_scenario_and_rolling_restart_under_load(kube: LocalKube) -> None:
    started = time.monotonic()
    with client(kube) as braid:
        info = braid.create_collection("docs", schema(), shards=2, replication_factor=2)
        assert info.shards == 2 and info.replication_factor == 2
        braid.upsert(
            "docs",
            [
                {"id": f"s-{i}", "text": {"body": f"seeded tok{i} document"}, "dense": {"emb": vector(1000 + i)}}
                for i in range(DOCS)
            ],
        )
        assert braid.search("docs", bm25="tok7", limit=3)[0].id == "s-7"
        assert braid.search("docs", dense=("emb", vector(1000 + 11)), limit=1)[0].id == "s-11"
        assert [d.id for d in braid.get("docs", ["s-3", "s-39", "nope"])] == ["s-3", "s-39"]

    timings: dict[str, float] = {}
    with Load(kube) as load:
        during: dict[str, int] = {}
        for workload in ("braid-nats", "braid-shard", "braid-router"):
            begun, searches = time.monotonic(), load.searches
            old = {p.name: p.proc.pid for p in kube.workload_pods(workload) if p.proc}
            kube.rolling_restart(workload, READY_S)
            timings[workload] = time.monotonic() - begun
            during[workload] = load.searches - searches
            new = {p.name: p.proc.pid for p in kube.workload_pods(workload) if p.proc}
            assert len(new) == len(old) and not set(new.values()) & set(old.values()), "every pod replaced"
        # The load also runs on the restarted cluster for a moment.
        seen = load.searches
        deadline = time.monotonic() + RETRY_S
        while load.searches < seen + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
    print(f"rolling restarts {timings}, searches during each {during}")
    print(f"searches {load.searches}, retried calls {load.retries}, ids acknowledged {len(load.acked)}")
    assert not load.errors, load.errors[:10]
    assert load.failed_searches == 0 and load.wrong_results == 0
    assert all(n >= 10 for n in during.values()), f"searches ran through every restart: {during}"
    assert len(load.acked) == WRITE_IDS

    # Every acknowledged write is there with its last acknowledged value (replicas may still be
    # applying the last ones: wait for them, bounded).
    with client(kube) as braid:
        deadline = time.monotonic() + RETRY_S
        while True:
            docs = {d.id: d.payload["v"].int for d in braid.get("docs", list(load.acked))}
            if docs == load.acked or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert docs == load.acked, {k: (docs.get(k), v) for k, v in load.acked.items() if docs.get(k) != v}
        assert braid.count("docs") == DOCS + WRITE_IDS
    # Every router served clients through the Service, the replacements included.
    print(f"whole test {time.monotonic() - started:.0f} s")


def test_bulk_job_indexes_a_corpus_into_the_running_cluster(kube: LocalKube) -> None:
    corpus = kube.claims["braid-corpus"]
    topics = ["bread baking", "car brakes", "python lists", "blue whales", "income tax", "guitar tuning"]
    rows = [
        {"_id": f"a-{i}", "title": f"note {i}", "text": f"A short note number {i} about {topics[i % len(topics)]}."}
        for i in range(36)
    ]
    (corpus / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with client(kube) as braid:
        braid.create_collection(
            "articles",
            pb.Schema(
                text_fields=[pb.TextField(name="title"), pb.TextField(name="text")],
                dense_fields=[
                    pb.DenseVectorField(
                        name="emb",
                        metric=pb.COSINE,
                        encoder=pb.Encoder(model="all-minilm-l6-v2", source_fields=["text"]),
                    )
                ],
            ),
            shards=2,
            replication_factor=2,
        )
        # The job's key has the write role only: it creates the jobs' system collection itself.
        assert "_braid_jobs" not in {c.name for c in braid.list_collections()}

    exits = kube.run_job("braid-index", timeout=400)
    pods = list(kube.job_pods("braid-index"))
    assert exits == {0: [0], 1: [0], 2: [0]}, "\n".join(f"----- {p.name}:\n{p.tail()}" for p in pods)
    reports = {}
    for pod in pods:
        assert pod.dir is not None
        report = json.loads((pod.dir / "termination-log").read_text())
        reports[report["partition"]] = report
    assert sorted(reports) == [0, 1, 2] and all(
        r["partitions"] == 3 and r["status"] == "done" for r in reports.values()
    )
    assert sum(r["written"] for r in reports.values()) == len(rows)

    with client(kube) as braid:
        assert braid.get_collection("_braid_jobs").name == "_braid_jobs"
        assert sorted(d.id for d in braid.get("articles", [r["_id"] for r in rows])) == sorted(r["_id"] for r in rows)
        assert braid.count("articles") == len(rows)
        hits = braid.search("articles", dense=("emb", "the largest animal in the ocean"), limit=6)
        assert hits and all(int(h.id.split("-")[1]) % len(topics) == 3 for h in hits)


def test_a_router_with_a_wrong_braid_nats_never_gets_ready(kube: LocalKube) -> None:
    """The same Deployment with BRAID_NATS on a port NATS does not serve: its pod must stay out of
    the Service while a correct pod started beside it becomes Ready."""
    router = kube.objects.workload("braid-router")
    wrong = with_env(
        router,
        "BRAID_NATS",
        "nats://braid-nats-0.braid-nats.$(POD_NAMESPACE).svc.cluster.local:4223",
    )
    bad = kube.start_pod(kube.new_pod(wrong))
    good = kube.start_pod(kube.new_pod(router))
    try:
        began = time.monotonic()
        kube.wait_ready([good], READY_S)
        took = time.monotonic() - began
        # As long again (and 10 s more) as the good one needed: the bad one is still not Ready.
        deadline = time.monotonic() + took + 10
        while time.monotonic() < deadline:
            kube.probe_once(bad)
            assert not bad.ready, f"{bad.name} became Ready with a wrong BRAID_NATS:\n{bad.tail()}"
            time.sleep(0.5)
    finally:
        kube.delete_pod(bad)
        kube.delete_pod(good)


def test_inside_the_cluster_only_braid_gets_in(kube: LocalKube) -> None:
    """The overlay's internal mTLS and NATS credentials are on: a shard server's port refuses a caller
    without the internal certificate, NATS refuses a client without Braid's nkey (each with the
    right credentials as the control)."""
    from braid.cluster.v1 import shard_pb2, shard_pb2_grpc

    shard = kube.workload_pods("braid-shard")[0]
    address = f"127.0.0.1:{shard.port('shard-grpc')}"
    internal = kube.secrets_dir / "braid-internal-tls"
    override = [("grpc.ssl_target_name_override", "braid-internal")]

    def status(channel: grpc.Channel) -> grpc.StatusCode:
        try:
            shard_pb2_grpc.ShardStub(channel).Status(shard_pb2.StatusRequest(), timeout=10)
        except grpc.RpcError as err:
            return err.code()
        finally:
            channel.close()
        return grpc.StatusCode.OK

    ca = (internal / "ca.crt").read_bytes()
    assert status(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
    assert status(grpc.secure_channel(address, no_cert, options=override)) == grpc.StatusCode.UNAVAILABLE
    with_cert = grpc.ssl_channel_credentials(
        ca, (internal / "tls.key").read_bytes(), (internal / "tls.crt").read_bytes()
    )
    assert status(grpc.secure_channel(address, with_cert, options=override)) == grpc.StatusCode.OK

    import asyncio
    import ssl

    import nats
    import nats.errors

    nats_pod = kube.workload_pods("braid-nats")[0]
    url = f"nats://127.0.0.1:{nats_pod.port('client')}"
    context = ssl.create_default_context(cafile=str(kube.secrets_dir / "braid-nats-tls" / "ca.crt"))

    async def connect(**options: object) -> str:
        async def quiet(err: Exception) -> None:
            pass

        try:
            nc = await nats.connect(
                servers=[url],
                connect_timeout=5,
                max_reconnect_attempts=0,
                allow_reconnect=False,
                error_cb=quiet,
                **options,  # type: ignore[arg-type]
            )
        except Exception as err:
            return type(err).__name__
        try:
            streams = await nc.jetstream().streams_info()
            return f"ok {len(streams)}"
        finally:
            await nc.close()

    assert not asyncio.run(connect(tls=context)).startswith("ok"), "NATS took a client without credentials"
    assert not asyncio.run(connect()).startswith("ok"), "NATS took a plaintext client"
    seed = str(kube.secrets_dir / "braid-nats-creds" / "braid.nk")
    assert asyncio.run(connect(tls=context, nkeys_seed=seed)).startswith("ok")
