"""``braid job index``: bulk jobs that encode on their own CPUs, resume after kill -9, and say why they stop.

Real servers on loopback (in process, or ``braid serve`` children that the tests kill),
real ONNX models, the real CLI as a child process where a test kills the job itself.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from braid.service.cli import build_parser
from braid.service.client import BraidClient, StreamFailed
from braid.service.jobs.checkpoint import SYSTEM_COLLECTION, CheckpointStore, checkpoint_id
from braid.service.jobs.corpus import fingerprint, partition_of
from braid.service.jobs.index_job import JobOptions, JobReport, run_index_job
from braid.service.jobs.sender import EXIT_BAD_INPUT, EXIT_OK, EXIT_RETRYABLE
from braid.v1 import braid_pb2 as pb

from .clusterkit import local_cluster  # noqa: F401 (a fixture)
from .conftest import start_in_process, stop_in_process, wait_for

MODEL = "all-minilm-l6-v2"
SPARSE_MODEL = "minilm-tied-splade"


def _schema(sparse: bool = False) -> pb.Schema:
    out = pb.Schema(
        text_fields=[pb.TextField(name="body")],
        dense_fields=[
            pb.DenseVectorField(name="dense", metric=pb.COSINE, encoder=pb.Encoder(model=MODEL, source_fields=["body"]))
        ],
        payload_fields=[pb.PayloadField(name="version", type=pb.INT), pb.PayloadField(name="topic", type=pb.KEYWORD)],
    )
    if sparse:
        out.sparse_fields.add(name="sparse", encoder=pb.Encoder(model=SPARSE_MODEL, source_fields=["body"]))
    return out


def _write_corpus(path: Path, n: int, versions: int = 1, bad: dict[int, str] | None = None) -> dict[str, int]:
    """Braid JSONL: ids d0..d{n-1}, then (versions > 1) every even id again with the next version.
    Returns id -> the version that must win. ``bad``: line number -> raw line to put there."""
    lines: list[str] = []
    last: dict[str, int] = {}
    for version in range(1, versions + 1):
        for i in range(n):
            if version > 1 and i % 2:
                continue
            doc_id = f"d{i}"
            body = f"document {i} version {version} about topic {i % 11} and words {i * 7919 % 1000}"
            doc = {"id": doc_id, "text": {"body": body}, "payload": {"version": {"int": str(version)}}}
            lines.append(json.dumps(doc))
            last[doc_id] = version
    for number, raw in sorted((bad or {}).items()):
        lines.insert(number - 1, raw)
    path.write_text("\n".join(lines) + "\n")
    return last


def _options(collection: str, corpus: Path, models_dir: Path, **overrides: object) -> JobOptions:
    return JobOptions(collection, [str(corpus)], models_dir=str(models_dir), progress=False, **overrides)  # type: ignore[arg-type]


def _job_cli(port: int, models_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The real CLI in its own process group (so a test can signal the group, as systemd does)."""
    command = [sys.executable, "-m", "braid.service.cli", "job", "index", "--address", f"127.0.0.1:{port}"]
    return subprocess.Popen(
        [*command, "--models-dir", str(models_dir), "--no-progress", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, **(env or {})),
        start_new_session=True,
    )


def _wait_for_position(store: CheckpointStore, job: subprocess.Popen[str], name: str, position: int) -> None:
    deadline = time.monotonic() + 60
    while (checkpoint := store.load(name, 0, 1)) is None or checkpoint.position < position:
        assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1]
        time.sleep(0.02)


def _job_server(child_server, tmp_path: Path, models_dir: Path, rows: int):  # type: ignore[no-untyped-def]
    """A ``braid serve`` child with collection ``c``, a corpus of ``rows`` documents, and the checkpoint store."""
    server = child_server(None, "--models-dir", str(models_dir))
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    expected = _write_corpus(corpus, rows)
    store = CheckpointStore(server.client)
    store.ensure()
    return server, corpus, expected, store


class _BackgroundJob:
    """``run_index_job`` on a thread, as a job pod runs while a test breaks things around it."""

    def __init__(self, options: JobOptions, connect) -> None:  # type: ignore[no-untyped-def]
        self.outcome: list[JobReport] = []
        self.thread = threading.Thread(target=lambda: self.outcome.append(run_index_job(options, connect)))
        self.thread.start()

    def report(self, timeout: float) -> JobReport:
        self.thread.join(timeout)
        assert self.outcome, f"the job did not finish within {timeout:.0f} s"
        return self.outcome[0]


def _last_report(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def _versions(client: BraidClient, collection: str, ids: list[str]) -> dict[str, int]:
    out = {}
    for start in range(0, len(ids), 500):
        for doc in client.get(collection, ids[start : start + 500]):
            out[doc.id] = doc.payload["version"].int
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path: Path, models_dir: Path):  # type: ignore[no-untyped-def]
    srv, running = start_in_process(tmp_path / "data", models_dir=models_dir)
    yield running
    stop_in_process(srv, running)


# ---------------------------------------------------------------- encoding


def test_job_vectors_are_bit_identical_to_server_side_encoding(server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    client = server.client
    client.create_collection("by_server", _schema(sparse=True))
    client.create_collection("by_job", _schema(sparse=True))
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus, 60)
    texts = [json.loads(line) for line in corpus.read_text().splitlines()]
    client.bulk_upsert("by_server", [pb.Document(id=d["id"], text=d["text"]) for d in texts], batch_size=25)
    # Different batch sizes on purpose: a document's vectors must not depend on its neighbours.
    report = run_index_job(
        _options("by_job", corpus, models_dir, batch=7, workers=2), lambda: BraidClient(f"127.0.0.1:{server.port}")
    )
    assert report.exit_code == EXIT_OK, report.error
    assert (report.written, report.read, report.status) == (60, 60, "done")
    ids = [d["id"] for d in texts]
    mine = {d.id: d for d in client.get("by_job", ids, include_vectors=True)}
    theirs = {d.id: d for d in client.get("by_server", ids, include_vectors=True)}
    assert len(mine) == len(theirs) == 60
    for doc_id in ids:
        a, b = mine[doc_id], theirs[doc_id]
        dense_a = (
            np.frombuffer(a.dense["dense"].packed, "<f4")
            if a.dense["dense"].packed
            else np.array(a.dense["dense"].values, "<f4")
        )
        dense_b = (
            np.frombuffer(b.dense["dense"].packed, "<f4")
            if b.dense["dense"].packed
            else np.array(b.dense["dense"].values, "<f4")
        )
        assert dense_a.tobytes() == dense_b.tobytes(), doc_id
        assert list(a.sparse["sparse"].indices) == list(b.sparse["sparse"].indices), doc_id
        assert (
            np.array(a.sparse["sparse"].values, "<f4").tobytes() == np.array(b.sparse["sparse"].values, "<f4").tobytes()
        )
    # Searches agree too: the same hits for the same text query.
    query = pb.SearchRequest(limit=5)
    query.queries.add(dense=pb.DenseQuery(field="dense", text="topic 3 words"))
    query.collection = "by_job"
    hits_job = [(h.id, round(h.score, 6)) for h in client.search_request(query).hits]
    query.collection = "by_server"
    assert hits_job == [(h.id, round(h.score, 6)) for h in client.search_request(query).hits]


def test_model_that_differs_from_the_servers_is_refused(server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    import shutil

    server.client.create_collection("c", _schema())
    other = tmp_path / "other-models"
    shutil.copytree(models_dir / MODEL, other / MODEL)
    manifest = json.loads((other / MODEL / "braid-model.json").read_text())
    manifest["max_length"] = manifest["max_length"] - 1  # another export: longer texts would encode differently
    (other / MODEL / "braid-model.json").write_text(json.dumps(manifest))
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus, 5)
    report = run_index_job(_options("c", corpus, other), lambda: BraidClient(f"127.0.0.1:{server.port}"))
    assert report.exit_code == EXIT_BAD_INPUT
    assert "is not the server's" in report.error and "'dense'" in report.error
    assert server.client.count("c") == 0


def test_collection_info_carries_model_fingerprints_and_create_checks_them(server, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    import grpc

    from braid.encoders.registry import ModelStore

    info = server.client.create_collection("c", _schema(sparse=True))
    store = ModelStore(models_dir)
    assert info.schema.dense_fields[0].encoder.fingerprint == store.fingerprint(MODEL)
    assert info.schema.sparse_fields[0].encoder.fingerprint == store.fingerprint(SPARSE_MODEL)
    assert store.fingerprint(MODEL) != store.fingerprint(MODEL, "int8")
    # A schema copied from this CollectionInfo creates the same collection elsewhere...
    assert server.client.create_collection("copy", info.schema).schema == info.schema
    # ...and one that asks for another model's vectors is refused, naming the field.
    wrong = pb.Schema()
    wrong.CopyFrom(info.schema)
    wrong.dense_fields[0].encoder.fingerprint = "sha256:" + "0" * 64
    with pytest.raises(grpc.RpcError) as refused:
        server.client.create_collection("wrong", wrong)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "schema.dense_fields[0].encoder.fingerprint" in refused.value.details()


# ------------------------------------------------------------------ resume


def test_kill_minus_9_at_random_moments_then_every_document_once_with_its_last_content(
    child_server, tmp_path: Path, models_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    server = child_server(None, "--models-dir", str(models_dir))
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    expected = _write_corpus(corpus, 900, versions=2)  # 1,350 rows: every even id twice
    rng = random.Random(15)
    store = CheckpointStore(server.client)
    store.ensure()
    # Kill at random moments in the middle: once the checkpoint passes a random mark, plus a
    # random fraction of a batch, so kills land while encoding, sending and checkpointing.
    marks = sorted(rng.uniform(0.1, 0.85) * 1350 for _ in range(3))
    for mark in marks:
        job = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "killed")
        deadline = time.monotonic() + 60
        while (checkpoint := store.load("killed", 0, 1)) is None or checkpoint.position < mark:
            assert job.poll() is None, job.communicate()[1]
            assert time.monotonic() < deadline, "the job made no progress"
            time.sleep(0.02)
        time.sleep(rng.uniform(0, 0.15))
        workers = psutil.Process(job.pid).children(recursive=True)
        job.send_signal(signal.SIGKILL)
        job.wait(10)
        # Its encoder processes notice the dead parent and leave: no orphans burning CPU.
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, f"orphaned job workers: {alive}"
        checkpoint = store.load("killed", 0, 1)
        assert checkpoint is not None and not checkpoint.done and checkpoint.position <= 1350
    final = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "killed")
    out, err = final.communicate(timeout=120)
    assert final.returncode == EXIT_OK, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "done"
    assert report["resumed_from"] > 0  # it continued; it did not start over
    assert server.client.count("c") == len(expected) == 900
    assert _versions(server.client, "c", list(expected)) == expected
    checkpoint = CheckpointStore(server.client).load("killed", 0, 1)
    assert checkpoint is not None and checkpoint.done and checkpoint.position == 1350
    # Run again: nothing to do, nothing written.
    again = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "killed")
    out, _ = again.communicate(timeout=60)
    assert again.returncode == EXIT_OK and json.loads(out.strip().splitlines()[-1])["status"] == "already-done"


def test_sigterm_finishes_the_batches_in_flight_exits_75_and_resumes(
    child_server, tmp_path: Path, models_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    server, corpus, expected, store = _job_server(child_server, tmp_path, models_dir, 1200)
    job = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "evicted")
    _wait_for_position(store, job, "evicted", 200)
    job.send_signal(signal.SIGTERM)  # what Kubernetes sends a pod it evicts
    out, err = job.communicate(timeout=30)
    assert job.returncode == EXIT_RETRYABLE, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["status"] == "failed" and "SIGTERM" in report["error"]
    checkpoint = store.load("evicted", 0, 1)
    assert checkpoint is not None and not checkpoint.done
    # What it says it wrote is there: the checkpoint is exactly the acknowledged batches.
    assert checkpoint.position < 1200 and server.client.count("c") == checkpoint.position == report["written"]
    resumed = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "evicted")
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == EXIT_OK, err
    assert json.loads(out.strip().splitlines()[-1])["resumed_from"] == checkpoint.position
    assert server.client.count("c") == 1200
    assert _versions(server.client, "c", list(expected)) == expected


def test_sigterm_to_the_process_group_and_a_dead_worker_still_end_with_a_report(
    child_server, tmp_path: Path, models_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    server, corpus, expected, store = _job_server(child_server, tmp_path, models_dir, 1200)
    # systemd, `timeout` or a shell's kill -TERM -PGID signal every process of the job.
    job = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "group", "--workers", "2")
    _wait_for_position(store, job, "group", 100)
    os.killpg(job.pid, signal.SIGTERM)
    out, err = job.communicate(timeout=30)
    assert job.returncode == EXIT_RETRYABLE, err
    assert "SIGTERM" in _last_report(out)["error"]
    # An encoder worker killed (out of memory, say): the job still reports, as retryable.
    job = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "group", "--workers", "2")
    _wait_for_position(store, job, "group", store.load("group", 0, 1).position + 64)  # type: ignore[union-attr]
    psutil.Process(job.pid).children()[-1].kill()
    out, err = job.communicate(timeout=30)
    assert job.returncode == EXIT_RETRYABLE, err
    report = _last_report(out)
    assert report["status"] == "failed" and "worker process died" in report["error"]
    final = _job_cli(server.port, models_dir, "c", str(corpus), "--batch", "32", "--job", "group")
    out, err = final.communicate(timeout=120)
    assert final.returncode == EXIT_OK, err
    assert server.client.count("c") == 1200
    assert _versions(server.client, "c", list(expected)) == expected


def test_sigterm_cuts_a_retry_wait_short(tmp_path: Path, models_dir: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus, 3)
    job = _job_cli(_free_port(), models_dir, "c", str(corpus), "--max-retries", "50")  # nothing listens there
    assert job.stderr is not None
    lines: list[str] = []
    guard = threading.Timer(60, job.kill)  # a job that never says it waits ends the read
    guard.start()
    try:
        for line in job.stderr:  # until it says it waits to retry: its SIGTERM handler is set by then
            lines.append(line)
            if "to retry" in line:
                break
    finally:
        guard.cancel()
    assert job.poll() is None, "".join(lines)
    started = time.monotonic()
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=30)
    err = "".join(lines) + err
    assert job.returncode == EXIT_RETRYABLE, err
    assert time.monotonic() - started < 5
    assert "SIGTERM" in _last_report(out)["error"]


def test_a_full_disk_on_the_server_is_waited_out(child_server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    from . import diskfaults

    flags = tmp_path / "faults"
    flags.mkdir()
    site = diskfaults.sitecustomize_dir(tmp_path / "site")
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH", "")) if p)
    env = {diskfaults.ENV: str(flags), "PYTHONPATH": path}
    server = child_server(None, "--models-dir", str(models_dir), env=env)
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    expected = _write_corpus(corpus, 600)
    connect = lambda: BraidClient(f"127.0.0.1:{server.port}", timeout=10)  # noqa: E731
    job = _BackgroundJob(_options("c", corpus, models_dir, batch=16), connect)
    wait_for(lambda: server.client.count("c") >= 100, timeout=60, what="the job's first writes")
    (flags / "wal_write").touch()  # the disk fills up under the job
    time.sleep(2.0)
    stuck = server.client.count("c")
    assert stuck < 600 and job.thread.is_alive()  # it waits; it neither fails nor skips
    (flags / "wal_write").unlink()
    report = job.report(120)
    assert report.exit_code == EXIT_OK, report.error
    assert report.retried >= 1
    assert server.client.count("c") == 600
    assert _versions(server.client, "c", list(expected)) == expected


def test_server_killed_mid_job_is_retried_with_backoff_and_nothing_is_lost(
    child_server, tmp_path: Path, models_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    port = _free_port()
    data = tmp_path / "data"
    server = child_server(data, "--models-dir", str(models_dir), "--port", str(port))
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    expected = _write_corpus(corpus, 700)
    connect = lambda: BraidClient(f"127.0.0.1:{port}", timeout=10)  # noqa: E731
    job = _BackgroundJob(_options("c", corpus, models_dir, batch=16), connect)
    wait_for(lambda: server.client.count("c") >= 100, timeout=60, what="the job's first writes")
    server.kill()
    time.sleep(1.0)
    restarted = child_server(data, "--models-dir", str(models_dir), "--port", str(port))
    report = job.report(120)
    assert report.exit_code == EXIT_OK, report.error
    assert report.retried >= 1
    assert restarted.client.count("c") == 700
    assert _versions(restarted.client, "c", list(expected)) == expected


class _Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "connection lost"

    def trailing_metadata(self) -> tuple:
        return ()


class _ScriptedStreams:
    """``upsert_stream`` with its real contract (yield (request, ack) in order; on failure
    StreamFailed with the requests taken but not acknowledged), failing on a script: stream k
    takes ``takes[k]`` batches and acknowledges ``acks[k]`` of them. Only the retry
    bookkeeping is under test; the real server's side is in the kill tests around it."""

    def __init__(self, script: list[tuple[int, int]]) -> None:
        self.script = list(script)
        self.taken: list[list[str]] = []

    def upsert_stream(self, requests, window=4, timeout=None):  # type: ignore[no-untyped-def]
        fails = bool(self.script)  # every scripted stream fails; the one after them succeeds
        takes, acks = self.script.pop(0) if fails else (10**9, 10**9)
        taken = list(itertools.islice(requests, takes))
        self.taken.append([r.documents[0].id for r in taken])
        for request in taken[:acks]:
            yield request, pb.UpsertStreamAck(upserted=1)
        if fails:
            raise StreamFailed(_Unavailable(), taken[acks:])


def test_a_stream_that_fails_at_once_loses_none_of_the_batches_to_resend() -> None:
    from braid.service.jobs.encode import Encoded
    from braid.service.jobs.sender import Backoff, Sender

    batches = [
        Encoded(i, pb.UpsertRequest(collection="c", documents=[pb.Document(id=f"b{i}")]).SerializeToString(), [])
        for i in range(10)
    ]
    # Stream 1 takes 6 and acknowledges 2; stream 2 dies after taking 1 of the 4 to resend;
    # stream 3 dies before taking any; stream 4 carries the rest.
    streams = _ScriptedStreams([(6, 2), (1, 0), (0, 0)])
    acked: list[int] = []
    sender = Sender(streams, lambda encoded, _: acked.append(encoded.seq), backoff=Backoff(), sleep=lambda _: None)  # type: ignore[arg-type]
    sender.run(iter(batches))
    assert acked == list(range(10))  # every batch acknowledged once, in order
    assert streams.taken[1] == ["b2"] and streams.taken[3][:4] == ["b2", "b3", "b4", "b5"]
    assert sender.stats.retried == 3


def test_an_unreachable_server_ends_the_job_as_retryable(tmp_path: Path, models_dir: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus, 3)
    port = _free_port()  # nothing listens there
    report = run_index_job(
        _options("c", corpus, models_dir, max_retries=2), lambda: BraidClient(f"127.0.0.1:{port}", timeout=1)
    )
    assert report.exit_code == EXIT_RETRYABLE
    assert "UNAVAILABLE" in report.error


# ---------------------------------------------------------------- bad input


def test_invalid_rows_stop_the_job_with_file_line_and_id(server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus, 50, bad={20: '{"id": "x1", "text": {"body": "ok"}, "payload": {"nope": {"int": "1"}}}'})
    connect = lambda: BraidClient(f"127.0.0.1:{server.port}")  # noqa: E731
    report = run_index_job(_options("c", corpus, models_dir, batch=8), connect)
    assert report.exit_code == EXIT_BAD_INPUT
    assert "docs.jsonl:20" in report.error and "'x1'" in report.error and "nope" in report.error
    assert server.client.count("c") == 16  # the two batches before the bad one, acknowledged


def test_skip_invalid_writes_rejects_and_everything_else(server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    bad = {
        3: "{not json",
        10: '{"text": {"body": "no id"}}',
        30: '{"id": "unknown-field", "text": {"body": "x"}, "payload": {"nope": {"int": "1"}}}',
        40: json.dumps({"id": "too-long", "text": {"body": "word " * 220_000}}),
        45: '{"id": "wrong-type", "text": {"body": "x"}, "payload": {"version": {"keyword": "v"}}}',
    }
    expected = _write_corpus(corpus, 60, bad=bad)
    rejects = tmp_path / "rejects.jsonl"
    connect = lambda: BraidClient(f"127.0.0.1:{server.port}")  # noqa: E731
    report = run_index_job(_options("c", corpus, models_dir, batch=8, skip_invalid=True, rejects=str(rejects)), connect)
    assert report.exit_code == EXIT_OK, report.error
    assert (report.read, report.written, report.skipped) == (65, 60, 5)
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert sorted(r["line"] for r in lines) == [3, 10, 30, 40, 45]
    by_line = {r["line"]: r for r in lines}
    assert "not JSON" in by_line[3]["reason"]
    assert by_line[30]["id"] == "unknown-field" and "nope" in by_line[30]["reason"]
    assert by_line[40]["id"] == "too-long" and "longer than" in by_line[40]["reason"]
    assert by_line[45]["id"] == "wrong-type"
    assert server.client.count("c") == 60
    assert _versions(server.client, "c", list(expected)) == expected


def test_a_changed_corpus_is_not_resumed_and_restart_starts_over(server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus, 20)
    connect = lambda: BraidClient(f"127.0.0.1:{server.port}")  # noqa: E731
    assert run_index_job(_options("c", corpus, models_dir, job="j"), connect).status == "done"
    assert run_index_job(_options("c", corpus, models_dir, job="j"), connect).status == "already-done"
    _write_corpus(corpus, 25)
    changed = run_index_job(_options("c", corpus, models_dir, job="j"), connect)
    assert changed.exit_code == EXIT_BAD_INPUT and "corpus changed" in changed.error
    restarted = run_index_job(_options("c", corpus, models_dir, job="j", restart=True), connect)
    assert (restarted.status, restarted.written) == ("done", 25)
    assert server.client.count("c") == 25
    stored = server.client.get(SYSTEM_COLLECTION, [checkpoint_id("j", 0, 1)])[0]
    assert stored.payload["corpus"].keyword == fingerprint([corpus])


# --------------------------------------------------------- partitions, formats


def test_partitions_split_the_corpus_once_and_default_from_kubernetes(
    server, tmp_path: Path, models_dir: Path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    expected = _write_corpus(corpus, 90, versions=2)
    connect = lambda: BraidClient(f"127.0.0.1:{server.port}")  # noqa: E731
    read = 0
    for partition in range(3):
        report = run_index_job(_options("c", corpus, models_dir, partition=partition, partitions=3, job="p"), connect)
        assert report.exit_code == EXIT_OK, report.error
        mine = [i for i in expected if partition_of(i, 3) == partition]
        assert len(mine) > 10  # the split is not lopsided
        read += report.read
    assert read == 135  # every row read by exactly one partition
    assert server.client.count("c") == 90
    assert _versions(server.client, "c", list(expected)) == expected
    # An Indexed Job's pod: JOB_COMPLETION_INDEX picks the partition, BRAID_JOB_* the rest.
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    monkeypatch.setenv("BRAID_JOB_PARTITIONS", "3")
    monkeypatch.setenv("BRAID_JOB_WORKERS", "2")
    args = build_parser().parse_args(["job", "index", "c", str(corpus)])
    assert (args.partition, args.partitions, args.workers) == (2, 3, 2)
    out_of_range = run_index_job(_options("c", corpus, models_dir, partition=3, partitions=3), connect)
    assert out_of_range.exit_code == EXIT_BAD_INPUT and "partition" in out_of_range.error


def test_beir_and_parquet_corpora(server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    server.client.create_collection("beir", _schema())
    beir = tmp_path / "corpus.jsonl"
    rows = [
        {"_id": f"b{i}", "title": f"Title {i}", "text": f"text body {i}", "metadata": {"topic": "t"}} for i in range(30)
    ]
    beir.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    connect = lambda: BraidClient(f"127.0.0.1:{server.port}")  # noqa: E731
    report = run_index_job(_options("beir", beir, models_dir), connect)
    assert report.exit_code == EXIT_OK, report.error
    doc = server.client.get("beir", ["b7"])[0]
    assert doc.text["body"] == "Title 7 text body 7" and doc.payload["topic"].keyword == "t"

    server.client.create_collection("pq", _schema())
    table = pyarrow.table(
        {
            "id": [f"p{i}" for i in range(40)],
            "body": [f"parquet row {i}" for i in range(40)],
            "version": list(range(40)),
        }
    )
    pq.write_table(table, tmp_path / "part-0.parquet")
    pq.write_table(
        table.slice(0, 10).set_column(0, "id", pyarrow.array([f"q{i}" for i in range(10)])), tmp_path / "part-1.parquet"
    )
    report = run_index_job(
        JobOptions("pq", [str(tmp_path / "part-*.parquet")], models_dir=str(models_dir), progress=False), connect
    )
    assert report.exit_code == EXIT_OK, report.error
    assert server.client.count("pq") == 50
    assert server.client.get("pq", ["p9"])[0].payload["version"].int == 9


# ----------------------------------------------------------------- reindex


def test_reindex_with_a_job_then_swap_the_alias_under_searches(server, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]
    """The issue's zero-downtime reindex: clients search ``articles``; a job builds
    ``articles_v2`` beside ``articles_v1``; the alias moves; no search fails or mixes them."""
    client = server.client
    connect = lambda: BraidClient(f"127.0.0.1:{server.port}")  # noqa: E731
    v1, v2 = tmp_path / "v1.jsonl", tmp_path / "v2.jsonl"
    _write_corpus(v1, 80)
    lines = [json.loads(line) for line in v1.read_text().splitlines()]
    for doc in lines:  # the new version of every document
        doc["payload"]["version"] = {"int": "2"}
    v2.write_text("\n".join(json.dumps(doc) for doc in lines) + "\n")
    client.create_collection("articles_v1", _schema())
    assert run_index_job(_options("articles_v1", v1, models_dir), connect).exit_code == EXIT_OK
    client.create_alias("articles", "articles_v1")

    stop = threading.Event()
    seen: list[set[int]] = []
    failures: list[str] = []

    def searcher() -> None:
        with BraidClient(f"127.0.0.1:{server.port}") as mine:
            while not stop.is_set():
                request = pb.SearchRequest(collection="articles", limit=10, include_payload=True)
                request.queries.add(dense=pb.DenseQuery(field="dense", text="document about topic 3"))
                request.queries.add(bm25=pb.Bm25Query(text="topic 3 words"))
                try:
                    hits = mine.search_request(request).hits
                except Exception as err:  # any failure is the finding
                    failures.append(repr(err))
                    continue
                seen.append({hit.payload["version"].int for hit in hits})

    threads = [threading.Thread(target=searcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        client.create_collection("articles_v2", _schema())
        report = run_index_job(_options("articles_v2", v2, models_dir, workers=2), connect)
        assert report.exit_code == EXIT_OK, report.error
        client.update_alias("articles", "articles_v2")
        swapped_at = len(seen)
        deadline = time.monotonic() + 30
        while len(seen) < swapped_at + 20:
            assert time.monotonic() < deadline, "searches stalled after the swap"
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]
    assert all(len(versions) == 1 for versions in seen), [v for v in seen if len(v) != 1][:3]
    assert {1} in seen and seen[-1] == {2}
    assert client.get_collection("articles").name == "articles_v2"


# ------------------------------------------------------------------ cluster


def test_job_through_a_cluster_router_survives_a_router_kill(local_cluster, tmp_path: Path, models_dir: Path) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    port = _free_port()  # fixed, like a Kubernetes Service: the restarted router comes back on it
    cluster = local_cluster(
        shard_servers=2, routers=1, extra_args=["--models-dir", str(models_dir)], router_args=["--port", str(port)]
    )
    address = cluster.router_address
    corpus = tmp_path / "docs.jsonl"
    expected = _write_corpus(corpus, 500, versions=2)
    with BraidClient(address) as client:
        client.create_collection("c", _schema(), shards=2)
        connect = lambda: BraidClient(address, timeout=10)  # noqa: E731
        options = _options("c", corpus, models_dir, batch=16, job="clustered")
        job = _BackgroundJob(options, connect)
        wait_for(lambda: client.count("c") >= 80, timeout=60, what="the job's first writes")
        cluster.routers[0].kill()  # the job's only way in: it must wait and resend
        time.sleep(0.5)
        cluster.routers[0].restart()
        assert cluster.router_address == address
        report = job.report(180)
        assert report.exit_code == EXIT_OK, report.error
        assert report.retried >= 1
        assert client.count("c") == 500
        assert _versions(client, "c", list(expected)) == expected
        # The checkpoint lives in the cluster: a pod on any node finds it.
        checkpoint = CheckpointStore(client).load("clustered", 0, 1)
        assert checkpoint is not None and checkpoint.done and checkpoint.position == 750
        assert run_index_job(options, connect).status == "already-done"


def test_braid_ingest_counts_acknowledged_documents(server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from braid.service.cli import main

    server.client.create_collection("c", _schema())
    corpus = tmp_path / "docs.jsonl"
    _write_corpus(corpus, 30)
    address = f"127.0.0.1:{server.port}"
    assert main(["ingest", "c", str(corpus), "--batch", "8", "--address", address]) == 0
    out, err = capsys.readouterr()
    assert "upserted 30 documents in 4 batches" in out
    assert "30/30" in err  # the bar ends at what the server acknowledged
    broken = tmp_path / "broken.jsonl"
    lines = corpus.read_text().splitlines()
    broken.write_text("\n".join([*lines[:20], "{oops", *lines[20:]]) + "\n")
    assert main(["ingest", "c", str(broken), "--batch", "8", "--address", address]) == 2
    _, err = capsys.readouterr()
    assert "broken.jsonl:21" in err and "16 documents before it are written" in err
