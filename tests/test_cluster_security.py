"""Security and readiness inside a cluster (docs/security.md, "Inside a cluster: routers and shard servers").

Real ``nats-server``, shard servers and routers in child processes on 127.0.0.1
(tests/clusterkit.py), a throwaway internal CA (tests/certs.py):

- mutual TLS on braid.cluster.v1.Shard (``--cluster-tls-*``): a cluster with it works end to
  end; a caller with no TLS, with TLS but no client certificate, or with a certificate another
  CA signed fails the handshake (UNAVAILABLE) and never gets data, and so does a router whose
  certificate another CA signed, or that expects another server name;
- a security flag a role cannot honour stops ``braid serve`` at start (exit 2, naming it);
- ``--health-port``: grpc.health.v1 alone, in plaintext, beside a TLS or mutual-TLS main port;
- readiness: a restarted shard server reads NOT_SERVING until every replica it hosts caught up
  with its log; a router until it has read the metadata buckets.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.cluster.v1 import shard_pb2 as spb
from braid.service.cli import main
from braid.service.client import BraidClient, dense_vector
from braid.service.cluster.local import ROUTER_READY, Child, LocalCluster, child_env, serve_args
from braid.service.cluster.natsproc import NatsCluster, free_ports
from braid.service.tls import channel_credentials
from braid.v1 import braid_pb2 as pb
from tests.clusterkit import local_cluster, log_ends, print_logs  # noqa: F401

from .certs import make_ca, make_leaf, write_cert, write_key
from .conftest import random_vectors, schema, start_in_process

pytestmark = pytest.mark.timeout(240)

DIM = 8
T = 30.0  # the deadline of a gRPC call
SETTLE = 60.0  # how long a loaded 2-core machine may take to start, replay or turn ready: a bound, not a speed
PYTHON = [sys.executable, "-m", "braid.service.cli"]  # how LocalCluster runs `braid`
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SHARD_METHODS = {  # the Shard calls that hand out data or state, with a request each
    "Status": (spb.StatusRequest, spb.StatusResponse),
    "Get": (spb.ShardGetRequest, pb.GetResponse),
    "Fetch": (spb.FetchRequest, spb.FetchResponse),
    "Search": (spb.ShardSearchRequest, spb.ShardSearchResponse),
    "Count": (spb.ShardCountRequest, spb.ShardCountResponse),
}


@dataclass(frozen=True)
class Internal:
    """The cluster's internal CA and one certificate for both ends; another CA's, for impostors."""

    ca: Path
    cert: Path
    key: Path
    rogue_ca: Path
    rogue_cert: Path
    rogue_key: Path

    def args(self, cert: Path | None = None, key: Path | None = None, server_name: str = "") -> list[str]:
        args = ["--cluster-tls-cert", str(cert or self.cert), "--cluster-tls-key", str(key or self.key)]
        args += ["--cluster-tls-ca", str(self.ca)]
        return [*args, "--cluster-tls-server-name", server_name] if server_name else args


@pytest.fixture(scope="module")
def internal(tmp_path_factory: pytest.TempPathFactory) -> Internal:
    folder = tmp_path_factory.mktemp("internal-tls")
    ca_key, ca_cert = make_ca("braid internal CA")
    key, cert = make_leaf(ca_key, ca_cert, "braid-internal", server=True, client=True, names=("braid-internal",))
    rogue_ca_key, rogue_ca_cert = make_ca("someone else's CA")
    rogue_key, rogue_cert = make_leaf(rogue_ca_key, rogue_ca_cert, "impostor", server=True, client=True)
    return Internal(
        ca=write_cert(folder / "ca.crt", ca_cert),
        cert=write_cert(folder / "tls.crt", cert),
        key=write_key(folder / "tls.key", key),
        rogue_ca=write_cert(folder / "rogue-ca.crt", rogue_ca_cert),
        rogue_cert=write_cert(folder / "rogue.crt", rogue_cert),
        rogue_key=write_key(folder / "rogue.key", rogue_key),
    )


def _docs(n: int, start: int = 0, text: str = "") -> list[dict[str, Any]]:
    vectors = random_vectors(n, DIM, seed=start)
    return [
        {"id": f"d{start + i}", "text": {"body": f"document {start + i} apple {text}"}, "dense": {"emb": v}}
        for i, v in enumerate(vectors)
    ]


def _channel(address: str, internal: Internal | None, cert: str = "internal") -> grpc.Channel:
    """A channel to a shard server: plaintext (``internal`` None), or TLS trusting the internal CA
    with the internal client certificate, none (``cert`` "none") or the rogue one ("rogue")."""
    if internal is None:
        return grpc.insecure_channel(address)
    pair = {"internal": (internal.cert, internal.key), "rogue": (internal.rogue_cert, internal.rogue_key)}
    client_cert, client_key = pair.get(cert, (None, None))
    return grpc.secure_channel(address, channel_credentials(internal.ca, client_cert, client_key))


def _shard_call(channel: grpc.Channel, method: str) -> Callable[..., Any]:
    request, response = SHARD_METHODS[method]
    return channel.unary_unary(
        f"/braid.cluster.v1.Shard/{method}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


def _health(port: int, service: str = "", timeout: float = 5.0) -> int:
    """The status a plaintext health client reads on ``127.0.0.1:port`` (a probe's view)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


def _health_or_none(port: int, service: str = "") -> int | None:
    """As _health; None while nothing listens there yet (a process still starting)."""
    try:
        return _health(port, service, timeout=2.0)
    except grpc.RpcError as err:
        if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return None
        raise


def _wait(check: Callable[[], bool], what: str, timeout: float = SETTLE, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


# ---------------------------------------------------------------- 1. mutual TLS on the Shard service


@pytest.fixture(scope="module")
def secure_cluster(tmp_path_factory: pytest.TempPathFactory, internal: Internal) -> Iterator[LocalCluster]:
    """1 NATS node, 2 shard servers and a router, mutual TLS between them; "docs" (2 shards,
    replication factor 1: searches fan out) and "whole" (1 shard on both servers: whole searches)."""
    with LocalCluster(
        tmp_path_factory.mktemp("mtls"),
        shard_servers=2,
        routers=1,
        extra_args=internal.args(server_name="braid-internal"),
    ) as built:
        with BraidClient(built.router_address, timeout=T) as client:
            client.create_collection("docs", schema(dim=DIM), shards=2, replication_factor=1)
            client.create_collection("whole", schema(dim=DIM), shards=1, replication_factor=2)
            assert client.upsert("docs", _docs(40)) == 40
            assert client.upsert("whole", _docs(10)) == 10
        yield built


def test_a_cluster_with_mutual_tls_works_end_to_end(secure_cluster: LocalCluster) -> None:
    with BraidClient(secure_cluster.router_address, timeout=T) as client:
        assert client.upsert("docs", _docs(10, start=40)) == 10
        query = random_vectors(1, DIM, seed=3)[0]
        for name, total in (("docs", 50), ("whole", 10)):
            assert client.count(name) == total
            dense = client.search(name, dense=("emb", query), limit=5)  # grpc.aio channels (SearchDense/Collection)
            hybrid = client.search(name, dense=("emb", query), bm25="apple", limit=5)  # sync channels
            assert len(dense) == len(hybrid) == 5
            got = client.get(name, ["d0", "d7"])
            assert sorted(doc.id for doc in got) == ["d0", "d7"]


def test_a_shard_server_refuses_callers_without_the_internal_certificate(
    secure_cluster: LocalCluster, internal: Internal
) -> None:
    address = secure_cluster.address_of(secure_cluster.shards[0])
    with _channel(address, internal) as channel:  # the internal certificate: answers, with data
        status = _shard_call(channel, "Status")(spb.StatusRequest(), timeout=T)
        assert status.node_id == "shard-0" and status.replicas, status
        ref = status.replicas[0].replica
        count = _shard_call(channel, "Count")(spb.ShardCountRequest(replica=ref), timeout=T)
        assert count.count > 0
    requests = {
        "Status": spb.StatusRequest(),
        "Get": spb.ShardGetRequest(replica=ref, ids=["d0", "d1", "d2"]),
        "Fetch": spb.FetchRequest(replica=ref, ids=["d0"], include_payload=True, text_fields=["body"]),
        "Search": spb.ShardSearchRequest(replica=ref, request=pb.SearchRequest(collection=ref.collection, limit=5)),
        "Count": spb.ShardCountRequest(replica=ref),
    }
    for who, channel in (
        ("plaintext", _channel(address, None)),
        ("TLS without a client certificate", _channel(address, internal, cert="none")),
        ("a client certificate another CA signed", _channel(address, internal, cert="rogue")),
    ):
        with channel:
            for method, request in requests.items():
                with pytest.raises(grpc.RpcError) as info:
                    answer = _shard_call(channel, method)(request, timeout=T)
                    pytest.fail(f"{who}: {method} answered {answer}")
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (who, method, info.value)


def test_a_router_with_the_wrong_certificate_or_server_name_reaches_no_shard_server(
    secure_cluster: LocalCluster, internal: Internal, tmp_path: Path
) -> None:
    """A router whose certificate another CA signed, and one that checks the shard servers under
    a name their certificate does not carry: every read fails UNAVAILABLE naming why, never data."""
    assert secure_cluster.nats is not None
    impostors = {
        "rogue-router": internal.args(cert=internal.rogue_cert, key=internal.rogue_key),
        "misnamed-router": internal.args(server_name="not-braid.example"),
    }
    children = []
    for name, tls in impostors.items():
        args = serve_args("router", secure_cluster.nats.url_list, tmp_path / name)
        command = [*PYTHON, *args, *tls]
        children.append(Child(name, command, ROUTER_READY, env=child_env(), start=False))
    try:
        for child in children:
            child.start()
        for child in children:
            child.wait_ready()
            with BraidClient(child.address, timeout=T) as client:
                for call in (
                    lambda c=client: c.search("docs", dense=("emb", random_vectors(1, DIM)[0]), limit=5),
                    lambda c=client: c.search("whole", bm25="apple", limit=5),
                    lambda c=client: c.get("docs", ["d0"]),
                    lambda c=client: c.count("whole"),
                ):
                    with pytest.raises(grpc.RpcError) as info:
                        answer = call()
                        pytest.fail(f"{child.name} answered {answer}")
                    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, (child.name, info.value)
                    assert "no live replica answered" in (info.value.details() or ""), info.value.details()
    except BaseException:
        for child in children:
            print(f"----- {child.name}:\n{child.tail(40)}")
        raise
    finally:
        for child in children:
            child.stop()


# ---------------------------------------------------------------- 2. refusals at start


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (
            ["--role", "shard", "--nats", "nats://127.0.0.1:4222", "--tls-cert", "c.pem", "--tls-key", "k.pem"],
            "tls_cert",
        ),
        (["--role", "shard", "--nats", "nats://127.0.0.1:4222", "--api-keys", "keys.json"], "api_keys"),
        (["--role", "standalone", "--cluster-tls-cert", "c.pem", "--cluster-tls-key", "k.pem"], "cluster_tls_cert"),
        (["--role", "standalone", "--cluster-tls-server-name", "braid-internal"], "cluster_tls_server_name"),
        (["--role", "shard", "--nats", "nats://127.0.0.1:4222", "--cluster-tls-cert", "c.pem"], "cluster_tls"),
    ],
)
def test_a_security_setting_the_role_cannot_honour_stops_braid_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], named: str
) -> None:
    assert main(["serve", "--data-dir", str(tmp_path), "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("braid serve: ") and named in err, err


@pytest.mark.parametrize("role", ["shard", "router"])
def test_an_unusable_internal_certificate_stops_braid_serve_naming_the_file(
    tmp_path: Path, internal: Internal, role: str
) -> None:
    """A real process (it gets as far as building its server, which sets up logging): exit 2."""
    missing = tmp_path / "nowhere.crt"
    tls = ["--cluster-tls-cert", str(missing), "--cluster-tls-key", str(internal.key)]
    tls += ["--cluster-tls-ca", str(internal.ca)]
    # No NATS listens there: the file is refused before anything connects.
    argv = ["serve", "--role", role, "--nats", "nats://127.0.0.1:1", "--data-dir", str(tmp_path / "d"), "--port", "0"]
    done = subprocess.run([*PYTHON, *argv, *tls], env=child_env(), capture_output=True, text=True, timeout=SETTLE)
    assert done.returncode == 2, done
    assert str(missing) in done.stderr, done.stderr


# ---------------------------------------------------------------- 3. the health port


def test_the_health_port_serves_health_alone_in_plaintext_beside_a_tls_port(tmp_path: Path, internal: Internal) -> None:
    """A standalone server with TLS on its main port: a probe (no certificate) reads its health on
    the health port, SERVING for "" and "braid.writes", NOT_SERVING while it drains at shutdown;
    nothing but health answers there."""
    health_port = free_ports(1)[0]
    server, running = start_in_process(
        tmp_path / "data", tls_cert=internal.cert, tls_key=internal.key, health_port=health_port
    )
    running.client.close()
    try:
        assert _health(health_port) == SERVING
        assert _health(health_port, "braid.writes") == SERVING
        assert _health(health_port, "braid.v1.Braid") == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_stub = channel.unary_unary(
                    "/braid.v1.Braid/ListCollections",
                    request_serializer=pb.ListCollectionsRequest.SerializeToString,
                    response_deserializer=pb.ListCollectionsResponse.FromString,
                )
                pb_stub(pb.ListCollectionsRequest(), timeout=T)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value
        with pytest.raises(grpc.RpcError):  # the main port is TLS: a plaintext probe there cannot read health
            _health(server.port)
        with BraidClient(f"127.0.0.1:{server.port}", timeout=T, tls_ca=internal.ca) as client:
            client.create_collection("c", schema(dim=DIM))

            # A stream held open keeps the server draining for the grace period: the probe reads NOT_SERVING.
            release = threading.Event()

            def batches() -> Iterator[pb.UpsertRequest]:
                first = pb.Document(id="first", text={"body": "one"})
                first.dense["emb"].CopyFrom(dense_vector(random_vectors(1, DIM)[0]))
                yield pb.UpsertRequest(collection="c", documents=[first])
                release.wait(2 * SETTLE)

            stream = client.stub.BulkUpsert.future(batches(), timeout=2 * SETTLE)
            _wait(lambda: client.count("c") == 1, "the stream's first batch")  # it is open now
            stopper = threading.Thread(target=server.stop, kwargs={"grace": 3.0})
            stopper.start()
            _wait(lambda: _health_or_none(health_port) == NOT_SERVING, "NOT_SERVING while draining", timeout=10)
            release.set()
            stream.exception(T)  # ended: by the client, or by the server after the grace period
            stopper.join(T)
            assert not stopper.is_alive()
        assert _health_or_none(health_port) is None  # stopped with the server
    finally:
        server.stop(grace=0)


def test_a_restarted_shard_server_is_ready_only_once_its_replicas_caught_up(
    local_cluster: Callable[..., LocalCluster],  # noqa: F811
    internal: Internal,
) -> None:
    """Writes, kill -9 (no checkpoint: the restart replays the whole log), restart: the health port
    (plaintext, beside the mutual-TLS Shard port) reads NOT_SERVING while the replicas replay,
    and when it first reads SERVING the replicas hold every acknowledged write."""
    DOCS = 8000  # (enough that the replay takes a good part of a second, on any machine)
    health_port = free_ports(1)[0]
    cluster = local_cluster(
        shard_servers=1,
        routers=1,
        extra_args=internal.args(),
        shard_args=["--health-port", str(health_port)],
        env={"BRAID_CHECKPOINT_LOG_BYTES": str(1 << 40), "BRAID_CHECKPOINT_INTERVAL_S": "100000"},
    )
    shard = cluster.shards[0]
    try:
        with BraidClient(cluster.router_address, timeout=T) as client:
            client.create_collection("c", schema(dim=DIM), shards=2)
            for start in range(0, DOCS, 500):
                assert client.upsert("c", _docs(500, start, text="lorem ipsum dolor " * 30)) == 500
        assert _health(health_port) == SERVING
        assert _health(health_port, "braid.cluster.v1.Shard") == SERVING
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:  # health alone on that port
            with pytest.raises(grpc.RpcError) as info:
                _shard_call(channel, "Status")(spb.StatusRequest(), timeout=T)
            assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED, info.value
        _, ends = log_ends(cluster, "c", 2, timeout=T)

        shard.kill()
        restarted = time.monotonic()
        shard.start()
        seen: list[int] = []
        live: list[int | None] = []

        def ready() -> bool:
            seen.append(_health_or_none(health_port) or -1)
            if seen[-1] == NOT_SERVING and len(live) < 3:  # liveness holds while readiness does not
                live.append(_health_or_none(health_port, "braid.live"))
            return seen[-1] == SERVING

        _wait(ready, "SERVING", every=0.02)
        took = time.monotonic() - restarted
        print(
            f"\n[readiness] SERVING {took:.1f} s after the restart, {seen.count(NOT_SERVING)} NOT_SERVING reads before"
        )
        # Ready: every replica has applied its whole log and answers for all of it, right now.
        with _channel(f"127.0.0.1:{shard.wait_ready()}", internal) as channel:
            status = _shard_call(channel, "Status")(spb.StatusRequest(), timeout=T)
            assert len(status.replicas) == 2, status
            total = 0
            for replica in status.replicas:
                assert replica.caught_up and replica.applied_seq >= ends[replica.replica.shard], replica
                total += _shard_call(channel, "Count")(spb.ShardCountRequest(replica=replica.replica), timeout=T).count
            assert total == DOCS
        assert NOT_SERVING in seen, f"the replay was over before the health port answered: {seen[:20]}"
        assert live and all(status == SERVING for status in live), live
        with BraidClient(cluster.router_address, timeout=T) as client:
            _wait(lambda: client.count("c") == DOCS, "the router to count every document")
    except BaseException:
        print_logs(cluster)
        raise


def test_a_router_is_ready_only_once_it_has_read_the_metadata(tmp_path: Path) -> None:
    """NATS down: the router's health port reads NOT_SERVING (its port answers, the metadata is
    unread); NATS up: SERVING once it has read the buckets, and it answers."""
    nats = NatsCluster(tmp_path / "nats", nodes=1)
    health_port = free_ports(1)[0]
    router = None
    try:
        nats.nodes[0].stop()
        args = [*serve_args("router", nats.url_list, tmp_path / "router"), "--health-port", str(health_port)]
        router = Child("router", [*PYTHON, *args], ROUTER_READY, env=child_env(), start=False)
        router.start()
        _wait(lambda: _health_or_none(health_port) is not None, "the router's health port")
        for _ in range(5):  # stays so while NATS is away; alive all the same (no restart by liveness)
            assert _health(health_port) == NOT_SERVING
            assert _health(health_port, "braid.live") == SERVING
            time.sleep(0.2)
        nats.nodes[0].start()
        _wait(lambda: _health(health_port) == SERVING, "SERVING once NATS is back")
        assert _health(health_port, "braid.writes") == SERVING
        with BraidClient(f"127.0.0.1:{router.wait_ready()}", timeout=T) as client:
            assert client.list_collections() == []
    except BaseException:
        if router is not None:
            print(f"----- router:\n{router.tail(40)}")
        raise
    finally:
        if router is not None:
            router.stop()
        nats.stop()
