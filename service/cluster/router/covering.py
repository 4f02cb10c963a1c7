"""A whole search on one server holding a replica of every shard (Shard/SearchCollection).

When some live server holds a replica of every shard (replication factor as large as the
server count, or one shard), one of them, chosen round robin, runs the whole search as a
standalone collection of those replicas would (DFS, fusion, payload and text in one call),
so the hop costs one round trip whatever the search's shape; if it fails retryably, the
search falls back to the fan-out (service/cluster/router/reads.py).
"""

from __future__ import annotations

import time

import grpc

from braid.cluster.v1 import shard_pb2 as spb
from braid.v1 import braid_pb2 as pb

from ...errors import RETRYABLE_CODES
from .replicas import CollectionBase, default_deadline, error_from


class CoveringSearch(CollectionBase):
    """The servers holding every shard, and the single call that searches on one of them."""

    @property
    def coverable(self) -> bool:
        """Whether some server holds a replica of every shard (live or not)."""
        return bool(self._coverers)

    def _coverer(self, turn: int) -> tuple[str, str] | None:
        """(node, address) of a live, unsuspected server holding a replica of every shard, chosen
        round robin by ``turn``; a suspected one when every replica is on such servers (a fan-out
        would ask them too); None otherwise (the search fans out per shard)."""
        if not self._coverers:
            return None
        state = self.catalog.state
        suspected = None
        for node, address, live in state.order(self._coverers, turn):
            if not live or address is None:
                continue
            if not state.suspected(node):
                return node, address
            suspected = suspected or (node, address)
        return suspected if self._covered_only else None

    def _covering_request(
        self, request: pb.SearchRequest, min_seqs: list[int], max_response_bytes: int | None
    ) -> spb.CollectionSearchRequest:
        return spb.CollectionSearchRequest(
            replicas=self._refs, min_seqs=min_seqs, request=request, max_response_bytes=max_response_bytes or 0
        )

    def _covering_timeout(self, deadline: float) -> float:
        """The covering server's share of the time left: half, when a fan-out to other replicas could follow."""
        remaining = max(deadline - time.monotonic(), 0.001)
        return remaining / 2 if self.replication_factor > 1 else remaining

    def _covering_failed(self, node: str, err: grpc.RpcError) -> bool:
        """A refusal of the request itself is raised; otherwise the server is suspect and the
        search falls back to the fan-out (True: a failover once that answers). A server that
        does not know SearchCollection (an older version) is no failure."""
        code = err.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            return False
        if code not in RETRYABLE_CODES:
            raise error_from(err) from None
        self.catalog.state.suspect(node)
        self.catalog.stats.retried(code)
        return True

    def _whole(
        self, request: pb.SearchRequest, min_seqs: list[int], max_response_bytes: int | None
    ) -> tuple[pb.SearchResponse | None, bool]:
        """(the response of one server holding every shard, or None when there is none or it
        failed retryably; whether it failed: a fan-out that answers then is a failover)."""
        found = self._coverer(self.catalog.turn())
        if found is None:
            return None, False
        node, address = found
        message = self._covering_request(request, min_seqs, max_response_bytes)
        try:
            stub = self.catalog.clients.stub(address)
            return stub.SearchCollection(message, timeout=self._covering_timeout(default_deadline())), False
        except grpc.RpcError as err:
            return None, self._covering_failed(node, err)
