"""Prometheus metrics of one server, served on ``--metrics-port`` (BRAID_METRICS_PORT; 0 = off).

Each server has its own ``CollectorRegistry`` (never prometheus_client's global one), so
several servers in one process (the tests) never mix. Two kinds of metric:

- measured by service/ on the call path (``RpcMetrics``): ``braid_rpc_requests_total`` and
  ``braid_rpc_duration_seconds``, by service, method and status code;
- read when /metrics is scraped (``BraidCollector``) from the plain counters index/ and
  encoders/ keep (index/stats.py, encoders/stats.py; neither imports Prometheus) and from
  the server's state: documents, index memory and disk bytes, WAL, checkpoints, merges,
  SPANN reads, encoders, admission, disk space, and in a cluster replica lag and the
  router's retries and failovers;
- prometheus_client's standard ``process_*`` metrics (resident memory, open file
  descriptors, CPU seconds).

docs/operations.md lists every metric, its labels, and the alerts worth setting.
"""

from __future__ import annotations

import logging
import platform
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from braid import __version__

log = logging.getLogger("braid.metrics")
RPC_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RpcMetrics:
    """What the handlers measure: one count and one duration per finished call."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "braid_rpc_requests",
            "RPCs finished, by service, method and gRPC status code.",
            ("service", "method", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "braid_rpc_duration_seconds",
            "Time from a call's arrival to its answer (admission wait included), by service and method.",
            ("service", "method"),
            buckets=RPC_SECONDS,
            registry=registry,
        )
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, service: str, method: str, code: str, seconds: float) -> None:
        key = (service, method, code)
        children = self._children.get(key)
        if children is None:  # labels() looks a child up under a lock: keep the pair for next time
            children = self._children[key] = (
                self.requests.labels(service, method, code),
                self.duration.labels(service, method),
            )
        children[0].inc()
        children[1].observe(seconds)


class ReplicaState(NamedTuple):
    """What a shard server reports of one replica."""

    collection: str
    shard: int
    lag_records: int | None  # records of its log subject not yet applied; None until known
    caught_up: bool
    applied_seq: int
    restores: int = 0  # bootstraps from a snapshot since the process started
    snapshots: int = 0  # snapshots of its shard it stored since then


@dataclass
class Sources:
    """Where the collector reads from; what a role does not have stays None (or empty)."""

    shards: Callable[[], Iterable[tuple[str, Any]]] = lambda: ()  # (collection, index/ Shard)
    encoding: Any = None  # service/encoding.py Encoding
    admission: Any = None  # service/admission.py Admission
    data_dir: Path | None = None
    replicas: Callable[[], Iterable[ReplicaState]] | None = None  # a shard server's
    router: Any = None  # service/cluster/view.py RouterStats
    live_shard_servers: Callable[[], int] | None = None  # a router's view of the cluster
    role: str = "standalone"  # braid_build_info's role: standalone, router or shard


class ServerMetrics:
    """One server's registry, its RPC metrics and collector, and the HTTP server of /metrics."""

    def __init__(self, sources: Sources) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.rpc = RpcMetrics(self.registry)
        self.registry.register(BraidCollector(sources))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, open fds, CPU (Linux /proc)
        self._http: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a daemon thread; returns the port (OSError if it is taken)."""
        try:
            self._http, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as err:
            raise OSError(f"cannot serve metrics on {host}:{port}: {err}") from err
        self.port = int(self._http.server_port)
        log.info("metrics on http://%s:%d/metrics", host, self.port)
        return self.port

    def close(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            http.shutdown()
            http.server_close()
        if self._thread is not None:
            self._thread.join(5)


# --------------------------------------------------------------------- collector


class _Hist:
    """Histogram snapshots (index/stats.py or encoders/stats.py) summed over shards or fields."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self) -> None:
        self.bounds: tuple[float, ...] = ()
        self.counts: list[int] = []
        self.count = 0
        self.sum = 0.0

    def add(self, histogram: Any) -> None:
        counts, count, total = histogram.snapshot()
        if not self.counts:
            self.bounds, self.counts = histogram.bounds, [0] * len(counts)
        self.counts = [a + b for a, b in zip(self.counts, counts, strict=True)]
        self.count += count
        self.sum += total

    def buckets(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((floatToGoString(bound), running))
        out.append(("+Inf", self.count))
        return out


def _histograms(name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], _Hist]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=labels)
    for key, hist in sorted(values.items()):
        family.add_metric(list(key), hist.buckets(), hist.sum)
    return family


def _family(kind: type, name: str, doc: str, labels: list[str], values: dict[tuple[str, ...], float]) -> Metric:
    family = kind(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family


class BraidCollector(Collector):
    """Reads index/, encoder and cluster state when scraped. A part that fails is skipped (and
    logged at DEBUG): a collection closing mid-scrape must not cost the whole scrape."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def describe(self) -> list[Metric]:
        return []  # names are not checked for clashes: this registry holds only Braid's metrics

    def collect(self) -> Iterator[Metric]:
        parts = (self._build, self._collections, self._encoders, self._admission, self._disk, self._replicas)
        for part in (*parts, self._router):
            try:
                yield from part()
            except Exception as err:  # state changing under the scrape: report the rest
                log.debug("metrics: %s skipped: %s", part.__name__, err)

    def _build(self) -> Iterator[Metric]:
        # Always 1: its labels tell a dashboard (or an alert) which version and role each target runs.
        info = GaugeMetricFamily(
            "braid_build_info",
            "1, labelled with the server's version, role and Python.",
            labels=["version", "role", "python"],
        )
        info.add_metric([__version__, self.sources.role, platform.python_version()], 1)
        yield info

    # ----------------------------------------------------------- collections

    def _collections(self) -> Iterator[Metric]:
        documents: dict[tuple[str, ...], float] = {}
        refused: dict[tuple[str, ...], float] = {}
        memory: dict[tuple[str, ...], float] = {}
        disk: dict[tuple[str, ...], float] = {}
        appended: dict[tuple[str, ...], float] = {}
        written: dict[tuple[str, ...], float] = {}
        wal_append: dict[tuple[str, ...], _Hist] = {}
        wal_fsync: dict[tuple[str, ...], _Hist] = {}
        jobs: dict[str, dict[tuple[str, ...], float]] = {"checkpoints": {}, "merges": {}}
        job_seconds: dict[str, dict[tuple[str, ...], _Hist]] = {"checkpoints": {}, "merges": {}}
        lists: dict[tuple[str, ...], float] = {}
        read_bytes: dict[tuple[str, ...], float] = {}
        per_query: dict[tuple[str, ...], _Hist] = {}
        hnsw_rows: dict[tuple[str, ...], float] = {}
        graphs: dict[tuple[str, ...], float] = {}
        for name, shard in list(self.sources.shards()):
            key = (name,)
            documents[key] = documents.get(key, 0) + shard.live_count
            refused[key] = max(refused.get(key, 0), 1 if shard.write_problem() is not None else 0)
            for (field, index), (mem, nbytes) in shard.footprint().items():
                at = (name, field, index)
                memory[at] = memory.get(at, 0) + mem
                disk[at] = disk.get(at, 0) + nbytes
            stats = shard.stats
            appended[key] = appended.get(key, 0) + stats.wal.appended_bytes
            for op, n in list(stats.written.items()):
                written[(name, op)] = written.get((name, op), 0) + n
            wal_append.setdefault(key, _Hist()).add(stats.wal.append_seconds)
            wal_fsync.setdefault(key, _Hist()).add(stats.wal.fsync_seconds)
            for kind, job in (("checkpoints", stats.checkpoints), ("merges", stats.merges)):
                for (what, outcome), n in list(job.outcomes.items()):
                    at = (name, outcome) if kind == "checkpoints" else (name, what, outcome)
                    jobs[kind][at] = jobs[kind].get(at, 0) + n
                for what, histogram in list(job.seconds.items()):
                    at = (name,) if kind == "checkpoints" else (name, what)
                    job_seconds[kind].setdefault(at, _Hist()).add(histogram)
            for field, parts in shard.hnsw_parts().items():
                graphs[(name, field)] = graphs.get((name, field), 0) + parts.pop("graphs")
                for part, rows in parts.items():
                    hnsw_rows[(name, field, part)] = hnsw_rows.get((name, field, part), 0) + rows
            for field, spann in list(stats.spann.items()):
                at = (name, field)
                lists[at] = lists.get(at, 0) + spann.lists_read
                read_bytes[at] = read_bytes.get(at, 0) + spann.bytes_read
                per_query.setdefault(at, _Hist()).add(spann.lists_per_query)
        c, f = ["collection"], ["collection", "field"]
        yield _family(
            GaugeMetricFamily,
            "braid_collection_documents",
            "Live documents held (on a shard server: in its replicas).",
            c,
            documents,
        )
        yield _family(
            GaugeMetricFamily,
            "braid_collection_writes_refused",
            "1 while some shard of the collection refuses writes (a full disk, a failed log), else 0.",
            c,
            refused,
        )
        yield _family(
            GaugeMetricFamily,
            "braid_index_memory_bytes",
            "Estimated resident bytes of each index (docs/operations.md says how).",
            [*f, "index"],
            memory,
        )
        yield _family(
            GaugeMetricFamily,
            "braid_hnsw_rows",
            "Rows of each HNSW field by part: sealed (in graphs, dead included), dead (deleted, still in a "
            "graph), frozen (waiting to be built into a graph), growing (taking writes); "
            "frozen and growing are searched exactly.",
            [*f, "part"],
            hnsw_rows,
        )
        yield _family(
            GaugeMetricFamily,
            "braid_hnsw_graphs",
            "Sealed graphs of each HNSW field (summed over shards): each is walked by every search; "
            "merges keep the count small and make it one when writes stop.",
            f,
            graphs,
        )
        yield _family(
            GaugeMetricFamily,
            "braid_index_disk_bytes",
            "Bytes of the files of each index under the data directory.",
            [*f, "index"],
            disk,
        )
        yield _family(
            CounterMetricFamily, "braid_wal_appended_bytes", "Bytes appended to the write-ahead logs.", c, appended
        )
        yield _family(
            CounterMetricFamily,
            "braid_documents_written",
            "Documents written by applied writes since the process started (op upsert: every document of an "
            "upsert; op delete: every document a delete removed); on a shard server, applied to its replicas.",
            [*c, "op"],
            written,
        )
        yield _histograms(
            "braid_wal_append_seconds", "Time of one write-ahead log append (one write call, no fsync).", c, wal_append
        )
        yield _histograms(
            "braid_wal_fsync_seconds",
            "Time of one write-ahead log fsync (shared by the writes of a group commit).",
            c,
            wal_fsync,
        )
        yield _family(
            CounterMetricFamily,
            "braid_checkpoints",
            "Shard checkpoints, by outcome (ok, failed).",
            [*c, "outcome"],
            jobs["checkpoints"],
        )
        yield _histograms(
            "braid_checkpoint_duration_seconds", "Time of a successful shard checkpoint.", c, job_seconds["checkpoints"]
        )
        yield _family(
            CounterMetricFamily,
            "braid_merges",
            "SPANN merges, by kind (seal, compact) and outcome (ok, failed, cancelled).",
            [*c, "kind", "outcome"],
            jobs["merges"],
        )
        yield _histograms(
            "braid_merge_duration_seconds",
            "Time of a successful SPANN merge, build and publish.",
            [*c, "kind"],
            job_seconds["merges"],
        )
        yield _family(CounterMetricFamily, "braid_spann_lists_read", "SPANN posting lists read by searches.", f, lists)
        yield _family(
            CounterMetricFamily,
            "braid_spann_bytes_read",
            "Bytes of SPANN posting lists read by searches (vectors and labels).",
            f,
            read_bytes,
        )
        yield _histograms(
            "braid_spann_lists_per_query", "Posting lists one query read in one sealed SPANN segment.", f, per_query
        )

    # -------------------------------------------------------------- encoders

    def _encoders(self) -> Iterator[Metric]:
        encoding = self.sources.encoding
        if encoding is None:
            return
        sizes: dict[tuple[str, ...], _Hist] = {}
        waits: dict[tuple[str, ...], _Hist] = {}
        runs: dict[tuple[str, ...], _Hist] = {}
        failures: dict[tuple[str, ...], float] = {}
        for (model, precision, source), stats in list(encoding.stats.items()):
            key = (model, precision, source)
            sizes.setdefault(key, _Hist()).add(stats.batch_size)
            runs.setdefault(key, _Hist()).add(stats.inference_seconds)
            failures[key] = stats.failures
            if source == "query":
                waits.setdefault((model, precision), _Hist()).add(stats.queue_wait_seconds)
        labels = ["model", "precision", "source"]
        yield _histograms(
            "braid_encoder_batch_size",
            "Texts per model call (source query: micro-batched search texts; document: one upsert batch's texts).",
            labels,
            sizes,
        )
        yield _histograms(
            "braid_encoder_queue_wait_seconds",
            "Time a query text waited for its micro-batch to start.",
            ["model", "precision"],
            waits,
        )
        yield _histograms(
            "braid_encoder_inference_seconds", "Time of one model call (tokenize, run, pool).", labels, runs
        )
        yield _family(CounterMetricFamily, "braid_encoder_failures", "Model calls that raised.", labels, failures)

    # ------------------------------------------------------------- admission

    def _admission(self) -> Iterator[Metric]:
        admission = self.sources.admission
        if admission is None:
            return
        outstanding = admission.outstanding
        running = min(outstanding, admission.workers)
        yield GaugeMetricFamily("braid_calls_running", "Calls running on a worker thread.", value=running)
        yield GaugeMetricFamily("braid_calls_queued", "Calls waiting for a worker.", value=outstanding - running)
        yield GaugeMetricFamily(
            "braid_calls_queue_limit",
            "max_queue: queued calls beyond this are RESOURCE_EXHAUSTED.",
            value=admission.max_queue,
        )
        yield GaugeMetricFamily(
            "braid_streams_open", "Open write streams (BulkUpsert and UpsertStream).", value=admission.open_streams
        )

    def _disk(self) -> Iterator[Metric]:
        if self.sources.data_dir is None:
            return
        usage = shutil.disk_usage(self.sources.data_dir)
        yield GaugeMetricFamily(
            "braid_disk_free_bytes", "Free bytes on the data directory's filesystem.", value=usage.free
        )
        yield GaugeMetricFamily("braid_disk_total_bytes", "Size of the data directory's filesystem.", value=usage.total)

    # --------------------------------------------------------------- cluster

    def _replicas(self) -> Iterator[Metric]:
        if self.sources.replicas is None:
            return
        lag: dict[tuple[str, ...], float] = {}
        caught_up: dict[tuple[str, ...], float] = {}
        applied: dict[tuple[str, ...], float] = {}
        restores: dict[tuple[str, ...], float] = {}
        snapshots: dict[tuple[str, ...], float] = {}
        for replica in list(self.sources.replicas()):
            key = (replica.collection, str(replica.shard))
            if replica.lag_records is not None:
                lag[key] = replica.lag_records
            caught_up[key] = 1 if replica.caught_up else 0
            applied[key] = replica.applied_seq
            restores[key] = replica.restores
            snapshots[key] = replica.snapshots
        labels = ["collection", "shard"]
        yield _family(
            GaugeMetricFamily,
            "braid_replica_lag_records",
            "Records of the shard's log (its JetStream subject) this replica has not applied yet.",
            labels,
            lag,
        )
        yield _family(
            GaugeMetricFamily,
            "braid_replica_caught_up",
            "1 once the replica has read its log to the end since it opened (it serves reads), else 0.",
            labels,
            caught_up,
        )
        yield _family(
            GaugeMetricFamily,
            "braid_replica_applied_sequence",
            "The last log (stream) sequence the replica applied.",
            labels,
            applied,
        )
        yield _family(
            CounterMetricFamily,
            "braid_replica_restores",
            "Times the replica was rebuilt from a snapshot (an empty, quarantined or trimmed-past directory).",
            labels,
            restores,
        )
        yield _family(
            CounterMetricFamily,
            "braid_replica_snapshots",
            "Snapshots of the shard this replica stored in the object store (its schedule's, on demand, users').",
            labels,
            snapshots,
        )

    def _router(self) -> Iterator[Metric]:
        stats = self.sources.router
        if stats is not None:
            retries = {(code,): float(n) for code, n in list(stats.retries.items())}
            yield _family(
                CounterMetricFamily,
                "braid_router_retries",
                "Replica calls that failed with a retryable "
                "status (the router tries the shard's next replica), by code.",
                ["code"],
                retries,
            )
            yield CounterMetricFamily(
                "braid_router_failovers",
                "Shard calls answered by a replica other than the first one tried.",
                value=stats.failovers,
            )
        if self.sources.live_shard_servers is not None:
            yield GaugeMetricFamily(
                "braid_router_shard_servers_live",
                "Shard servers heard from within the TTL.",
                value=self.sources.live_shard_servers(),
            )
