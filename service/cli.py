"""The ``braid`` command line: run the server, manage collections, ingest and search from a shell.

    braid serve [--data-dir DIR] [--host H] [--port P] [--workers N] [--metrics-port P] [--log-format json]
    braid collection create NAME --schema schema.json [--shards N]
    braid collection list | describe NAME | delete NAME
    braid alias create NAME COLLECTION | update NAME COLLECTION | delete NAME | list
    braid snapshot create COLLECTION | list [COLLECTION] | restore SNAPSHOT --as NAME [--replace]
    braid snapshot delete SNAPSHOT | export SNAPSHOT PATH(.tar or dir/) | import PATH
    braid ingest NAME docs.jsonl [--batch 500]
    braid search NAME --text "query" [--dense-field F] | --vector-file q.json --field F [--limit 10]
    braid models list | export NAME [--force] [--no-int8] | verify NAME
    braid models register DIR --name NAME --kind dense|sparse [--pooling mean|cls] [--hf-checkpoint]
    braid eval DIR [--plans bm25,dense,rrf,dbsf] [--out eval-results] [--reuse]
    braid keys add --file F --name N --role read|write|admin [--collection C ...] | list | remove
    braid verify DIR [--collection NAME]   (offline checksum scrub; stop the server first)

``models`` commands work on the models directory (``--models-dir``, BRAID_MODELS_DIR,
default <data-dir>/models, the one ``braid serve`` reads).
Client commands talk to ``--address`` (BRAID_ADDRESS, default 127.0.0.1:50051), over TLS
with ``--tls-ca`` (+ ``--tls-cert``/``--tls-key`` for mutual TLS) and with ``--api-key``
(BRAID_TLS_CA, BRAID_TLS_CLIENT_CERT, BRAID_TLS_CLIENT_KEY, BRAID_API_KEY; docs/security.md).
The schema file and the JSONL documents use the JSON shapes described in
docs/cli.md (the protobuf JSON mapping of braid.v1 Schema and Document).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# A search runs on one thread: OpenBLAS threads inside its small matrix products (the exact
# scans of index/hnsw_strand.py) only spin against the other searches, 2-5x slower on a busy
# machine. Set before numpy loads OpenBLAS; an operator may still set another value.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .auth import add_keys_command
from .cluster.local import add_cluster_command
from .jobs.index_job import add_job_command
from .verify import add_verify_command

DEFAULT_ADDRESS = "127.0.0.1:50051"
# ServerConfig fields that `braid serve` takes as flags (the rest come from BRAID_* variables).
SERVE_SETTINGS = (
    "data_dir", "host", "port", "workers", "models_dir", "max_message_bytes", "max_batch", "max_limit",
    "max_query_bytes", "max_queue", "max_streams", "max_streams_per_peer", "stream_idle_timeout_s",
    "shutdown_grace_s", "tls_cert", "tls_key", "tls_client_ca", "api_keys", "reflection", "min_free_bytes",
    "checkpoint_log_bytes", "checkpoint_interval_s", "role", "nats", "node_id", "advertise", "nats_replicas",
    "snapshot_interval_s", "snapshot_log_bytes", "write_share",
    "nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key", "nats_tls_server_name", "cluster_tls_cert",
    "cluster_tls_key", "cluster_tls_ca", "cluster_tls_server_name", "metrics_port", "health_port", "log_format",
    "slow_query_ms", "otlp_endpoint", "trace_sample_ratio",
)  # fmt: skip


def _serve(args: argparse.Namespace) -> int:
    # OPENBLAS_NUM_THREADS is set at the top of this module, before numpy loads. A thread waiting
    # for the GIL gets it after the switch interval: 5 ms by default, which a search pays each time
    # it comes back from hnswlib or numpy while a bulk load runs Python; 0.5 ms bounds that.
    sys.setswitchinterval(0.0005)
    from .memory import freeze_heap, tune_malloc

    tune_malloc()  # before the indexes load: service/memory.py
    from .config import load_config
    from .logs import configure_logging
    from .server import serve

    freeze_heap()  # the imports' objects, out of the collector's full passes (service/memory.py)

    try:
        config = load_config(**{name: getattr(args, name) for name in SERVE_SETTINGS})
    except ValueError as err:
        print(f"braid serve: {err}", file=sys.stderr)
        return 2
    configure_logging(config.log_format, logging.INFO)

    def ready(port: int) -> None:
        freeze_heap()  # and what recovery built
        role = "" if config.role == "standalone" else f"{config.role}, nats {config.nats}, "
        print(f"braid: serving braid.v1.Braid on {config.host}:{port} ({role}data: {config.data_dir})", flush=True)

    def shard_ready(port: int) -> None:
        freeze_heap()
        node = config.cluster_node_id
        print(
            f"braid: serving braid.cluster.v1.Shard on {config.host}:{port} (node {node}, nats {config.nats})",
            flush=True,
        )

    from braid.index.errors import BraidError

    try:
        if config.role == "shard":
            from .cluster.shard_server import serve_shard

            serve_shard(config, shard_ready)
        else:
            serve(config, ready)
    except (ValueError, OSError, BraidError) as err:  # a bad TLS or key file, a port or data dir in use
        print(f"braid serve: {err}", file=sys.stderr)
        return 2
    return 0


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .client import BraidClient

    return BraidClient(
        args.address,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        api_key=args.api_key or None,
        server_name=args.tls_server_name,
    )


def _collection(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from rich.console import Console
    from rich.table import Table

    from braid.v1 import braid_pb2 as pb

    console = Console()
    with _client(args) as client:
        if args.action == "create":
            schema = json_format.Parse(Path(args.schema).read_text(), pb.Schema())
            info = client.create_collection(args.name, schema, shards=args.shards)
            console.print(f"created collection [bold]{info.name}[/bold] with {info.shards} shard(s)")
        elif args.action == "list":
            table = Table("name", "documents", "shards", "text", "dense", "sparse", "payload")
            for info in client.list_collections():
                s = info.schema
                table.add_row(
                    info.name,
                    str(info.documents),
                    str(info.shards),
                    ", ".join(f.name for f in s.text_fields),
                    ", ".join(f"{f.name}({f.dim}, {f.index or 'hnsw'})" for f in s.dense_fields),
                    ", ".join(f.name for f in s.sparse_fields),
                    ", ".join(f.name for f in s.payload_fields),
                )
            console.print(table)
        elif args.action == "describe":
            info = client.get_collection(args.name)
            console.print_json(json_format.MessageToJson(info))
        elif args.action == "delete":
            client.delete_collection(args.name)
            console.print(f"deleted collection [bold]{args.name}[/bold]")
    return 0


def _alias(args: argparse.Namespace) -> int:
    """``braid alias``: a second name of a collection; ``update`` moves it atomically."""
    with _client(args) as client:
        if args.action == "create":
            alias = client.create_alias(args.name, args.collection)
            print(f"alias {alias.name} -> {alias.collection}")
        elif args.action == "update":
            alias = client.update_alias(args.name, args.collection)
            print(f"alias {alias.name} -> {alias.collection}")
        elif args.action == "delete":
            client.delete_alias(args.name)
            print(f"deleted alias {args.name}")
        else:
            for alias in client.list_aliases():
                print(f"{alias.name}\t{alias.collection}")
    return 0


def _snapshot(args: argparse.Namespace) -> int:
    """``braid snapshot``: back a collection up on the server, restore it, move it off the machine."""
    from braid.index.errors import BraidError

    with _client(args) as client:
        try:
            if args.action == "create":
                info = client.create_snapshot(args.collection, timeout=args.timeout)
                print(f"created snapshot {info.name} of {info.collection}: {_snapshot_line(info)}")
            elif args.action == "list":
                for info in client.list_snapshots(args.collection or ""):
                    if info.error:
                        print(f"{info.name}\tDAMAGED: {info.error}")
                    else:
                        print(f"{info.name}\t{info.collection}\t{_snapshot_line(info)}")
            elif args.action == "restore":
                collection = client.restore_snapshot(args.snapshot, args.name, args.replace, timeout=args.timeout)
                verb = "replaced" if args.replace else "restored"
                print(f"{verb} collection {collection.name} from {args.snapshot}: {collection.documents} documents")
            elif args.action == "delete":
                client.delete_snapshot(args.snapshot)
                print(f"deleted snapshot {args.snapshot}")
            elif args.action == "export":
                written = client.export_snapshot(args.snapshot, args.path, timeout=args.timeout)
                print(f"exported snapshot {args.snapshot} to {written}")
            else:
                info = client.import_snapshot(args.path, timeout=args.timeout)
                print(f"imported snapshot {info.name} of {info.collection}: {_snapshot_line(info)}")
        except (OSError, BraidError) as err:  # this machine's side: a path, a damaged export
            print(f"braid snapshot {args.action}: {err}", file=sys.stderr)
            return 1
    return 0


def _snapshot_line(info) -> str:  # type: ignore[no-untyped-def]
    created = info.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S UTC")
    sequences = ",".join(str(shard.sequence) for shard in info.shards)
    return (
        f"{info.documents} documents, {info.size_bytes} bytes, {len(info.shards)} shard(s) at log sequence "
        f"{sequences}, taken {created}, format {info.format}"
    )


def _document_line(line: str) -> object:
    """One JSONL line as a braid.v1 Document (protobuf JSON mapping); ``metadata`` may be a JSON
    object rather than its text (docs/cli.md)."""
    from google.protobuf import json_format

    from braid.v1 import braid_pb2 as pb

    data = json.loads(line)
    if isinstance(data, dict) and isinstance(data.get("metadata"), dict):
        data["metadata"] = json.dumps(data["metadata"], ensure_ascii=False, separators=(",", ":"))
    return json_format.ParseDict(data, pb.Document())


def _ingest(args: argparse.Namespace) -> int:
    """Stream a JSONL file; the server encodes. The bar counts documents the server acknowledged."""
    import time

    from google.protobuf import json_format
    from tqdm import tqdm

    from braid.v1 import braid_pb2 as pb

    from .client import StreamFailed

    path = Path(args.file)
    total = sum(1 for line in path.open(encoding="utf-8") if line.strip())

    def batches():  # type: ignore[no-untyped-def]
        with path.open(encoding="utf-8") as fh:
            batch: list = []
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    batch.append(_document_line(line))
                except (json_format.ParseError, ValueError) as err:
                    raise ValueError(f"{path.name}:{number}: {err}") from None
                if len(batch) >= args.batch:
                    yield pb.UpsertRequest(collection=args.collection, documents=batch)
                    batch = []
            if batch:
                yield pb.UpsertRequest(collection=args.collection, documents=batch)

    started = time.monotonic()
    upserted = acked = 0
    with _client(args) as client, tqdm(total=total, unit="doc", desc=f"ingest {args.collection}") as bar:
        try:
            for request, ack in client.upsert_stream(batches()):
                upserted += ack.upserted
                acked += 1
                bar.update(len(request.documents))
        except ValueError as err:
            print(f"braid ingest: {err}; {upserted} documents before it are written", file=sys.stderr)
            return 2
        except StreamFailed as err:
            print(f"braid ingest: {err}; {upserted} documents before it are written", file=sys.stderr)
            return 1
    seconds = time.monotonic() - started
    rate = upserted / max(seconds, 1e-9)
    print(f"upserted {upserted} documents in {acked} batches ({seconds:.1f} s, {rate:.1f} docs/s)")
    return 0


def _search(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    with _client(args) as client:
        if args.vector_file:
            vector = json.loads(Path(args.vector_file).read_text())
            hits = client.search(args.collection, dense=(args.field, vector), limit=args.limit, include_payload=True)
        else:
            hits = client.search(
                args.collection,
                bm25=args.text,
                dense=(args.dense_field, args.text) if args.dense_field else None,
                limit=args.limit,
                include_payload=True,
                text_fields=[args.show] if args.show else None,
            )
    table = Table("#", "id", "score", "payload", *(["text"] if args.show else []))
    for rank, hit in enumerate(hits, 1):
        payload = ", ".join(f"{k}={v}" for k, v in hit.payload.items())
        row = [str(rank), hit.id, f"{hit.score:.4f}", payload]
        if args.show:
            row.append(hit.text.get(args.show, "")[:80])
        table.add_row(*row)
    Console().print(table)
    return 0


def _models(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from braid.encoders import export
    from braid.encoders.errors import EncoderError
    from braid.encoders.registry import ModelStore

    from .config import load_config

    models_dir = load_config(data_dir=args.data_dir, models_dir=args.models_dir).models_path
    console = Console()
    try:
        if args.action == "list":
            table = Table("model", "kind", "exported", "precisions", "dim", "description")
            for status in ModelStore(models_dir).list():
                table.add_row(
                    status.name,
                    status.kind,
                    "yes" if status.exported else f"no: braid models export {status.name}",
                    ",".join(status.precisions),
                    str(status.dim or ""),
                    status.description,
                )
            console.print(f"models directory: {models_dir}")
            console.print(table)
        elif args.action == "export":
            manifest = export.export_builtin(args.name, models_dir, quantize=not args.no_int8, force=args.force)
            console.print(
                f"{manifest.name}: {manifest.kind}, dim {manifest.dim}, {', '.join(manifest.files)} in {models_dir}"
            )
        elif args.action == "verify":
            for line in ModelStore(models_dir).verify(args.name):
                console.print(f"ok  {line}")
        elif args.action == "register":
            route = export.export_checkpoint if args.hf_checkpoint else export.register_onnx
            manifest = route(
                Path(args.dir),
                models_dir,
                args.name,
                kind=args.kind,
                pooling=args.pooling,
                normalize=not args.no_normalize,
                max_length=args.max_length,
                quantize=args.int8,
            )
            console.print(
                f"registered {manifest.name}: {manifest.kind}, dim {manifest.dim}, output {manifest.output!r}"
            )
    except EncoderError as err:
        print(f"braid models {args.action}: {err}", file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from .evaluate import MEASURES, evaluate

    with _client(args) as client:
        client.timeout = 3600
        try:
            summary = evaluate(
                client,
                Path(args.dir),
                [p for p in args.plans.split(",") if p],
                Path(args.out),
                name=args.name,
                model=args.model,
                precision=args.precision,
                analyzer=args.analyzer,
                sparse_model=args.sparse_model,
                sparse_query_mode=args.sparse_query_mode,
                depth=args.depth,
                reuse=args.reuse,
                shards=args.shards,
            )
        except (ValueError, FileNotFoundError) as err:
            print(f"braid eval: {err}", file=sys.stderr)
            return 2
    table = Table("plan", *MEASURES, "p50 ms", "p95 ms", "p99 ms", title=f"{summary['collection']}: "
                  f"{summary['documents']} docs, {summary['queries']} queries")  # fmt: skip
    for plan in summary["plans"]:
        m, lat = plan["metrics"], plan["latency_ms"]
        table.add_row(
            plan["plan"], *(f"{m[k]:.4f}" for k in MEASURES), *(f"{lat[k]:.1f}" for k in ("p50", "p95", "p99"))
        )
    Console().print(table)
    print(f"run files and {summary['collection']}.summary.json in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="braid", description="Braid hybrid search service")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--data-dir", help="data directory (BRAID_DATA_DIR, default ./braid-data)")
    serve.add_argument("--host", help="listen address (BRAID_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen port, 0 for any free port (BRAID_PORT, default 50051)")
    serve.add_argument("--workers", type=int, help="gRPC worker threads (BRAID_WORKERS, default 16)")
    serve.add_argument("--models-dir", help="ONNX models (BRAID_MODELS_DIR, default <data-dir>/models)")
    limits = serve.add_argument_group("limits (docs/security.md)")
    limits.add_argument("--max-message-bytes", type=int, help="largest request or response (default 64 MiB)")
    limits.add_argument("--max-batch", type=int, help="documents or searches per call (default 10000)")
    limits.add_argument("--max-limit", type=int, help="hits per search, offset included (default 10000)")
    limits.add_argument("--max-query-bytes", type=int, help="UTF-8 bytes of one query text (default 65536)")
    limits.add_argument("--max-queue", type=int, help="calls waiting for a worker before RESOURCE_EXHAUSTED (256)")
    limits.add_argument("--max-streams", type=int, help="open BulkUpsert streams (default 64)")
    limits.add_argument("--max-streams-per-peer", type=int, help="open streams from one client address (default 8)")
    limits.add_argument("--stream-idle-timeout-s", type=float, help="end a stream silent this long (default 30)")
    limits.add_argument("--shutdown-grace-s", type=float, help="SIGTERM: time for in-flight calls (default 10)")
    storage = serve.add_argument_group("storage (docs/design.md)")
    storage.add_argument("--min-free-bytes", type=int, help="refuse writes below this much free disk (256 MiB)")
    storage.add_argument("--checkpoint-log-bytes", type=int, help="checkpoint a shard after this much log (32 MiB)")
    storage.add_argument("--checkpoint-interval-s", type=float, help="or once its oldest write is this old (300)")
    storage.add_argument(
        "--write-share", type=float, help="while searches run, writes take at most this share of their time (0.5)"
    )
    security = serve.add_argument_group("security (docs/security.md)")
    security.add_argument("--tls-cert", help="PEM server certificate chain (BRAID_TLS_CERT); TLS when given")
    security.add_argument("--tls-key", help="PEM private key of --tls-cert (BRAID_TLS_KEY)")
    security.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates (mutual TLS)")
    security.add_argument("--api-keys", help="file of hashed API keys (BRAID_API_KEYS); every call needs a key")
    security.add_argument(
        "--reflection", action=argparse.BooleanOptionalAction, default=None, help="server reflection (default on)"
    )
    cluster = serve.add_argument_group('cluster mode (docs/design.md, "Cluster")')
    cluster.add_argument(
        "--role", choices=("standalone", "router", "shard"), help="standalone (default: no NATS), router or shard"
    )
    cluster.add_argument("--nats", help="NATS URLs, comma-separated (BRAID_NATS); routers and shard servers")
    cluster.add_argument("--node-id", help="a shard server's identity (BRAID_NODE_ID, default: the host name)")
    cluster.add_argument("--advertise", help="host:port routers use to reach this shard server (default host:port)")
    cluster.add_argument("--nats-replicas", type=int, help="replicas of Braid's streams and buckets (0 = auto)")
    cluster.add_argument(
        "--snapshot-interval-s", type=float, help="shard servers: snapshot a shard this long after its last (3600)"
    )
    cluster.add_argument(
        "--snapshot-log-bytes", type=int, help="shard servers: or once this much log was applied since (256 MiB)"
    )
    cluster.add_argument("--nats-creds", help="NATS credentials: a .creds file or an nkey seed file (BRAID_NATS_CREDS)")
    cluster.add_argument("--nats-tls-ca", help="PEM CA of the NATS servers: TLS to NATS (BRAID_NATS_TLS_CA)")
    cluster.add_argument("--nats-tls-cert", help="PEM client certificate for NATS (BRAID_NATS_TLS_CERT)")
    cluster.add_argument("--nats-tls-key", help="PEM key of --nats-tls-cert (BRAID_NATS_TLS_KEY)")
    cluster.add_argument(
        "--nats-tls-server-name", help="name NATS certificates are checked against (default: each URL's host)"
    )
    cluster.add_argument(
        "--cluster-tls-cert", help="PEM certificate for mutual TLS between routers and shards (BRAID_CLUSTER_TLS_CERT)"
    )
    cluster.add_argument("--cluster-tls-key", help="PEM key of --cluster-tls-cert (BRAID_CLUSTER_TLS_KEY)")
    cluster.add_argument(
        "--cluster-tls-ca", help="PEM internal CA: the only one the other side trusts (BRAID_CLUSTER_TLS_CA)"
    )
    cluster.add_argument(
        "--cluster-tls-server-name", help="name a router checks shard certificates against (default: advertised host)"
    )
    observability = serve.add_argument_group("observability (docs/operations.md)")
    observability.add_argument(
        "--metrics-port", type=int, help="serve Prometheus /metrics on this port (BRAID_METRICS_PORT, 0 = off)"
    )
    observability.add_argument(
        "--health-port", type=int, help="plaintext grpc.health.v1 only, for probes (BRAID_HEALTH_PORT, 0 = off)"
    )
    observability.add_argument(
        "--log-format", choices=("text", "json"), help="text, or json: one object per line (BRAID_LOG_FORMAT)"
    )
    observability.add_argument(
        "--slow-query-ms", type=float, help="log searches slower than this, with their plan (0 = off, default)"
    )
    observability.add_argument(
        "--otlp-endpoint", help="export OpenTelemetry spans to this OTLP/gRPC host:port (BRAID_OTLP_ENDPOINT; off)"
    )
    observability.add_argument(
        "--trace-sample-ratio", type=float, help="share of new traces sampled (BRAID_TRACE_SAMPLE_RATIO, default 1)"
    )
    serve.set_defaults(run=_serve)

    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", help="data directory whose models/ is used (BRAID_DATA_DIR)")
    where.add_argument("--models-dir", help="models directory (BRAID_MODELS_DIR, default <data-dir>/models)")
    models = commands.add_parser("models", help="list, export, verify and register encoder models")
    model_actions = models.add_subparsers(dest="action", required=True)
    model_actions.add_parser("list", parents=[where])
    export_model = model_actions.add_parser("export", parents=[where], help="export a built-in model to ONNX")
    export_model.add_argument("name")
    export_model.add_argument("--force", action="store_true", help="export again even if present")
    export_model.add_argument("--no-int8", action="store_true", help="skip the int8 quantized variant")
    model_actions.add_parser("verify", parents=[where], help="check hashes and run the model").add_argument("name")
    register = model_actions.add_parser(
        "register", parents=[where], help="add your own BERT-family ONNX directory (or HF checkpoint)"
    )
    register.add_argument(
        "dir", help="model.onnx + tokenizer.json, or with --hf-checkpoint config.json + model.safetensors"
    )
    register.add_argument("--name", required=True)
    register.add_argument("--kind", choices=["dense", "sparse"], required=True)
    register.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    register.add_argument("--no-normalize", action="store_true")
    register.add_argument("--max-length", type=int, default=512)
    register.add_argument("--int8", action="store_true", help="also write an int8 quantized variant")
    register.add_argument("--hf-checkpoint", action="store_true", help="DIR is a Hugging Face BERT checkpoint")
    models.set_defaults(run=_models)

    address = argparse.ArgumentParser(add_help=False)
    address.add_argument("--address", default=os.environ.get("BRAID_ADDRESS", DEFAULT_ADDRESS))
    env = os.environ.get
    address.add_argument("--tls-ca", default=env("BRAID_TLS_CA"), help="PEM CA of the server: use TLS")
    address.add_argument("--tls-cert", default=env("BRAID_TLS_CLIENT_CERT"), help="PEM client cert, mutual TLS")
    address.add_argument("--tls-key", default=env("BRAID_TLS_CLIENT_KEY"), help="PEM key of --tls-cert")
    address.add_argument(
        "--tls-server-name", default=env("BRAID_TLS_SERVER_NAME"), help="name to check the server's cert against"
    )
    address.add_argument("--api-key", default=env("BRAID_API_KEY"), help="API key (argv is visible: prefer env)")

    collection = commands.add_parser("collection", help="manage collections")
    actions = collection.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[address])
    create.add_argument("name")
    create.add_argument("--schema", required=True, help="JSON file with a braid.v1.Schema")
    create.add_argument("--shards", type=int, default=1)
    actions.add_parser("list", parents=[address])
    for action in ("describe", "delete"):
        actions.add_parser(action, parents=[address]).add_argument("name")
    collection.set_defaults(run=_collection)

    alias = commands.add_parser("alias", help="manage collection aliases (a second name; update moves it atomically)")
    alias_actions = alias.add_subparsers(dest="action", required=True)
    for action in ("create", "update"):
        pointed = alias_actions.add_parser(action, parents=[address])
        pointed.add_argument("name")
        pointed.add_argument("collection")
    alias_actions.add_parser("delete", parents=[address]).add_argument("name")
    alias_actions.add_parser("list", parents=[address])
    alias.set_defaults(run=_alias)

    snapshot = commands.add_parser(
        "snapshot", help="back up and restore collections (docs/operations.md, Backup and restore)"
    )
    snapshot_actions = snapshot.add_subparsers(dest="action", required=True)
    timed = argparse.ArgumentParser(add_help=False, parents=[address])
    timed.add_argument("--timeout", type=float, default=3600.0, help="seconds the call may take (default 3600)")
    snapshot_actions.add_parser("create", parents=[timed], help="snapshot a collection (or an alias's)").add_argument(
        "collection"
    )
    snapshot_actions.add_parser("list", parents=[address], help="snapshots, oldest first").add_argument(
        "collection", nargs="?", help="only this collection's"
    )
    restore = snapshot_actions.add_parser("restore", parents=[timed], help="restore a snapshot as a collection")
    restore.add_argument("snapshot")
    restore.add_argument("--as", dest="name", required=True, help="the collection to restore into")
    restore.add_argument("--replace", action="store_true", help="swap an existing collection NAME for it")
    snapshot_actions.add_parser("delete", parents=[address]).add_argument("snapshot")
    export = snapshot_actions.add_parser(
        "export", parents=[timed], help="download a snapshot: PATH.tar, or PATH/ for its directory"
    )
    export.add_argument("snapshot")
    export.add_argument("path")
    snapshot_actions.add_parser(
        "import", parents=[timed], help="upload a snapshot from a .tar file or a snapshot directory"
    ).add_argument("path")
    snapshot.set_defaults(run=_snapshot)

    ingest = commands.add_parser("ingest", parents=[address], help="stream a JSONL file of documents")
    ingest.add_argument("collection")
    ingest.add_argument("file")
    ingest.add_argument("--batch", type=int, default=500)
    ingest.set_defaults(run=_ingest)

    search = commands.add_parser("search", parents=[address], help="search and print a table")
    search.add_argument("collection")
    search.add_argument("--text", help="BM25 query text")
    search.add_argument("--dense-field", help="also search this encoder-backed dense field with --text (hybrid)")
    search.add_argument("--vector-file", help="JSON list of floats for a dense query")
    search.add_argument("--field", default="", help="dense field of --vector-file")
    search.add_argument("--limit", type=int, default=10)
    search.add_argument("--show", help="text field to print beside each hit")
    search.set_defaults(run=_search)

    evaluation = commands.add_parser("eval", parents=[address], help="relevance of search plans on a BEIR collection")
    evaluation.add_argument("dir", help="BEIR layout: corpus.jsonl, queries.jsonl, qrels/test.tsv")
    evaluation.add_argument(
        "--plans", default="bm25,dense,hybrid", help="of bm25,dense,sparse,hybrid,rrf,minmax,zscore,dbsf"
    )
    evaluation.add_argument("--name", help="collection name (default eval-<dir name>)")
    evaluation.add_argument("--model", default="all-minilm-l6-v2", help="dense encoder")
    evaluation.add_argument("--precision", default="fp32", choices=["fp32", "int8"])
    evaluation.add_argument("--analyzer", default="english", help="analyzer of the BM25 field body")
    evaluation.add_argument("--sparse-model", default="", help="sparse encoder for a field 'sparse' (plan sparse)")
    evaluation.add_argument("--sparse-query-mode", default="", choices=["", "model", "idf"], help="sparse queries")
    evaluation.add_argument("--depth", type=int, default=100, help="hits per query")
    evaluation.add_argument("--shards", type=int, default=1, help="shards of the collection it creates")
    evaluation.add_argument("--reuse", action="store_true", help="the collection exists: skip ingest")
    evaluation.add_argument("--out", default="eval-results", help="folder for TREC run files and the summary")
    evaluation.set_defaults(run=_eval)
    add_keys_command(commands)
    add_verify_command(commands)
    add_cluster_command(commands)
    add_job_command(commands, address, _client)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "search" and not (args.text or args.vector_file):
        print("braid search: give --text or --vector-file", file=sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except Exception as err:
        import grpc

        if isinstance(err, grpc.RpcError):
            print(f"braid: {err.code().name}: {err.details()}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
