"""The Braid gRPC server: a grpc.aio server whose blocking work runs on admitted worker threads.

Building (``BraidServer(config)``, which binds the port) stays apart from running
(``serve``, which waits for SIGTERM). The layers of one call:

1. the event loop decodes the request (an undecodable one becomes INVALID_ARGUMENT,
   service/handlers.py), checks the API key (service/auth.py) and asks for admission
   (service/admission.py);
2. a worker thread runs the RPC's body in service/rpcs.py against the catalog and the
   encoders; index errors are mapped to status codes once, in service/errors.py.

Health (grpc.health.v1) answers on the event loop and never waits for a worker, so
probes stay fast under load. With ``health_port``, the same health servicer (so the same
statuses) is also served alone, in plaintext, on that port (``health_only_server``): for
Kubernetes' native gRPC probes, which cannot present the client certificate or API key the
main port may need. ``braid.live`` is SERVING from the first moment the server answers (a
liveness probe's service: recovery, a full disk or a replay are not hangs); ``""`` is
readiness (_StorageWatch). Every server in a process shares one event-loop thread.

Shutdown (``stop``): health turns NOT_SERVING, new calls are refused, in-flight calls get
``shutdown_grace_s``; then open BulkUpsert streams end with UNAVAILABLE and the count of
batches they applied, the rest is cancelled, running work finishes (bounded), and the
encoders and every shard close cleanly, releasing their locks. A second SIGTERM skips
the grace period.

Operators (docs/operations.md): every call gets a request id and, with ``metrics_port``,
counts in the server's own Prometheus registry served on that port (service/metrics.py);
``slow_query_ms`` logs slow searches with their plan (service/observe.py, service/logs.py).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from braid.index.catalog import Catalog
from braid.index.errors import BraidError

from .admission import Admission
from .config import ServerConfig
from .encoding import Encoding
from .handlers import SERVICE_NAME, BraidHandlers
from .metrics import ServerMetrics, Sources
from .observe import CallObserver
from .rpcs import BraidRpcs
from .tracing import Tracing, make_tracing

log = logging.getLogger("braid.server")
T = TypeVar("T")
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# After the grace period, streams are told to end; this long later the rest is cancelled.
STREAM_END_SECONDS = 1.0
MAX_CALLS_PER_CONNECTION = 256
# Health service whose status says whether writes are accepted everywhere, and how often it is refreshed.
WRITES_HEALTH_NAME = "braid.writes"
# Liveness: SERVING as soon as the event loop answers, whatever recovery or the disk say, so a
# liveness probe restarts a wedged process but never one that waits for room or replays a log.
LIVE_HEALTH_NAME = "braid.live"
# Per collection: NOT_SERVING while one of its shards could not finish recovery (service ``<prefix><name>``).
COLLECTION_HEALTH_PREFIX = "braid.collection."
STORAGE_WATCH_S = 1.0
# How long shutdown waits for work already running on a worker thread.
WORK_DRAIN_SECONDS = 30.0

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def health_only_server(servicer: health.aio.HealthServicer, host: str, port: int) -> grpc.aio.Server:
    """A bound (not started) plaintext server with grpc.health.v1 and nothing else, on ``host:port``
    (``health_port``): every other service answers UNIMPLEMENTED there."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"health_port {port}: cannot bind {host}:{port} (in use?)")
    return server


def event_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for gRPC servers, running on a daemon thread."""
    global _loop
    with _loop_lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, name="braid-grpc-loop", daemon=True).start()
        return _loop


class BraidServer:
    """One Braid server: catalog, encoders, workers and a bound (not yet started) gRPC port."""

    def __init__(self, config: ServerConfig, catalog: Any = None, rpcs_class: type[BraidRpcs] = BraidRpcs) -> None:
        self.config = config
        self._rpcs_class = rpcs_class
        # Recovery runs after the port is bound (start): probes see NOT_SERVING, not "connection refused".
        self.catalog = catalog or Catalog(config.data_dir, config.limits, policy=config.storage, recover=False)
        self._recovered = threading.Event()
        self._stopping = threading.Event()
        self.encoding = Encoding(
            config.models_path,
            config.encoder_threads or None,
            config.encoder_max_batch,
            config.encoder_max_wait_ms / 1000,
        )
        self.admission = Admission(config.workers, config.max_queue, config.max_streams, config.max_streams_per_peer)
        self._loop = event_loop()
        self._stopped = threading.Event()
        self._stop_lock = threading.Lock()
        self._hurry: asyncio.Event | None = None
        self.health_server: grpc.aio.Server | None = None  # health_port: health alone, plaintext
        self.metrics: ServerMetrics | None = None
        self.tracing: Tracing | None = None
        try:
            self.tracing = make_tracing(config)
            if config.metrics_port:
                self.metrics = ServerMetrics(self._metric_sources())
                self.metrics.serve(config.host, config.metrics_port)
            self.port = self._call(self._build())
        except BaseException:
            self._close_resources()
            raise

    def _metric_sources(self) -> Sources:
        """What /metrics reads: a router's catalog keeps no shards, but counts retries and failovers."""
        catalog = self.catalog
        common = {"encoding": self.encoding, "admission": self.admission}
        router = getattr(catalog, "stats", None)
        if router is not None:  # service/cluster/router/catalog.py RemoteCatalog
            # A router stores nothing: no disk metrics (its data directory may not even exist).
            def live() -> int:
                return len(catalog.state.live_nodes())

            return Sources(router=router, live_shard_servers=live, role="router", **common)

        def shards() -> list[tuple[str, Any]]:
            if catalog.closed or not catalog.recovery.done:
                return []
            return [(collection.name, shard) for collection in catalog.list() for shard in collection.shards]

        return Sources(shards=shards, data_dir=self.config.data_dir, **common)

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _build(self) -> int:
        config = self.config
        options = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            ("grpc.so_reuseport", 0),
            # One connection cannot open unbounded calls, and dead peers' calls are reclaimed.
            ("grpc.max_concurrent_streams", MAX_CALLS_PER_CONNECTION),
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
        ]
        self._hurry = asyncio.Event()
        self.server = grpc.aio.server(options=options)
        keys = None
        if config.api_keys is not None:
            from .auth import ApiKeys

            keys = ApiKeys(config.api_keys)
        observer = CallObserver(
            SERVICE_NAME,
            self.metrics.rpc if self.metrics else None,
            config.slow_query_ms / 1000,
            self.tracing.tracer if self.tracing else None,
        )
        self.handlers = BraidHandlers(
            self.catalog, self.encoding, self.admission, config, keys, self._rpcs_class, observer
        )
        self.server.add_generic_rpc_handlers((self.handlers.generic_handler(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVE_HEALTH_NAME, health_pb2.HealthCheckResponse.SERVING)
        if config.reflection:
            names = (SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, self.server)
        if config.tls:
            from .tls import server_credentials

            credentials = server_credentials(config.tls_cert, config.tls_key, config.tls_client_ca)  # type: ignore[arg-type]
            port = self.server.add_secure_port(config.address, credentials)
        else:
            port = self.server.add_insecure_port(config.address)
        if port == 0:
            raise OSError(f"cannot bind {config.address}")
        if config.health_port:
            self.health_server = health_only_server(self.health, config.host, config.health_port)
        return port

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def start(self) -> None:
        """Start answering, then recover the catalog on a thread; health says SERVING once it is done."""
        self._call(self.server.start())
        if self.health_server is not None:
            self._call(self.health_server.start())
        threading.Thread(target=self._recover, name="braid-recovery", daemon=True).start()

    def _recover(self) -> None:
        try:
            self.catalog.recover()
        except BaseException:
            log.exception("recovery failed")  # calls keep answering UNAVAILABLE; health stays NOT_SERVING
            return
        quarantined = ", ".join(q.name for q in self.catalog.quarantined()) or "none"
        seconds = time.monotonic() - self.catalog.recovery.started
        replayed = self.catalog.recovery.log_bytes_replayed / 1e6
        log.info("recovery done in %.1f s, %.1f MB of log replayed (quarantined: %s)", seconds, replayed, quarantined)
        watch = _StorageWatch()
        if not watch.round(self):  # health SERVING, unless a shard could not recover its log
            return
        self._recovered.set()
        while not self._stopping.wait(STORAGE_WATCH_S) and watch.round(self):
            pass

    def wait_recovered(self, timeout: float | None = None) -> bool:
        """True once every collection is open (or quarantined) and health is set: SERVING, or
        NOT_SERVING while a shard waits for room to finish its recovery (_StorageWatch)."""
        return self._recovered.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Drain and close everything (see the module docstring); blocks until done; safe to call twice."""
        self._stopping.set()
        with self._stop_lock:
            if self._stopped.is_set():
                return
            grace = self.config.shutdown_grace_s if grace is None else grace
            try:
                self._call(self._shutdown(grace))
            finally:
                self._close_resources()
                self._stopped.set()

    def hurry(self) -> None:
        """End the grace period now (a second SIGTERM)."""
        if self._hurry is not None:
            self._loop.call_soon_threadsafe(self._hurry.set)

    async def _shutdown(self, grace: float) -> None:
        assert self._hurry is not None
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.ensure_future(self.server.stop(grace + STREAM_END_SECONDS))
        hurry = asyncio.ensure_future(self._hurry.wait())
        await asyncio.wait({stopping, hurry}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        if not stopping.done():
            self.handlers.end_streams()  # streams answer UNAVAILABLE with their applied counts
            await asyncio.wait({stopping}, timeout=STREAM_END_SECONDS / 2)
            if not stopping.done():
                await self.server.stop(0)
            await stopping
        hurry.cancel()
        if self.health_server is not None:  # last: probes read NOT_SERVING for the whole drain
            await self.health_server.stop(0)

    def _close_resources(self) -> None:
        if not self.admission.close(WORK_DRAIN_SECONDS):
            log.error("shutdown: work still running after %.0f s; closing shards anyway", WORK_DRAIN_SECONDS)
        self.encoding.close()
        self.catalog.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tracing is not None:
            self.tracing.close()  # exports the spans still buffered

    def wait_stopped(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)


def create_server(config: ServerConfig, catalog: Catalog | None = None) -> BraidServer:
    """Build a server bound to ``config.address`` (port 0 picks a free one: see ``.port``); call start().

    ``config.role`` router: the same braid.v1 server over a RemoteCatalog (service/cluster/router/).
    """
    if config.role == "router" and catalog is None:
        from .cluster.router import RemoteCatalog, RouterRpcs

        remote = RemoteCatalog(config)
        try:
            return BraidServer(config, remote, RouterRpcs)
        except BaseException:
            remote.close()
            raise
    return BraidServer(config, catalog)


class _StorageWatch:
    """Health from the shards' state, refreshed every STORAGE_WATCH_S until shutdown:

    - ``""`` and ``braid.v1.Braid``: NOT_SERVING while some shard could not finish recovery
      (a full disk stopped its replay: it refuses reads rather than answer from part of its
      log), SERVING otherwise;
    - ``braid.collection.<name>``: the same for one collection;
    - ``braid.writes``: NOT_SERVING while some collection refuses writes (a full disk, a
      failed log; reads go on).

    Shards that a full disk made read-only or left unrecovered are healed (reopened) each
    round once there is room.
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def round(self, server: BraidServer) -> bool:
        """One refresh; False once the catalog is closed (shutting down)."""
        serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
        statuses: dict[str, int] = {}
        read_problems, write_problems = [], []
        try:
            for collection in server.catalog.list():
                if collection.write_problem() is not None or collection.read_problem() is not None:
                    collection.heal()
                read_problem = collection.read_problem()
                statuses[f"{COLLECTION_HEALTH_PREFIX}{collection.name}"] = not_serving if read_problem else serving
                if read_problem is not None:
                    read_problems.append(read_problem)
                if (problem := collection.write_problem()) is not None:
                    write_problems.append(f"{collection.name}: {problem}")
        except BraidError:  # the catalog closed under us: shutting down
            return False
        except Exception:  # never let one bad round stop the health updates: the next one tries again
            log.exception("storage health check failed")
            return True
        overall = not_serving if read_problems else serving
        statuses[""] = statuses[SERVICE_NAME] = overall
        statuses[WRITES_HEALTH_NAME] = not_serving if write_problems else serving
        if read_problems and self._last.get("") != not_serving:
            log.warning("not serving: %s", "; ".join(read_problems))
        if write_problems and self._last.get(WRITES_HEALTH_NAME) != not_serving:
            log.warning("writes refused: %s", "; ".join(write_problems))
        for name, status in statuses.items():
            if self._last.get(name) != status:
                if server._stopping.is_set():  # shutdown owns the overall status now
                    return False
                server._call(server.health.set(name, status))
                self._last[name] = status
        return True


def serve(config: ServerConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight RPCs and close every shard cleanly."""
    server = create_server(config)
    server.start()
    log.info("braid listening on %s:%d, recovering collections in %s", config.host, server.port, config.data_dir)
    signals = threading.Semaphore(0)

    def announce() -> None:
        if server.wait_recovered() and ready is not None:
            ready(server.port)

    threading.Thread(target=announce, name="braid-announce", daemon=True).start()

    def on_signal(signum: int, frame: object) -> None:
        signals.release()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not signals.acquire(timeout=1.0):  # a timeout, so the main thread still runs signal handlers
        pass
    log.info("shutting down (grace %.1f s; a second signal ends in-flight calls now)", config.shutdown_grace_s)
    stopper = threading.Thread(target=server.stop, name="braid-stop")
    stopper.start()
    while not server.wait_stopped(0.2):
        if signals.acquire(blocking=False):
            log.info("second signal: ending in-flight calls")
            server.hurry()
    stopper.join()
    log.info("stopped")
