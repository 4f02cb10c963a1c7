"""Storage faults: one flipped byte in any file Braid keeps is refused as DATA_LOSS naming the
file, or every answer stays correct; never a wrong answer, never a crash. `braid verify` finds
each flip and passes a clean directory.

One collection is built through the server (an HNSW field, a SPANN field with sealed segments,
text, sparse and payload fields), flushed, and given a log tail; a copy of its quiescent
directory is the image every case starts from (what a crash would leave). Each case copies
the image, flips one bit of one file (at its start, middle and end; the manifest's wal_seq and
generation bumped too) and starts a server on it in a child process, so a segfault is
reported rather than taking pytest down; the child answers a fixed set of Gets and searches.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from braid.index import hnsw_strand
from braid.index.catalog import Catalog
from braid.index.errors import DataLoss
from braid.index.manifest import write_json_atomic
from braid.index.spann_strand import SpannStrand
from braid.service.client import dense_vector
from braid.service.verify import run_verify
from braid.v1 import braid_pb2 as pb

from .conftest import start_in_process, stop_in_process

DIM, SP_DIM = 8, 16
N_DOCS = 480
THRESHOLD = 100  # SPANN merge_threshold: the first upserts seal segments
SHARD = "collections/c/shard-000"
ROOT = Path(__file__).resolve().parents[1]


def collection_schema() -> pb.Schema:
    return pb.Schema(
        dense_fields=[
            pb.DenseVectorField(name="emb", dim=DIM, metric=pb.COSINE, hnsw=pb.HnswParams(m=8, ef_construction=64)),
            pb.DenseVectorField(
                name="sp",
                dim=SP_DIM,
                metric=pb.COSINE,
                index="spann",
                spann=pb.SpannParams(merge_threshold=THRESHOLD, target_list_size=16),
            ),
        ],
        text_fields=[pb.TextField(name="title"), pb.TextField(name="body")],
        sparse_fields=[pb.SparseVectorField(name="splade")],
        payload_fields=[pb.PayloadField(name="n", type=pb.INT), pb.PayloadField(name="tag", type=pb.KEYWORD)],
    )


def make_doc(i: int, version: int = 0) -> dict:
    rng = np.random.default_rng(i * 7 + version)
    return {
        "id": f"d{i}",
        "text": {"title": f"title{i} v{version}", "body": f"word{i} common w{i % 7} v{version}"},
        "dense": {
            "emb": rng.standard_normal(DIM).astype(np.float32),
            "sp": rng.standard_normal(SP_DIM).astype(np.float32),
        },
        "sparse": {"splade": {f"t{i}": 1.0, f"g{i % 5}": 0.5}},
        "payload": {"n": i, "tag": f"tag{i % 4}"},
        "metadata": {"page": i, "tags": [f"m{i % 3}"], "loc": {"v": version}},
    }


ALL_IDS = [f"d{i}" for i in range(N_DOCS + 40)] + ["z-last"]


def _call(fn) -> Any:  # type: ignore[no-untyped-def]
    try:
        return fn()
    except grpc.RpcError as err:
        return {"error": err.code().name, "details": err.details()}


def _documents(docs) -> list[dict]:  # type: ignore[no-untyped-def]
    """Documents as plain data; a sparse vector as sorted (term, weight) pairs (its order is not kept)."""
    out = []
    for doc in docs:
        plain = json_format.MessageToDict(doc)
        for name, vector in plain.get("sparse", {}).items():
            terms = vector.get("tokens") or vector.get("indices") or []
            plain["sparse"][name] = sorted(zip(terms, vector.get("values", []), strict=True))
        out.append(plain)
    return out


def _hits(hits) -> list:  # type: ignore[no-untyped-def]
    return [[h.id, round(h.score, 4)] for h in hits]


def answers(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """A fixed set of answers: Get of every id (vectors, text, payload) and searches of every strand."""
    out: dict[str, Any] = {}
    for start in range(0, len(ALL_IDS), 100):
        ids = ALL_IDS[start : start + 100]
        out[f"get{start}"] = _call(lambda ids=ids: _documents(client.get("c", ids, include_vectors=True)))
    rng = np.random.default_rng(99)
    for q in range(4):
        emb, sp = rng.standard_normal(DIM), rng.standard_normal(SP_DIM)
        out[f"emb{q}"] = _call(lambda emb=emb: _hits(client.search("c", dense=("emb", emb), limit=10)))
        out[f"sp{q}"] = _call(lambda sp=sp: _hits(client.search("c", dense=("sp", sp), limit=10)))
        query = pb.DenseQuery(field="sp", vector=dense_vector(sp), max_lists=64, eps=10.0)
        out[f"sp-wide{q}"] = _call(lambda query=query: _hits(client.search("c", dense=query, limit=10)))
    tag = pb.Filter(must=[pb.Condition(match=pb.Match(field="tag", value=pb.Value(keyword="tag1")))])
    out["sp-filtered"] = _call(lambda: _hits(client.search("c", dense=("sp", np.ones(SP_DIM)), filter=tag)))
    for word in ("common", "w3", "word17", "v1", "title5"):
        out[f"bm25-{word}"] = _call(lambda word=word: _hits(client.search("c", bm25=word, limit=20)))
    out["sparse"] = _call(lambda: _hits(client.search("c", sparse=("splade", {"g2": 1.0, "t9": 2.0}), limit=20)))
    out["hybrid"] = _call(
        lambda: _hits(client.search("c", bm25="common w2", dense=("emb", np.ones(DIM)), filter=tag, limit=15))
    )
    out["count"] = _call(lambda: client.count("c"))
    on_metadata = pb.Filter(must=[pb.Condition(match=pb.Match(field="tags", value=pb.Value(keyword="m1")))])
    out["count-metadata"] = _call(lambda: client.count("c", on_metadata))
    return json.loads(json.dumps(out))  # as the child process reports it


def _probe(data_dir: str, out_path: str) -> None:
    """Child process: start a server on ``data_dir``, write its answers (or why it did not start)."""
    try:
        server, running = start_in_process(Path(data_dir))
    except BaseException as err:  # the server refused to start: report it, as a test would see it
        Path(out_path).write_text(json.dumps({"start_error": f"{type(err).__name__}: {err}"}))
        return
    try:
        result = answers(running.client)
    finally:
        stop_in_process(server, running)
    Path(out_path).write_text(json.dumps(result))


def probe(data_dir: Path) -> dict[str, Any]:
    out = data_dir.parent / "answers.json"
    code = f"import sys; from tests.test_corruption import _probe; _probe({str(data_dir)!r}, {str(out)!r})"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return {"crash": f"exit status {proc.returncode}: {proc.stderr[-2000:]}"}
    return json.loads(out.read_text())


# --------------------------------------------------------------------------- the image


def _settle(server, client) -> None:  # type: ignore[no-untyped-def]
    """Flush until no SPANN merge is running or due."""
    strand = server.catalog.get("c").shards[0].dense["sp"]
    assert isinstance(strand, SpannStrand)
    client.flush("c")
    while strand._merging or strand.wants_merge():
        time.sleep(0.05)
        client.flush("c")


def _quiet(server) -> None:  # type: ignore[no-untyped-def]
    strand = server.catalog.get("c").shards[0].dense["sp"]
    deadline = time.time() + 60
    while strand._merging and time.time() < deadline:
        time.sleep(0.05)
    assert not strand._merging


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The image (checkpoint + sealed SPANN segments + a log tail) and the answers it must give."""
    base = tmp_path_factory.mktemp("corruption")
    with pytest.MonkeyPatch.context() as small:
        small.setattr(hnsw_strand, "SEAL_ROWS", 128)  # so the HNSW field has a base graph as well as rows
        return _build_image(base)


def _build_image(base: Path) -> dict[str, Any]:
    server, running = start_in_process(base / "live")
    client = running.client
    try:
        client.create_collection("c", collection_schema())
        for start in range(0, N_DOCS, 60):
            client.upsert("c", [make_doc(i) for i in range(start, start + 60)])
        client.delete("c", ids=["d3", "d4", "d150"])  # tombstones in tantivy and in a sealed segment
        assert server.catalog.get("c").shards[0].wait_merged(60)
        _settle(server, client)
        assert (server.catalog.get("c").shards[0].dense["emb"].segments()["sealed"]) >= 128
        strand = server.catalog.get("c").shards[0].dense["sp"]
        assert len(strand.sealed) >= 1 and strand.growing.live < THRESHOLD - 40
        # The log tail, replayed at the next open: new documents, a replacement, a delete.
        client.upsert("c", [make_doc(i) for i in range(N_DOCS, N_DOCS + 20)])
        client.upsert("c", [make_doc(i, version=1) for i in (1, 200)])
        client.delete("c", ids=["d7", "d250"])
        _quiet(server)
        client.upsert("c", [{**make_doc(N_DOCS + 39), "id": "z-last"}])  # the last log record
        _quiet(server)
        expected = answers(client)
        shutil.copytree(base / "live", base / "image")  # quiescent: what a crash would leave
    finally:
        stop_in_process(server, running)
    return {"dir": base / "image", "expected": expected}


# --------------------------------------------------------------------------- helpers


def _copy(image: dict[str, Any], tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(image["dir"], data)
    return data


def _flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def _target(data: Path, pattern: str) -> Path:
    found = sorted(p for p in data.glob(pattern) if p.is_file() and p.stat().st_size > 0)
    assert found, f"no file matches {pattern}"
    return found[0]


def _refusals(result: dict[str, Any]) -> list[str]:
    return [v["details"] for v in result.values() if isinstance(v, dict) and v.get("error") == "DATA_LOSS"]


def judge(result: dict[str, Any], expected: dict[str, Any], names: list[str]) -> str:
    """'correct' (every answer as before) or 'refused' (some DATA_LOSS naming the file, the rest correct).

    Anything else fails the test: a crash, another error, or a wrong answer.
    """
    assert "crash" not in result, result["crash"]
    if "start_error" in result:
        assert "DataLoss" in result["start_error"] and any(n in result["start_error"] for n in names), result
        return "refused"
    refusals = _refusals(result)
    for key, value in expected.items():
        got = result[key]
        if isinstance(got, dict) and got.get("error") == "DATA_LOSS":
            continue
        assert got == value, f"WRONG ANSWER for {key}: {str(got)[:300]} != {str(value)[:300]}"
    for details in refusals:
        assert any(n in details for n in names), f"DATA_LOSS does not name {names}: {details}"
    return "refused" if refusals else "correct"


def verify_output(data: Path) -> tuple[int, str]:
    out = io.StringIO()
    return run_verify(data, out=out), out.getvalue()


# --------------------------------------------------------------------------- the matrix

# (case name, glob under the data directory)
FILES = [
    ("collection.json", "collections/c/collection.json"),
    ("MANIFEST.json", f"{SHARD}/MANIFEST.json"),
    ("CHECKSUMS", f"{SHARD}/segments/[0-9]*/CHECKSUMS"),
    ("ids.json", f"{SHARD}/segments/[0-9]*/ids.json"),
    ("payload.json", f"{SHARD}/segments/[0-9]*/payload.json"),
    ("payload column", f"{SHARD}/segments/[0-9]*/payload-n.values.npy"),
    ("payload keyword codes", f"{SHARD}/segments/[0-9]*/payload-tag.codes.npy"),
    ("metadata", f"{SHARD}/segments/[0-9]*/metadata.bin"),
    ("hnsw base graph", f"{SHARD}/segments/[0-9]*/emb.g*.hnsw"),
    ("hnsw rows", f"{SHARD}/segments/[0-9]*/emb.rows.npy"),
    ("hnsw row labels", f"{SHARD}/segments/[0-9]*/emb.rows-labels.npy"),
    ("hnsw.json", f"{SHARD}/segments/[0-9]*/emb.hnsw.json"),
    ("spann growing hnsw", f"{SHARD}/segments/[0-9]*/sp.hnsw"),
    ("strand.json", f"{SHARD}/segments/[0-9]*/sp.strand.json"),
    ("sparse labels", f"{SHARD}/segments/[0-9]*/splade.sparse.labels.npy"),
    ("sparse weights", f"{SHARD}/segments/[0-9]*/splade.sparse.weights.npy"),
    ("sparse vocab", f"{SHARD}/segments/[0-9]*/splade.sparse.vocab.json"),
    ("spann.json", f"{SHARD}/segments/spann-*/spann.json"),
    ("spann centroids", f"{SHARD}/segments/spann-*/centroids.hnsw"),
    ("spann postings", f"{SHARD}/segments/spann-*/postings.bin"),
    ("wal", f"{SHARD}/wal/*.wal"),
    ("tantivy meta.json", f"{SHARD}/text/meta.json"),
    ("tantivy .managed.json", f"{SHARD}/text/.managed.json"),
    ("tantivy .idx", f"{SHARD}/text/*.idx"),
    ("tantivy .pos", f"{SHARD}/text/*.pos"),
    ("tantivy .term", f"{SHARD}/text/*.term"),
    ("tantivy .store", f"{SHARD}/text/*.store"),
    ("tantivy .fast", f"{SHARD}/text/*.fast"),
    ("tantivy .fieldnorm", f"{SHARD}/text/*.fieldnorm"),
    ("tantivy .del", f"{SHARD}/text/*.del"),
]
OFFSETS = ["start", "middle", "end"]
UNCHECKED = {"tantivy meta.json", "tantivy .managed.json"}  # no checksum: a harmless flip may go unseen


@pytest.mark.parametrize("where", OFFSETS)
@pytest.mark.parametrize(("kind", "pattern"), FILES, ids=[f[0] for f in FILES])
def test_a_flipped_byte_is_refused_or_harmless(image, tmp_path, kind, pattern, where):
    data = _copy(image, tmp_path)
    target = _target(data, pattern)
    size = target.stat().st_size
    offset = {"start": 0, "middle": size // 2, "end": size - 1}[where]
    _flip(target, offset)
    rel = str(target.relative_to(data))
    # Every file's flip is found by the scrub, named.
    status, report = verify_output(data)
    assert rel in report or (kind in UNCHECKED and status == 0), report
    result = probe(data)
    outcome = judge(result, image["expected"], [rel, str(target.parent.relative_to(data))])
    if outcome == "correct" and kind not in UNCHECKED:
        assert status == 1, f"{kind} {where}: harmless to answers, yet the scrub must report it: {report}"
    if kind == "wal" and where == "end":
        # A flip in the complete last record damages an acknowledged write: refused, never taken for a torn tail.
        assert outcome == "refused" and status == 1 and "damaged, not torn" in report, report
    print(f"MATRIX {kind} | {where} (offset {offset} of {size}) | {outcome} | verify exit {status}")


def _edit_manifest(data: Path, key: str, delta: int, keep_checksum: bool) -> Path:
    path = data / SHARD / "MANIFEST.json"
    text = path.read_text()
    meta = json.loads(text)
    if keep_checksum:  # a software bug that writes a consistent but wrong manifest
        meta.pop("crc32")
        meta[key] += delta
        write_json_atomic(path, meta)
    else:  # a flipped digit: the stored checksum no longer matches
        path.write_text(re.sub(rf'"{key}": (\d+)', lambda m: f'"{key}": {int(m.group(1)) + delta}', text))
    return path


@pytest.mark.parametrize("keep_checksum", [False, True], ids=["raw", "rechecksummed"])
@pytest.mark.parametrize(("key", "delta"), [("wal_seq", 1), ("wal_seq", -1), ("wal_seq", 1000), ("generation", 1)])
def test_manifest_pointing_elsewhere_is_data_loss(image, tmp_path, key, delta, keep_checksum):
    data = _copy(image, tmp_path)
    _edit_manifest(data, key, delta, keep_checksum)
    status, report = verify_output(data)
    assert status == 1, report
    with pytest.raises(DataLoss) as info:  # in-process: the catalog's own error, before quarantine wording
        catalog = Catalog(data)
        try:
            catalog.get("c")
        finally:
            catalog.close(checkpoint=False)
    message = str(info.value)
    if not keep_checksum:
        assert "MANIFEST.json" in message and "checksum mismatch" in message, message
    elif key == "generation":
        assert "MANIFEST.json" in message and "which is missing" in message, message
    else:
        assert "wal" in message and ("replay starts" in message or "ends at seq" in message), message
    result = probe(data)
    judge(result, image["expected"], [f"{SHARD}/MANIFEST.json", f"{SHARD}/wal"])
    assert _refusals(result) or "start_error" in result
    print(f"MATRIX MANIFEST {key} {delta:+d} ({'rechecksummed' if keep_checksum else 'raw'}) | refused | {status}")


def test_a_clean_image_answers_everything_and_verifies(image, tmp_path):
    data = _copy(image, tmp_path)
    status, report = verify_output(data)
    assert status == 0 and "every checksum matches" in report, report
    assert judge(probe(data), image["expected"], []) == "correct"


def test_verify_command_exit_status_and_refusal_while_served(image, tmp_path):
    data = _copy(image, tmp_path)
    cli = [sys.executable, "-m", "braid.service.cli", "verify", str(data)]
    clean = subprocess.run(cli, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    _flip(_target(data, f"{SHARD}/segments/[0-9]*/emb.g*.hnsw"), 100)
    _flip(_target(data, f"{SHARD}/text/*.store"), 10)
    bad = subprocess.run([*cli, "--collection", "c"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "emb.g" in bad.stdout and ".store" in bad.stdout, bad.stdout
    assert bad.stdout.count("BAD ") == 2
    # A running server holds each shard's tantivy writer lock: the scrub refuses.
    live = tmp_path / "live"
    shutil.copytree(image["dir"], live)
    server, running = start_in_process(live)
    try:
        assert run_verify(live, out=io.StringIO()) == 2
    finally:
        stop_in_process(server, running)
    assert run_verify(live, out=io.StringIO()) == 0


def test_a_flipped_posting_list_is_refused_when_read(image, tmp_path):
    """A posting list is checked when a query reads it: the collection opens, and the searches and
    Gets that touch the list answer DATA_LOSS naming the file and the list; the rest stay correct."""
    data = _copy(image, tmp_path)
    path = _target(data, f"{SHARD}/segments/spann-*/postings.bin")
    raw = path.read_bytes()
    (first_list,) = struct.unpack_from("<Q", raw, 64)  # the offset table's first entry
    _flip(path, first_list + 3)
    result = probe(data)
    assert "start_error" not in result and result["count"] == image["expected"]["count"]
    assert judge(result, image["expected"], [str(path.relative_to(data))]) == "refused"
    assert all("posting list 0 at offset" in details for details in _refusals(result))
    status, report = verify_output(data)
    assert status == 1 and "posting list 0" in report, report


def test_files_written_before_checksums_still_open(image, tmp_path, caplog):
    """A format 1 manifest (no crc32), a generation without CHECKSUMS and JSON files without a
    checksum field: the shard opens unchecked and answers as before."""
    data = _copy(image, tmp_path)
    manifest = data / SHARD / "MANIFEST.json"
    meta = json.loads(manifest.read_text())
    for key in ("crc32", "wal_crc32"):
        meta.pop(key)
    meta["format"] = 1
    manifest.write_text(json.dumps(meta))
    generation = data / SHARD / "segments" / str(meta["generation"])
    (generation / "CHECKSUMS").unlink()
    collection = data / "collections/c/collection.json"
    collection.write_text(json.dumps({k: v for k, v in json.loads(collection.read_text()).items() if k != "crc32"}))
    status, report = verify_output(data)  # before the probe: its clean shutdown writes a new checkpoint
    assert status == 0 and "WARN" in report and "written before checksums" in report, report
    assert judge(probe(data), image["expected"], []) == "correct"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ('{"a": 1, "crc32": 5}', "checksum mismatch"),
        ('{"a": 1, "crc33": 5}', "damaged checksum key 'crc33'"),
        ('{"a": 1}', None),  # written before checksums: read, unchecked
    ],
)
def test_json_manifest_checksums(tmp_path, content, needle):
    from braid.index.manifest import read_json

    path = tmp_path / "x.json"
    path.write_text(content)
    if needle is None:
        assert read_json(path) == {"a": 1}
        with pytest.raises(DataLoss, match="must carry one"):
            read_json(path, require_checksum=True)
    else:
        with pytest.raises(DataLoss, match=needle):
            read_json(path)
    write_json_atomic(path, {"a": 1})
    assert read_json(path, require_checksum=True) == {"a": 1}


@pytest.mark.parametrize("cut", ["level0", "links"])
def test_a_cut_hnsw_file_whose_checksums_match_is_refused(image, tmp_path, cut):
    """What a checkpoint on a full disk once published (issue 20, finding 1): ``emb.hnsw`` cut
    short by hnswlib's silent failure, with a CHECKSUMS entry computed over the cut bytes.
    Every checksum matches, so ``braid verify`` said so (exit 0) and hnswlib read the cut
    file; now its structure is walked (index/hnswfile.py): verify reports it BAD, and an open
    is refused with DATA_LOSS naming it, never served."""
    from braid.index.checksums import write_checksums

    data = _copy(image, tmp_path)
    path = _target(data, f"{SHARD}/segments/[0-9]*/emb.g*.hnsw")
    raw = path.read_bytes()
    keep = len(raw) // 2 if cut == "level0" else len(raw) - 3  # inside the vectors, or the last link list
    path.write_bytes(raw[:keep])
    write_checksums(path.parent)  # as the old checkpoint did: a checksum of what was there
    status, report = verify_output(data)
    assert status == 1 and "emb.g" in report and "truncated" in report, report
    result = probe(data)
    assert judge(result, image["expected"], [path.name]) == "refused", result
