"""Snapshots (issue 23, section 7): time and size against data size, beside a plain copy and tar;
replica bootstrap from a snapshot against a full log replay; stream disk use with trimming.

    python bench/snapshots.py [--parts 1,2] [--sizes 10000,30000] [--dim 384] [--index hnsw,spann]
                              [--shards 1] [--spann-merge-threshold 5000] [--writes 300] [--gap 50]
                              [--cluster-docs 10000] [--steady-batches 300] [--snapshot-log-bytes 2097152]

Part 1, standalone, measured at the Catalog level in this process (index/catalog.py
``create_snapshot`` and ``restore_snapshot``, index/snapshot_store.py ``export`` and
``import_archive``): no gRPC. For each size and dense index type, a fresh data directory
holds one collection of the shared vector set (../shared/bench/make_vectors.py, cached under
bench/results/; without ../shared the project's identical generator, loadtest/vectors.py): a
text field "body" and a dense field "emb" (cosine, HNSW M=16 ef_construction=200, or SPANN
with a growing segment of ``--spann-merge-threshold`` vectors, so sealed segments exist).
After the bulk upsert the collection settles (HNSW graphs built and merged, SPANN merges
published; the ingest time includes it), then:

  snapshot        CreateSnapshot with no writes (it checkpoints, then hard-links the files,
                  checksums and fsyncs every one);
  snapshot, writes  snapshots while one writer thread upserts one new document per call,
                  ``--gap`` upserts apart: at least ``--snapshots``, more (up to
                  ``--max-snapshots``) until ``--writes`` upserts overlapped one; median wall time;
  restore         RestoreSnapshot as a new collection (links the files, opens the collection);
  export          the snapshot's tar stream written to a file;
  import          that tar into another snapshot directory (extract, then every crc32 checked).

Each runs ``--repeat`` times, alternating with its reference; the tables show the medians.

References, on the same files in the same run: ``cp -a`` of the collection directory
(shutil.copytree: what a backup by copying costs, without the consistency) for snapshot and
restore, and tarfile writing / extracting the collection directory for export / import.

Sizes: the collection directory on disk; the bytes the snapshot manifest lists; the disk the
snapshot really adds (blocks of files under snapshots/ that share no inode with the
collection: hard links cost nothing while the collection keeps its files), right after the
quiet snapshot and again after the writes (the collection has checkpointed since, so some
files are the snapshots' alone).

Write latency: ``--writes`` single-document upserts with no snapshot, against the upserts that
overlap a snapshot (p50 / p99).

Part 2, a cluster of real processes on 127.0.0.1 (service/cluster/local.py's LocalCluster, as
tests/clusterkit.py starts it: one nats-server, 2 shard servers, a router):

  bootstrap       a collection of ``--cluster-docs`` documents (the same fields, HNSW), 1 shard,
                  replication factor 2, loaded through the router with automatic snapshots
                  off. Shard server 1 is killed (-9), its data directory deleted and it is
                  started again: seconds until its replica applied the log's end with every
                  document, first from the whole log (the reference), then from a snapshot
                  shard server 0 took (braid.cluster.v1.Shard/Snapshot) of the same state;
  steady load     ``--steady-batches`` Upserts of ``--steady-batch`` documents over
                  ``--steady-pool`` ids through the router; the stream's bytes every
                  ``--steady-every`` Upserts, on a cluster without automatic snapshots (the
                  reference: nothing is trimmed) and on one with
                  BRAID_SNAPSHOT_LOG_BYTES=``--snapshot-log-bytes`` (snapshots, then trims).
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from braid.cluster.v1 import shard_pb2 as spb  # noqa: E402
from braid.cluster.v1 import shard_pb2_grpc  # noqa: E402
from braid.index.catalog import Catalog  # noqa: E402
from braid.index.collection import Collection  # noqa: E402
from braid.index.records import DocumentWrite  # noqa: E402
from braid.index.schema import (  # noqa: E402
    DenseFieldSpec,
    DenseIndexType,
    HnswParams,
    Schema,
    SpannParams,
    TextFieldSpec,
)
from braid.index.snapshot_store import SnapshotStore  # noqa: E402
from braid.service.client import BraidClient, dense_vector  # noqa: E402
from braid.service.cluster.local import LocalCluster  # noqa: E402
from braid.service.cluster.nats_link import NatsLink  # noqa: E402
from braid.service.cluster.snapshot_objects import SnapshotObjects  # noqa: E402
from braid.v1 import braid_pb2 as pb  # noqa: E402
from loadtest.vectors import load_vectors  # noqa: E402

NAME = "bench"
BATCH = 500
M, EF_CONSTRUCTION = 16, 200


def schema(dim: int, index: str, merge_threshold: int) -> Schema:
    dense = DenseFieldSpec(
        "emb",
        dim,
        hnsw=HnswParams(m=M, ef_construction=EF_CONSTRUCTION),
        index=DenseIndexType(index),
        spann=SpannParams(merge_threshold=merge_threshold),
    )
    return Schema(text_fields=(TextFieldSpec("body"),), dense_fields=(dense,))


def doc(doc_id: str, vector: np.ndarray) -> DocumentWrite:
    return DocumentWrite(id=doc_id, text={"body": f"document {doc_id} about snapshots"}, dense={"emb": vector})


def inodes(root: Path) -> dict[tuple[int, int], int]:
    """{(device, inode): bytes on disk} of every file under ``root``."""
    out = {}
    for path in root.rglob("*"):
        st = path.lstat()
        if path.is_file():
            out[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return out


def disk_bytes(root: Path) -> int:
    return sum(inodes(root).values())


def extra_bytes(snapshots: Path, collection: Path) -> int:
    """Disk the snapshots hold that the collection does not share (du of both minus du of the collection)."""
    shared = inodes(collection)
    return sum(size for key, size in inodes(snapshots).items() if key not in shared)


def timed(fn, *args, **kwargs) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    began = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - began, out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


@dataclass
class Writer:
    """One thread upserting one new document per call; records (start, end) of every call."""

    collection: Collection
    vectors: np.ndarray
    calls: list[tuple[float, float]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _progress: threading.Condition = field(default_factory=threading.Condition)

    def start(self) -> None:
        threading.Thread(target=self._run, name="bench-writer", daemon=True).start()

    def _run(self) -> None:
        i = 0
        try:
            while not self._stop.is_set():
                vector = self.vectors[i % len(self.vectors)]
                began = time.perf_counter()
                self.collection.upsert([doc(f"w{i}", vector)])
                with self._progress:
                    self.calls.append((began, time.perf_counter()))
                    self._progress.notify_all()
                i += 1
        except BaseException as err:  # reported by the caller
            self.error.append(err)
        finally:
            self.done.set()
            with self._progress:
                self._progress.notify_all()

    def wait_for(self, count: int) -> None:
        """Block until ``count`` calls have returned (or the writer failed)."""
        with self._progress:
            self._progress.wait_for(lambda: len(self.calls) >= count or self.done.is_set())
        if self.error:
            raise self.error[0]

    def stop(self) -> None:
        self._stop.set()
        self.done.wait()
        if self.error:
            raise self.error[0]


@dataclass
class Result:
    n: int
    index: str
    ingest_s: float = 0.0
    collection_mb: float = 0.0
    snapshot_s: float = 0.0
    snapshot_writes_s: float = 0.0
    copy_s: float = 0.0
    restore_s: float = 0.0
    export_s: float = 0.0
    tar_s: float = 0.0
    import_s: float = 0.0
    untar_s: float = 0.0
    listed_mb: float = 0.0
    extra_mb: float = 0.0
    listed_after_mb: float = 0.0
    extra_after_mb: float = 0.0
    export_mb: float = 0.0
    tar_mb: float = 0.0
    snapshots: int = 0  # taken under writes
    kept: int = 0  # in the store at the end
    quiet_ms: list[float] = field(default_factory=list)
    during_ms: list[float] = field(default_factory=list)


def settle(collection: Collection) -> None:
    """Wait for the steady state after a load: HNSW graphs built and merged (the idle merge into
    one graph comes IDLE_MERGE_S after the last write), SPANN merges published (each flush waits
    for a running one and publishes it; the flush itself may start the next)."""
    for shard in collection.shards:
        assert shard.wait_merged(600, settled=True), f"shard {shard.number}: HNSW merges still running"
    for _ in range(4):
        collection.flush()


def measure(n: int, index: str, args: argparse.Namespace, base: np.ndarray, work: Path) -> Result:
    result = Result(n, index)
    data = work / "data"
    catalog = Catalog(data)
    try:
        collection = catalog.create(NAME, schema(base.shape[1], index, args.spann_merge_threshold), args.shards)
        began = time.perf_counter()
        for i in range(0, n, BATCH):
            collection.upsert([doc(str(j), base[j]) for j in range(i, min(n, i + BATCH))])
        settle(collection)
        result.ingest_s = time.perf_counter() - began
        assert collection.count() == n, (collection.count(), n)
        collection_dir, snapshots_dir = data / "collections" / NAME, data / "snapshots"
        result.collection_mb = disk_bytes(collection_dir) / 1e6
        log(f"{n:,} {index}: ingest {result.ingest_s:.1f} s, collection {result.collection_mb:.1f} MB on disk")

        # Each operation and its reference --repeat times, alternately; the medians (a shared machine).
        repeat = range(args.repeat)
        archive, reference = work / "export.tar", work / "reference.tar"
        snapshot_s, copy_s, export_s, tar_s, import_s, untar_s, restore_s = [], [], [], [], [], [], []
        names = []
        for i in repeat:  # quiet snapshots against cp -a of the collection directory
            seconds, manifest = timed(catalog.create_snapshot, NAME)
            snapshot_s.append(seconds)
            names.append(manifest["name"])  # type: ignore[index]
            if i == 0:
                result.listed_mb = manifest["bytes"] / 1e6  # type: ignore[index]
                result.extra_mb = extra_bytes(snapshots_dir, collection_dir) / 1e6
            copy_s.append(timed(shutil.copytree, collection_dir, work / "copy", symlinks=True)[0])
            shutil.rmtree(work / "copy")
        name = names[0]

        def export() -> None:
            with open(archive, "wb") as out:
                for chunk in catalog.snapshots.export(name):
                    out.write(chunk)

        def write_tar() -> None:
            with tarfile.open(reference, "w") as tar:
                tar.add(collection_dir, arcname=NAME)

        def extract_tar() -> None:
            with tarfile.open(reference) as tar:
                tar.extractall(work / "untarred", filter="data")

        for _ in repeat:  # export against tarfile of the collection directory, import against extracting it
            export_s.append(timed(export)[0])
            tar_s.append(timed(write_tar)[0])
            seconds, imported = timed(SnapshotStore(work / "imported").import_archive, archive)
            assert imported["name"] == name  # type: ignore[index]
            import_s.append(seconds)
            untar_s.append(timed(extract_tar)[0])
            result.export_mb, result.tar_mb = archive.stat().st_size / 1e6, reference.stat().st_size / 1e6
            for path in (archive, reference, work / "imported", work / "untarred"):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

        for i in repeat:  # restore as a new collection against cp -a (above)
            seconds, restored = timed(catalog.restore_snapshot, name, f"restored{i}")
            assert restored.count() == n, (restored.count(), n)  # type: ignore[attr-defined]
            restore_s.append(seconds)
            catalog.delete(f"restored{i}")
        result.snapshot_s, result.copy_s = statistics.median(snapshot_s), statistics.median(copy_s)
        result.export_s, result.tar_s = statistics.median(export_s), statistics.median(tar_s)
        result.import_s, result.untar_s = statistics.median(import_s), statistics.median(untar_s)
        result.restore_s = statistics.median(restore_s)

        # single-document upserts without, then while snapshots are taken
        writer = Writer(collection, base)
        writer.start()
        writer.wait_for(args.writes)
        quiet = list(writer.calls)
        windows: list[tuple[float, float]] = []

        def overlapping() -> list[float]:
            calls = list(writer.calls)
            return [(end - start) * 1e3 for start, end in calls if any(start < b and end > a for a, b in windows)]

        # At least --snapshots, and more (up to --max-snapshots) until --writes upserts overlapped one.
        while len(windows) < args.snapshots or (
            len(overlapping()) < args.writes and len(windows) < max(args.snapshots, args.max_snapshots)
        ):
            writer.wait_for(len(writer.calls) + args.gap)
            began = time.perf_counter()
            catalog.create_snapshot(NAME)
            windows.append((began, time.perf_counter()))
        writer.wait_for(len(writer.calls) + 1)  # the call overlapping the last snapshot's end has returned
        writer.stop()
        result.snapshots = len(windows)
        result.snapshot_writes_s = statistics.median(b - a for a, b in windows)
        result.quiet_ms = [(end - start) * 1e3 for start, end in quiet]
        result.during_ms = overlapping()
        kept = catalog.snapshots.list(NAME)
        result.kept = len(kept)
        result.listed_after_mb = sum(m["bytes"] for m in kept) / 1e6
        result.extra_after_mb = extra_bytes(snapshots_dir, collection_dir) / 1e6
        log(
            f"{n:,} {index}: snapshot {result.snapshot_s:.2f} s, under writes {result.snapshot_writes_s:.2f} s, "
            f"restore {result.restore_s:.2f} s, export {result.export_s:.2f} s, import {result.import_s:.2f} s"
        )
    finally:
        catalog.close(checkpoint=False)
    return result


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def report(results: list[Result], args: argparse.Namespace) -> None:
    print(
        f"\nTime, at the Catalog level in process (no gRPC), {args.dim}-dim vectors + a text field, "
        f"{args.shards} shard(s); reference on the same collection directory in the same run"
    )
    print(f"(medians of {args.repeat} runs)")
    print("| documents | index | operation | braid s | reference | reference s | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        rows = (
            ("snapshot", r.snapshot_s, "cp -a", r.copy_s),
            (f"snapshot, writes (median of {r.snapshots})", r.snapshot_writes_s, "cp -a", r.copy_s),
            ("restore as new", r.restore_s, "cp -a", r.copy_s),
            ("export (tar)", r.export_s, "tarfile write", r.tar_s),
            ("import (tar)", r.import_s, "tarfile extract", r.untar_s),
        )
        for label, ours, ref, theirs in rows:
            print(f"| {r.n:,} | {r.index} | {label} | {ours:.3f} | {ref} | {theirs:.3f} | {ratio(ours, theirs)} |")

    print("\nSize (MB); extra = disk the snapshots add beside the collection (hard links are free)")
    print(
        "| documents | index | collection on disk | snapshot listed | snapshot extra | snapshots after writes | "
        "their listed | their extra | export tar | tarfile of collection | export / tarfile |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.n:,} | {r.index} | {r.collection_mb:.1f} | {r.listed_mb:.1f} | {r.extra_mb:.2f} | "
            f"{r.kept} | {r.listed_after_mb:.1f} | {r.extra_after_mb:.1f} | {r.export_mb:.1f} | "
            f"{r.tar_mb:.1f} | {ratio(r.export_mb, r.tar_mb)} |"
        )

    print("\nSingle-document upsert latency (ms) without a snapshot and overlapping one")
    print(
        "| documents | index | upserts without / during | p50 without | p50 during | ratio | "
        "p99 without | p99 during | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        q50, d50, q99, d99 = pct(r.quiet_ms, 50), pct(r.during_ms, 50), pct(r.quiet_ms, 99), pct(r.during_ms, 99)
        print(
            f"| {r.n:,} | {r.index} | {len(r.quiet_ms)} / {len(r.during_ms)} | {q50:.2f} | {d50:.2f} | "
            f"{ratio(d50, q50)} | {q99:.2f} | {d99:.2f} | {ratio(d99, q99)} |"
        )


# ------------------------------------------------------------------ cluster (section 2)

CLUSTER_TIMEOUT_S = 600.0
POLL_S = 0.1
NO_AUTO_SNAPSHOTS = {"BRAID_SNAPSHOT_INTERVAL_S": "1e9", "BRAID_SNAPSHOT_LOG_BYTES": str(1 << 50)}


def shard_stub(cluster: LocalCluster, server: int) -> tuple[grpc.Channel, shard_pb2_grpc.ShardStub]:
    channel = grpc.insecure_channel(cluster.address_of(cluster.shards[server]))
    return channel, shard_pb2_grpc.ShardStub(channel)


def replica_status(cluster: LocalCluster, server: int, collection: str) -> spb.ReplicaStatus | None:
    """Server ``server``'s replica of shard 0 of ``collection`` (None while it has none or is down)."""
    channel, stub = shard_stub(cluster, server)
    try:
        replicas = stub.Status(spb.StatusRequest(), timeout=10).replicas
    except grpc.RpcError:
        return None
    finally:
        channel.close()
    return next((r for r in replicas if r.replica.collection == collection and r.replica.shard == 0), None)


def log_end(link: NatsLink, uid: str) -> int:
    """The sequence of the last record of shard 0's subject (what a caught-up replica has applied)."""

    async def last() -> int:
        return int((await link.js.get_last_msg(f"BRAID_{uid}", f"braid.{uid}.0")).seq)

    return link.call(last(), 10.0)


def wait_caught_up(cluster: LocalCluster, server: int, collection: str, seq: int, documents: int) -> float:
    """Seconds until the server's replica applied ``seq`` with ``documents`` documents and serves."""
    began = time.perf_counter()
    while True:
        status = replica_status(cluster, server, collection)
        if (
            status is not None
            and status.caught_up
            and not status.problem
            and status.applied_seq >= seq
            and status.documents == documents
        ):
            return time.perf_counter() - began
        if time.perf_counter() - began > CLUSTER_TIMEOUT_S:
            raise RuntimeError(f"{cluster.shards[server].name} did not catch up with {collection}: {status}")
        time.sleep(POLL_S)


def cluster_schema(dim: int) -> pb.Schema:
    return pb.Schema(
        dense_fields=[
            pb.DenseVectorField(
                name="emb", dim=dim, metric=pb.COSINE, hnsw=pb.HnswParams(m=M, ef_construction=EF_CONSTRUCTION)
            )
        ],
        text_fields=[pb.TextField(name="body")],
    )


def cluster_doc(doc_id: str, vector: np.ndarray) -> pb.Document:
    return pb.Document(
        id=doc_id, text={"body": f"document {doc_id} about snapshots"}, dense={"emb": dense_vector(vector)}
    )


def wiped_restart(cluster: LocalCluster, collection: str, seq: int, documents: int) -> tuple[float, float, str]:
    """kill -9 shard server 1, delete its data directory, start it again: (seconds until its
    ready line, seconds until its replica caught up, its output since the restart)."""
    one = cluster.shards[1]
    one.kill()
    shutil.rmtree(cluster.directory / one.name)
    began_at = len(one.output)
    began = time.perf_counter()
    one.start()
    one.wait_ready()
    ready_s = time.perf_counter() - began
    caught_up_s = ready_s + wait_caught_up(cluster, 1, collection, seq, documents)
    return ready_s, caught_up_s, "".join(one.output[began_at:])


@dataclass
class Bootstrap:
    documents: int
    log_mb: float
    replay_ready_s: float
    replay_s: float
    snapshot_s: float
    snapshot_mb: float
    ready_s: float
    bootstrap_s: float


def bootstrap(cluster: LocalCluster, link: NatsLink, base: np.ndarray) -> Bootstrap:
    """One shard, replication factor 2: shard server 1 wiped and rebuilt from the whole log, then
    again from a snapshot that shard server 0 took of the same state (no log tail after it)."""
    collection, n = "boot", len(base)
    with BraidClient(cluster.router_address, timeout=600) as client:
        client.create_collection(collection, cluster_schema(base.shape[1]), shards=1, replication_factor=2)
        began = time.perf_counter()
        client.bulk_upsert(collection, (cluster_doc(str(i), v) for i, v in enumerate(base)), batch_size=BATCH)
        log(f"cluster: {n:,} documents loaded through the router in {time.perf_counter() - began:.1f} s")
    uid = ""
    while not uid:
        status = replica_status(cluster, 0, collection)
        uid = status.replica.uid if status is not None else ""
    seq = log_end(link, uid)
    for server in (0, 1):
        wait_caught_up(cluster, server, collection, seq, n)
    objects = SnapshotObjects(link, 1)
    log_mb = objects.stream_state(f"BRAID_{uid}")["bytes"] / 1e6

    replay_ready_s, replay_s, output = wiped_restart(cluster, collection, seq, n)
    assert "restored snapshot" not in output, output[-2000:]
    log(f"cluster: full log replay ({log_mb:.1f} MB) {replay_s:.1f} s")

    channel, stub = shard_stub(cluster, 0)
    try:
        ref = spb.ReplicaRef(collection=collection, uid=uid, shard=0)
        began = time.perf_counter()
        taken = stub.Snapshot(spb.SnapshotRequest(replica=ref, min_seq=seq), timeout=CLUSTER_TIMEOUT_S)
        snapshot_s = time.perf_counter() - began
    finally:
        channel.close()
    ready_s, bootstrap_s, output = wiped_restart(cluster, collection, seq, n)
    assert f"restored snapshot {taken.object}" in output, output[-2000:]  # not a replay after all
    log(f"cluster: snapshot {snapshot_s:.1f} s ({taken.bytes / 1e6:.1f} MB), bootstrap from it {bootstrap_s:.1f} s")
    return Bootstrap(n, log_mb, replay_ready_s, replay_s, snapshot_s, taken.bytes / 1e6, ready_s, bootstrap_s)


@dataclass
class Steady:
    samples: list[tuple[int, int, int]] = field(default_factory=list)  # (batches, records written, stream bytes)
    objects_mb: float = 0.0
    objects: int = 0
    latencies_ms: list[float] = field(default_factory=list)


def steady_load(cluster: LocalCluster, link: NatsLink, base: np.ndarray, args: argparse.Namespace) -> Steady:
    """``--steady-batches`` Upserts of ``--steady-batch`` documents through the router, over a pool of
    ``--steady-pool`` ids (replacing: the collection stays one size while its log grows);
    the stream's bytes sampled every ``--steady-every`` batches."""
    collection, out = "steady", Steady()
    objects = SnapshotObjects(link, 1)
    with BraidClient(cluster.router_address, timeout=120) as client:
        client.create_collection(collection, cluster_schema(base.shape[1]), shards=1, replication_factor=2)
        uid = ""
        for number in range(args.steady_batches):
            first = number * args.steady_batch
            docs = [
                cluster_doc(str((first + i) % args.steady_pool), base[(first + i) % len(base)])
                for i in range(args.steady_batch)
            ]
            began = time.perf_counter()
            client.stub.Upsert(pb.UpsertRequest(collection=collection, documents=docs), timeout=120)
            out.latencies_ms.append((time.perf_counter() - began) * 1e3)
            while not uid:
                status = replica_status(cluster, 0, collection)
                uid = status.replica.uid if status is not None else ""
            if (number + 1) % args.steady_every == 0:
                state = objects.stream_state(f"BRAID_{uid}")
                out.samples.append((number + 1, state["last_seq"], state["bytes"]))
        kept = objects.replica_snapshots(uid, 0)
    out.objects, out.objects_mb = len(kept), sum(o.bytes for o in kept) / 1e6
    return out


def cluster_section(args: argparse.Namespace) -> None:
    base, _, _ = load_vectors(args.cluster_docs, args.dim, 1, log=log)
    with tempfile.TemporaryDirectory(prefix="braid-snapshots-cluster-") as tmp:
        work = Path(tmp)
        # No automatic snapshots: the replay is a whole log's, and the steady load's stream is never trimmed.
        plain_cluster = LocalCluster(work / "plain", shard_servers=2, routers=1, nats_nodes=1, env=NO_AUTO_SNAPSHOTS)
        with plain_cluster as cluster, connected(cluster) as link:
            boot = bootstrap(cluster, link, base)
            plain = steady_load(cluster, link, base, args)
        env = {"BRAID_SNAPSHOT_LOG_BYTES": str(args.snapshot_log_bytes)}
        trim_cluster = LocalCluster(work / "trim", shard_servers=2, routers=1, nats_nodes=1, env=env)
        with trim_cluster as cluster, connected(cluster) as link:
            trimmed = steady_load(cluster, link, base, args)
    cluster_report(boot, plain, trimmed, args)


@contextlib.contextmanager
def connected(cluster: LocalCluster) -> Iterator[NatsLink]:
    assert cluster.nats is not None
    link = NatsLink(cluster.nats.url_list, "braid-bench")
    try:
        if not link.wait_connected(30):
            raise RuntimeError(f"cannot connect to NATS: {link.last_error}")
        yield link
    finally:
        link.close()


def cluster_report(boot: Bootstrap, plain: Steady, trimmed: Steady, args: argparse.Namespace) -> None:
    print(
        "\nReplica bootstrap (cluster: NATS, 2 shard servers, a router; 1 shard, replication factor 2): "
        "shard server 1 killed (-9), its data directory deleted, started again; seconds until its replica "
        "applied the log's end with every document"
    )
    print("| documents | log MB | rebuild from | snapshot s | snapshot MB | process ready s | caught up s | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    print(
        f"| {boot.documents:,} | {boot.log_mb:.1f} | whole log (reference) | - | - | {boot.replay_ready_s:.1f} | "
        f"{boot.replay_s:.1f} | 1.00x |"
    )
    print(
        f"| {boot.documents:,} | {boot.log_mb:.1f} | snapshot (no tail) | {boot.snapshot_s:.1f} | "
        f"{boot.snapshot_mb:.1f} | {boot.ready_s:.1f} | {boot.bootstrap_s:.1f} | "
        f"{ratio(boot.bootstrap_s, boot.replay_s)} |"
    )
    print(
        f"\nStream disk use under a steady load: Upserts of {args.steady_batch} documents over "
        f"{args.steady_pool:,} ids, 1 shard, replication factor 2; trimming with BRAID_SNAPSHOT_LOG_BYTES="
        f"{args.snapshot_log_bytes:,} against none (no automatic snapshots)"
    )
    print("| batches | records written | stream MB, no trimming (reference) | stream MB, trimming | ratio |")
    print("|---|---|---|---|---|")
    for (batches, records, untrimmed), (_, _, kept) in zip(plain.samples, trimmed.samples, strict=True):
        print(f"| {batches} | {records:,} | {untrimmed / 1e6:.2f} | {kept / 1e6:.2f} | {ratio(kept, untrimmed)} |")
    print(
        f"Snapshots kept in the object store at the end: {trimmed.objects} ({trimmed.objects_mb:.1f} MB) with "
        f"trimming, {plain.objects} without. Upsert p50 / p99 ms: {pct(plain.latencies_ms, 50):.1f} / "
        f"{pct(plain.latencies_ms, 99):.1f} without, {pct(trimmed.latencies_ms, 50):.1f} / "
        f"{pct(trimmed.latencies_ms, 99):.1f} with trimming"
    )


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="1,2", help="1: standalone (Catalog), 2: cluster")
    parser.add_argument("--sizes", default="10000,30000")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--index", default="hnsw,spann", help="dense index types, comma-separated")
    parser.add_argument("--shards", type=int, default=1)
    parser.add_argument("--spann-merge-threshold", type=int, default=5000)
    parser.add_argument(
        "--writes", type=int, default=300, help="upserts timed without a snapshot, and at least as many during"
    )
    parser.add_argument("--snapshots", type=int, default=3, help="fewest snapshots taken under writes")
    parser.add_argument("--max-snapshots", type=int, default=30, help="most snapshots taken under writes")
    parser.add_argument("--gap", type=int, default=50, help="upserts between two snapshots under writes")
    parser.add_argument("--repeat", type=int, default=3, help="part 1: runs of each timed operation (median)")
    parser.add_argument("--vectors", choices=("shared", "random"), default="shared", help="random: no cached set")
    parser.add_argument("--cluster-docs", type=int, default=10000, help="part 2: documents of the bootstrap")
    parser.add_argument("--steady-batches", type=int, default=300, help="part 2: Upserts of the steady load")
    parser.add_argument("--steady-batch", type=int, default=50, help="part 2: documents per Upsert")
    parser.add_argument("--steady-pool", type=int, default=2000, help="part 2: ids the steady load replaces")
    parser.add_argument("--steady-every", type=int, default=30, help="part 2: sample the stream every N Upserts")
    parser.add_argument("--snapshot-log-bytes", type=int, default=2 << 20, help="part 2: BRAID_SNAPSHOT_LOG_BYTES")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    results = []
    if "1" in parts:
        for n in (int(s) for s in args.sizes.split(",")):
            if args.vectors == "shared":
                base, _, _ = load_vectors(n, args.dim, 1, log=log)
            else:
                rng = np.random.default_rng(0)
                base = rng.standard_normal((n, args.dim)).astype(np.float32)
                base /= np.linalg.norm(base, axis=1, keepdims=True)
            for index in args.index.split(","):
                with tempfile.TemporaryDirectory(prefix="braid-snapshots-") as tmp:
                    results.append(measure(n, index, args, base, Path(tmp)))
        report(results, args)
    if "2" in parts:
        cluster_section(args)
    return results


if __name__ == "__main__":
    main()
