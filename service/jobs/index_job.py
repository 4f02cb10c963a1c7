"""``braid job index``: one partition of a bulk indexing job, resumable after a kill.

    braid job index COLLECTION CORPUS... [--partition I --partitions N] [--workers W]
        [--batch 128] [--job NAME] [--skip-invalid] [--rejects FILE] [--report FILE]

The pipeline: the corpus rows of this partition (corpus.py), cut into batches, encoded
by ``--workers`` processes with the collection's own models (encode.py), sent in order
over UpsertStream (sender.py); each acknowledged batch advances the checkpoint in the
target Braid (checkpoint.py) and the progress bar, which counts acknowledged rows.

Started again after any failure or kill, a job with the same name, partition and corpus
continues after its last acknowledged batch. Every option has a ``BRAID_JOB_*`` variable;
the partition defaults to Kubernetes' ``JOB_COMPLETION_INDEX`` (an Indexed Job), and the
partition count to ``BRAID_JOB_PARTITIONS``. Exit codes (sender.py): 0 done, 2 bad input
or configuration (fix it; rerunning fails again), 75 the server stayed unavailable or the
job was stopped by SIGTERM after its batches in flight (rerun: it resumes), 1 anything else.
The summary goes to stderr and, as JSON, to stdout and ``--report``.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import itertools
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from braid.encoders.errors import EncoderError
from braid.encoders.export import BUILTIN_MODELS, export_builtin
from braid.encoders.registry import ModelStore
from braid.encoders.runtime import default_threads
from braid.v1 import braid_pb2 as pb

from ..client import BraidClient
from .checkpoint import Checkpoint, CheckpointStore
from .corpus import FORMATS, CorpusError, Row, count_lines, expand, fingerprint, partition_rows
from .encode import Batch, Encoded, Reject, encode_in_worker, start_worker
from .sender import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_RETRYABLE,
    Backoff,
    JobFailed,
    Sender,
    failure_of,
    retryable,
)

T = TypeVar("T")
DEFAULT_MODELS_DIR = "braid-data/models"  # the server's default (<data-dir>/models) when both run in one place


@dataclass
class JobOptions:
    collection: str
    corpus: list[str]
    partition: int = 0
    partitions: int = 1
    workers: int = 1
    batch: int = 128
    window: int = 4
    job: str = ""
    restart: bool = False
    skip_invalid: bool = False
    rejects: str = ""
    report: str = ""
    models_dir: str = DEFAULT_MODELS_DIR
    format: str = "auto"
    text_field: str = ""
    max_retries: int = 10
    progress: bool = True


@dataclass
class JobReport:
    """The summary of one run of one partition (printed, and written as JSON with --report)."""

    job: str
    collection: str
    partition: int
    partitions: int
    status: str = "running"  # done | already-done | failed
    resumed_from: int = 0  # partition rows acknowledged by earlier runs
    read: int = 0  # rows read by this run
    encoded: int = 0  # documents encoded (or taken as they were) by this run
    written: int = 0  # documents acknowledged by the server in this run
    skipped: int = 0  # rows rejected in this run (--skip-invalid)
    retried: int = 0  # streams reopened after a transient failure
    seconds: float = 0.0
    docs_per_s: float = 0.0
    exit_code: int = EXIT_OK
    error: str = ""
    rejects_file: str = ""


def run_index_job(options: JobOptions, connect: Callable[[], BraidClient]) -> JobReport:
    """Run one partition to its end; returns the report (its exit_code says how it went)."""
    started = time.monotonic()
    report = JobReport(options.job, options.collection, options.partition, options.partitions)
    _STOP.clear()
    try:
        _check_options(options)
        files = expand(options.corpus)
        corpus = fingerprint(files)
        report.job = options.job or f"{options.collection}-{corpus[:12]}"
        with connect() as client:
            _run(options, client, files, corpus, report)
    except JobFailed as err:
        report.status, report.exit_code, report.error = "failed", err.exit_code, str(err)
    except CorpusError as err:
        report.status, report.exit_code, report.error = "failed", EXIT_BAD_INPUT, str(err)
    except grpc.RpcError as err:
        failed = failure_of(err, "talking to the server")
        report.status, report.exit_code, report.error = "failed", failed.exit_code, str(failed)
    except BrokenProcessPool as err:  # a worker killed (out of memory, a signal): rerunning resumes
        report.status, report.exit_code = "failed", EXIT_RETRYABLE
        report.error = f"an encoder worker process died ({err}); rerun to resume from the checkpoint"
    except Exception as err:  # never leave without the report: what was acknowledged is checkpointed
        report.status, report.exit_code, report.error = "failed", EXIT_FAILED, f"{type(err).__name__}: {err}"
    report.seconds = round(time.monotonic() - started, 3)
    report.docs_per_s = round(report.written / report.seconds, 1) if report.seconds > 0 else 0.0
    return report


def _check_options(options: JobOptions) -> None:
    if options.partitions < 1 or not 0 <= options.partition < options.partitions:
        raise JobFailed(
            f"partition: {options.partition} is not in 0..{options.partitions - 1} (--partitions {options.partitions})",
            EXIT_BAD_INPUT,
        )
    for name in ("workers", "batch", "window"):
        if getattr(options, name) < 1:
            raise JobFailed(f"{name}: must be at least 1, got {getattr(options, name)}", EXIT_BAD_INPUT)
    if options.format not in FORMATS:
        raise JobFailed(f"format: one of {', '.join(FORMATS)}, got {options.format!r}", EXIT_BAD_INPUT)


def _run(options: JobOptions, client: BraidClient, files: list[Path], corpus: str, report: JobReport) -> None:
    backoff = Backoff(max_retries=options.max_retries)
    info = _retrying(lambda: client.get_collection(options.collection), backoff, "reading the collection")
    collection = info.name  # an alias resolved once: the whole job writes one collection
    _check_models(info.schema, Path(options.models_dir))
    store = CheckpointStore(client)
    _retrying(store.ensure, backoff, "creating the checkpoint collection")
    checkpoint = _retrying(
        lambda: store.load(report.job, options.partition, options.partitions), backoff, "reading the checkpoint"
    )
    if checkpoint is not None and not options.restart:
        if checkpoint.corpus != corpus:
            raise JobFailed(
                f"job {report.job!r}: the corpus changed since its checkpoint (fingerprint {checkpoint.corpus} "
                f"then, {corpus} now); --restart starts the partition over, or give the job another --job name",
                EXIT_BAD_INPUT,
            )
        if checkpoint.collection != collection:
            raise JobFailed(
                f"job {report.job!r}: its checkpoint writes collection {checkpoint.collection!r}, not {collection!r}; "
                "--restart starts over, or give the job another --job name",
                EXIT_BAD_INPUT,
            )
        if checkpoint.done:
            report.status, report.resumed_from = "already-done", checkpoint.position
            return
    else:
        checkpoint = Checkpoint(report.job, collection, corpus, options.partition, options.partitions)
    report.resumed_from = checkpoint.position
    rejects = _Rejects(options, report)
    total = _partition_total(files, options) if options.progress else None  # a pass over the corpus: only for a bar
    progress = _progress(options, total, checkpoint.position, collection)

    def acknowledged(encoded: Encoded, upserted: int) -> None:
        rejects.write(encoded.rejects)
        report.written += upserted
        report.skipped += len(encoded.rejects)
        checkpoint.position = encoded.end_position
        checkpoint.written += upserted
        checkpoint.rejected += len(encoded.rejects)
        _retrying(lambda: store.save(checkpoint), backoff, "saving the checkpoint")
        progress.update(encoded.read)
        progress.set_postfix(written=checkpoint.written, rejected=checkpoint.rejected, refresh=False)

    rows = itertools.islice(
        partition_rows(files, options.format, options.partition, options.partitions), checkpoint.position, None
    )
    batches = _batches(rows, options.batch, checkpoint.position)
    threads = max(1, default_threads() // options.workers)  # the CPUs this process may use, shared
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # inherited by the workers, before their numpy loads
    args = (collection, info.schema.SerializeToString(), str(options.models_dir), threads, options.text_field)
    pool = ProcessPoolExecutor(
        options.workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker, initargs=args
    )
    sender = Sender(
        client, acknowledged, window=options.window, skip_invalid=options.skip_invalid, backoff=backoff, sleep=_sleep
    )
    try:
        encoded = _checked(_ordered(pool, encode_in_worker, batches, ahead=2 * options.workers + 1), options, report)
        sender.run(encoded)
    finally:
        report.retried = sender.stats.retried
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
        rejects.close()
    checkpoint.done = True
    _retrying(lambda: store.save(checkpoint), backoff, "saving the checkpoint")
    report.status = "done"


def _checked(encoded: Iterator[Encoded], options: JobOptions, report: JobReport) -> Iterator[Encoded]:
    """Count what was read and encoded; a reject stops the job unless --skip-invalid."""
    for batch in encoded:
        report.read += batch.read
        report.encoded += len(batch.rows)
        if batch.rejects and not options.skip_invalid:
            first = batch.rejects[0]
            raise JobFailed(
                f"{first.file}:{first.line}: document {first.id!r}: {first.reason} "
                "(--skip-invalid writes such rows to the rejects file and goes on)",
                EXIT_BAD_INPUT,
            )
        yield batch


def _batches(rows: Iterator[Row], size: int, position: int) -> Iterator[Batch]:
    for seq in itertools.count():
        if _STOP.is_set():
            # The stream ends cleanly after this: the batches in flight are acknowledged and
            # checkpointed, and a rerun resumes after them.
            raise JobFailed("stopped by SIGTERM after the batches in flight; rerun to resume", EXIT_RETRYABLE)
        chunk = list(itertools.islice(rows, size))
        if not chunk:
            return
        position += len(chunk)
        yield Batch(seq, chunk, position)


def _ordered(pool: ProcessPoolExecutor, fn: Callable[[Any], T], items: Iterator[Any], ahead: int) -> Iterator[T]:
    """``map`` over a process pool, in order, with at most ``ahead`` items in the pool (a
    corpus of any size is never read far ahead of what the server acknowledged)."""
    pending: deque[Future[T]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _retrying(call: Callable[[], T], backoff: Backoff, doing: str) -> T:
    """A unary step of the job, retried like the stream on transient failures."""
    for attempt in itertools.count(1):
        try:
            return call()
        except grpc.RpcError as err:
            if not retryable(err) or attempt > backoff.max_retries:
                raise failure_of(err, doing) from None
            _sleep(backoff.delay(attempt))
    raise AssertionError("unreachable")


def _check_models(schema: pb.Schema, models_dir: Path) -> None:
    """Every model the collection encodes with is here (a built-in one is exported on first
    use) and is the same model the server runs: otherwise the vectors would differ."""
    store = ModelStore(models_dir)
    for spec in (*schema.dense_fields, *schema.sparse_fields):
        if not spec.HasField("encoder"):
            continue
        model, precision = spec.encoder.model, spec.encoder.precision or "fp32"
        try:
            if model in BUILTIN_MODELS and not (models_dir / model / "braid-model.json").exists():
                print(f"braid job: exporting model {model} to {models_dir} (once)", file=sys.stderr)
                export_builtin(model, models_dir)
            mine = store.fingerprint(model, precision)
        except EncoderError as err:
            raise JobFailed(f"field {spec.name!r}: {err}", EXIT_BAD_INPUT) from None
        theirs = spec.encoder.fingerprint
        if theirs and theirs != mine:
            raise JobFailed(
                f"field {spec.name!r}: model {model} ({precision}) in {models_dir} is not the server's "
                f"(fingerprint {mine[:19]}..., the server's {theirs[:19]}...): the vectors would differ; "
                "export the same model version or point --models-dir at the server's copy",
                EXIT_BAD_INPUT,
            )


def _partition_total(files: list[Path], options: JobOptions) -> int | None:
    """Rows this partition will read, for the ETA: exact with one partition, else the even share."""
    try:
        rows = count_lines(files)
    except Exception:  # a progress bar without a total is fine
        return None
    return rows if options.partitions == 1 else rows // options.partitions


def _progress(options: JobOptions, total: int | None, done: int, collection: str) -> Any:
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=done,
        unit="doc",
        desc=f"job {collection} [{options.partition}/{options.partitions}]",
        disable=not options.progress,
        mininterval=0.2 if interactive else 10.0,  # a pod's log gets a line every 10 s, not a spinner
        smoothing=0.1,
    )


class _Rejects:
    """The rejects file: one JSON object per rejected row ({file, line, id, reason}), appended."""

    def __init__(self, options: JobOptions, report: JobReport) -> None:
        self.path = options.rejects or (
            f"{report.job}.{options.partition}.rejects.jsonl" if options.skip_invalid else ""
        )
        report.rejects_file = self.path
        self.out: Any = None

    def write(self, rejects: list[Reject]) -> None:
        if not rejects:
            return
        if self.out is None:
            self.out = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (held for the whole job)
        for reject in rejects:
            self.out.write(json.dumps(reject.to_json()) + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.close()


# SIGTERM (a pod evicted or deleted) sets this: no new batch is read, the ones in flight finish.
_STOP = threading.Event()


def _on_sigterm(signum: int, frame: Any) -> None:
    _STOP.set()


def _sleep(seconds: float) -> None:
    """A backoff wait that SIGTERM cuts short: the job stops instead of retrying on. Said on
    stderr, so an operator (or a test) sees the job is waiting out a failure, not stuck."""
    print(f"braid job: waiting {seconds:.1f} s to retry", file=sys.stderr, flush=True)
    if _STOP.wait(seconds):
        raise JobFailed("stopped by SIGTERM while waiting to retry; rerun to resume", EXIT_RETRYABLE)


# ---------------------------------------------------------------------- CLI


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"BRAID_JOB_{name}", default)


def _flag(name: str) -> bool:
    return _env(name, "").lower() in ("1", "true", "yes", "on")


def add_job_command(commands: Any, address: argparse.ArgumentParser, client: Callable[[Any], BraidClient]) -> None:
    job = commands.add_parser("job", help="bulk jobs (docs/jobs.md)")
    kinds = job.add_subparsers(dest="job_kind", required=True)
    index = kinds.add_parser(
        "index", parents=[address], help="encode a corpus on this machine and stream it in, resumably"
    )
    index.add_argument("collection", help="collection or alias (resolved once, at the start)")
    index.add_argument("corpus", nargs="+", help="JSONL / BEIR corpus.jsonl / Parquet files or globs")
    index.add_argument(
        "--partition",
        type=int,
        default=int(_env("PARTITION", os.environ.get("JOB_COMPLETION_INDEX", 0))),
        help="this pod's partition (BRAID_JOB_PARTITION, else JOB_COMPLETION_INDEX, else 0)",
    )
    index.add_argument(
        "--partitions", type=int, default=int(_env("PARTITIONS", 1)), help="partitions (BRAID_JOB_PARTITIONS, 1)"
    )
    index.add_argument(
        "--workers", type=int, default=int(_env("WORKERS", 1)), help="encoder processes (BRAID_JOB_WORKERS, 1)"
    )
    index.add_argument("--batch", type=int, default=int(_env("BATCH", 128)), help="documents per batch (128)")
    index.add_argument("--window", type=int, default=int(_env("WINDOW", 4)), help="batches in flight (4)")
    index.add_argument("--job", default=_env("NAME", ""), help="job name (default <collection>-<corpus digest>)")
    index.add_argument("--restart", action="store_true", default=_flag("RESTART"), help="ignore the checkpoint")
    index.add_argument(
        "--skip-invalid",
        action="store_true",
        default=_flag("SKIP_INVALID"),
        help="write invalid rows to the rejects file and go on (default: stop, exit 2)",
    )
    index.add_argument("--rejects", default=_env("REJECTS", ""), help="rejects file (JSONL; default <job>.<i>...)")
    index.add_argument("--report", default=_env("REPORT", ""), help="write the summary here as JSON")
    index.add_argument(
        "--models-dir",
        default=os.environ.get("BRAID_MODELS_DIR", DEFAULT_MODELS_DIR),
        help="ONNX models (BRAID_MODELS_DIR, default braid-data/models)",
    )
    index.add_argument("--format", choices=FORMATS, default=_env("FORMAT", "auto"))
    index.add_argument("--text-field", default=_env("TEXT_FIELD", ""), help="BEIR: the text field title+text go to")
    index.add_argument("--max-retries", type=int, default=int(_env("MAX_RETRIES", 10)), help="in a row (10)")
    index.add_argument("--no-progress", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        options = JobOptions(
            collection=args.collection,
            corpus=args.corpus,
            partition=args.partition,
            partitions=args.partitions,
            workers=args.workers,
            batch=args.batch,
            window=args.window,
            job=args.job,
            restart=args.restart,
            skip_invalid=args.skip_invalid,
            rejects=args.rejects,
            report=args.report,
            models_dir=args.models_dir,
            format=args.format,
            text_field=args.text_field,
            max_retries=args.max_retries,
            progress=not args.no_progress,
        )
        signal.signal(signal.SIGTERM, _on_sigterm)
        faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack to stderr
        report = run_index_job(options, lambda: client(args))
        _print_report(report, options.report)
        return report.exit_code

    index.set_defaults(run=run)


def _print_report(report: JobReport, path: str) -> None:
    summary = asdict(report)
    line = (
        f"braid job {report.job} [{report.partition}/{report.partitions}]: {report.status}; read {report.read}, "
        f"encoded {report.encoded}, written {report.written}, skipped {report.skipped}, retried {report.retried}, "
        f"{report.seconds:.1f} s ({report.docs_per_s:g} docs/s)"
    )
    if report.resumed_from:
        line += f"; resumed after {report.resumed_from} rows"
    print(line, file=sys.stderr)
    if report.error:
        print(f"braid job: {report.error}", file=sys.stderr)
    if path:
        with contextlib.suppress(OSError), open(path, "w", encoding="utf-8") as out:
            json.dump(summary, out, indent=2)
    print(json.dumps(summary), flush=True)
