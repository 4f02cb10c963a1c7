"""A shard server (``braid serve --role shard``): replicas of shards, fed by JetStream, read by routers.

What it does:

- registers itself in the ``braid-nodes`` bucket (heartbeat every second, TTL 5 s) with
  the address routers should call (``--advertise``, default host:port);
- watches ``braid-collections`` and keeps one Replica (service/cluster/replica.py) open per
  shard whose placement names this node; a collection deleted from the bucket is closed and
  its files removed (also when the delete happened while this server was down);
- answers braid.cluster.v1.Shard on its gRPC port (the bodies: shard_rpcs.py): searches, fetches, gets and counts on
  a replica, each only once the replica has applied the caller's ``min_seq``; and, when it
  holds a replica of every shard of a collection, whole searches (SearchCollection) over a
  collection of those replicas, as standalone runs them, so the router's hop is one call;
  with ``cluster_tls_*`` that port is mutual TLS: only callers presenting a certificate the
  cluster's internal CA signed get past the handshake (docs/security.md);
- health (grpc.health.v1, on the main port and, with ``health_port``, alone in plaintext on
  that port): ``""`` and ``braid.cluster.v1.Shard`` turn SERVING only once the server is
  registered and every replica it hosts has caught up with its log (read its subject to the
  stream's last sequence as of its open: ``Replica.caught_up``), so a readiness probe holds a
  rolling restart back while this server still replays; NOT_SERVING again from shutdown on;
  ``braid.live`` is SERVING from the start (the liveness probe's: a replay is not a hang);
- with ``--metrics-port``, serves its calls, its replicas' lag and their indexes' metrics;
- snapshots (service/cluster/replica.py): a thread checks every second whether a replica's
  shard is due a snapshot (``snapshot_interval_s``, ``snapshot_log_bytes``) and takes it on
  ONE replica per shard: the first node of the shard's placement that is live (its heartbeat
  in ``braid-nodes``) snapshots when due; a node with k live nodes before it waits k+1 times
  as long (time and log bytes), so it stands in for a first one that is alive but cannot
  snapshot (catching up, a full disk), while two rarely snapshot the same shard at once
  (harmless if they do: the object of one sequence is the same shard state, and trim points
  only rise). The first node, not any: it keeps the choice stable without a lease, and its
  placement is the same on every server. ``Snapshot`` takes one now (tests, the router's user
  snapshots). A deleted collection's replica snapshots and trim points are removed by the
  servers that held its replicas.

Data directory: ``<data_dir>/replicas/<collection>-<uid>/shard-NNN/`` (an index/ shard
directory whose manifest's ``wal_seq`` is the last stream sequence applied), scratch
directories beside it while a snapshot is taken or restored (``.snapshot-shard-NNN-*``,
``.restore-shard-NNN-*``: removed when the replica starts), and the ``LOCK`` that keeps a
second process out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import message_factory
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from braid.cluster.v1 import shard_pb2 as spb
from braid.index.collection import Collection
from braid.index.dirlock import DataDirLock

from ..admission import Admission
from ..config import ServerConfig
from ..errors import describe
from ..handlers import PASS_THROUGH, check_decoded, parser, run_admitted
from ..metrics import ReplicaState, ServerMetrics, Sources
from ..observe import CallObserver
from ..server import LIVE_HEALTH_NAME, event_loop, health_only_server
from ..tracing import Tracing, make_tracing
from .meta import (
    COLLECTIONS_BUCKET,
    HEARTBEAT_S,
    NODE_TTL_S,
    NODES_BUCKET,
    CollectionMeta,
    NodeInfo,
    changed,
    parse_collections,
)
from .nats_link import NatsLink
from .replica import Replica, SnapshotPolicy
from .shard_rpcs import ShardRpcs
from .snapshot_objects import SnapshotObjects

log = logging.getLogger("braid.shard_server")
SERVICE = spb.DESCRIPTOR.services_by_name["Shard"]
SERVICE_NAME = SERVICE.full_name
SNAPSHOT_TICK_S = 1.0  # how often the snapshot thread asks each replica whether it is due
RANK_S = 5.0  # how long a replica's turn to snapshot (live nodes before it) is taken as known


class ShardServer:
    """A shard server process: NATS link, replicas, the internal gRPC service and health."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.node_id = config.cluster_node_id
        self.root = config.data_dir / "replicas"
        self.root.mkdir(parents=True, exist_ok=True)
        self._dir_lock = DataDirLock(config.data_dir)
        self.replicas: dict[tuple[str, int], Replica] = {}
        self._metas: dict[str, CollectionMeta] = {}
        self._synced = threading.Event()
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._announced = threading.Event()  # registered in the nodes bucket: the ready line
        self._reconciled = threading.Event()  # the replicas of the first collections snapshot exist
        self._health_lock = threading.Lock()  # readiness never sets SERVING once stop() began
        self.health_server: grpc.aio.Server | None = None
        self._views: dict[tuple[str, int], Collection] = {}
        self._executor = ThreadPoolExecutor(4, thread_name_prefix="braid-shard-search")
        self.admission = Admission(config.workers, config.max_queue, config.max_streams, config.max_streams_per_peer)
        self.rpcs = ShardRpcs(self)
        self._loop = event_loop()
        self.link: NatsLink | None = None
        self.snapshots: SnapshotObjects | None = None
        self._snapshot_policy = SnapshotPolicy(config.snapshot_interval_s, config.snapshot_log_bytes)
        self._snapshot_wake = threading.Event()  # a replica applied enough log for a snapshot
        self._ranks: dict[tuple[str, int], tuple[float, int]] = {}  # replica -> (monotonic time, rank)
        self._forget: list[tuple[str, int]] = []  # (uid, shards) of deleted collections whose snapshots go
        self.metrics: ServerMetrics | None = None
        self.tracing: Tracing | None = None
        try:
            if config.metrics_port:
                self.metrics = ServerMetrics(
                    Sources(
                        shards=self._replica_shards,
                        admission=self.admission,
                        data_dir=config.data_dir,
                        replicas=self._replica_states,
                        role="shard",
                    )
                )
                self.metrics.serve(config.host, config.metrics_port)
            self.tracing = make_tracing(config)
            self.observer = CallObserver(
                SERVICE_NAME, self.metrics.rpc if self.metrics else None, tracer=self.tracing and self.tracing.tracer
            )
            self.port = asyncio.run_coroutine_threadsafe(self._build(), self._loop).result()
        except BaseException:
            if self.metrics is not None:
                self.metrics.close()
            self._dir_lock.release()
            raise
        self.address = config.cluster_advertise or f"{config.host}:{self.port}"

    async def _build(self) -> int:
        config = self.config
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.server.add_generic_rpc_handlers((self._generic_handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVE_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
        if config.cluster_tls:
            from ..tls import server_credentials

            # require_client_auth: a caller without a certificate the internal CA signed fails the handshake.
            credentials = server_credentials(
                config.cluster_tls_cert,  # type: ignore[arg-type]
                config.cluster_tls_key,  # type: ignore[arg-type]
                client_ca=config.cluster_tls_ca,
            )
            port = self.server.add_secure_port(config.address, credentials)
        else:
            port = self.server.add_insecure_port(config.address)
        if port == 0:
            raise OSError(f"cannot bind {config.address}")
        if config.health_port:
            self.health_server = health_only_server(self.health, config.host, config.health_port)
        return port

    def _generic_handler(self) -> grpc.GenericRpcHandler:
        handlers = {}
        for method in SERVICE.methods:
            parse = parser(message_factory.GetMessageClass(method.input_type))
            serialize = message_factory.GetMessageClass(method.output_type).SerializeToString
            handler = self.observer.unary(method.name, self._unary(getattr(self.rpcs, method.name)))
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=parse, response_serializer=serialize
            )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    def _unary(self, body: Callable[[Any], Any]) -> Callable[..., Any]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                check_decoded(request)
                # A quick body runs on the loop: the thread hop would cost as much as the search.
                work = functools.partial(body, request)
                return await run_admitted(self.admission, context, work, lambda: self.rpcs.quick(request))
            except PASS_THROUGH:
                raise
            except BaseException as err:  # tantivy's PanicException is a BaseException: answer, never hang
                failure = err
            code, message = describe(failure)
            await context.abort(code, message)

        return handle

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result()
        if self.health_server is not None:
            asyncio.run_coroutine_threadsafe(self.health_server.start(), self._loop).result()
        self.link = NatsLink.for_config(self.config, f"braid-shard-{self.node_id}")
        self.snapshots = SnapshotObjects(self.link, self.config.stream_replicas)
        threading.Thread(target=self._join, name="braid-join", daemon=True).start()
        threading.Thread(target=self._snapshot_loop, name="braid-snapshots", daemon=True).start()
        threading.Thread(target=self._reconcile_loop, name="braid-reconcile", daemon=True).start()
        threading.Thread(target=self._readiness, name="braid-readiness", daemon=True).start()

    def _join(self) -> None:
        """Wait for NATS, make the buckets, watch the collections, then heartbeat until stopped."""
        assert self.link is not None
        while not self._stopping.is_set():
            if not self.link.wait_connected(1.0):
                continue
            try:
                self.link.ensure_bucket(COLLECTIONS_BUCKET, self.config.stream_replicas)
                self.link.ensure_bucket(NODES_BUCKET, self.config.stream_replicas, ttl=NODE_TTL_S)
                # Here, not at the first replica's open: two servers creating the replicated
                # buckets at once while their replicas wait stalled one for 10 s on a fresh NATS.
                assert self.snapshots is not None
                self.snapshots.ensure()
                break
            except Exception as err:
                log.warning("cannot set up the cluster buckets yet: %s", err)
                self._stopping.wait(1.0)
        self.link.watch(COLLECTIONS_BUCKET, self._on_snapshot, self._on_change)
        info = NodeInfo(self.node_id, self.address, time.time()).to_json()
        announced = False
        while not self._stopping.is_set():
            try:
                self.link.kv_put(NODES_BUCKET, self.node_id, info)
                if not announced and self._synced.is_set():
                    announced = True
                    self._announced.set()  # health follows once the replicas caught up (_readiness)
            except Exception as err:  # NATS away: keep serving reads, retry
                log.debug("heartbeat failed: %s", err)
            if announced:
                self._stopping.wait(HEARTBEAT_S)
            else:  # announce as soon as the collections are read, not a heartbeat later
                self._synced.wait(HEARTBEAT_S)

    def wait_announced(self, timeout: float | None = None) -> bool:
        """Until the server is registered (routers may call it) with the collections read."""
        return self._announced.wait(timeout)

    def _pending_replicas(self) -> list[Replica]:
        """Replicas this server hosts that have not caught up with their log yet."""
        return [replica for replica in list(self.replicas.values()) if not replica.caught_up.is_set()]

    def _readiness(self) -> None:
        """Health SERVING once registered and every replica hosted has caught up with its log.

        Until then a probe reads NOT_SERVING: a restarted server replaying its subjects must hold
        a rolling restart back, or the next server goes down while this one cannot answer yet. A
        replica that cannot catch up (a full disk stopped its replay) keeps it NOT_SERVING; the
        replicas of collections created later do not turn a ready server back."""
        while not self._stopping.is_set():
            if not (self._announced.is_set() and self._reconciled.is_set()):
                self._stopping.wait(0.1)
                continue
            pending = self._pending_replicas()
            if pending:
                pending[0].caught_up.wait(0.5)
                continue
            with self._health_lock:
                if self._stopping.is_set():
                    return
                self._set_health(health_pb2.HealthCheckResponse.SERVING)
            log.info("ready: %d replica(s) caught up with the log", len(self.replicas))
            return

    def _set_health(self, status: int) -> None:
        async def set_all() -> None:
            for name in ("", SERVICE_NAME):
                await self.health.set(name, status)

        asyncio.run_coroutine_threadsafe(set_all(), self._loop).result(5)

    # ------------------------------------------------------------ replicas

    def _on_snapshot(self, items: dict[str, bytes]) -> None:
        self._metas = parse_collections(items)
        self._synced.set()
        self._changed.set()

    def _on_change(self, key: str, value: bytes | None) -> None:
        self._metas = changed(self._metas, key, value)
        self._changed.set()

    def _reconcile_loop(self) -> None:
        cleaned = False
        while not self._stopping.is_set():
            self._changed.wait(1.0)
            self._changed.clear()
            if not self._synced.is_set() or self._stopping.is_set():
                continue
            wanted = {
                (meta.uid, number): meta
                for meta in self._metas.values()
                for number, nodes in enumerate(meta.placement)
                if self.node_id in nodes
            }
            for key, meta in wanted.items():
                if key not in self.replicas:
                    directory = self.root / f"{meta.name}-{meta.uid}" / f"shard-{key[1]:03d}"
                    replica = Replica(
                        meta,
                        key[1],
                        directory,
                        self.link,  # type: ignore[arg-type]
                        self.config.storage,
                        self.snapshots,
                        self._snapshot_policy,
                    )
                    replica.wake = self._snapshot_wake.set
                    self.replicas[key] = replica
                    replica.start()
            for key in [key for key in self.replicas if key not in wanted]:
                replica = self.replicas.pop(key)
                self._views.pop(key, None)
                self._views.pop((key[0], -1), None)
                log.info("collection %r shard %d deleted: removing its replica", replica.meta.name, key[1])
                replica.close(remove=True)
                if not any(meta.uid == key[0] for meta in self._metas.values()):
                    self._forget.append((key[0], replica.meta.shards))
            if not cleaned:  # directories of collections deleted while this server was down
                cleaned = True
                keep = {f"{meta.name}-{meta.uid}" for meta in self._metas.values()}
                for path in self.root.iterdir():
                    if path.name not in keep:
                        shutil.rmtree(path, ignore_errors=True)
            self._reconciled.set()

    # ------------------------------------------------------------ snapshots

    def _snapshot_loop(self) -> None:
        """Every SNAPSHOT_TICK_S: snapshot each replica that is due and whose turn it is (module doc);
        remove the snapshots of deleted collections."""
        while not self._stopping.is_set():
            self._snapshot_wake.wait(SNAPSHOT_TICK_S)
            self._snapshot_wake.clear()
            if self.link is None or not self.link.connected or self.snapshots is None:
                continue
            while self._forget and not self._stopping.is_set():
                uid, shards = self._forget[0]
                try:
                    self.snapshots.forget(uid, shards)
                except Exception as err:
                    log.warning("cannot remove the snapshots of deleted collection uid %s yet: %s", uid, err)
                    break
                self._forget.pop(0)
            for replica in list(self.replicas.values()):
                if self._stopping.is_set():
                    return
                try:
                    if replica.snapshot_due() and replica.snapshot_due(self._snapshot_rank(replica)):
                        replica.take_snapshot()
                except Exception as err:  # NATS away, a full disk, a replica closing: the next tick retries
                    log.warning("replica %s/%d: snapshot failed: %s", replica.meta.name, replica.number, err)

    def _snapshot_rank(self, replica: Replica) -> int:
        """How many live nodes come before this one in the shard's placement (0: it snapshots);
        looked up again after RANK_S."""
        assert self.link is not None
        key = (replica.meta.uid, replica.number)
        known = self._ranks.get(key)
        if known is not None and time.monotonic() - known[0] < RANK_S:
            return known[1]
        rank = self._live_before(replica)
        self._ranks[key] = (time.monotonic(), rank)
        return rank

    def _live_before(self, replica: Replica) -> int:
        assert self.link is not None
        rank = 0
        for node in replica.meta.placement[replica.number]:
            if node == self.node_id:
                return rank
            if self.link.kv_get(NODES_BUCKET, node) is not None:
                rank += 1
        return rank

    def _replica_shards(self) -> list[tuple[str, Any]]:
        """(collection, shard) of every open replica, for /metrics."""
        return [(r.meta.name, r.shard) for r in list(self.replicas.values()) if r.shard is not None]

    def _replica_states(self) -> list[ReplicaState]:
        return [
            ReplicaState(
                r.meta.name, r.number, r.lag_records, r.caught_up.is_set(), r.applied_seq, r.restores, r.snapshots_taken
            )
            for r in list(self.replicas.values())
        ]

    def view(self, replica: Replica) -> Collection:
        """A one-shard Collection over the replica's shard, for gets and counts."""
        key = (replica.meta.uid, replica.number)
        view = self._views.get(key)
        shard = replica.serving(need_caught_up=False)
        if view is None or view.shards[0] is not shard:
            view = Collection(
                replica.meta.name, replica.schema, [shard], replica.meta.created_at, self._executor, self.config.limits
            )
            self._views[key] = view
        return view

    def collection_view(self, replica: Replica, shards: list[Any]) -> Collection:
        """A Collection over this server's replicas of every shard of ``replica``'s collection
        (``shards``, in shard order), for whole searches (SearchCollection)."""
        key = (replica.meta.uid, -1)
        view = self._views.get(key)
        if (
            view is None
            or len(view.shards) != len(shards)
            or any(a is not b for a, b in zip(view.shards, shards, strict=True))
        ):
            meta = replica.meta
            view = Collection(meta.name, replica.schema, shards, meta.created_at, self._executor, self.config.limits)
            self._views[key] = view
        return view

    # ------------------------------------------------------------ shutdown

    def stop(self, grace: float | None = None) -> None:
        if self._stopped.is_set():
            return
        self._stopping.set()
        grace = self.config.shutdown_grace_s if grace is None else grace
        with self._health_lock, contextlib.suppress(Exception):
            self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.link is not None:
            with contextlib.suppress(Exception):  # else the TTL removes it
                self.link.kv_delete(NODES_BUCKET, self.node_id, timeout=2.0)  # routers stop choosing us now
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result()
        if self.health_server is not None:  # after the drain: probes read NOT_SERVING throughout
            asyncio.run_coroutine_threadsafe(self.health_server.stop(0), self._loop).result()
        self.admission.close(30.0)
        for replica in list(self.replicas.values()):
            shard = replica.shard
            if shard is not None and shard.needs_checkpoint:
                try:
                    shard.flush()
                except Exception as err:
                    log.warning(
                        "replica %s/%d: checkpoint at shutdown failed: %s", replica.meta.name, replica.number, err
                    )
            replica.close()
        if self.link is not None:
            self.link.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tracing is not None:
            self.tracing.close()
        self._executor.shutdown(wait=False)
        self._dir_lock.release()
        self._stopped.set()


def serve_shard(config: ServerConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run a shard server until SIGTERM/SIGINT."""
    server = ShardServer(config)
    server.start()
    log.info(
        "shard server %s listening on %s:%d (advertised as %s)",
        server.node_id,
        config.host,
        server.port,
        server.address,
    )

    def announce() -> None:
        if server.wait_announced() and ready is not None:
            ready(server.port)

    threading.Thread(target=announce, daemon=True).start()
    signals = threading.Semaphore(0)
    signal.signal(signal.SIGTERM, lambda *_: signals.release())
    signal.signal(signal.SIGINT, lambda *_: signals.release())
    while not signals.acquire(timeout=1.0):
        pass
    log.info("shutting down")
    server.stop()
    log.info("stopped")
