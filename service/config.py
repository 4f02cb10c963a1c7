"""Server configuration: typed, loaded once from flags and ``BRAID_*`` environment variables.

Precedence: command-line flag, then environment variable, then default.

| setting                | env                          | default           |
|------------------------|------------------------------|-------------------|
| data_dir               | BRAID_DATA_DIR               | ./braid-data      |
| host                   | BRAID_HOST                   | 127.0.0.1         |
| port                   | BRAID_PORT                   | 50051             |
| workers                | BRAID_WORKERS                | 16                |
| max_message_bytes      | BRAID_MAX_MESSAGE_BYTES      | 64 MiB            |
| max_batch              | BRAID_MAX_BATCH              | 10000             |
| max_limit              | BRAID_MAX_LIMIT              | 10000             |
| max_query_bytes        | BRAID_MAX_QUERY_BYTES        | 65536             |
| max_queue              | BRAID_MAX_QUEUE              | 256               |
| max_streams            | BRAID_MAX_STREAMS            | 64                |
| max_streams_per_peer   | BRAID_MAX_STREAMS_PER_PEER   | 8                 |
| stream_idle_timeout_s  | BRAID_STREAM_IDLE_TIMEOUT_S  | 30                |
| shutdown_grace_s       | BRAID_SHUTDOWN_GRACE_S       | 10                |
| tls_cert               | BRAID_TLS_CERT               | (plaintext)       |
| tls_key                | BRAID_TLS_KEY                | (plaintext)       |
| tls_client_ca          | BRAID_TLS_CLIENT_CA          | (no client certs) |
| api_keys               | BRAID_API_KEYS               | (no keys: open)   |
| reflection             | BRAID_REFLECTION             | true              |
| min_free_bytes         | BRAID_MIN_FREE_BYTES         | 256 MiB           |
| checkpoint_log_bytes   | BRAID_CHECKPOINT_LOG_BYTES   | 32 MiB            |
| checkpoint_interval_s  | BRAID_CHECKPOINT_INTERVAL_S  | 300               |
| write_share            | BRAID_WRITE_SHARE            | 0.5               |
| models_dir             | BRAID_MODELS_DIR             | <data_dir>/models |
| encoder_threads        | BRAID_ENCODER_THREADS        | 0 = one per CPU   |
| encoder_max_batch      | BRAID_ENCODER_MAX_BATCH      | 32                |
| encoder_max_wait_ms    | BRAID_ENCODER_MAX_WAIT_MS    | 2                 |
| role                   | BRAID_ROLE                   | standalone        |
| nats                   | BRAID_NATS                   | (none)            |
| node_id                | BRAID_NODE_ID                | the host name     |
| advertise              | BRAID_ADVERTISE              | host:port         |
| nats_replicas          | BRAID_NATS_REPLICAS          | 0 = auto          |
| nats_creds             | BRAID_NATS_CREDS             | (no credentials)  |
| nats_tls_ca            | BRAID_NATS_TLS_CA            | (plaintext NATS)  |
| nats_tls_cert          | BRAID_NATS_TLS_CERT          | (no client cert)  |
| nats_tls_key           | BRAID_NATS_TLS_KEY           | (no client cert)  |
| nats_tls_server_name   | BRAID_NATS_TLS_SERVER_NAME   | each URL's host   |
| cluster_tls_cert       | BRAID_CLUSTER_TLS_CERT       | (plaintext)       |
| cluster_tls_key        | BRAID_CLUSTER_TLS_KEY        | (plaintext)       |
| cluster_tls_ca         | BRAID_CLUSTER_TLS_CA         | (plaintext)       |
| cluster_tls_server_name| BRAID_CLUSTER_TLS_SERVER_NAME| the advertised host |
| metrics_port           | BRAID_METRICS_PORT           | 0 = off           |
| health_port            | BRAID_HEALTH_PORT            | 0 = main port only|
| log_format             | BRAID_LOG_FORMAT             | text              |
| slow_query_ms          | BRAID_SLOW_QUERY_MS          | 0 = off           |
| otlp_endpoint          | BRAID_OTLP_ENDPOINT          | (none: no tracing)|
| trace_sample_ratio     | BRAID_TRACE_SAMPLE_RATIO     | 1.0               |
| snapshot_interval_s    | BRAID_SNAPSHOT_INTERVAL_S    | 3600              |
| snapshot_log_bytes     | BRAID_SNAPSHOT_LOG_BYTES     | 256 MiB           |

``workers`` threads run the index and encoder work of RPCs; ``max_queue`` calls may
wait for one, and a call beyond that is refused with RESOURCE_EXHAUSTED and a retry
hint. Streams (BulkUpsert) hold no worker while they wait for their next message:
``max_streams`` may be open at once, ``max_streams_per_peer`` from one client address,
and a stream that sends nothing for ``stream_idle_timeout_s`` is ended. See
docs/security.md for what each limit protects against.

Cluster mode (docs/design.md, "Cluster"): ``role`` (BRAID_ROLE) is standalone (the
default, no NATS), router or shard; routers and shard servers take ``nats``
(BRAID_NATS, comma-separated URLs); a shard server takes ``node_id`` (BRAID_NODE_ID,
default: the host name, so a StatefulSet pod's ordinal names it) and ``advertise``
(BRAID_ADVERTISE, the host:port routers call; default host:port). ``nats_replicas``
(BRAID_NATS_REPLICAS, 0 = as many NATS URLs as given, at most 3) is the replica count
of the streams and buckets Braid creates.

Security inside a cluster (docs/security.md, docs/deploy.md): ``cluster_tls_cert``,
``cluster_tls_key`` and ``cluster_tls_ca`` (all three or none) put mutual TLS on the
internal braid.cluster.v1.Shard service: a shard server serves it with that certificate
and accepts only clients whose certificate ``cluster_tls_ca`` signed; a router presents
the same kind of certificate and checks each shard server's against ``cluster_tls_ca``
and ``cluster_tls_server_name`` (default: the host a shard server advertises). The
client-facing settings (``tls_*``, ``api_keys``) are refused on a shard server, which
serves no client API; cluster and NATS settings are refused on a standalone server.
``nats_creds`` is a NATS credentials file (a ``.creds`` file, JWT and seed, or a bare
nkey seed file); ``nats_tls_ca`` turns on TLS to NATS (the server checked against it),
``nats_tls_cert`` + ``nats_tls_key`` add a client certificate, and ``nats_tls_server_name``
is the name the NATS servers' certificate is checked against (default: each URL's host).

Snapshots of a shard server's replicas (service/cluster/replica.py, docs/operations.md): one
replica of each shard snapshots it into the ``braid-snapshots`` object store when
``snapshot_interval_s`` passed since the shard's newest snapshot and records were applied
since, or ``snapshot_log_bytes`` of log were applied since it; the shard's log is then
trimmed below the older of the two snapshots kept.

The encoder settings: ONNX Runtime intra-op threads per model, the most texts in
one model call, and how long the micro-batcher waits for concurrent queries.

``health_port`` serves grpc.health.v1.Health alone, in plaintext, on a second port (every
role; 0 = off, health is then on the main port only): Kubernetes' native gRPC probes
present no certificate and no key, so a TLS or mutual-TLS port cannot answer them.

Observability (docs/operations.md): ``metrics_port`` serves Prometheus metrics at
``http://<host>:<metrics_port>/metrics`` (every role; 0 = off); ``log_format`` is text or
json (one JSON object per line, with the call's request id); ``slow_query_ms`` logs each
Search and BatchSearch slower than that many milliseconds with its plan's shape and
timings (0 = off; fractions allowed). ``otlp_endpoint`` (host:port of an OTLP/gRPC
collector, plaintext) turns on OpenTelemetry tracing (service/tracing.py); a new trace is
sampled with probability ``trace_sample_ratio``, a call with a sampled parent always is.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

from braid.index.policy import StoragePolicy
from braid.index.validate import Limits

from .cluster.meta import check_node_id, node_id_from_host

DEFAULT_DATA_DIR = "./braid-data"
ROLES = ("standalone", "router", "shard")
_PATHS = (
    "data_dir", "models_dir", "tls_cert", "tls_key", "tls_client_ca", "api_keys", "nats_creds", "nats_tls_ca",
    "nats_tls_cert", "nats_tls_key", "cluster_tls_cert", "cluster_tls_key", "cluster_tls_ca",
)  # fmt: skip
_CLIENT_API = ("tls_cert", "tls_key", "tls_client_ca", "api_keys")
_CLUSTER_ONLY = ("nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key", "cluster_tls_cert", "cluster_tls_key")
_CLUSTER_NAMES = ("cluster_tls_server_name", "nats_tls_server_name")  # strings: "" is unset
_FLOATS = (
    "stream_idle_timeout_s", "shutdown_grace_s", "checkpoint_interval_s", "slow_query_ms", "trace_sample_ratio",
    "snapshot_interval_s", "write_share",
)  # fmt: skip
LOG_FORMATS = ("text", "json")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class ServerConfig:
    data_dir: Path = Path(DEFAULT_DATA_DIR)
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 16
    max_message_bytes: int = 64 * 1024 * 1024
    max_batch: int = 10_000
    max_limit: int = 10_000
    max_query_bytes: int = 64 * 1024
    max_queue: int = 256
    max_streams: int = 64
    max_streams_per_peer: int = 8
    stream_idle_timeout_s: float = 30.0
    shutdown_grace_s: float = 10.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    api_keys: Path | None = None
    reflection: bool = True
    min_free_bytes: int = 256 * 1024 * 1024
    checkpoint_log_bytes: int = 32 * 1024 * 1024
    checkpoint_interval_s: float = 300.0
    write_share: float = 0.5
    models_dir: Path | None = None
    encoder_threads: int = 0
    encoder_max_batch: int = 32
    encoder_max_wait_ms: int = 2
    role: str = "standalone"
    nats: str = ""
    node_id: str = ""
    advertise: str = ""
    nats_replicas: int = 0
    nats_creds: Path | None = None
    nats_tls_ca: Path | None = None
    nats_tls_cert: Path | None = None
    nats_tls_key: Path | None = None
    nats_tls_server_name: str = ""
    cluster_tls_cert: Path | None = None
    cluster_tls_key: Path | None = None
    cluster_tls_ca: Path | None = None
    cluster_tls_server_name: str = ""
    metrics_port: int = 0
    health_port: int = 0
    log_format: str = "text"
    slow_query_ms: float = 0.0
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    snapshot_interval_s: float = 3600.0
    snapshot_log_bytes: int = 256 * 1024 * 1024
    limits: Limits = field(init=False)
    storage: StoragePolicy = field(init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, got {self.max_message_bytes}")
        if self.max_query_bytes < 1:
            raise ValueError(f"max_query_bytes must be >= 1, got {self.max_query_bytes}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_streams < 1 or self.max_streams_per_peer < 1:
            raise ValueError("max_streams and max_streams_per_peer must be >= 1")
        if not self.stream_idle_timeout_s > 0 or not self.shutdown_grace_s >= 0:
            raise ValueError("stream_idle_timeout_s must be > 0 and shutdown_grace_s >= 0")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.encoder_threads < 0 or self.encoder_max_batch < 1 or self.encoder_max_wait_ms < 0:
            raise ValueError("encoder_threads >= 0, encoder_max_batch >= 1 and encoder_max_wait_ms >= 0 are required")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if self.role != "standalone" and not self.nats_urls:
            raise ValueError(f"role {self.role} needs nats (--nats URL[,URL...] or BRAID_NATS)")
        if self.node_id:
            check_node_id(self.node_id)
        self._check_security_for_role()
        if not 0 <= self.nats_replicas <= 5:
            raise ValueError(f"nats_replicas must be in 0..5, got {self.nats_replicas}")
        if not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535 (0 = off), got {self.metrics_port}")
        if not 0 <= self.health_port <= 65535:
            raise ValueError(f"health_port must be in 0..65535 (0 = off), got {self.health_port}")
        if self.log_format not in LOG_FORMATS:
            raise ValueError(f"log_format must be one of {', '.join(LOG_FORMATS)}, got {self.log_format!r}")
        if not self.slow_query_ms >= 0:
            raise ValueError(f"slow_query_ms must be >= 0 (0 = off), got {self.slow_query_ms}")
        if not 0 <= self.trace_sample_ratio <= 1:
            raise ValueError(f"trace_sample_ratio must be in 0..1, got {self.trace_sample_ratio}")
        limits = Limits(
            max_batch=self.max_batch,
            max_limit=self.max_limit,
            max_depth=self.max_limit,
            max_query_bytes=self.max_query_bytes,
        )
        object.__setattr__(self, "limits", limits)
        if self.min_free_bytes < 0 or self.checkpoint_log_bytes < 1 or not self.checkpoint_interval_s > 0:
            raise ValueError("need min_free_bytes >= 0, checkpoint_log_bytes >= 1 and checkpoint_interval_s > 0")
        if not self.snapshot_interval_s > 0 or self.snapshot_log_bytes < 1:
            raise ValueError("need snapshot_interval_s > 0 and snapshot_log_bytes >= 1")
        if not 0 < self.write_share <= 1:
            raise ValueError(f"write_share must be in (0, 1], got {self.write_share}")
        storage = StoragePolicy(
            self.min_free_bytes, self.checkpoint_log_bytes, self.checkpoint_interval_s, self.write_share
        )
        object.__setattr__(self, "storage", storage)

    def _check_security_for_role(self) -> None:
        """Refuse a security setting this role cannot honour, rather than run without it."""
        if self.role == "shard":
            given = [name for name in _CLIENT_API if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"{given[0]} (BRAID_{given[0].upper()}) secures the client API, which a shard server does not "
                    "serve; secure braid.cluster.v1.Shard with cluster_tls_cert, cluster_tls_key and cluster_tls_ca"
                )
        if self.role == "standalone":
            given = [name for name in (*_CLUSTER_ONLY, "cluster_tls_ca") if getattr(self, name) is not None]
            given += [name for name in _CLUSTER_NAMES if getattr(self, name)]
            if given:
                name = given[0]
                raise ValueError(f"{name} (BRAID_{name.upper()}) needs role router or shard (a standalone server)")
        cluster_tls = (self.cluster_tls_cert, self.cluster_tls_key, self.cluster_tls_ca)
        if any(value is not None for value in cluster_tls) and None in cluster_tls:
            raise ValueError("cluster_tls_cert, cluster_tls_key and cluster_tls_ca must be given together")
        if self.cluster_tls_server_name and self.cluster_tls_cert is None:
            raise ValueError("cluster_tls_server_name needs cluster_tls_cert, cluster_tls_key and cluster_tls_ca")
        if (self.nats_tls_cert is None) != (self.nats_tls_key is None):
            raise ValueError("nats_tls_cert and nats_tls_key must be given together")
        if self.nats_tls_cert is not None and self.nats_tls_ca is None:
            raise ValueError("nats_tls_cert (a client certificate for NATS) needs nats_tls_ca")
        if self.nats_tls_server_name and self.nats_tls_ca is None:
            raise ValueError("nats_tls_server_name (BRAID_NATS_TLS_SERVER_NAME) needs nats_tls_ca")
        if self.nats_creds is not None or self.nats_tls_ca is not None:
            from .cluster.nats_auth import NatsSecurity

            NatsSecurity.from_config(self)  # an unreadable or unrecognised file is refused now, not retried

    @property
    def cluster_tls(self) -> bool:
        """Mutual TLS on braid.cluster.v1.Shard, between routers and shard servers."""
        return self.cluster_tls_cert is not None

    @property
    def models_path(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.data_dir / "models"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def nats_urls(self) -> list[str]:
        return [url.strip() for url in self.nats.split(",") if url.strip()]

    @property
    def cluster_node_id(self) -> str:
        return self.node_id or node_id_from_host(socket.gethostname())

    @property
    def cluster_advertise(self) -> str:
        return self.advertise

    @property
    def stream_replicas(self) -> int:
        """Replicas of the JetStream streams and buckets Braid creates."""
        return self.nats_replicas or min(3, max(len(self.nats_urls), 1))


def _parse(name: str, value: object) -> object:
    if name in _PATHS:
        return Path(str(value))
    if name in ("host", "role", "nats", "node_id", "advertise", "otlp_endpoint", *_CLUSTER_NAMES):
        return str(value)
    if name == "log_format":
        return str(value).strip().lower()
    if name == "reflection":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in _TRUE + _FALSE:
            raise ValueError(f"reflection (BRAID_REFLECTION) must be true or false, got {value!r}")
        return text in _TRUE
    kind, word = (float, "a number") if name in _FLOATS else (int, "an integer")
    try:
        return kind(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"{name} (BRAID_{name.upper()}) must be {word}, got {value!r}") from None


def load_config(**overrides: object) -> ServerConfig:
    """Build the config from BRAID_* variables, with non-None overrides (flags) taking precedence."""
    values: dict[str, object] = {}
    for f in fields(ServerConfig):
        if not f.init:
            continue
        env = os.environ.get(f"BRAID_{f.name.upper()}")
        value = overrides.get(f.name)
        if value is None and env is not None:
            value = env
        if value is None:
            continue
        values[f.name] = _parse(f.name, value)
    return ServerConfig(**values)  # type: ignore[arg-type]
