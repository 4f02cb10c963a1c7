"""The router's view of the cluster, and its channels to shard servers.

- ``ClusterState``: collections, aliases and shard-server membership, watched from the NATS
  KV buckets (service/cluster/meta.py) into memory, with the aliases bucket's revision the
  view has reached (a router waits for its own alias writes); which servers are live
  (judged against the freshest heartbeat, less the windows in which no heartbeat arrived
  from anyone, so a stalled bucket or a NATS leader election never makes healthy servers
  look dead); the order in which a shard's replicas are tried (live ones first, then the
  ones not heard from lately at their last known address: a read tries every replica it
  knows before failing).
- ``ShardClients``: one gRPC channel per shard-server address (sync and grpc.aio), each
  call carrying the current request id (and trace context) to the shard server; mutual TLS
  when the cluster has its internal certificates (``cluster_tls_*``, docs/security.md).
- ``RouterStats``: what /metrics reports of the router's calls to replicas.
"""

from __future__ import annotations

import threading
import time

import grpc

from braid.cluster.v1 import shard_pb2_grpc

from ..config import ServerConfig
from ..logs import REQUEST_ID_KEY, forward_metadata
from .meta import (
    ALIASES_BUCKET,
    COLLECTIONS_BUCKET,
    HEARTBEAT_S,
    NODE_TTL_S,
    NODES_BUCKET,
    AliasMeta,
    CollectionMeta,
    NodeInfo,
    alias_changed,
    changed,
    parse_alias,
    parse_collections,
    parse_node,
)
from .nats_link import NatsLink

SUSPECT_S = 1.0  # a replica that failed is tried last for this long
# No heartbeat from any shard server for this long is a stall of the bucket (NATS electing its
# leader, a watch being restarted), not of the servers: live_nodes does not count it against them.
STALL_S = 2 * HEARTBEAT_S
STALLS_KEPT = 8  # the most recent stalls remembered (older ones are further back than any TTL)


class ClusterState:
    """The router's view of the cluster, kept current by watching the buckets."""

    def __init__(self, link: NatsLink) -> None:
        self.link = link
        self.metas: dict[str, CollectionMeta] = {}
        self.aliases: dict[str, AliasMeta] = {}  # replaced whole on each change: one read, one version
        self.alias_revision = 0  # the aliases bucket's revision self.aliases reflects
        self._alias_seen = threading.Condition()
        self._aliases_synced = threading.Event()
        self.nodes: dict[str, tuple[NodeInfo, float]] = {}  # node id -> (info, time.monotonic() last seen)
        self.synced = threading.Event()
        self._nodes_synced = threading.Event()
        self._collections_synced = threading.Event()
        self._suspect: dict[str, float] = {}
        self._last_beat = 0.0  # time.monotonic() of the last heartbeat heard from anyone
        self._stalls: list[tuple[float, float]] = []  # (start, end) of recent windows with none

    def start(self) -> None:
        self.link.watch(COLLECTIONS_BUCKET, self._collections_snapshot, self._collection_changed)
        self.link.watch(NODES_BUCKET, self._nodes_snapshot, self._node_changed, silent_s=3 * HEARTBEAT_S)
        self.link.watch(ALIASES_BUCKET, self._aliases_snapshot, self._alias_changed, on_revision=self._alias_reached)

    def _check_synced(self) -> None:
        if self._nodes_synced.is_set() and self._collections_synced.is_set() and self._aliases_synced.is_set():
            self.synced.set()

    def _collections_snapshot(self, items: dict[str, bytes]) -> None:
        self.metas = parse_collections(items)
        self._collections_synced.set()
        self._check_synced()

    def _aliases_snapshot(self, items: dict[str, bytes]) -> None:
        self.aliases = {key: alias for key, raw in items.items() if (alias := parse_alias(key, raw)) is not None}
        self._aliases_synced.set()
        self._check_synced()

    def _alias_changed(self, key: str, value: bytes | None) -> None:
        self.aliases = alias_changed(self.aliases, key, value)

    def _alias_reached(self, revision: int) -> None:
        with self._alias_seen:
            self.alias_revision = max(self.alias_revision, revision)
            self._alias_seen.notify_all()

    def wait_alias_revision(self, revision: int, timeout: float) -> bool:
        """Until the view reflects the aliases bucket at ``revision`` (a write of this router)."""
        with self._alias_seen:
            return self._alias_seen.wait_for(lambda: self.alias_revision >= revision, timeout)

    def _collection_changed(self, key: str, value: bytes | None) -> None:
        self.metas = changed(self.metas, key, value)

    def _heard(self) -> float:
        """A heartbeat (or a snapshot of them) arrived: note a stall it ends; the time now."""
        now = time.monotonic()
        if self._last_beat and now - self._last_beat > STALL_S:
            self._stalls = [*self._stalls[-(STALLS_KEPT - 1) :], (self._last_beat, now)]
        self._last_beat = now
        return now

    def _nodes_snapshot(self, items: dict[str, bytes]) -> None:
        now = self._heard() if items else time.monotonic()  # an empty one (every entry expired) is no beat
        # Nodes missing from the snapshot keep their last heartbeat: entries expire from the bucket
        # (TTL) while its leader is re-elected and nobody can write; live_nodes ages them out
        # against the freshest heartbeat once heartbeats land again.
        fresh = {key: (info, now) for key, raw in items.items() if (info := parse_node(key, raw)) is not None}
        self.nodes = {**self.nodes, **fresh}
        self._nodes_synced.set()
        self._check_synced()

    def _node_changed(self, key: str, value: bytes | None) -> None:
        nodes = dict(self.nodes)
        info = parse_node(key, value) if value is not None else None
        if info is None:
            nodes.pop(key, None)
        else:
            nodes[key] = (info, self._heard())
        self.nodes = nodes

    def live_nodes(self) -> dict[str, str]:
        """Node id -> address of the shard servers whose heartbeat is at most the TTL older than
        the freshest heartbeat of any node, not counting the stalls in between. Measured against
        the freshest, not the clock: while the bucket itself is stalled (NATS unreachable, its
        leader being re-elected, a watch being restarted) no heartbeat arrives from anyone, and
        that says nothing about the shard servers; nor does it once heartbeats land again, in
        whatever order the servers' next beats arrive. A server that stopped while the others
        kept beating drops out."""
        nodes, stalls = self.nodes, self._stalls
        if not nodes:
            return {}
        freshest = max(seen for _, seen in nodes.values())
        live = {}
        for node, (info, seen) in nodes.items():
            silent = freshest - seen - sum(end - start for start, end in stalls if start >= seen)
            if silent <= NODE_TTL_S:
                live[node] = info.address
        return live

    def suspect(self, node: str) -> None:
        self._suspect[node] = time.monotonic() + SUSPECT_S

    def suspected(self, node: str) -> bool:
        """Whether ``node`` failed a call within the last SUSPECT_S."""
        return self._suspect.get(node, 0.0) > time.monotonic()

    def addresses(self) -> dict[str, str]:
        """Node id -> last known address of every shard server the view has heard of."""
        return {node: info.address for node, (info, _) in self.nodes.items()}

    def order(self, nodes: tuple[str, ...], turn: int) -> list[tuple[str, str | None, bool]]:
        """The replicas to try: (node, address, live). Live and unsuspected first, rotated by
        ``turn`` for balance; then those not live, at their last known address (None: never
        heard of), for a read to try before it fails."""
        live = self.live_nodes()
        known = self.addresses()
        now = time.monotonic()
        rotated = [nodes[(turn + i) % len(nodes)] for i in range(len(nodes))]
        rank = {node: (live.get(node) is None, self._suspect.get(node, 0.0) > now) for node in rotated}
        ordered = sorted(rotated, key=lambda node: rank[node])
        return [(node, live.get(node) or known.get(node), node in live) for node in ordered]


class RouterStats:
    """What /metrics reports of the router's calls to replicas (service/metrics.py)."""

    def __init__(self) -> None:
        self.retries: dict[str, int] = {}  # status code name -> replica calls that failed retryably
        self.failovers = 0  # shard calls answered by a replica other than the first one tried
        self._lock = threading.Lock()

    def retried(self, code: grpc.StatusCode) -> None:
        with self._lock:
            self.retries[code.name] = self.retries.get(code.name, 0) + 1

    def failed_over(self) -> None:
        with self._lock:
            self.failovers += 1


class _ForwardRequestId(grpc.UnaryUnaryClientInterceptor):
    """Sends the current call's request id (service/logs.py) with every call to a shard server."""

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        forwarded = forward_metadata()
        if forwarded and not any(key == REQUEST_ID_KEY for key, _ in details.metadata or ()):
            details = details._replace(metadata=(*(details.metadata or ()), *forwarded))
        return continuation(details, request)


class ShardClients:
    """One gRPC channel per shard-server address: plaintext, or mutual TLS with ``credentials``
    (the server checked against the internal CA under ``server_name``, default the address's host)."""

    def __init__(
        self,
        max_message_bytes: int,
        credentials: grpc.ChannelCredentials | None = None,
        server_name: str = "",
    ) -> None:
        self._options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if credentials is not None and server_name:
            self._options.append(("grpc.ssl_target_name_override", server_name))
        self._credentials = credentials
        self._stubs: dict[str, shard_pb2_grpc.ShardStub] = {}
        self._aio_stubs: dict[str, shard_pb2_grpc.ShardStub] = {}
        self._channels: list[grpc.Channel] = []
        self._lock = threading.Lock()

    @classmethod
    def for_config(cls, config: ServerConfig) -> ShardClients:
        """The channels a router (or any other caller of shard servers) opens under ``config``:
        mutual TLS when ``cluster_tls_*`` is set. The files are read and checked now, so a bad
        one stops the process at start with a message naming it, not at the first search."""
        credentials = None
        if config.cluster_tls:
            from ..tls import channel_credentials

            credentials = channel_credentials(config.cluster_tls_ca, config.cluster_tls_cert, config.cluster_tls_key)
        return cls(config.max_message_bytes, credentials, config.cluster_tls_server_name)

    def _channel(self, address: str) -> grpc.Channel:
        if self._credentials is None:
            return grpc.insecure_channel(address, options=self._options)
        return grpc.secure_channel(address, self._credentials, options=self._options)

    def stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            with self._lock:
                stub = self._stubs.get(address)
                if stub is None:
                    channel = self._channel(address)
                    self._channels.append(channel)
                    forwarding = grpc.intercept_channel(channel, _ForwardRequestId())
                    stub = self._stubs[address] = shard_pb2_grpc.ShardStub(forwarding)
        return stub

    def aio_stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        """A grpc.aio stub (for the server's event loop, the only loop that uses them)."""
        stub = self._aio_stubs.get(address)
        if stub is None:
            if self._credentials is None:
                channel = grpc.aio.insecure_channel(address, options=self._options)
            else:
                channel = grpc.aio.secure_channel(address, self._credentials, options=self._options)
            stub = self._aio_stubs[address] = shard_pb2_grpc.ShardStub(channel)
        return stub

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
