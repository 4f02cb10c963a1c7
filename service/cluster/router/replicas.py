"""Calls to the replicas of a collection's shards, with failover: what every part of a
``RemoteCollection`` stands on (its metadata, validation, replica references).

One replica of every shard, chosen round robin among the live ones, answers over
braid.cluster.v1.Shard; a failed or slow replica is retried on the next inside the call's
deadline (each try gets a share of the time left), and replicas not heard from lately are
tried last, at their last address, before a read fails (``Tries``). A retryable failure
(service/errors.py ``RETRYABLE_CODES``) marks the node suspect; a refusal of the request
itself is raised as the index error it was: every replica would say so.

Consistency (``_min_seqs``): DEFAULT waits for the writes this router acknowledged, STRONG
for the last record of each shard's subject at the start of the read, EVENTUAL for nothing
(but a replica still catching up never answers).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np

from braid.cluster.v1 import shard_pb2 as spb
from braid.cluster.v1 import shard_pb2_grpc
from braid.index import analyzers
from braid.index.errors import BraidError, Unavailable
from braid.index.gather import Ranked
from braid.index.payload import PayloadStore
from braid.index.query import SearchPlan
from braid.index.schema import Schema
from braid.index.validate import ChecksDense, check_plan
from braid.v1 import braid_pb2 as pb

from ...admission import call_deadline
from ...errors import RETRYABLE_CODES, STATUS_OF
from ..meta import CollectionMeta

if TYPE_CHECKING:
    from .catalog import RemoteCatalog

DEFAULT_TIMEOUT_S = 30.0  # a call without a deadline still ends
_ERROR_OF = {code: cls for cls, code in reversed(list(STATUS_OF.items())) if issubclass(cls, BraidError)}


def default_deadline() -> float:
    """The call's deadline; a call without one still ends ``DEFAULT_TIMEOUT_S`` from now."""
    deadline = call_deadline()
    return deadline if deadline is not None else time.monotonic() + DEFAULT_TIMEOUT_S


def ranked_of(msg: spb.Ranked) -> Ranked:
    return Ranked(np.frombuffer(msg.labels, "<i8"), np.frombuffer(msg.scores, "<f4"), list(msg.ids))


def error_from(err: grpc.RpcError) -> BaseException:
    """A replica's refusal of a bad request, as the index error it was."""
    cls = _ERROR_OF.get(err.code(), Unavailable)
    return cls(err.details() or str(err.code()))


class Tries:
    """The replicas of one shard to try in turn, each with its share of the time left.

    Live, unsuspected replicas first (rotated for balance); a retryable failure (UNAVAILABLE,
    DEADLINE_EXCEEDED, ...) marks the node suspect and moves on; a refusal of the request
    itself (INVALID_ARGUMENT, NOT_FOUND, ...) is raised at once: every replica would say so.
    """

    def __init__(self, collection: CollectionBase, shard: int, turn: int | None = None) -> None:
        self.collection = collection
        self.shard = shard
        turn = collection.catalog.turn() if turn is None else turn
        self.order = collection.catalog.state.order(collection.meta.placement[shard], turn)
        self.failures: list[str] = []

    def each(self, deadline: float) -> Iterator[tuple[str, str, float]]:
        """(node, address, timeout) for each replica worth trying before ``deadline``: the live
        ones, each with its share of the time left; then, when none of them answered, those the
        view has not heard from lately (a stalled heartbeat bucket says little about a server)."""
        for i, (node, address, live) in enumerate(self.order):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.failures.append("the deadline passed")
                return
            if address is None:
                self.failures.append(f"{node}: never heard of")
                continue
            later = self.order[i:]
            left = sum(1 for _, at, up in later if at is not None and (up or not live))
            if not live:
                self.failures.append(f"{node}: not live (tried at its last address)")
            yield node, address, remaining / max(left, 1)

    def failed(self, node: str, err: grpc.RpcError) -> None:
        if err.code() not in RETRYABLE_CODES:
            raise error_from(err) from None
        self.collection.catalog.state.suspect(node)
        self.collection.catalog.stats.retried(err.code())
        self.failures.append(f"{node}: {err.code().name} {err.details()}")

    def answered(self) -> None:
        """A replica answered: a failover when an earlier one failed or was not live."""
        if self.failures:
            self.collection.catalog.stats.failed_over()

    def exhausted(self) -> Unavailable:
        name = self.collection.name
        why = "; ".join(self.failures) or "none placed"
        return Unavailable(f"collection {name!r} shard {self.shard}: no live replica answered ({why})")


class CollectionBase(ChecksDense):
    """A collection as the router sees it, and the calls to its shards' replicas."""

    def __init__(self, catalog: RemoteCatalog, meta: CollectionMeta) -> None:
        self.catalog = catalog
        self.meta = meta
        self.name = meta.name
        self.schema = Schema.from_json(meta.schema)
        self.shards = list(range(meta.shards))
        self.created_at = meta.created_at
        self.replication_factor = meta.replication_factor
        self.limits = catalog.limits
        self.payload = PayloadStore(self.schema.payload_fields)  # types for validation; holds nothing
        self._analyzers = {spec.name: analyzers.build(spec.analyzer) for spec in self.schema.text_fields}
        self._refs = [self._ref(shard) for shard in self.shards]
        # The servers holding a replica of every shard: each can answer a whole search alone.
        self._coverers = tuple(n for n in meta.placement[0] if all(n in nodes for nodes in meta.placement[1:]))
        # Every replica is on one of them: a fan-out could only ask the same servers.
        self._covered_only = all(set(nodes) <= set(self._coverers) for nodes in meta.placement)

    # Validation: index/validate.py's, as a standalone collection's.
    def check(self, plan: SearchPlan, where: str = "") -> None:
        check_plan(plan, self.schema, self.payload, self.limits, where)

    def write_problem(self) -> str | None:
        if not self.catalog.link.connected:
            return f"NATS unreachable at {','.join(self.catalog.link.urls)}: writes are refused"
        return None

    def read_problem(self) -> str | None:
        """None: a router holds no data; a shard with no live replica fails its reads by itself."""
        return None

    def heal(self) -> None:
        """Nothing to heal on a router (shard servers heal their replicas)."""

    def _ref(self, shard: int) -> spb.ReplicaRef:
        return spb.ReplicaRef(collection=self.name, uid=self.meta.uid, shard=shard)

    def _call(
        self, shard: int, call: Callable[[shard_pb2_grpc.ShardStub, float], Any], deadline: float
    ) -> tuple[Any, str]:
        """``call(stub, timeout)`` on one replica of ``shard`` after another until one answers;
        (its answer, its address). A replica's refusal of the request itself (INVALID_ARGUMENT...)
        is raised as it is; when none answers, Unavailable naming the shard and why each failed."""
        tries = Tries(self, shard)
        for node, address, timeout in tries.each(deadline):
            try:
                answer = call(self.catalog.clients.stub(address), timeout)
            except grpc.RpcError as err:
                tries.failed(node, err)
                continue
            tries.answered()
            return answer, address
        raise tries.exhausted()

    def _fan_out(
        self, shards: list[int], call: Callable[[int, shard_pb2_grpc.ShardStub, float], Any], deadline: float
    ) -> dict[int, tuple[Any, str]]:
        """``call`` (returning a gRPC future) on one replica of each shard, all at once, retrying a
        failed shard on its other replicas; {shard: (answer, address)}. One turn for the whole
        request: placement rotates shard i's replicas by i, so the shards land on distinct servers."""
        turn = self.catalog.turn()
        started = {}
        for shard in shards:
            tries = Tries(self, shard, turn)
            attempts = tries.each(deadline)
            started[shard] = (tries, attempts, self._start(shard, call, attempts))
        answers: dict[int, tuple[Any, str]] = {}
        for shard, (tries, attempts, attempt) in started.items():
            while attempt is not None:
                node, address, future = attempt
                try:
                    answers[shard] = (future.result(), address)
                    tries.answered()
                    break
                except grpc.RpcError as err:
                    tries.failed(node, err)
                attempt = self._start(shard, call, attempts)
            else:
                raise tries.exhausted()
        return answers

    def _start(
        self, shard: int, call: Callable[[int, shard_pb2_grpc.ShardStub, float], Any], attempts: Iterator
    ) -> tuple[str, str, Any] | None:
        for node, address, timeout in attempts:
            return node, address, call(shard, self.catalog.clients.stub(address), timeout)
        return None

    # A server holding a replica of every shard answers a whole search in one call (SearchCollection).

    def wait_open(self, deadline: float) -> None:
        """Until one replica of every shard is open and has read its log (a fresh collection)."""
        while True:
            try:
                self._fan_out(
                    self.shards,
                    lambda s, stub, t: stub.WaitApplied.future(spb.WaitAppliedRequest(replica=self._ref(s)), timeout=t),
                    deadline,
                )
                return
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.05)

    def _min_seqs(self, consistency: int) -> list[int]:
        if consistency == pb.CONSISTENCY_EVENTUAL:
            return [0] * len(self.shards)
        if consistency == pb.CONSISTENCY_STRONG:
            subjects = [self.meta.subject(s) for s in self.shards]
            # The call's deadline: a NATS election may take seconds.
            timeout = max(default_deadline() - time.monotonic(), 0.1)
            return self.catalog.link.last_seqs(self.meta.stream, subjects, timeout=timeout)
        return [self.catalog.acked.get((self.meta.uid, s), 0) for s in self.shards]
