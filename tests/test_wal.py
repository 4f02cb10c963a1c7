"""The write-ahead log survives reopen, torn tails and SIGKILL, detects corruption, and shares fsyncs; manifests."""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest

import braid.index.wal as wal_module
from braid.index.errors import DataLoss, InvalidArgument, Unavailable
from braid.index.manifest import read_json, write_json_atomic
from braid.index.wal import HEADER_BYTES, WalError, WriteAheadLog

ROOT = Path(__file__).resolve().parents[1]


def payload_for(seq: int) -> bytes:
    return f"payload-{seq}-".encode() * (seq % 5 + 1)


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.wal"))


def read_all(wal: WriteAheadLog, after: int = 0) -> list[tuple[int, int, bytes]]:
    return list(wal.read_from(after))


def fill(directory: Path, count: int, segment_bytes: int = 64 * 1024 * 1024) -> None:
    with WriteAheadLog.open(directory, segment_bytes=segment_bytes) as wal:
        for seq in range(1, count + 1):
            assert wal.append(seq % 3, payload_for(seq)) == seq


def record_offsets(path: Path) -> list[int]:
    """Start offsets of the records in a clean segment, parsed independently of the module under test."""
    data, offsets, off = path.read_bytes(), [], 0
    while off < len(data):
        offsets.append(off)
        off += HEADER_BYTES + struct.unpack_from("<I", data, off)[0]
    return offsets


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ format and round trip


def test_record_bytes_match_documented_layout(tmp_path):
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.append(9, b"hello") == 1
    (path,) = segment_files(tmp_path)
    assert path.name == f"{1:020d}.wal"
    crc = zlib.crc32(struct.pack("<Q", 1) + bytes([9]) + b"hello")
    assert path.read_bytes() == struct.pack("<IIQB", 5, crc, 1, 9) + b"hello"


def test_round_trip_across_segment_rolls(tmp_path):
    wal = WriteAheadLog.open(tmp_path, segment_bytes=256)
    for seq in range(1, 121):
        assert wal.append(seq % 3, payload_for(seq)) == seq
    assert wal.append_many([(1, payload_for(seq)) for seq in range(121, 131)]) == 130
    assert wal.append_many([]) == 130
    assert wal.append(2, b"") == 131  # empty payloads are legal
    expected = [(seq, seq % 3, payload_for(seq)) for seq in range(1, 121)]
    expected += [(seq, 1, payload_for(seq)) for seq in range(121, 131)] + [(131, 2, b"")]
    assert read_all(wal) == expected
    assert read_all(wal, 77) == expected[77:]
    assert read_all(wal, 131) == []
    files = segment_files(tmp_path)
    assert len(files) > 5
    assert wal.size_bytes() == sum(f.stat().st_size for f in files)
    wal.close()
    # Each file is named after its first record, and only a lone oversized write may exceed segment_bytes.
    for path in files:
        assert record_offsets(path)
        first_seq = struct.unpack_from("<Q", path.read_bytes(), 8)[0]
        assert path.name == f"{first_seq:020d}.wal"
    assert all(f.stat().st_size <= 256 for f in files[:-2])


def test_reopen_keeps_last_seq_and_continues(tmp_path):
    fill(tmp_path, 40, segment_bytes=300)
    with WriteAheadLog.open(tmp_path, segment_bytes=300) as wal:
        assert wal.last_seq == 40
        assert wal.synced_seq == 40
        assert wal.append(1, payload_for(41)) == 41
    with WriteAheadLog.open(tmp_path, segment_bytes=300) as wal:
        assert wal.last_seq == 41
        assert [r[0] for r in read_all(wal)] == list(range(1, 42))


def test_empty_log(tmp_path):
    with WriteAheadLog.open(tmp_path / "new" / "wal") as wal:
        assert (wal.last_seq, wal.synced_seq) == (0, 0)
        assert read_all(wal) == []
    with WriteAheadLog.open(tmp_path / "new" / "wal") as wal:
        assert wal.last_seq == 0
        assert wal.append(0, b"x") == 1


def test_first_seq_numbers_an_empty_log_and_refuses_a_log_behind_the_checkpoint(tmp_path):
    with WriteAheadLog.open(tmp_path / "a", first_seq=51) as wal:
        assert wal.last_seq == 50
        assert wal.append(1, b"x") == 51
        assert read_all(wal, 50) == [(51, 1, b"x")]
    fill(tmp_path / "b", 10)
    # A checkpoint never trims the active segment: a log ending before it lost records.
    with pytest.raises(WalError, match=r"ends at seq 10, before the checkpoint's seq 19"):
        WriteAheadLog.open(tmp_path / "b", first_seq=20)
    with WriteAheadLog.open(tmp_path / "b", first_seq=11) as wal:  # a log reaching the checkpoint is kept
        assert [r[0] for r in read_all(wal, 9)] == [10]


def test_checkpoint_crc_must_match_the_record_replay_starts_after(tmp_path):
    fill(tmp_path / "w", 10)
    with WriteAheadLog.open(tmp_path / "w") as wal:
        crc = wal.record_crc(6)
        assert crc is not None and wal.record_crc(11) is None and wal.record_crc(0) is None
    with WriteAheadLog.open(tmp_path / "w", first_seq=7, checkpoint_crc=crc) as wal:
        assert wal.last_seq == 10
    with pytest.raises(WalError, match=r"record 7, where the checkpoint says replay starts"):
        WriteAheadLog.open(tmp_path / "w", first_seq=8, checkpoint_crc=crc)  # wal_seq one too far


# ------------------------------------------------------------------------------- torn tails


@pytest.mark.parametrize("cut", [1, 3, 20, "header"])
def test_torn_tail_is_truncated_and_appends_continue(tmp_path, cut):
    fill(tmp_path, 10)
    (path,) = segment_files(tmp_path)
    last_record = record_offsets(path)[-1]
    size = path.stat().st_size
    keep = last_record + 5 if cut == "header" else size - cut
    assert last_record < keep < size
    os.truncate(path, keep)

    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.last_seq == 9
        assert path.stat().st_size == last_record
        assert wal.append(7, b"after the crash") == 10
    with WriteAheadLog.open(tmp_path) as wal:
        records = read_all(wal)
    assert records[:9] == [(seq, seq % 3, payload_for(seq)) for seq in range(1, 10)]
    assert records[9:] == [(10, 7, b"after the crash")]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x40\x00\x00\x00garbage-from-a-torn-write",  # a header promising 64 bytes, then too few
        bytes(4096),  # a zero-filled page, as some filesystems leave after a crash
        bytes(range(256)) * 3,
        b"\x01",
    ],
)
def test_garbage_tail_is_truncated(tmp_path, garbage):
    fill(tmp_path, 10, segment_bytes=200)
    path = segment_files(tmp_path)[-1]
    clean_size = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(garbage)
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        assert wal.last_seq == 10
        assert path.stat().st_size == clean_size
        assert wal.append(1, payload_for(11)) == 11
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        assert read_all(wal, 9) == [(10, 1, payload_for(10)), (11, 1, payload_for(11))]


def test_torn_first_record_of_a_fresh_segment(tmp_path):
    fill(tmp_path, 30, segment_bytes=200)
    path = segment_files(tmp_path)[-1]
    first_seq = int(path.name[:20])
    os.truncate(path, 4)
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        assert wal.last_seq == first_seq - 1
        assert wal.append(1, b"z") == first_seq
    with WriteAheadLog.open(tmp_path, segment_bytes=200) as wal:
        assert read_all(wal)[-1] == (first_seq, 1, b"z")


@pytest.mark.parametrize(
    ("field_offset", "mask"),
    [
        (0, 0x01),
        (0, 0x04),
        (0, 0x5A),
        (1, 0x01),
        (4, 0x01),
        (8, 0x01),
        (16, 0x01),
        (HEADER_BYTES + 2, 0x10),
        (-1, 0x80),
    ],
    ids=["len+1", "len-4", "len-many", "len-high", "crc", "seq", "kind", "payload", "last-byte"],
)
def test_a_damaged_last_record_is_corruption_not_a_torn_tail(tmp_path, field_offset, mask):
    """A complete, fsynced last record with a flipped bit (its length field included) was acknowledged:
    open refuses with DataLoss naming the file and offset, truncates nothing, and the scrub calls it fatal."""
    fill(tmp_path, 10)
    (path,) = segment_files(tmp_path)
    last = record_offsets(path)[-1]
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    data[last + field_offset if field_offset >= 0 else size + field_offset] ^= mask
    path.write_bytes(bytes(data))
    with pytest.raises(DataLoss, match=rf"{re.escape(path.name)}.*last record \(seq 10\) at offset {last}\b.*damaged"):
        WriteAheadLog.open(tmp_path)
    assert path.stat().st_size == size  # nothing "repaired" away
    (problem,) = wal_module.check(tmp_path)
    assert problem.fatal and "damaged, not torn" in problem.message, problem


@pytest.mark.parametrize("zeroed", ["tail-sector", "to-end"])
def test_zeros_a_crash_left_in_the_last_record_are_a_torn_tail(tmp_path, zeroed):
    """A crash before the fsync can leave the file sized but its last blocks unwritten (zeros): torn, not damage."""
    with WriteAheadLog.open(tmp_path) as wal:
        for seq in range(1, 4):
            wal.append(1, payload_for(seq))
        wal.append(1, bytes(range(1, 256)) * 8)  # 2,040 non-zero bytes: spans several sectors
    (path,) = segment_files(tmp_path)
    last = record_offsets(path)[-1]
    size = path.stat().st_size
    data = bytearray(path.read_bytes())
    first_sector = -(-(last + HEADER_BYTES) // 512) * 512
    stop = first_sector + 512 if zeroed == "tail-sector" else size
    data[first_sector:stop] = bytes(stop - first_sector)
    path.write_bytes(bytes(data))
    assert not wal_module.check(tmp_path)[0].fatal
    with WriteAheadLog.open(tmp_path) as wal:
        assert wal.last_seq == 3 and path.stat().st_size == last


# ---------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("field_offset", [0, 4, 8, 16, HEADER_BYTES + 2], ids=["len", "crc", "seq", "kind", "payload"])
def test_corruption_before_valid_records_raises(tmp_path, field_offset):
    fill(tmp_path, 10)
    (path,) = segment_files(tmp_path)
    bad = record_offsets(path)[4]
    flip_byte(path, bad + field_offset)
    size = path.stat().st_size
    with pytest.raises(DataLoss, match=rf"{re.escape(path.name)}.*offset {bad}\b"):
        WriteAheadLog.open(tmp_path)
    assert path.stat().st_size == size  # corruption is reported, never "repaired" by dropping good records


def test_corruption_in_a_sealed_segment_raises(tmp_path):
    fill(tmp_path, 40, segment_bytes=200)
    files = segment_files(tmp_path)
    assert len(files) >= 3
    sealed = files[1]
    bad = record_offsets(sealed)[-1]  # the last record: in the last segment this would pass for a torn tail
    flip_byte(sealed, sealed.stat().st_size - 1)
    with pytest.raises(DataLoss, match=rf"{re.escape(sealed.name)}.*offset {bad}\b"):
        WriteAheadLog.open(tmp_path, segment_bytes=200)


def test_missing_segment_raises(tmp_path):
    fill(tmp_path, 40, segment_bytes=200)
    segment_files(tmp_path)[1].unlink()
    with pytest.raises(DataLoss, match="previous one ends"):
        WriteAheadLog.open(tmp_path, segment_bytes=200)


# ------------------------------------------------------------------------- prefix truncation


def test_truncate_prefix_removes_only_fully_covered_segments(tmp_path):
    fill(tmp_path, 100, segment_bytes=256)
    firsts = [int(p.name[:20]) for p in segment_files(tmp_path)]
    assert len(firsts) >= 5
    upto = firsts[3] + 1  # inside the fourth segment: the first three go, the fourth stays
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        wal.truncate_prefix(upto)
        remaining = [int(p.name[:20]) for p in segment_files(tmp_path)]
        assert remaining == firsts[3:]
        assert wal.size_bytes() == sum(p.stat().st_size for p in segment_files(tmp_path))
        assert [r[0] for r in read_all(wal, upto)] == list(range(upto + 1, 101))
        with pytest.raises(DataLoss, match="truncated"):
            read_all(wal, 0)
        wal.truncate_prefix(10**9)  # everything is covered, but the active segment is never deleted
        assert [int(p.name[:20]) for p in segment_files(tmp_path)] == firsts[-1:]
        assert wal.append(1, payload_for(101)) == 101
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        assert wal.last_seq == 101
        assert read_all(wal, 100) == [(101, 1, payload_for(101))]


def test_truncate_prefix_of_a_just_rolled_log_survives_reopen(tmp_path):
    """An empty active segment still carries the next seq in its name."""
    fill(tmp_path, 50, segment_bytes=256)
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        wal.truncate_prefix(50)
        last = segment_files(tmp_path)[-1]
        os.truncate(last, 0)  # as if every record of the active segment was torn
    with WriteAheadLog.open(tmp_path, segment_bytes=256) as wal:
        assert wal.last_seq == int(last.name[:20]) - 1
        assert wal.append(1, b"n") == int(last.name[:20])


# ---------------------------------------------------------------------------- group commit


def run_writers(wal: WriteAheadLog, threads: int, per_thread: int) -> dict[int, bytes]:
    acked: dict[int, bytes] = {}
    lock = threading.Lock()
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                payload = f"t{t}-r{i}".encode()
                seq = wal.append(t, payload)
                wal.sync(seq)
                assert wal.synced_seq >= seq
                with lock:
                    acked[seq] = payload
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    pool = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=30)
    assert not errors, errors
    return acked


def test_group_commit_shares_fsyncs(tmp_path):
    wal = WriteAheadLog.open(tmp_path)
    acked = run_writers(wal, threads=8, per_thread=50)
    assert sorted(acked) == list(range(1, 401))
    assert wal.fsync_count < 400
    wal.close()
    with WriteAheadLog.open(tmp_path) as reopened:
        assert {seq: payload for seq, _, payload in read_all(reopened)} == acked


def test_group_commit_with_a_slow_disk(tmp_path, monkeypatch):
    """With a 2 ms fsync, writers that arrive during one fsync must all ride on the next one."""
    real = wal_module._fsync_data

    def slow(fd: int) -> None:
        time.sleep(0.002)
        real(fd)

    monkeypatch.setattr(wal_module, "_fsync_data", slow)
    wal = WriteAheadLog.open(tmp_path, segment_bytes=2048)  # rolls during the run, too
    acked = run_writers(wal, threads=8, per_thread=50)
    assert sorted(acked) == list(range(1, 401))
    assert wal.fsync_count < 300, wal.fsync_count  # typically 100-150; one fsync per record would be 400
    wal.close()
    with WriteAheadLog.open(tmp_path, segment_bytes=2048) as reopened:
        assert {seq: payload for seq, _, payload in read_all(reopened)} == acked


def test_sync_of_a_covered_seq_does_not_fsync(tmp_path):
    with WriteAheadLog.open(tmp_path) as wal:
        wal.append_many([(1, b"a"), (1, b"b"), (1, b"c")])
        wal.sync(3)
        assert wal.fsync_count == 1
        wal.sync(1)
        wal.sync(2)
        wal.sync(3)
        assert wal.fsync_count == 1
        with pytest.raises(InvalidArgument, match="seq"):
            wal.sync(4)


def test_sync_fsyncs_the_segment_holding_the_record(tmp_path, monkeypatch):
    fsynced: list[int] = []  # inode numbers of the files whose fds were fsynced
    real = wal_module._fsync_data

    def recording(fd: int) -> None:
        fsynced.append(os.fstat(fd).st_ino)
        real(fd)

    monkeypatch.setattr(wal_module, "_fsync_data", recording)
    with WriteAheadLog.open(tmp_path / "each", segment_bytes=200) as wal:
        for seq in range(1, 31):
            assert wal.append(1, payload_for(seq)) == seq
            before = len(fsynced)
            wal.sync(seq)
            assert segment_files(tmp_path / "each")[-1].stat().st_ino in fsynced[before:]
            assert wal.synced_seq == seq
    # Records appended across several rolls with no sync in between: sealing must have fsynced each old segment.
    batch = tmp_path / "batch"
    with WriteAheadLog.open(batch, segment_bytes=200) as wal:
        for seq in range(1, 31):
            wal.append(1, payload_for(seq))
        wal.sync(30)
        assert len(segment_files(batch)) > 3
        assert all(path.stat().st_ino in fsynced for path in segment_files(batch))


def test_appends_proceed_while_a_sync_is_in_fsync(tmp_path, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    real = wal_module._fsync_data

    def blocking(fd: int) -> None:
        entered.set()
        release.wait(10)
        real(fd)

    wal = WriteAheadLog.open(tmp_path)
    seq = wal.append(1, b"first")
    monkeypatch.setattr(wal_module, "_fsync_data", blocking)
    syncer = threading.Thread(target=wal.sync, args=(seq,))
    syncer.start()
    try:
        assert entered.wait(5)
        appender = threading.Thread(target=wal.append, args=(1, b"second"))
        appender.start()
        appender.join(timeout=2)
        assert not appender.is_alive(), "append blocked behind an fsync"
        assert wal.last_seq == 2
        assert wal.synced_seq == 0
    finally:
        release.set()
        syncer.join(timeout=5)
    assert wal.synced_seq == 1  # the fsync covered what was written when it started, not the later append
    monkeypatch.setattr(wal_module, "_fsync_data", real)
    wal.sync(2)
    assert wal.synced_seq == 2
    wal.close()


def test_argument_and_state_errors(tmp_path):
    wal = WriteAheadLog.open(tmp_path)
    with pytest.raises(InvalidArgument, match="kind"):
        wal.append(256, b"")
    with pytest.raises(InvalidArgument, match="after_seq"):
        wal.read_from(-1)
    wal.close()
    wal.close()  # idempotent
    with pytest.raises(Unavailable):
        wal.append(1, b"")


# ------------------------------------------------------------------------------ SIGKILL

CHILD = """
import sys
from pathlib import Path
from braid.index.wal import WriteAheadLog

def payload_for(seq):
    return f"payload-{seq}-".encode() * (seq % 5 + 1)

wal = WriteAheadLog.open(Path(sys.argv[1]), segment_bytes=1024)
while True:
    expected = wal.last_seq + 1
    seq = wal.append(expected % 3, payload_for(expected))
    assert seq == expected
    wal.sync(seq)
    print(seq, flush=True)
"""


def test_acknowledged_records_survive_sigkill(tmp_path):
    directory = tmp_path / "wal"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    acked: list[int] = []
    try:
        assert proc.stdout is not None
        while len(acked) < 300:
            line = proc.stdout.readline()
            assert line, f"child exited early with {proc.poll()}"
            acked.append(int(line))
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        rest = proc.communicate(timeout=10)[0]
    acked += [int(line) for line in rest.splitlines(keepends=True) if line.endswith("\n")]
    assert proc.returncode == -signal.SIGKILL
    assert acked == list(range(1, len(acked) + 1))

    with WriteAheadLog.open(directory, segment_bytes=1024) as wal:
        assert wal.last_seq >= acked[-1]
        records = {seq: (kind, payload) for seq, kind, payload in read_all(wal)}
        assert sorted(records) == list(range(1, wal.last_seq + 1))
        for seq in acked:
            assert records[seq] == (seq % 3, payload_for(seq))
        assert wal.append(1, b"after") == wal.last_seq


# ------------------------------------------------------------------------------- manifest


def test_manifest_round_trip_and_layout(tmp_path):
    path = tmp_path / "MANIFEST.json"
    assert read_json(path) is None
    write_json_atomic(path, {"wal_seq": 7, "b": [1, 2], "a": {"z": 1, "y": "é"}})
    assert read_json(path) == {"wal_seq": 7, "b": [1, 2], "a": {"z": 1, "y": "é"}}
    text = path.read_text()
    assert text.index('"a"') < text.index('"b"') < text.index('"wal_seq"')
    assert '\n "a": {\n  "y"' in text
    write_json_atomic(path, {"wal_seq": 8})
    assert read_json(path) == {"wal_seq": 8}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANIFEST.json"]


def test_manifest_ignores_a_leftover_tmp(tmp_path):
    path = tmp_path / "MANIFEST.json"
    write_json_atomic(path, {"generation": 1})
    (tmp_path / "MANIFEST.json.tmp").write_bytes(b'{"generation": 2, "trunc')  # a crash mid-write
    assert read_json(path) == {"generation": 1}
    write_json_atomic(path, {"generation": 3})
    assert read_json(path) == {"generation": 3}
    assert not (tmp_path / "MANIFEST.json.tmp").exists()


@pytest.mark.parametrize("content", [b'{"wal_seq": 1', b"\xff\xfe", b"[1, 2]", b""])
def test_manifest_garbage_raises_data_loss(tmp_path, content):
    path = tmp_path / "MANIFEST.json"
    path.write_bytes(content)
    with pytest.raises(DataLoss, match=r"MANIFEST\.json"):
        read_json(path)
