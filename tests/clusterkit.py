"""Fixtures for cluster mode: real ``nats-server`` processes and whole local clusters in child processes.

Import them where needed (they are not in conftest.py, so other tests never pay for them)::

    from tests.clusterkit import nats1, nats3, local_cluster  # noqa: F401

* ``nats1``: a 1-node NATS (JetStream) in ``tmp_path``, ready; stopped at teardown.
* ``nats3``: a 3-node JetStream cluster with a meta leader, ready for ``num_replicas=3``.
* ``secure_nats1``: a 1-node NATS with TLS (client certificates required) and one nkey user
  (:class:`SecureNats`: its files, and ``client()``: what a Braid client presents to it);
  ``secure_nats(directory, nodes)`` makes one of 1 or 3 nodes (routes over TLS too).
* ``local_cluster(shard_servers=2, routers=1, nats_nodes=1, **options)``: a factory that starts a
  :class:`LocalCluster` (NATS, shard servers, routers) and returns it once every child is serving;
  every cluster it made is stopped at teardown.
* ``print_logs(cluster)``: the last lines of every child's log (for a test that failed).
* ``cluster_link(cluster)``: a context manager yielding a connected ``NatsLink`` to the cluster's
  NATS (with its credentials), for the object store (``SnapshotObjects(link, 1)``) and streams.
* ``damage_object(link, name)``: overwrite a snapshot object with a copy whose middle byte is flipped.
* ``damage_object_file(link, name, rng=None)``: the same, flipping a byte of one of its files (the
  middle of the largest, or a random one): in a small snapshot the middle byte of the object may be
  a tar member's zero padding, which no check covers (nor needs to).
* ``log_ends(cluster, collection, shards, timeout)``: a collection's uid and the last stream
  sequence of each shard's subject, read from NATS itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import random
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import pytest

from braid.service.cluster.local import LocalCluster
from braid.service.cluster.nats_auth import NatsSecurity, write_user_seed
from braid.service.cluster.nats_link import NatsLink
from braid.service.cluster.natsproc import NatsCluster, NatsServerSecurity, NatsUser
from braid.service.cluster.snapshot_objects import BUCKET
from tests.certs import make_ca, make_leaf, write_cert, write_key


@pytest.fixture
def nats1(tmp_path: Path) -> Iterator[NatsCluster]:
    """A single ``nats-server`` with JetStream, ready."""
    cluster = NatsCluster(tmp_path / "nats1", nodes=1)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def nats3(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three ``nats-server`` nodes in one JetStream cluster, meta leader elected."""
    cluster = NatsCluster(tmp_path / "nats3", nodes=3)
    try:
        yield cluster
    finally:
        cluster.stop()


@dataclass
class SecureNats:
    """A NATS that takes only TLS clients with a certificate its CA signed, presenting the nkey
    user ``seed`` (public key ``user``). ``tls_cert`` serves the nodes and is a client certificate too."""

    cluster: NatsCluster
    security: NatsServerSecurity
    ca: Path
    tls_cert: Path
    tls_key: Path
    seed: Path
    user: str

    def client(self, seed: Path | None = None, cert: bool = True) -> NatsSecurity:
        """What a client presents: ``seed`` (default the configured user's) over TLS, with the
        client certificate unless ``cert`` is False."""
        chosen = self.seed if seed is None else seed
        if cert:
            return NatsSecurity.of(chosen, self.ca, self.tls_cert, self.tls_key)
        return NatsSecurity.of(chosen, self.ca)

    def serve_args(self) -> list[str]:
        """The ``braid serve`` flags of a client with every credential."""
        flags = ["--nats-creds", self.seed, "--nats-tls-ca", self.ca]
        return [str(flag) for flag in (*flags, "--nats-tls-cert", self.tls_cert, "--nats-tls-key", self.tls_key)]


def secure_material(directory: Path) -> tuple[NatsServerSecurity, Path]:
    """A throwaway CA, a node certificate (serverAuth and clientAuth, SAN 127.0.0.1) and a user nkey
    seed in ``directory``: the nodes' security (TLS with client certificates, that one user) and the seed."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = make_ca("braid-nats-test-ca")
    key, cert = make_leaf(ca_key, ca, "braid-nats", server=True, client=True)
    ca_path = write_cert(directory / "ca.crt", ca)
    cert_path = write_cert(directory / "tls.crt", cert)
    key_path = write_key(directory / "tls.key", key)
    seed = directory / "braid.nk"
    user = write_user_seed(seed)
    security = NatsServerSecurity(cert_path, key_path, ca_path, verify=True, users=(NatsUser(user),))
    return security, seed


def secure_nats(directory: Path, nodes: int = 1) -> SecureNats:
    """A started NATS of ``nodes`` nodes secured by :func:`secure_material` (stop it yourself)."""
    security, seed = secure_material(directory / "secrets")
    cluster = NatsCluster(directory / "nats", nodes=nodes, security=security)
    assert security.tls_ca and security.tls_cert and security.tls_key
    user = security.users[0].nkey
    return SecureNats(cluster, security, security.tls_ca, security.tls_cert, security.tls_key, seed, user)


@pytest.fixture
def secure_nats1(tmp_path: Path) -> Iterator[SecureNats]:
    """A single ``nats-server`` with TLS (client certificates required) and one nkey user, ready."""
    secured = secure_nats(tmp_path / "secure-nats1")
    try:
        yield secured
    finally:
        secured.cluster.stop()


@pytest.fixture
def local_cluster(tmp_path: Path) -> Iterator[Callable[..., LocalCluster]]:
    """A factory: ``local_cluster(shard_servers=2, routers=1, nats_nodes=1, **options)`` -> a started LocalCluster."""
    started: list[LocalCluster] = []
    numbers = itertools.count()

    def factory(shard_servers: int = 2, routers: int = 1, nats_nodes: int = 1, **options: Any) -> LocalCluster:
        directory = options.pop("directory", None) or tmp_path / f"cluster-{next(numbers)}"
        cluster = LocalCluster(
            directory, shard_servers=shard_servers, routers=routers, nats_nodes=nats_nodes, **options
        )
        started.append(cluster)
        return cluster

    try:
        yield factory
    finally:
        for cluster in reversed(started):
            cluster.stop()


def log_ends(cluster: LocalCluster, collection: str, shards: int, timeout: float) -> tuple[str, list[int]]:
    """The collection's uid (from the ``braid-collections`` bucket) and the sequence of the last record
    of each shard's subject in its stream, read from NATS itself (retried while NATS settles, up to
    ``timeout``)."""
    assert cluster.nats is not None
    urls = [node.url for node in cluster.nats.nodes if node.alive]
    options = client_security(cluster).connect_options()

    async def main() -> tuple[str, list[int]]:
        async def quiet(err: Exception) -> None:
            pass

        nc = await nats.connect(servers=urls, connect_timeout=2, max_reconnect_attempts=3, error_cb=quiet, **options)
        try:
            js = nc.jetstream()
            entry = await (await js.key_value("braid-collections")).get(collection)
            uid = json.loads(entry.value)["uid"]
            ends = []
            for n in range(shards):
                try:
                    ends.append(int((await js.get_last_msg(f"BRAID_{uid}", f"braid.{uid}.{n}")).seq))
                except nats.js.errors.NotFoundError:
                    ends.append(0)
            return uid, ends
        finally:
            await nc.close()

    deadline = time.monotonic() + timeout
    while True:
        try:
            return asyncio.run(asyncio.wait_for(main(), 10))
        except Exception as err:  # a NATS node just restarted, a leader being elected: bounded retries
            if time.monotonic() > deadline:
                raise AssertionError(f"cannot read the collection's log ends from NATS: {err!r}") from err
            time.sleep(0.5)


def client_security(cluster: LocalCluster) -> NatsSecurity:
    """What a client of the cluster's NATS presents (its credentials and TLS, if any)."""
    security, creds = cluster.nats_security, cluster.nats_creds
    if security is not None and security.tls_ca is not None and security.verify:
        return NatsSecurity.of(creds, security.tls_ca, security.tls_cert, security.tls_key)
    if security is not None or creds is not None:
        return NatsSecurity.of(creds, security.tls_ca if security else None)
    return NatsSecurity()


@contextlib.contextmanager
def cluster_link(cluster: LocalCluster, timeout: float = 15.0) -> Iterator[NatsLink]:
    """A connected NatsLink to the cluster's live NATS nodes, closed on exit."""
    assert cluster.nats is not None
    urls = [node.url for node in cluster.nats.nodes if node.alive]
    link = NatsLink(urls, "braid-test", client_security(cluster))
    try:
        assert link.wait_connected(timeout), f"cannot connect to NATS at {urls}: {link.last_error}"
        yield link
    finally:
        link.close()


def damage_object(link: NatsLink, name: str, bucket: str = BUCKET) -> None:
    """Overwrite object ``name`` through the object store API with a copy whose middle byte is
    flipped (the store's own digest then matches the damaged bytes: only Braid's checks can tell)."""

    async def damage() -> None:
        store = await link.js.object_store(bucket)
        data = bytearray((await store.get(name)).data)
        data[len(data) // 2] ^= 0xFF
        await store.put(name, bytes(data))

    link.call(damage(), 60.0)


def damage_object_file(link: NatsLink, name: str, rng: random.Random | None = None, bucket: str = BUCKET) -> str:
    """Overwrite snapshot object ``name`` (a tar) with a copy in which one byte of one file is
    flipped: the middle byte of the largest file, or with ``rng`` a random byte of a random file
    (the manifest included); that file's name in the tar. Unlike :func:`damage_object`, the byte
    is always one of a file Braid checksums, never a header's or the padding after a member."""

    async def damage() -> str:
        store = await link.js.object_store(bucket)
        data = bytearray((await store.get(name)).data)
        with tarfile.open(fileobj=io.BytesIO(bytes(data))) as tar:
            files = [m for m in tar.getmembers() if m.isfile() and m.size > 0]
        if rng is None:
            member = max(files, key=lambda m: m.size)
            offset = member.size // 2
        else:
            member = rng.choice(files)
            offset = rng.randrange(member.size)
        data[member.offset_data + offset] ^= 0xFF
        await store.put(name, bytes(data))
        return member.name

    return link.call(damage(), 60.0)


def print_logs(cluster: LocalCluster, lines: int = 60) -> None:
    """The last ``lines`` of every child's log, for a failed test's captured output."""
    for child in cluster.children:
        print(f"----- {child.name}:\n{child.tail(lines)}")
