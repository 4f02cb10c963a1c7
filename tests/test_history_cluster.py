"""A short seeded history run against a local cluster (tests/history/cluster.py): 3 NATS nodes,
2 shard servers, 2 routers, 2 shards with replication factor 2, writers in both ack modes and
STRONG readers while a handful of faults (kill -9, SIGSTOP/SIGCONT of shard servers, routers and
NATS nodes, the collection stream's leader most often) hit. Then: no acknowledged write lost on
any replica or router, no stale STRONG read, no phantom, counts as the model allows.

The long runs are ``python bench/history.py --mode cluster --faults 50 --seed N``.
"""

from __future__ import annotations

import pytest

from tests.history.cluster import run_cluster

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# Draws kill -9 of router-1, SIGSTOP of shard-1, kill -9 of the NATS node leading the collection's
# stream, SIGSTOP of the (new) leader, kill -9 of shard-1 (the leader is the target when NATS answers
# who leads it, as it does once the cluster is up).
SEED = 20261457


def test_history_cluster_under_kills_and_pauses(tmp_path) -> None:
    report = run_cluster(tmp_path / "cluster", SEED, faults=5, keys=30, min_run_s=25.0)
    print("\n" + report.text())
    report.assert_held(faults=5)
