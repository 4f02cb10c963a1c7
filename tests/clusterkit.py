"""Fixtures for cluster mode: real ``nats-server`` processes and whole local clusters in child processes.

Import them where needed (they are not in conftest.py, so other tests never pay for them)::

    from tests.clusterkit import nats1, nats3, local_cluster  # noqa: F401

* ``nats1``: a 1-node NATS (JetStream) in ``tmp_path``, ready; stopped at teardown.
* ``nats3``: a 3-node JetStream cluster with a meta leader, ready for ``num_replicas=3``.
* ``local_cluster(shard_servers=2, routers=1, nats_nodes=1, **options)``: a factory that starts a
  :class:`LocalCluster` (NATS, shard servers, routers) and returns it once every child is serving;
  every cluster it made is stopped at teardown.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from braid.service.cluster.local import LocalCluster
from braid.service.cluster.natsproc import NatsCluster


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
