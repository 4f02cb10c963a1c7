"""NATS secured for Braid: TLS with client certificates and nkey users (issue 22, item 3).

Real ``nats-server`` processes (tests/clusterkit.py ``secure_nats1``: TLS on the client port with
client certificates required, one nkey user), real nats-py clients and real ``braid serve``
children. What a user relies on: a client without the credentials, without TLS or with a seed
NATS does not list cannot connect, so it cannot read Braid's streams or buckets; Braid itself,
given --nats-creds and --nats-tls-*, works end to end; a router without credentials says why
and stays NOT_SERVING; a bad credentials file stops ``braid serve`` at start (exit 2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import nats
import nats.errors
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from braid.service.client import BraidClient
from braid.service.cluster.local import Child, child_env
from braid.service.cluster.nats_auth import NatsSecurity, read_creds, write_user_seed
from braid.service.cluster.nats_link import NatsLink
from braid.service.cluster.natsproc import HOST, NatsCluster, NatsServerSecurity, NatsUser, free_ports
from tests.clusterkit import SecureNats, local_cluster, log_ends, secure_material, secure_nats1  # noqa: F401

from .conftest import schema

pytestmark = pytest.mark.timeout(120)

BRAID = [sys.executable, "-m", "braid.service.cli"]
T = 30.0  # a call's deadline: a bound for a loaded 2-core machine, not a speed
SETTLE = 60.0  # how long a child may take to log what it should


async def _connect(secured: SecureNats, **options: Any) -> Any:
    async def quiet(err: Exception) -> None:
        pass

    return await nats.connect(
        servers=secured.cluster.urls,
        connect_timeout=5,
        allow_reconnect=False,
        max_reconnect_attempts=0,
        error_cb=quiet,
        **options,
    )


async def _write_braid_state(secured: SecureNats) -> None:
    """What Braid keeps in NATS: a record in a log stream and a key in the collections bucket."""
    nc = await _connect(secured, **secured.client().connect_options())
    try:
        js = nc.jetstream()
        await js.add_stream(name="BRAID_u1", subjects=["braid.u1.>"])
        await js.publish("braid.u1.0", b"secret record", stream="BRAID_u1")
        kv = await js.create_key_value(bucket="braid-collections", history=1)
        await kv.put("docs", json.dumps({"uid": "u1"}).encode())
    finally:
        await nc.close()


async def _read_braid_state(secured: SecureNats, **options: Any) -> bytes:
    nc = await _connect(secured, **options)
    try:
        js = nc.jetstream()
        entry = await (await js.key_value("braid-collections")).get("docs")
        record = await js.get_last_msg("BRAID_u1", "braid.u1.0")
        return bytes(entry.value or b"") + bytes(record.data or b"")
    finally:
        await nc.close()


def test_secured_nats_refuses_clients_without_credentials_or_tls(
    secure_nats1: SecureNats,  # noqa: F811
    tmp_path: Path,
) -> None:
    secured = secure_nats1
    asyncio.run(_write_braid_state(secured))
    good = secured.client().connect_options()
    assert asyncio.run(_read_braid_state(secured, **good)) == b'{"uid": "u1"}secret record'

    # TLS and a client certificate, but no credentials: NATS says authorization violation
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(_read_braid_state(secured, tls=good["tls"]))
    # a well-formed user seed NATS does not list
    stranger = tmp_path / "stranger.nk"
    write_user_seed(stranger)
    with pytest.raises(nats.errors.Error, match="Authorization Violation"):
        asyncio.run(_read_braid_state(secured, **secured.client(seed=stranger).connect_options()))
    # the right seed, TLS, but no client certificate: the TLS handshake is refused
    with pytest.raises((OSError, nats.errors.Error)):
        asyncio.run(_read_braid_state(secured, **secured.client(cert=False).connect_options()))
    # the right seed without trusting the CA: the server's certificate is not accepted
    with pytest.raises(OSError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(_read_braid_state(secured, nkeys_seed=str(secured.seed)))

    # plaintext, by hand: the server wants a TLS handshake and closes a plaintext CONNECT unanswered
    node = secured.cluster.nodes[0]
    with socket.create_connection((HOST, node.port), timeout=10) as sock:
        reader = sock.makefile("rb")
        info = json.loads(reader.readline().split(b" ", 1)[1])
        assert info["tls_required"] is True and info["auth_required"] is True
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false}\r\nSUB $KV.braid-collections.> 1\r\nPING\r\n')
        answer = reader.read()  # until the server closes (within the socket's timeout)
    assert b"PONG" not in answer and b"MSG" not in answer and b"+OK" not in answer, answer


def test_braid_cluster_nkey_writes_a_seed_nats_accepts(tmp_path: Path) -> None:
    seed = tmp_path / "braid.nk"
    made = subprocess.run(
        [*BRAID, "cluster", "nkey", str(seed)], capture_output=True, text=True, env=child_env(), timeout=60
    )
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    assert public.startswith("U") and len(public) == 56
    assert stat.S_IMODE(os.stat(seed).st_mode) == 0o600
    assert read_creds(seed) == ("seed", public)
    again = subprocess.run(
        [*BRAID, "cluster", "nkey", str(seed)], capture_output=True, text=True, env=child_env(), timeout=60
    )
    assert again.returncode == 2 and "exists" in again.stderr
    assert read_creds(seed) == ("seed", public)  # not overwritten

    # a nats-server whose only user is that public key takes a client signing with the seed
    plain_auth = NatsServerSecurity(users=(NatsUser(public),))
    with NatsCluster(tmp_path / "nats", nodes=1, security=plain_auth) as cluster:

        async def round_trip(options: dict[str, Any]) -> bytes:
            nc = await nats.connect(servers=cluster.urls, connect_timeout=5, allow_reconnect=False, **options)
            try:
                kv = await nc.jetstream().create_key_value(bucket="b", history=1)
                await kv.put("k", b"signed")
                return bytes((await kv.get("k")).value or b"")
            finally:
                await nc.close()

        assert asyncio.run(round_trip(NatsSecurity.of(seed).connect_options())) == b"signed"
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            asyncio.run(round_trip({}))


def _health(port: int, timeout: float = 5.0) -> int:
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        request = health_pb2.HealthCheckRequest(service="")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=timeout).status


def _router(name: str, secured: SecureNats, tmp_path: Path, flags: list[str]) -> tuple[Child, int]:
    port = free_ports(1)[0]
    args = ["serve", "--role", "router", "--nats", secured.cluster.url_list, "--data-dir", str(tmp_path / name)]
    command = [*BRAID, *args, "--host", HOST, "--port", str(port), *flags]
    # ready once it listens (the ready line of a router comes only after it read NATS)
    child = Child(name, command, r"braid listening on [\d.]+:(\d+)", env=child_env(), ready_timeout=SETTLE)
    return child, port


def _wait_output(child: Child, text: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(child.output):
            if text in line:
                return line
        assert child.alive, f"{child.name} exited:\n{child.tail()}"
        time.sleep(0.1)
    raise AssertionError(f"{child.name} never logged {text!r}:\n{child.tail()}")


def test_router_without_credentials_says_why_and_stays_not_serving(
    secure_nats1: SecureNats,  # noqa: F811
    tmp_path: Path,
) -> None:
    secured = secure_nats1
    tls_only = ["--nats-tls-ca", str(secured.ca), "--nats-tls-cert", str(secured.tls_cert)]
    tls_only += ["--nats-tls-key", str(secured.tls_key)]
    no_creds, no_creds_port = _router("router-no-creds", secured, tmp_path, tls_only)
    no_tls, no_tls_port = _router("router-no-tls", secured, tmp_path, ["--nats-creds", str(secured.seed)])
    try:
        line = _wait_output(no_creds, "NATS refused the credentials", SETTLE)
        assert "Authorization Violation" in line and "BRAID_NATS_CREDS" in line and " ERROR " in line
        line = _wait_output(no_tls, "TLS to NATS failed", SETTLE)
        assert "BRAID_NATS_TLS" in line
        for child, port in ((no_creds, no_creds_port), (no_tls, no_tls_port)):
            assert _health(port) == health_pb2.HealthCheckResponse.NOT_SERVING, child.tail()
            assert not any("serving braid.v1.Braid" in out for out in child.output), child.tail()
        # it keeps trying without filling the log: the same failure is logged again only after a while
        assert sum("NATS refused the credentials" in out for out in no_creds.output) <= 2, no_creds.tail()
    finally:
        statuses = [no_creds.stop(), no_tls.stop()]
    assert statuses == [0, 0], (no_creds.tail(), no_tls.tail())


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "cannot read"),
        ("not a seed at all\n", "neither a .creds file"),
        ("SAAGNHYMJEJFXUNQQ5KRYW2IRWPEQ5ZB5OM7JOCPN4ZQZCGSNQEMM5GSWA\n", "another kind"),
        ("SUANOTAVALIDSEEDXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\n", "malformed"),
        ("-----BEGIN NATS USER JWT-----\neyJ0.eyJ1.c2ln\n------END NATS USER JWT------\n", "no user nkey seed"),
    ],
)
def test_bad_credentials_file_stops_serve_at_start(tmp_path: Path, content: str | None, why: str) -> None:
    creds = tmp_path / "braid.creds"
    if content is not None:
        creds.write_text(content)
    # nothing listens on the NATS URL: a serve that did not refuse at once would retry, not exit
    url = f"nats://{HOST}:{free_ports(1)[0]}"
    more = ["--port", "0", "--nats-creds", str(creds)]
    # the router for each file; the shard server (the same check) for one
    for role in ("router", "shard") if content is None else ("router",):
        run = subprocess.run(
            [*BRAID, "serve", "--role", role, "--nats", url, "--data-dir", str(tmp_path / role), *more],
            capture_output=True,
            text=True,
            env=child_env(),
            timeout=60,
        )
        assert run.returncode == 2, (role, run.stdout, run.stderr)
        assert "BRAID_NATS_CREDS" in run.stderr and why in run.stderr, run.stderr


def test_creds_file_kinds(tmp_path: Path) -> None:
    seed = tmp_path / "braid.nk"
    public = write_user_seed(seed)
    creds = tmp_path / "braid.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\neyJhbGciOiJlZDI1NTE5In0.eyJzdWIiOiJVIn0.c2ln\n------END NATS USER JWT------\n\n"
        "************************* IMPORTANT *************************\n"
        f"-----BEGIN USER NKEY SEED-----\n{seed.read_text().strip()}\n------END USER NKEY SEED------\n"
    )
    assert read_creds(creds) == ("creds", public)
    assert NatsSecurity.of(creds).connect_options() == {"user_credentials": str(creds)}
    assert NatsSecurity.of(seed).connect_options() == {"nkeys_seed": str(seed)}


def test_cluster_with_nats_credentials_and_tls_end_to_end(local_cluster, tmp_path: Path) -> None:  # noqa: F811
    security, seed = secure_material(tmp_path / "secrets")
    cluster = local_cluster(shard_servers=1, routers=1, nats_security=security, nats_creds=seed)
    assert "--nats-creds" in cluster.routers[0].command and "--nats-tls-cert" in cluster.shards[0].command
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((20, 8)).astype(np.float32)
    with BraidClient(cluster.router_address, timeout=T) as client:
        client.create_collection("docs", schema(dim=8, text=True, sparse=False), shards=2)
        docs = [{"id": f"d{i}", "dense": {"emb": vectors[i]}, "text": {"title": f"word{i} common"}} for i in range(20)]
        assert client.upsert("docs", docs) == 20
        hits = client.search("docs", dense=("emb", vectors[3]), limit=3)
        assert hits[0].id == "d3"
        hits = client.search("docs", bm25="word11", limit=3)
        assert [hit.id for hit in hits][:1] == ["d11"]
    # the log is in the secured NATS (read with the credentials), written through it by Braid
    _, ends = log_ends(cluster, "docs", 2, timeout=T)
    assert sum(1 for end in ends if end > 0) >= 1


def test_braid_cluster_up_with_a_secured_three_node_nats(tmp_path: Path) -> None:
    """`braid cluster up` with the NATS security flags: 3 nodes whose routes run over TLS too, the
    seed's public key the only user, and a router and shard server that use them."""
    security, seed = secure_material(tmp_path / "secrets")
    assert security.tls_cert and security.tls_key and security.tls_ca
    flags = ["--nats-tls-cert", security.tls_cert, "--nats-tls-key", security.tls_key, "--nats-tls-ca"]
    flags += [security.tls_ca, "--nats-verify", "--nats-creds", seed]
    command = [*BRAID, "cluster", "up", "--data-dir", str(tmp_path / "c"), "--shard-servers", "1", "--nats-nodes", "3"]
    proc = subprocess.Popen(
        [*command, *map(str, flags)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env()
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        for line in proc.stdout:  # bounded by the test's timeout; cluster up exits 2 if it cannot start
            lines.append(line)
            if "stops everything" in line:
                break
        text = "".join(lines)
        found = re.search(r"braid cluster: router on (127\.0\.0\.1:\d+)", text)
        assert found, text
        conf = (tmp_path / "c" / "nats" / "n1" / "nats.conf").read_text()
        assert security.users[0].nkey in conf and conf.count("verify: true") == 2, conf
        with BraidClient(found.group(1), timeout=T) as client:
            client.create_collection("docs", schema(dim=8, text=True, sparse=False), shards=1)
            vector = np.ones(8, dtype=np.float32)
            assert client.upsert("docs", [{"id": "a", "dense": {"emb": vector}, "text": {"title": "hello"}}]) == 1
            assert [hit.id for hit in client.search("docs", bm25="hello", limit=1)] == ["a"]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, text + out
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.communicate(timeout=60)


def test_nats_tls_server_name_is_what_the_certificate_is_checked_against(
    secure_nats1: SecureNats,  # noqa: F811
) -> None:
    """nats_tls_server_name (BRAID_NATS_TLS_SERVER_NAME): a certificate naming the service, not each
    URL's host (the test certificate names braid.test besides 127.0.0.1)."""
    secured = secure_nats1
    files = (secured.seed, secured.ca, secured.tls_cert, secured.tls_key)
    wrong = NatsLink(secured.cluster.urls, "test-wrong-name", NatsSecurity.of(*files, tls_server_name="other.test"))
    right = NatsLink(secured.cluster.urls, "test-right-name", NatsSecurity.of(*files, tls_server_name="braid.test"))
    try:
        assert right.wait_connected(SETTLE)
        # a link that connected works: a bucket made and read back
        right.ensure_bucket("names", replicas=1)
        right.kv_put("names", "k", b"v")
        assert right.kv_get("names", "k") == (b"v", 1)
        deadline = time.monotonic() + SETTLE
        while not wrong.last_error and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not wrong.connected and "TLS to NATS failed" in wrong.last_error, wrong.last_error
        assert "other.test" in wrong.last_error or "mismatch" in wrong.last_error.lower(), wrong.last_error
    finally:
        wrong.close()
        right.close()


def test_a_link_nats_refused_connects_once_nats_lists_its_user(tmp_path: Path) -> None:
    """The rollout case: Braid's pods start before NATS's new configuration lists their user. The
    link says NATS refused it, keeps trying, and connects once NATS (restarted) lists the user."""
    security, seed = secure_material(tmp_path / "secrets")
    other = tmp_path / "other.nk"
    without = dataclasses.replace(security, users=(NatsUser(write_user_seed(other)),))
    cluster = NatsCluster(tmp_path / "nats", nodes=1, security=without)
    files = (seed, security.tls_ca, security.tls_cert, security.tls_key)
    link = NatsLink(cluster.urls, "test-rollout", NatsSecurity.of(*files))
    try:
        deadline = time.monotonic() + SETTLE
        while "NATS refused the credentials" not in link.last_error and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "NATS refused the credentials" in link.last_error and not link.connected, link.last_error
        node = cluster.nodes[0]
        node.security = security  # the new configuration, on the same ports and store
        node.restart()
        assert link.wait_connected(SETTLE), link.last_error
        link.ensure_bucket("rollout", replicas=1)
        link.kv_put("rollout", "k", b"v")
        assert link.kv_get("rollout", "k") == (b"v", 1)
    finally:
        link.close()
        cluster.stop()
