"""Builds deploy/grafana/braid.json: the Grafana (10 and later) dashboard of Braid's Prometheus metrics.

The panels are declared below as data (rows of panels, each with its PromQL, its unit and the
roles whose /metrics carry what it shows); ``render()`` lays them out on Grafana's 24-column
grid and returns the dashboard's JSON model. After editing a panel::

    python deploy/grafana/build.py           # rewrites braid.json
    python deploy/grafana/build.py --check   # exits 1 when braid.json is not what this file builds

Standard library only, on purpose: grafana-foundation-sdk (Grafana's generated builders) is
published on PyPI once per Grafana version under epoch-stamped versions (``1769699998!11.6.0``),
calls itself experimental / public preview, and its builders change between releases; this
dashboard uses a handful of JSON objects, and tests/test_grafana.py checks the JSON itself
(structure, PromQL syntax, every metric and label against live /metrics of a standalone server
and a cluster).

Conventions the test holds every panel to: each target names the datasource variable
``${datasource}``; each selector filters on ``job=~"$job",instance=~"$instance"`` (and
``collection=~"$collection"`` where the metric has that label); each panel's description ends
with ``Exported by: <roles>.``: the roles (standalone, router, shard) whose /metrics carry every
metric the panel names.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("braid.json")
COLUMNS = 24
STANDALONE, ROUTER, SHARD = "standalone", "router", "shard"
ALL = (STANDALONE, ROUTER, SHARD)
CLIENT_API = (STANDALONE, ROUTER)  # serve braid.v1.Braid and encode texts
STORAGE = (STANDALONE, SHARD)  # hold collections
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
R = "$__rate_interval"

# Label matchers used below.
API = 'service="braid.v1.Braid"'
SHARD_API = 'service="braid.cluster.v1.Shard"'
SERVICE = 'service=~"$service"'
METHOD = 'method=~"$method"'
NOT_OK = 'code!="OK"'
OK = 'code="OK"'
WRITES = 'method=~"Upsert|BulkUpsert|UpsertStream|Delete"'
SEARCHES = 'method=~"Search|BatchSearch"'
REFUSED = 'code=~"RESOURCE_EXHAUSTED|UNAVAILABLE"'
EXHAUSTED = 'code="RESOURCE_EXHAUSTED"'


def s(metric: str, *matchers: str, c: bool = False) -> str:
    """A selector of ``metric`` filtered by the job and instance variables (and collection: ``c``)."""
    base = ['job=~"$job"', 'instance=~"$instance"', *(['collection=~"$collection"'] if c else []), *matchers]
    return f"{metric}{{{','.join(base)}}}"


def rate(selector: str) -> str:
    return f"rate({selector}[{R}])"


def quantile(q: float, bucket: str, by: str) -> str:
    """The q-quantile of a histogram's ``bucket`` selector, per ``by`` labels."""
    return f"histogram_quantile({q}, sum by (le, {by}) ({rate(bucket)}))"


def mean(histogram: str, by: str, *matchers: str, c: bool = False) -> str:
    """A histogram's mean over the rate window: rate of _sum over rate of _count."""
    total, count = s(f"{histogram}_sum", *matchers, c=c), s(f"{histogram}_count", *matchers, c=c)
    return f"sum by ({by}) ({rate(total)}) / sum by ({by}) ({rate(count)})"


@dataclass
class Q:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    description: str
    roles: tuple[str, ...]
    queries: list[Q]
    unit: str = "short"
    width: int = 8
    height: int = 8
    kind: str = "timeseries"  # or "stat"
    thresholds: list[tuple[float | None, str]] = field(default_factory=list)


@dataclass
class Row:
    title: str
    panels: list[Panel]
    collapsed: bool = False  # the cluster rows: a standalone deployment has nothing to show there


def stat(title: str, description: str, roles: tuple[str, ...], expr: str, unit: str, **options: Any) -> Panel:
    return Panel(title, description, roles, [Q(expr)], unit, width=4, height=4, kind="stat", **options)


ROWS: list[Row] = [
    Row(
        "Overview",
        [
            stat(
                "Requests/s (client API)",
                "Calls answered per second on braid.v1.Braid, every method and status.",
                CLIENT_API,
                f"sum({rate(s('braid_rpc_requests_total', API))})",
                "reqps",
            ),
            stat(
                "Errors (not OK)",
                "Share of braid.v1.Braid calls that ended with a status other than OK (client errors such "
                "as INVALID_ARGUMENT and NOT_FOUND included).",
                CLIENT_API,
                f"sum({rate(s('braid_rpc_requests_total', API, NOT_OK))}) "
                f"/ sum({rate(s('braid_rpc_requests_total', API))})",
                "percentunit",
                thresholds=[(None, "green"), (0.01, "orange"), (0.05, "red")],
            ),
            stat(
                "Search p99",
                "99th percentile of Search and BatchSearch, from arrival to answer (admission wait included).",
                CLIENT_API,
                quantile(0.99, s("braid_rpc_duration_seconds_bucket", API, SEARCHES), "service"),
                "s",
            ),
            stat(
                "Live documents",
                "Documents held, summed over the selected servers (in a cluster each replica counts: divide "
                "by the replication factor).",
                STORAGE,
                f"sum({s('braid_collection_documents', c=True)})",
                "short",
            ),
            stat(
                "Collections refusing writes",
                "Collections with a shard that refuses writes (a full disk, a failed log fsync); reads keep "
                "working. See the row 'Disk and refused writes'.",
                STORAGE,
                f"sum(max by (collection) ({s('braid_collection_writes_refused', c=True)}))",
                "short",
                thresholds=[(None, "green"), (1, "red")],
            ),
            stat(
                "Lowest disk free",
                "Free bytes of the fullest data directory's filesystem; writes are refused below "
                "--min-free-bytes (256 MiB).",
                STORAGE,
                f"min({s('braid_disk_free_bytes')})",
                "bytes",
                thresholds=[(None, "red"), (536870912, "orange"), (2147483648, "green")],
            ),
        ],
    ),
    Row(
        "Requests",
        [
            Panel(
                "Requests/s by method",
                "Finished calls per second by API and method: braid.v1.Braid on standalone servers and routers, "
                "braid.cluster.v1.Shard on shard servers (the calls routers make). BulkUpsert and UpsertStream "
                "count one per stream. Follows the service and method variables.",
                ALL,
                [
                    Q(
                        f"sum by (service, method) ({rate(s('braid_rpc_requests_total', SERVICE, METHOD))})",
                        "{{method}} ({{service}})",
                    )
                ],
                "reqps",
                width=12,
            ),
            Panel(
                "Errors/s by method and gRPC code",
                "Calls that ended with a status other than OK. RESOURCE_EXHAUSTED: admission refused them (queue "
                "full, stream limits) or the disk is full; UNAVAILABLE: recovery, shutdown, no live replica; "
                "INTERNAL, UNKNOWN, DATA_LOSS: bugs and damaged files (run braid verify).",
                ALL,
                [
                    Q(
                        f"sum by (method, code) ({rate(s('braid_rpc_requests_total', SERVICE, METHOD, NOT_OK))})",
                        "{{method}} {{code}}",
                    )
                ],
                "reqps",
                width=12,
            ),
            Panel(
                "Latency p50 by method",
                "Median time from a call's arrival to its answer, admission wait included (for write streams: "
                "the whole stream).",
                ALL,
                [
                    Q(
                        quantile(0.5, s("braid_rpc_duration_seconds_bucket", SERVICE, METHOD), "service, method"),
                        "{{method}}",
                    )
                ],
                "s",
            ),
            Panel(
                "Latency p99 by method",
                "99th percentile of the time from a call's arrival to its answer, admission wait included.",
                ALL,
                [
                    Q(
                        quantile(0.99, s("braid_rpc_duration_seconds_bucket", SERVICE, METHOD), "service, method"),
                        "{{method}}",
                    )
                ],
                "s",
            ),
            Panel(
                "Search latency",
                "Search and BatchSearch on the client API: percentiles and the mean. The slow-query log "
                "(--slow-query-ms) says which plans are slow.",
                CLIENT_API,
                [
                    *(
                        Q(quantile(q, s("braid_rpc_duration_seconds_bucket", API, SEARCHES), "service"), f"p{label}")
                        for q, label in ((0.5, "50"), (0.9, "90"), (0.99, "99"), (0.999, "99.9"))
                    ),
                    Q(mean("braid_rpc_duration_seconds", "service", API, SEARCHES), "mean"),
                ],
                "s",
            ),
        ],
    ),
    Row(
        "Admission and streams",
        [
            Panel(
                "Calls running and queued",
                "Calls on a worker thread (at most --workers) and calls waiting for one.",
                ALL,
                [
                    Q(f"sum by (instance) ({s('braid_calls_running')})", "{{instance}} running"),
                    Q(f"sum by (instance) ({s('braid_calls_queued')})", "{{instance}} queued"),
                ],
                width=6,
            ),
            Panel(
                "Queue fill",
                "Queued calls over --max-queue: at 100% new calls are refused with RESOURCE_EXHAUSTED "
                "(clients get a grpc-retry-pushback-ms hint).",
                ALL,
                [Q(f"max by (instance) ({s('braid_calls_queued')} / {s('braid_calls_queue_limit')})", "{{instance}}")],
                "percentunit",
                width=6,
            ),
            Panel(
                "Open write streams",
                "Open BulkUpsert and UpsertStream calls (limit --max-streams).",
                ALL,
                [Q(f"sum by (instance) ({s('braid_streams_open')})", "{{instance}}")],
                width=6,
            ),
            Panel(
                "Refused with RESOURCE_EXHAUSTED",
                "Calls per second refused at admission or over a limit, by method.",
                ALL,
                [
                    Q(
                        f"sum by (method) ({rate(s('braid_rpc_requests_total', SERVICE, EXHAUSTED))})",
                        "{{method}}",
                    )
                ],
                "reqps",
                width=6,
            ),
        ],
    ),
    Row(
        "Ingest",
        [
            Panel(
                "Write calls/s",
                "Acknowledged Upsert, BulkUpsert (one per stream), UpsertStream (one per stream) and Delete "
                "calls on the client API; 'Documents written/s' counts their documents.",
                CLIENT_API,
                [Q(f"sum by (method) ({rate(s('braid_rpc_requests_total', API, WRITES, OK))})", "{{method}}")],
                "reqps",
                width=6,
            ),
            Panel(
                "Documents written/s",
                "Documents upserted and deleted per second by applied writes, per collection and op, over the "
                "selected servers (in a cluster each replica applies every write of its shard: divide by the "
                "replication factor for the ingest rate).",
                STORAGE,
                [
                    Q(
                        f"sum by (collection, op) ({rate(s('braid_documents_written_total', c=True))})",
                        "{{collection}} {{op}}",
                    )
                ],
                width=6,
            ),
            Panel(
                "WAL bytes/s",
                "Bytes appended to the write-ahead logs per second: the ingest volume (vectors, text, payload).",
                STORAGE,
                [Q(f"sum by (collection) ({rate(s('braid_wal_appended_bytes_total', c=True))})", "{{collection}}")],
                "Bps",
                width=6,
            ),
            Panel(
                "Live documents by collection",
                "Documents held per collection over the selected servers (in a cluster each replica counts).",
                STORAGE,
                [Q(f"sum by (collection) ({s('braid_collection_documents', c=True)})", "{{collection}}")],
                width=6,
            ),
        ],
    ),
    Row(
        "Encoders",
        [
            Panel(
                "Model calls/s",
                "Calls of each ONNX model, by source (query: micro-batched search texts; document: an upsert "
                "batch's texts), and the calls that raised.",
                CLIENT_API,
                [
                    Q(
                        f"sum by (model, precision, source) ({rate(s('braid_encoder_inference_seconds_count'))})",
                        "{{model}} {{precision}} {{source}}",
                    ),
                    Q(
                        f"sum by (model, precision, source) ({rate(s('braid_encoder_failures_total'))})",
                        "{{model}} {{precision}} {{source}} failed",
                    ),
                ],
                "ops",
                width=6,
            ),
            Panel(
                "Inference p99",
                "99th percentile of one model call: tokenize, run, pool.",
                CLIENT_API,
                [
                    Q(
                        quantile(0.99, s("braid_encoder_inference_seconds_bucket"), "model, source"),
                        "{{model}} {{source}}",
                    )
                ],
                "s",
                width=6,
            ),
            Panel(
                "Query batching wait p99",
                "How long a query text waited for its micro-batch to start (BRAID_ENCODER_MAX_WAIT_MS when idle, "
                "more when the model is busy).",
                CLIENT_API,
                [Q(quantile(0.99, s("braid_encoder_queue_wait_seconds_bucket"), "model"), "{{model}}")],
                "s",
                width=6,
            ),
            Panel(
                "Texts per model call",
                "Mean batch size per model call, by source.",
                CLIENT_API,
                [Q(mean("braid_encoder_batch_size", "model, source"), "{{model}} {{source}}")],
                width=6,
            ),
        ],
    ),
    Row(
        "Index memory and disk",
        [
            Panel(
                "Index memory",
                "Estimated resident bytes of each index, by collection, field and index kind (hnsw, spann, "
                "sparse, payload, bm25, ids), from the structures' sizes; docs/operations.md says how.",
                STORAGE,
                [
                    Q(
                        f"sum by (collection, field, index) ({s('braid_index_memory_bytes', c=True)})",
                        "{{collection}}/{{field}} {{index}}",
                    )
                ],
                "bytes",
                width=12,
            ),
            Panel(
                "Index disk",
                "Bytes of each index's files under the data directory (wal: the logs until the next checkpoint).",
                STORAGE,
                [
                    Q(
                        f"sum by (collection, field, index) ({s('braid_index_disk_bytes', c=True)})",
                        "{{collection}}/{{field}} {{index}}",
                    )
                ],
                "bytes",
                width=12,
            ),
            Panel(
                "Process memory and the index estimate",
                "Each server's resident memory beside its indexes' estimate (the selected collections): the gap "
                "is Python, allocator slack and what the estimate leaves out.",
                STORAGE,
                [
                    Q(f"sum by (instance) ({s('process_resident_memory_bytes')})", "{{instance}} resident"),
                    Q(f"sum by (instance) ({s('braid_index_memory_bytes', c=True)})", "{{instance}} indexes"),
                ],
                "bytes",
                width=12,
            ),
            Panel(
                "Index memory by kind",
                "Estimated resident bytes summed by index kind over the selected collections.",
                STORAGE,
                [Q(f"sum by (index) ({s('braid_index_memory_bytes', c=True)})", "{{index}}")],
                "bytes",
                width=12,
            ),
        ],
    ),
    Row(
        "Vector indexes",
        [
            Panel(
                "HNSW rows by part",
                "Rows of each HNSW field: sealed (in graphs, deleted included), dead (deleted, still in a graph), "
                "frozen (waiting to be built into a graph; frozen rows above 16,384 hold writers back) and growing "
                "(taking writes); frozen and growing rows are searched exactly.",
                STORAGE,
                [
                    Q(
                        f"sum by (collection, field, part) ({s('braid_hnsw_rows', c=True)})",
                        "{{collection}}/{{field}} {{part}}",
                    )
                ],
                width=12,
            ),
            Panel(
                "HNSW sealed graphs",
                "Sealed graphs of each HNSW field; every search walks each, merges keep the count small.",
                STORAGE,
                [Q(f"sum by (collection, field) ({s('braid_hnsw_graphs', c=True)})", "{{collection}}/{{field}}")],
                width=12,
            ),
            Panel(
                "SPANN posting lists read/s",
                "Posting lists read by searches of SPANN fields.",
                STORAGE,
                [
                    Q(
                        f"sum by (collection, field) ({rate(s('braid_spann_lists_read_total', c=True))})",
                        "{{collection}}/{{field}}",
                    )
                ],
                "ops",
            ),
            Panel(
                "SPANN bytes read/s",
                "Bytes of posting lists read by searches (from the page cache or the disk).",
                STORAGE,
                [
                    Q(
                        f"sum by (collection, field) ({rate(s('braid_spann_bytes_read_total', c=True))})",
                        "{{collection}}/{{field}}",
                    )
                ],
                "Bps",
            ),
            Panel(
                "SPANN lists per query p90",
                "Posting lists one query read in one sealed segment (filters widen the probe).",
                STORAGE,
                [
                    Q(
                        quantile(0.9, s("braid_spann_lists_per_query_bucket", c=True), "collection, field"),
                        "{{collection}}/{{field}}",
                    )
                ],
            ),
        ],
    ),
    Row(
        "WAL, checkpoints and merges",
        [
            Panel(
                "WAL fsync latency",
                "One write-ahead log fsync, shared by the writes of a group commit: every acknowledged write "
                "waits for one.",
                STORAGE,
                [
                    Q(quantile(0.5, s("braid_wal_fsync_seconds_bucket", c=True), "collection"), "{{collection}} p50"),
                    Q(quantile(0.99, s("braid_wal_fsync_seconds_bucket", c=True), "collection"), "{{collection}} p99"),
                ],
                "s",
            ),
            Panel(
                "WAL append latency p99",
                "One write-ahead log append (one write call, no fsync).",
                STORAGE,
                [Q(quantile(0.99, s("braid_wal_append_seconds_bucket", c=True), "collection"), "{{collection}}")],
                "s",
            ),
            Panel(
                "Checkpoint duration",
                "Time of a successful shard checkpoint (Flush, the log-size or age policy, merges, shutdown).",
                STORAGE,
                [
                    Q(
                        quantile(0.99, s("braid_checkpoint_duration_seconds_bucket", c=True), "collection"),
                        "{{collection}} p99",
                    ),
                    Q(mean("braid_checkpoint_duration_seconds", "collection", c=True), "{{collection}} mean"),
                ],
                "s",
            ),
            Panel(
                "Checkpoints/min by outcome",
                "Shard checkpoints per minute, ok or failed: failing checkpoints let the log grow and restarts "
                "replay more.",
                STORAGE,
                [
                    Q(
                        f"60 * sum by (collection, outcome) ({rate(s('braid_checkpoints_total', c=True))})",
                        "{{collection}} {{outcome}}",
                    )
                ],
                "opm",
            ),
            Panel(
                "Merges/min by kind and outcome",
                "Background builds per minute: SPANN seal and compact, HNSW hnsw-seal and hnsw-merge; outcome ok, "
                "failed or cancelled (shutdown).",
                STORAGE,
                [
                    Q(
                        f"60 * sum by (collection, kind, outcome) ({rate(s('braid_merges_total', c=True))})",
                        "{{collection}} {{kind}} {{outcome}}",
                    )
                ],
                "opm",
            ),
            Panel(
                "Merge duration p99",
                "Time of a successful merge: build and publishing checkpoint.",
                STORAGE,
                [
                    Q(
                        quantile(0.99, s("braid_merge_duration_seconds_bucket", c=True), "collection, kind"),
                        "{{collection}} {{kind}}",
                    )
                ],
                "s",
            ),
        ],
    ),
    Row(
        "Disk and refused writes",
        [
            Panel(
                "Disk free",
                "Free bytes of each server's data directory filesystem (writes stop at --min-free-bytes).",
                STORAGE,
                [Q(f"min by (instance) ({s('braid_disk_free_bytes')})", "{{instance}}")],
                "bytes",
                width=6,
            ),
            Panel(
                "Disk used",
                "Share of each data directory's filesystem in use.",
                STORAGE,
                [
                    Q(
                        f"max by (instance) (1 - {s('braid_disk_free_bytes')} / {s('braid_disk_total_bytes')})",
                        "{{instance}}",
                    )
                ],
                "percentunit",
                width=6,
            ),
            Panel(
                "Writes refused",
                "1 while some shard of the collection refuses writes (a full disk, a failed log fsync: "
                "GetCollection's write_problem says which); health braid.writes is NOT_SERVING meanwhile.",
                STORAGE,
                [
                    Q(
                        f"max by (collection, instance) ({s('braid_collection_writes_refused', c=True)})",
                        "{{collection}} {{instance}}",
                    )
                ],
                width=6,
            ),
            Panel(
                "Write calls refused/s",
                "Write calls answered RESOURCE_EXHAUSTED (disk full, admission) or UNAVAILABLE, by method and code.",
                CLIENT_API,
                [
                    Q(
                        f"sum by (method, code) ({rate(s('braid_rpc_requests_total', API, WRITES, REFUSED))})",
                        "{{method}} {{code}}",
                    )
                ],
                "reqps",
                width=6,
            ),
        ],
    ),
    Row(
        "Cluster: shard servers",
        [
            Panel(
                "Replica lag",
                "Records of each shard's log (its JetStream subject) the slowest replica has not applied; "
                "DEFAULT and STRONG reads wait for it.",
                (SHARD,),
                [
                    Q(
                        f"max by (collection, shard) ({s('braid_replica_lag_records', c=True)})",
                        "{{collection}} shard {{shard}}",
                    )
                ],
                width=6,
            ),
            Panel(
                "Replicas not caught up",
                "Replicas still reading their log to the end since they opened (they do not serve reads yet).",
                (SHARD,),
                [
                    Q(
                        f"sum by (collection, shard) (1 - {s('braid_replica_caught_up', c=True)})",
                        "{{collection}} shard {{shard}}",
                    )
                ],
                width=6,
            ),
            Panel(
                "Applied sequence spread",
                "Between the replicas of a shard: the newest applied log sequence minus the oldest.",
                (SHARD,),
                [
                    Q(
                        f"max by (collection, shard) ({s('braid_replica_applied_sequence', c=True)}) "
                        f"- min by (collection, shard) ({s('braid_replica_applied_sequence', c=True)})",
                        "{{collection}} shard {{shard}}",
                    )
                ],
                width=6,
            ),
            Panel(
                "Shard API calls/s",
                "Calls routers made to shard servers (braid.cluster.v1.Shard), by method and code.",
                (SHARD,),
                [
                    Q(
                        f"sum by (method, code) ({rate(s('braid_rpc_requests_total', SHARD_API))})",
                        "{{method}} {{code}}",
                    )
                ],
                "reqps",
                width=6,
            ),
        ],
        collapsed=True,
    ),
    Row(
        "Cluster: routers",
        [
            Panel(
                "Failovers/s",
                "Shard calls answered by a replica other than the first one tried (the first failed or was not "
                "live): a shard server down or slow.",
                (ROUTER,),
                [Q(f"sum by (instance) ({rate(s('braid_router_failovers_total'))})", "{{instance}}")],
                "ops",
            ),
            Panel(
                "Replica retries/s by code",
                "Replica calls that failed with a retryable status; the router marks the node suspect and tries "
                "the shard's next replica within the call's deadline.",
                (ROUTER,),
                [Q(f"sum by (code) ({rate(s('braid_router_retries_total'))})", "{{code}}")],
                "ops",
            ),
            Panel(
                "Live shard servers",
                "Shard servers each router heard from within the heartbeat TTL (5 s).",
                (ROUTER,),
                [Q(f"min by (instance) ({s('braid_router_shard_servers_live')})", "{{instance}}")],
            ),
        ],
        collapsed=True,
    ),
    Row(
        "Process",
        [
            Panel(
                "Resident memory",
                "Each server process's resident memory (RSS).",
                ALL,
                [Q(f"sum by (instance) ({s('process_resident_memory_bytes')})", "{{instance}}")],
                "bytes",
            ),
            Panel(
                "CPU",
                "CPU seconds per second (cores busy) of each server process.",
                ALL,
                [Q(f"sum by (instance) ({rate(s('process_cpu_seconds_total'))})", "{{instance}}")],
            ),
            Panel(
                "Open files",
                "Open file descriptors over the process's limit (each shard holds its WAL, text and SPANN files).",
                ALL,
                [
                    Q(
                        f"max by (instance) ({s('process_open_fds')} / {s('process_max_fds')})",
                        "{{instance}}",
                    )
                ],
                "percentunit",
            ),
        ],
    ),
]


# ------------------------------------------------------------------ variables


def query_variable(name: str, label: str, query: str, all_value: str = ".+") -> dict[str, Any]:
    """A multi-value Prometheus ``label_values`` variable, refreshed when the time range changes."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,  # a plain string: every Grafana since 7 reads it (the object form varies by version)
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": all_value,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
    }


def variables() -> list[dict[str, Any]]:
    where = 'job=~"$job",instance=~"$instance"'
    return [
        {
            "name": "datasource",
            "label": "Prometheus",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "options": [],
            "regex": "",
            "refresh": 1,
            "hide": 0,
        },
        # braid_build_info: every role exports it from the start, before any call, labelled with its role.
        query_variable("job", "job", "label_values(braid_build_info, job)"),
        query_variable("role", "role", 'label_values(braid_build_info{job=~"$job"}, role)'),
        # Every panel filters on instance: picking roles narrows the instances to theirs.
        query_variable("instance", "instance", 'label_values(braid_build_info{job=~"$job",role=~"$role"}, instance)'),
        query_variable("collection", "collection", f"label_values(braid_collection_documents{{{where}}}, collection)"),
        query_variable("service", "API", f"label_values(braid_rpc_requests_total{{{where}}}, service)"),
        query_variable(
            "method", "method", f'label_values(braid_rpc_requests_total{{{where},service=~"$service"}}, method)'
        ),
        # Labels your Prometheus adds (a pod label such as the role: app_kubernetes_io_component).
        {"name": "filters", "label": "Filters", "type": "adhoc", "datasource": DATASOURCE, "filters": [], "hide": 0},
    ]


# ------------------------------------------------------------------ layout


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    roles = ", ".join(panel.roles)
    defaults: dict[str, Any] = {"unit": panel.unit}
    # Without thresholds of its own a stat panel takes Grafana's default, red from 80: one green step instead.
    thresholds = panel.thresholds or [(None, "green")]
    steps = [{"color": color, "value": value} for value, color in thresholds]
    defaults["thresholds"] = {"mode": "absolute", "steps": steps}
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "fillOpacity": 10, "lineWidth": 1, "showPoints": "never"}
        options: dict[str, Any] = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    else:
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "justifyMode": "auto",
            "orientation": "auto",
            "textMode": "auto",
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": f"{panel.description}\n\nExported by: {roles}.",
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "refId": chr(ord("A") + n),
                "datasource": DATASOURCE,
                "editorMode": "code",
                "expr": query.expr,
                "legendFormat": query.legend or "__auto",
                "range": True,
            }
            for n, query in enumerate(panel.queries)
        ],
    }


def layout(rows: list[Row]) -> list[dict[str, Any]]:
    """Rows and panels on the 24-column grid: each row's panels left to right, wrapping to a new line.
    A collapsed row keeps its panels inside it (Grafana's model) and takes one grid line."""
    out: list[dict[str, Any]] = []
    ids = iter(range(1, 10_000))
    y = 0
    for row in rows:
        row_json: dict[str, Any] = {
            "id": next(ids),
            "type": "row",
            "title": row.title,
            "collapsed": row.collapsed,
            "gridPos": {"h": 1, "w": COLUMNS, "x": 0, "y": y},
            "panels": [],
        }
        out.append(row_json)
        y += 1
        x, line_height, top = 0, 0, y
        placed = []
        for panel in row.panels:
            if x + panel.width > COLUMNS:
                x, top, line_height = 0, top + line_height, 0
            placed.append(panel_json(panel, next(ids), x, top))
            x += panel.width
            line_height = max(line_height, panel.height)
        bottom = top + line_height
        if row.collapsed:
            row_json["panels"] = placed
        else:
            out.extend(placed)
            y = bottom
    return out


def render() -> dict[str, Any]:
    """The dashboard's JSON model."""
    return {
        "title": "Braid",
        "uid": "braid-overview",
        "description": "Braid hybrid search: requests, admission, ingest, encoders, indexes, durability, disk, "
        "cluster replicas and routers. Built by deploy/grafana/build.py.",
        "tags": ["braid", "grpc", "search"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 38,  # Grafana 10.0; later versions migrate it on load
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables()},
        "panels": layout(ROWS),
    }


def dumps(dashboard: dict[str, Any]) -> str:
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if braid.json differs from what this builds")
    args = parser.parse_args(argv)
    text = dumps(render())
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).as_posix()}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
