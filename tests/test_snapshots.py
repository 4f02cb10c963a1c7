"""Snapshots through the real server: CreateSnapshot, ListSnapshots, RestoreSnapshot, DeleteSnapshot,
ExportSnapshot and ImportSnapshot, with the clients and ``braid snapshot`` on top.

A restored collection must answer every search shape exactly as the original did when the
snapshot was taken (answers are recorded right before CreateSnapshot and compared message
for message), every write acknowledged before the call must be in it, and damage, foreign
archives, full disks, silent or cancelling clients and kill -9 must each end in a clear
status with nothing half done.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from braid.index import diskspace
from braid.index.manifest import load_json, write_json_atomic
from braid.service.aio import AsyncBraidClient
from braid.service.auth import generate_key, hash_key
from braid.service.cli import main
from braid.service.client import BraidClient
from braid.v1 import braid_pb2 as pb

from .conftest import Running, rpc_error, start_in_process, stop_in_process, wait_for

DIM = 8
WORDS = ["apple", "banana", "cherry", "delta", "echo", "fox", "golf", "hotel", "india", "juliet"]
ADMIN_KEY, WRITE_KEY, SCOPED_KEY = generate_key(), generate_key(), generate_key()
IDLE_S = 1.0  # the module server's stream_idle_timeout_s: a silent import is ended after it


def full_schema(spann: bool = False) -> pb.Schema:
    """Text (BM25), a dense field (HNSW, or SPANN), a sparse field, payload."""
    if spann:
        params = pb.SpannParams(merge_threshold=40, target_list_size=16)
        dense = pb.DenseVectorField(name="emb", dim=DIM, metric=pb.COSINE, index="spann", spann=params)
    else:
        dense = pb.DenseVectorField(name="emb", dim=DIM, metric=pb.COSINE, hnsw=pb.HnswParams(m=16, ef_search=64))
    return pb.Schema(
        text_fields=[pb.TextField(name="title"), pb.TextField(name="body")],
        dense_fields=[dense],
        sparse_fields=[pb.SparseVectorField(name="splade")],
        payload_fields=[pb.PayloadField(name="n", type=pb.INT), pb.PayloadField(name="lang", type=pb.KEYWORD)],
    )


def doc(i: int, version: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(i * 7919 + version)
    words = [WORDS[(i + k * (version + 1)) % len(WORDS)] for k in range(3)]
    return {
        "id": f"d{i}",
        "text": {"title": f"{words[0]} {i}", "body": " ".join(words) + f" v{version}"},
        "dense": {"emb": rng.standard_normal(DIM).astype(np.float32)},
        "sparse": {"splade": {w: float(k + 1) for k, w in enumerate(words)}},
        "payload": {"n": i % 5, "lang": "en" if i % 3 else "de"},
        "metadata": {"i": i, "version": version},
    }


def searches(name: str) -> list[pb.SearchRequest]:
    """Every search shape: BM25, dense, sparse, fused hybrids, filtered, with payload and text returned."""
    vector = pb.DenseVector(values=doc(3)["dense"]["emb"].tolist())
    dense = pb.SubQuery(dense=pb.DenseQuery(field="emb", vector=vector))
    bm25 = pb.SubQuery(bm25=pb.Bm25Query(text="apple cherry hotel"))
    sparse = pb.SubQuery(
        sparse=pb.SparseQuery(field="splade", vector=pb.SparseVector(tokens=["banana", "fox"], values=[1.0, 2.0]))
    )
    de = pb.Filter(must=[pb.Condition(match=pb.Match(field="lang", value=pb.Value(keyword="de")))])
    small = pb.Filter(must=[pb.Condition(range=pb.Range(field="n", lt=pb.Value(int=3)))])
    out = [pb.SearchRequest(collection=name, queries=[q], limit=10) for q in (bm25, dense, sparse)]
    out.append(pb.SearchRequest(collection=name, queries=[dense, bm25, sparse], limit=10))
    out.append(
        pb.SearchRequest(
            collection=name, queries=[dense, bm25], fusion=pb.Fusion(rrf=pb.ReciprocalRankFusion(k=60)), limit=10
        )
    )
    out.append(pb.SearchRequest(collection=name, queries=[dense], filter=de, limit=10))
    out.append(pb.SearchRequest(collection=name, queries=[bm25], filter=small, limit=10))
    out.append(
        pb.SearchRequest(
            collection=name,
            queries=[dense, bm25],
            filter=small,
            include_payload=True,
            text_fields=["title", "body"],
            limit=10,
        )
    )
    return out


def answers(client: BraidClient, name: str, ids: int = 80) -> list[Any]:
    """What a user sees of collection ``name``: every search shape, Count (all, filtered) and Get."""
    out: list[Any] = [
        client.search_request(request).SerializeToString(deterministic=True) for request in searches(name)
    ]
    small = pb.Filter(must=[pb.Condition(range=pb.Range(field="n", lt=pb.Value(int=3)))])
    out += [client.count(name), client.count(name, small)]
    out += [_canonical(d) for d in client.get(name, [f"d{i}" for i in range(ids)])]
    return out


def _canonical(document: pb.Document) -> bytes:
    """A stored document's bytes with its sparse vectors as token-sorted maps: a shard reopened
    from a checkpoint lists a vector's tokens in term-id order, an open one in the order written."""
    for vector in document.sparse.values():
        pairs = sorted(zip(vector.tokens, vector.values, strict=True))
        vector.ClearField("tokens")
        vector.ClearField("values")
        vector.tokens.extend(t for t, _ in pairs)
        vector.values.extend(v for _, v in pairs)
    return document.SerializeToString(deterministic=True)


def load(client: BraidClient, name: str, spann: bool = False, shards: int = 2) -> None:
    """60 documents, 5 deleted, 5 replaced."""
    client.create_collection(name, full_schema(spann), shards=shards)
    client.upsert(name, [doc(i) for i in range(60)])
    client.delete(name, [f"d{i}" for i in range(0, 10, 2)])
    client.upsert(name, [doc(i, version=1) for i in range(1, 10, 2)])


def change(client: BraidClient, name: str) -> None:
    """Writes after a snapshot: new documents, deletes, replacements."""
    client.upsert(name, [doc(i, version=2) for i in range(55, 70)])
    client.delete(name, [f"d{i}" for i in range(10, 20)])


# ------------------------------------------------------------------ servers


def _keys_file(path: Path) -> Path:
    entries = [
        {"name": "ops", "hash": hash_key(ADMIN_KEY), "role": "admin"},
        {"name": "ingest", "hash": hash_key(WRITE_KEY), "role": "write"},
        {"name": "tenant", "hash": hash_key(SCOPED_KEY), "role": "admin", "collections": ["tenant", "tenant2"]},
    ]
    path.write_text(json.dumps({"keys": entries}))
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Running]]:
    """One in-process server with API keys for the module, its client holding the admin key."""
    root = tmp_path_factory.mktemp("snapshots")
    keys = _keys_file(root / "keys.json")
    server, running = start_in_process(
        root / "data", api_keys=keys, stream_idle_timeout_s=IDLE_S, min_free_bytes=1 << 20
    )
    running.client.close()
    running.client = BraidClient(f"127.0.0.1:{running.port}", timeout=120, api_key=ADMIN_KEY)
    yield server, running
    stop_in_process(server, running)


@pytest.fixture
def client(served: tuple[Any, Running]) -> BraidClient:
    return served[1].client


def snapshots_dir(served: tuple[Any, Running]) -> Path:
    return served[1].data_dir / "snapshots"


def code(call) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    err = rpc_error(call)
    return err.code(), err.details()


# ---------------------------------------------------------------- round trip


def test_a_restored_collection_answers_as_the_original_did_at_the_snapshot(tmp_path: Path):
    server, running = start_in_process(tmp_path / "data")
    try:
        client = running.client
        load(client, "docs")
        before = answers(client, "docs")
        info = client.create_snapshot("docs")
        assert info.collection == "docs" and info.name.startswith("docs-") and info.format == 1
        assert info.documents == client.count("docs") == 55 and [s.shard for s in info.shards] == [0, 1]
        assert all(s.sequence > 0 for s in info.shards) and info.size_bytes > 0
        change(client, "docs")
        assert answers(client, "docs") != before

        restored = client.restore_snapshot(info.name, "restored")
        assert (restored.name, restored.documents, restored.shards) == ("restored", 55, 2)
        assert answers(client, "restored") == before
        assert [s.name for s in client.list_snapshots("docs")] == [info.name]
        assert client.list_snapshots("restored") == []

        client.upsert("restored", [doc(100)])  # it takes writes, numbering its own log
        client.delete("restored", ["d1"])
        assert client.count("restored") == 55
        now = answers(client, "restored", ids=101)
        stop_in_process(server, running)
        server, running = start_in_process(tmp_path / "data")
        assert answers(running.client, "restored", ids=101) == now
        assert [s.name for s in running.client.list_snapshots()] == [info.name]
    finally:
        stop_in_process(server, running)


def test_a_spann_field_round_trips(client: BraidClient, served: tuple[Any, Running]):
    load(client, "spann", spann=True, shards=1)
    client.upsert("spann", [doc(i) for i in range(100, 200)])  # past merge_threshold: sealed segments
    client.flush("spann")
    before = answers(client, "spann")
    info = client.create_snapshot("spann")
    assert list((snapshots_dir(served) / info.name / "shard-000" / "segments").glob("spann-emb-*"))  # sealed, linked
    change(client, "spann")
    client.restore_snapshot(info.name, "spann-restored")
    assert answers(client, "spann-restored") == before


def test_writes_acknowledged_before_the_call_are_in_the_snapshot(client: BraidClient):
    client.create_collection("racing", full_schema(), shards=2)
    acked: list[int] = []
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            client.upsert("racing", [doc(i)])
            acked.append(i)
            i += 1

    writer = threading.Thread(target=write)
    writer.start()
    try:
        wait_for(lambda: len(acked) >= 20, what="20 acknowledged writes")
        before = len(acked)  # every write acknowledged before the call
        info = client.create_snapshot("racing")
        wait_for(lambda: len(acked) >= before + 5, what="writes after the snapshot")
    finally:
        stop.set()
        writer.join()
    client.restore_snapshot(info.name, "racing-restored")
    got = {d.id for d in client.get("racing-restored", [f"d{i}" for i in range(len(acked))])}
    missing = {f"d{i}" for i in range(before)} - got
    assert not missing, f"acknowledged before CreateSnapshot, missing from it: {sorted(missing)}"
    assert got <= {f"d{i}" for i in range(len(acked))}
    assert info.documents == len(got) == client.count("racing-restored")


def test_restore_over_an_existing_name_needs_replace_and_aliases_follow(client: BraidClient):
    load(client, "live", shards=1)
    client.create_alias("live-alias", "live")
    before = answers(client, "live")
    info = client.create_snapshot("live-alias")  # an alias snapshots its collection
    assert info.collection == "live"
    change(client, "live")
    status, message = code(lambda: client.restore_snapshot(info.name, "live"))
    assert status is grpc.StatusCode.ALREADY_EXISTS and "'live' already exists" in message
    status, message = code(lambda: client.restore_snapshot(info.name, "live-alias"))
    assert status is grpc.StatusCode.ALREADY_EXISTS and "alias" in message
    restored = client.restore_snapshot(info.name, "live", replace=True)
    assert list(restored.aliases) == ["live-alias"]
    assert answers(client, "live") == before
    assert [s.collection for s in client.list_snapshots("live-alias")] == ["live"]
    for request in searches("live-alias"):  # the alias answers the restored collection
        assert client.search_request(request) == client.search_request(
            pb.SearchRequest(**{**_fields(request), "collection": "live"})
        )


def _fields(request: pb.SearchRequest) -> dict[str, Any]:
    return {f.name: v for f, v in request.ListFields()}


# ----------------------------------------------------------- export / import


def test_export_and_import_round_trip_as_a_tar_and_as_a_directory(client: BraidClient, tmp_path: Path):
    load(client, "moved", shards=2)
    before = answers(client, "moved")
    info = client.create_snapshot("moved")
    tar_path = client.export_snapshot(info.name, tmp_path / "backup" / "moved.tar")
    directory = client.export_snapshot(info.name, str(tmp_path / "exported") + "/")
    assert tar_path == tmp_path / "backup" / "moved.tar" and tarfile.is_tarfile(tar_path)
    assert directory == tmp_path / "exported" / info.name and (directory / "SNAPSHOT.json").is_file()
    assert sorted(p.name for p in (tmp_path / "backup").iterdir()) == ["moved.tar"]  # no partial file left
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [info.name]

    for source, name in ((tar_path, "moved-from-tar"), (directory, "moved-from-dir")):
        client.delete_snapshot(info.name)
        assert code(lambda: client.restore_snapshot(info.name, "x"))[0] is grpc.StatusCode.NOT_FOUND
        imported = client.import_snapshot(source)
        assert (imported.name, imported.collection, imported.documents) == (info.name, "moved", 55)
        client.restore_snapshot(info.name, name)
        assert answers(client, name) == before
    status, message = code(lambda: client.import_snapshot(tar_path))
    assert status is grpc.StatusCode.ALREADY_EXISTS and info.name in message


def test_the_asyncio_client_round_trips(client: BraidClient, served: tuple[Any, Running], tmp_path: Path):
    load(client, "aio", shards=1)
    before = answers(client, "aio")

    async def run() -> None:
        async with AsyncBraidClient(f"127.0.0.1:{served[1].port}", api_key=ADMIN_KEY) as braid:
            info = await braid.create_snapshot("aio")
            assert [s.name for s in await braid.list_snapshots("aio")] == [info.name]
            directory = await braid.export_snapshot(info.name, tmp_path)
            archive = await braid.export_snapshot(info.name, tmp_path / "aio.tar")
            await braid.delete_snapshot(info.name)
            assert (await braid.import_snapshot(directory)).name == info.name
            await braid.delete_snapshot(info.name)
            assert (await braid.import_snapshot(archive)).documents == 55
            restored = await braid.restore_snapshot(info.name, "aio-restored")
            assert restored.documents == 55

    asyncio.run(run())
    assert answers(client, "aio-restored") == before


def test_the_cli_backs_up_and_restores(client: BraidClient, served: tuple[Any, Running], tmp_path: Path, capsys):  # type: ignore[no-untyped-def]
    load(client, "clidocs", shards=1)
    before = answers(client, "clidocs")
    flags = ["--address", f"127.0.0.1:{served[1].port}", "--api-key", ADMIN_KEY]
    assert main(["snapshot", "create", "clidocs", *flags]) == 0
    name = capsys.readouterr().out.split()[2]
    assert name.startswith("clidocs-")
    assert main(["snapshot", "list", "clidocs", *flags]) == 0
    listed = capsys.readouterr().out
    assert name in listed and "55 documents" in listed
    assert main(["snapshot", "export", name, str(tmp_path / "b.tar"), *flags]) == 0
    assert main(["snapshot", "delete", name, *flags]) == 0
    assert main(["snapshot", "restore", name, "--as", "clidocs2", *flags]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    assert main(["snapshot", "import", str(tmp_path / "b.tar"), *flags]) == 0
    assert main(["snapshot", "restore", name, "--as", "clidocs", *flags]) == 1
    assert "ALREADY_EXISTS" in capsys.readouterr().err
    change(client, "clidocs")
    assert main(["snapshot", "restore", name, "--as", "clidocs", "--replace", *flags]) == 0
    assert answers(client, "clidocs") == before
    assert main(["snapshot", "import", str(tmp_path / "missing.tar"), *flags]) == 1
    assert "missing.tar" in capsys.readouterr().err
    assert main(["snapshot", "create", "clidocs", "--address", f"127.0.0.1:{served[1].port}"]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err


def _tar(members: list[tarfile.TarInfo], data: bytes = b"x") -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for member in members:
            tar.addfile(member, io.BytesIO(data) if member.isfile() else None)
    return out.getvalue()


def _member(name: str, kind: bytes = tarfile.REGTYPE, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.size = kind, target, 1 if kind == tarfile.REGTYPE else 0
    return info


def _import_bytes(client: BraidClient, data: bytes) -> tuple[grpc.StatusCode, str]:
    def chunks() -> Iterator[pb.SnapshotChunk]:
        for start in range(0, len(data), 1 << 16):
            yield pb.SnapshotChunk(data=data[start : start + (1 << 16)])

    return code(lambda: client.stub.ImportSnapshot(chunks(), timeout=60))


def test_foreign_archives_are_invalid_argument_and_leave_nothing(client: BraidClient, served: tuple[Any, Running]):
    cases = {
        "garbage": os.urandom(5000),
        "parent path": _tar([_member("snap/SNAPSHOT.json"), _member("snap/../../evil")]),
        "symlink": _tar([_member("snap/SNAPSHOT.json"), _member("snap/link", tarfile.SYMTYPE, "/etc/passwd")]),
        "two tops": _tar([_member("a/SNAPSHOT.json"), _member("b/SNAPSHOT.json")]),
        "empty": b"",
    }
    for case, data in cases.items():
        status, message = _import_bytes(client, data)
        assert status is grpc.StatusCode.INVALID_ARGUMENT, (case, status, message)
        assert message.startswith(("archive:", "data:")), (case, message)
    raw = client.channel.stream_unary("/braid.v1.Braid/ImportSnapshot")
    status, message = code(lambda: raw(iter([b"\xff\xff\xff"]), timeout=60))  # not a SnapshotChunk
    assert status is grpc.StatusCode.INVALID_ARGUMENT and "cannot decode braid.v1.SnapshotChunk" in message
    assert sorted(p.name for p in snapshots_dir(served).iterdir() if p.name.startswith(".")) == []
    assert not (snapshots_dir(served).parent / "evil").exists()


def _flip(path: Path, offset: int = 0) -> None:
    """A flipped byte in a new inode: snapshot files are hard links to the collection's own."""
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.unlink()
    path.write_bytes(bytes(data))


def _largest_file(root: Path) -> Path:
    return max(
        (p for p in root.rglob("*") if p.is_file() and p.name != "SNAPSHOT.json"), key=lambda p: p.stat().st_size
    )


def test_damage_is_data_loss_naming_the_file_and_an_unknown_format_is_failed_precondition(
    client: BraidClient, served: tuple[Any, Running], tmp_path: Path
):
    load(client, "damaged", shards=1)
    count = client.count("damaged")
    info = client.create_snapshot("damaged")
    archive = client.export_snapshot(info.name, tmp_path / "damaged.tar")
    root = snapshots_dir(served) / info.name
    victim = _largest_file(root)
    _flip(victim, victim.stat().st_size // 2)
    relative = victim.relative_to(root).as_posix()
    status, message = code(lambda: client.restore_snapshot(info.name, "damaged2"))
    assert status is grpc.StatusCode.DATA_LOSS and relative in message, message
    assert code(lambda: client.get_collection("damaged2"))[0] is grpc.StatusCode.NOT_FOUND  # nothing half restored
    assert client.count("damaged") == count  # the collection's own file is untouched

    # The same flip inside an exported archive: the import refuses it, naming the file.
    client.delete_snapshot(info.name)
    with tarfile.open(archive) as tar:
        member = tar.getmember(f"{info.name}/{relative}")
        offset = member.offset_data + member.size // 2
    _flip(archive, offset)
    status, message = code(lambda: client.import_snapshot(archive))
    assert status is grpc.StatusCode.DATA_LOSS and relative in message, message
    assert [s.name for s in client.list_snapshots("damaged")] == []

    # A snapshot of a format this version does not read (its manifest's own crc32 is valid).
    info = client.create_snapshot("damaged")
    manifest_path = snapshots_dir(served) / info.name / "SNAPSHOT.json"
    manifest, _ = load_json(manifest_path, require_checksum=True)
    write_json_atomic(manifest_path, {**manifest, "format": 99})
    status, message = code(lambda: client.restore_snapshot(info.name, "future"))
    assert status is grpc.StatusCode.FAILED_PRECONDITION and "snapshot format 99" in message, message
    assert code(lambda: client.export_snapshot(info.name, tmp_path / "f.tar"))[0] is grpc.StatusCode.FAILED_PRECONDITION
    [listed] = [s for s in client.list_snapshots() if s.name == info.name]
    assert "snapshot format 99" in listed.error
    assert not (tmp_path / "f.tar").exists()
    client.delete_snapshot(info.name)

    # A snapshot whose manifest is gone is listed with the reason, and can be deleted.
    info = client.create_snapshot("damaged")
    (snapshots_dir(served) / info.name / "SNAPSHOT.json").unlink()
    [listed] = [s for s in client.list_snapshots() if s.name == info.name]
    assert "missing" in listed.error
    assert code(lambda: client.restore_snapshot(info.name, "gone"))[0] is grpc.StatusCode.NOT_FOUND
    client.delete_snapshot(info.name)
    assert info.name not in {s.name for s in client.list_snapshots()}


def test_names_are_checked(client: BraidClient, tmp_path: Path):
    cases = [
        (lambda: client.create_snapshot(""), grpc.StatusCode.INVALID_ARGUMENT, "collection"),
        (lambda: client.create_snapshot("nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda: client.restore_snapshot("Bad Name!", "x"), grpc.StatusCode.INVALID_ARGUMENT, "snapshot:"),
        (lambda: client.restore_snapshot("nope-1", "x"), grpc.StatusCode.NOT_FOUND, "nope-1"),
        (lambda: client.delete_snapshot("../x"), grpc.StatusCode.INVALID_ARGUMENT, "snapshot:"),
        (lambda: client.delete_snapshot("nope-2"), grpc.StatusCode.NOT_FOUND, "nope-2"),
        (lambda: client.export_snapshot("nope-3", tmp_path / "x.tar"), grpc.StatusCode.NOT_FOUND, "nope-3"),
        (lambda: client.export_snapshot("/etc", tmp_path / "x.tar"), grpc.StatusCode.INVALID_ARGUMENT, "snapshot:"),
        (lambda: client.export_snapshot("nope-4", str(tmp_path / "d") + "/"), grpc.StatusCode.NOT_FOUND, "nope-4"),
    ]
    for call, expected, named in cases:
        status, message = code(call)
        assert status is expected and named in message, (expected, status, message)
    load(client, "named", shards=1)
    info = client.create_snapshot("named")
    status, message = code(lambda: client.restore_snapshot(info.name, "Bad Name!"))
    assert status is grpc.StatusCode.INVALID_ARGUMENT and message.startswith("name:"), message
    assert not list(tmp_path.iterdir())  # a refused export leaves no file


# ------------------------------------------------------------- the worst day


def _intact(client: BraidClient) -> list[Any]:
    """Count, a dense search (unique vectors: no ties, which BM25 breaks by segment order and a
    restart may merge segments) and stored documents of collection ``big``."""
    dense = searches("big")[1]
    documents = client.get("big", [f"d{i}" for i in range(0, 3000, 97)])
    return [client.count("big"), client.search_request(dense).SerializeToString(), *map(_canonical, documents)]


def test_kill_9_during_create_snapshot_leaves_the_collection_and_no_half_snapshot(child_server, tmp_path: Path):
    server = child_server(tmp_path / "data")
    client = server.client
    client.timeout = 120
    client.create_collection("big", full_schema(), shards=2)
    for start in range(0, 3000, 500):
        client.upsert("big", [doc(i) for i in range(start, start + 500)])
    before = _intact(client)
    snapshots = tmp_path / "data" / "snapshots"
    caught = None
    for _ in range(20):  # until a kill lands while the snapshot is being written
        client.upsert("big", [doc(0)])  # something to checkpoint, so the snapshot has work
        call = client.stub.CreateSnapshot.future(pb.CreateSnapshotRequest(collection="big"), timeout=120)
        while not call.done():
            caught = next((p.name for p in snapshots.glob(".creating-*")), None)
            if caught:
                server.kill()
                break
        if caught:
            break
    assert caught, "no CreateSnapshot was caught in the act in 20 tries"
    server = child_server(tmp_path / "data")
    client = server.client
    assert _intact(client) == before
    listed = [s.name for s in client.list_snapshots()]
    assert caught.removeprefix(".creating-") not in listed and all(not s.error for s in client.list_snapshots())
    assert not list(snapshots.glob(".*"))
    info = client.create_snapshot("big")  # snapshots work again
    assert info.documents == before[0]
    assert server.stop() == 0


def test_an_import_that_goes_silent_is_ended_and_leaves_no_file(client: BraidClient, served: tuple[Any, Running]):
    release = threading.Event()

    def one_then_silence() -> Iterator[pb.SnapshotChunk]:
        yield pb.SnapshotChunk(data=b"x" * 4096)
        release.wait(120)

    try:
        status, message = code(lambda: client.stub.ImportSnapshot(one_then_silence(), timeout=120))
    finally:
        release.set()
    assert status is grpc.StatusCode.DEADLINE_EXCEEDED and "stream_idle_timeout_s" in message, message
    assert not [p for p in snapshots_dir(served).iterdir() if p.name.startswith(".")]
    assert served[0].admission.open_streams == 0


def test_a_full_disk_while_snapshotting_or_importing(
    client: BraidClient, served: tuple[Any, Running], tmp_path: Path, monkeypatch
):  # type: ignore[no-untyped-def]
    load(client, "cramped", shards=1)
    before = answers(client, "cramped")
    info = client.create_snapshot("cramped")
    archive = client.export_snapshot(info.name, tmp_path / "cramped.tar")
    client.delete_snapshot(info.name)
    listed = [s.name for s in client.list_snapshots()]

    monkeypatch.setattr(diskspace, "free_bytes", lambda directory: 1000)
    time.sleep(diskspace.CACHE_S * 1.5)  # the cached reading expires
    for call in (lambda: client.create_snapshot("cramped"), lambda: client.import_snapshot(archive)):
        status, message = code(call)
        assert status is grpc.StatusCode.RESOURCE_EXHAUSTED and "disk full" in message, message
    assert answers(client, "cramped") == before  # still serving
    assert [s.name for s in client.list_snapshots()] == listed
    assert not [p for p in snapshots_dir(served).iterdir() if p.name.startswith(".")]

    monkeypatch.undo()
    assert client.import_snapshot(archive).name == info.name  # room again: both work
    assert client.create_snapshot("cramped").documents == 55


def test_a_client_cancelling_an_export_leaves_the_server_serving(client: BraidClient, served: tuple[Any, Running]):
    server = served[0]
    client.create_collection(
        "wide", pb.Schema(dense_fields=[pb.DenseVectorField(name="emb", dim=256, metric=pb.COSINE)])
    )
    vectors = np.random.default_rng(5).standard_normal((3000, 256)).astype(np.float32)
    for start in range(0, 3000, 1000):
        client.upsert("wide", [{"id": f"w{i}", "dense": {"emb": vectors[i]}} for i in range(start, start + 1000)])
    info = client.create_snapshot("wide")
    assert info.size_bytes > 3 << 20
    call = client.stub.ExportSnapshot(pb.ExportSnapshotRequest(snapshot=info.name), timeout=60)
    first = next(call)
    assert len(first.data) == 1 << 20  # 1 MiB pieces
    call.cancel()
    root = snapshots_dir(served) / info.name

    def reading() -> list[str]:  # the server's open files inside the snapshot
        fds = Path("/proc/self/fd")
        return [
            t
            for t in (os.readlink(fds / fd) for fd in os.listdir(fds) if (fds / fd).exists())
            if t.startswith(str(root))
        ]

    wait_for(lambda: not reading() and server.admission.outstanding == 0, what="the export's reader to stop")
    assert server.admission.open_streams == 0
    assert client.count("wide") == 3000
    whole = b"".join(
        c.data for c in client.stub.ExportSnapshot(pb.ExportSnapshotRequest(snapshot=info.name), timeout=60)
    )
    assert len(whole) % 512 == 0 and len(whole) > info.size_bytes  # a whole tar after the cancelled one
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        assert {m.name for m in tar.getmembers()} >= {f"{info.name}/SNAPSHOT.json"}


# ----------------------------------------------------------------------- auth


def test_snapshots_need_the_admin_role_and_stay_in_a_scoped_keys_collections(
    client: BraidClient, served: tuple[Any, Running], tmp_path: Path
):
    address = f"127.0.0.1:{served[1].port}"
    load(client, "tenant", shards=1)
    load(client, "other", shards=1)
    theirs = client.create_snapshot("tenant")
    foreign = client.create_snapshot("other")
    archive = client.export_snapshot(foreign.name, tmp_path / "other.tar")
    with BraidClient(address, api_key=WRITE_KEY) as writer:
        status, message = code(lambda: writer.create_snapshot("tenant"))
        assert status is grpc.StatusCode.PERMISSION_DENIED and "needs role admin" in message, message
        assert code(lambda: writer.list_snapshots())[0] is grpc.StatusCode.PERMISSION_DENIED
    with BraidClient(address, api_key=SCOPED_KEY) as scoped:
        assert code(lambda: scoped.create_snapshot("other"))[0] is grpc.StatusCode.PERMISSION_DENIED
        assert {s.collection for s in scoped.list_snapshots()} == {"tenant"}
        for call in (
            lambda: scoped.restore_snapshot(foreign.name, "tenant2"),
            lambda: scoped.restore_snapshot(theirs.name, "other", replace=True),
            lambda: scoped.delete_snapshot(foreign.name),
            lambda: scoped.export_snapshot(foreign.name, tmp_path / "stolen.tar"),
        ):
            assert code(call)[0] is grpc.StatusCode.PERMISSION_DENIED
        client.delete_snapshot(foreign.name)
        status, message = code(lambda: scoped.import_snapshot(archive))
        assert status is grpc.StatusCode.PERMISSION_DENIED and "'other'" in message, message
        assert foreign.name not in {s.name for s in client.list_snapshots()}
        assert scoped.restore_snapshot(theirs.name, "tenant2").documents == 55
    assert not (tmp_path / "stolen.tar").exists()


def test_an_export_closed_before_its_first_piece_closes_its_source() -> None:
    """An export a client cancelled before reading anything still releases what it opened (a
    router's scratch copy of every shard): the rechunking iterator closes its source even when
    no piece was asked for, and once the source is exhausted."""
    from braid.service.snapshot_files import rechunk

    class Source:
        def __init__(self) -> None:
            self.closed = 0
            self.pieces = iter([b"a" * 700, b"b" * 700, b"c" * 100])

        def __iter__(self) -> Source:
            return self

        def __next__(self) -> bytes:
            return next(self.pieces)

        def close(self) -> None:
            self.closed += 1

    unread = Source()
    rechunk(unread, 512).close()
    assert unread.closed == 1
    read = Source()
    assert [len(piece) for piece in rechunk(read, 512)] == [512, 512, 476]
    assert read.closed >= 1
