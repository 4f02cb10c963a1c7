"""A shard that follows an external log (index/log.py): apply_logged, skips, results, waits, recovery."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from braid.index import records
from braid.index.errors import DataLoss, DiskFull, FailedPrecondition, Unavailable
from braid.index.filters import Filter, Match
from braid.index.log import ShardLog, open_local_wal, opens_external
from braid.index.records import DocumentWrite
from braid.index.schema import DenseFieldSpec, PayloadFieldSpec, PayloadType, Schema, TextFieldSpec
from braid.index.shard import Shard, read_manifest
from braid.index.wal import WriteAheadLog

from . import diskfaults

DIM = 4
SCHEMA = Schema(
    text_fields=(TextFieldSpec("body"),),
    dense_fields=(DenseFieldSpec("emb", DIM),),
    payload_fields=(PayloadFieldSpec("group", PayloadType.KEYWORD),),
)
Record = tuple[int, int, bytes]


class ListLog:
    """A ShardLog over a Python list, as a replicated log looks to a shard: external, seqs with gaps."""

    external = True

    def __init__(self) -> None:
        self.records: list[Record] = []
        self.reads: list[int] = []  # after_seq of each read_from
        self.replayed: list[int] = []  # seqs read_from yielded
        self.opened: list[tuple[int, int | None]] = []  # (first_seq, checkpoint_crc) of each open
        self.truncated: list[int] = []
        self.closes = 0

    def add(self, seq: int, kind: int, payload: bytes) -> Record:
        assert not self.records or seq > self.records[-1][0]
        self.records.append((seq, kind, payload))
        return seq, kind, payload

    def opener(self, directory: Path, first_seq: int, checkpoint_crc: int | None) -> ShardLog:
        self.opened.append((first_seq, checkpoint_crc))
        return self

    def append(self, kind: int, payload: bytes) -> int:
        raise AssertionError("a follower never appends")

    def sync(self, seq: int) -> None:
        raise AssertionError("a follower never syncs")

    def read_from(self, after_seq: int) -> Iterator[Record]:
        self.reads.append(after_seq)
        for record in [r for r in self.records if r[0] > after_seq]:
            self.replayed.append(record[0])
            yield record

    def record_crc(self, seq: int) -> int | None:
        return None

    def truncate_prefix(self, upto_seq: int) -> None:
        self.truncated.append(upto_seq)

    def size_bytes(self) -> int:
        return sum(len(payload) for _, _, payload in self.records)

    def close(self) -> None:
        self.closes += 1


def doc(i: int, group: str = "a") -> DocumentWrite:
    vector = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return DocumentWrite(id=f"d{i}", text={"body": f"word{i} common"}, dense={"emb": vector}, payload={"group": group})


def upsert(log: ListLog, seq: int, ids: range, group: str = "a") -> Record:
    return log.add(seq, records.UPSERT, records.encode_upsert([doc(i, group) for i in ids]))


def delete_ids(log: ListLog, seq: int, ids: list[str]) -> Record:
    return log.add(seq, records.DELETE_IDS, records.encode_delete_ids(ids))


def delete_filter(log: ListLog, seq: int, flt: Filter) -> Record:
    return log.add(seq, records.DELETE_FILTER, records.encode_delete_filter(flt))


def follower(path: Path, log: ListLog) -> Shard:
    return Shard.open(path, SCHEMA, 0, log_opener=log.opener)


def dense_top(shard: Shard, i: int) -> str:
    vector = doc(i).dense["emb"][None, :]
    with shard.read():
        labels, _ = shard.dense["emb"].search(vector, 1, 64)[0]
        return shard.ids_of(labels)[0]


def bm25_top(shard: Shard, i: int) -> list[str]:
    assert shard.text is not None
    with shard.read():
        query = shard.text.parse(f"word{i}", ["body"], {})
        mask, count = shard.allowed(None)
        labels, _ = shard.text.search(query, 3, mask, count, filtered=False)
        return shard.ids_of(labels)


def labels(shard: Shard, ids: range) -> dict[str, int | None]:
    return {f"d{i}": shard.label_of(f"d{i}") for i in ids}


def test_the_local_wal_is_a_shard_log() -> None:
    assert WriteAheadLog.external is False
    assert opens_external(open_local_wal) is False
    assert opens_external(ListLog().opener) is True


def test_apply_logged_makes_documents_searchable_with_gaps_between_seqs(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    try:
        assert shard.applied_seq == 0 and shard.count(None) == 0
        assert shard.apply_logged([upsert(log, 3, range(0, 10)), upsert(log, 7, range(10, 15))]) == [10, 5]
        assert shard.applied_seq == 7
        assert shard.count(None) == 15
        assert shard.apply_logged([upsert(log, 8, range(15, 16)), upsert(log, 20, range(3, 5), "b")]) == [1, 2]
        assert shard.applied_seq == 20 and shard.count(None) == 16
        assert shard.count(Filter(must=(Match("group", "b"),))) == 2  # d3, d4 replaced by their new versions
        assert dense_top(shard, 12) == "d12"
        assert bm25_top(shard, 15) == ["d15"]
        assert bm25_top(shard, 3) == ["d3"]  # one version of a replaced document
        assert [shard.result_of(seq) for seq in (3, 7, 8, 20, 4)] == [10, 5, 1, 2, None]
        assert log.truncated == [] and not (tmp_path / "s" / "wal").exists()
    finally:
        shard.close()


def test_redelivered_records_are_skipped(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    try:
        first, second = upsert(log, 3, range(5)), delete_ids(log, 7, ["d0"])
        assert shard.apply_logged([first, second]) == [5, 1]
        assert shard.apply_logged([first, second]) == []  # re-delivery after a reconnect
        third = upsert(log, 8, range(0, 1))
        assert shard.apply_logged([second, third]) == [1]  # only the new one gives a result
        assert shard.apply_logged([]) == []
        assert shard.applied_seq == 8 and shard.count(None) == 5
        assert shard.result_of(7) == 1  # the first application's result stays
    finally:
        shard.close()


def test_seqs_must_increase_within_a_batch(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    try:
        seven, three = upsert(log, 7, range(2)), (3, records.UPSERT, records.encode_upsert([doc(9)]))
        with pytest.raises(DataLoss, match=r"seq 3 follows seq 7"):
            shard.apply_logged([seven, three])
        assert shard.applied_seq == 0 and shard.count(None) == 0  # nothing of the batch was applied
        with pytest.raises(DataLoss, match=r"seq 7 follows seq 7"):
            shard.apply_logged([seven, seven])
        assert shard.apply_logged([seven]) == [2]
        with pytest.raises(DataLoss, match=r"seq 5 follows seq 6"):  # even among re-delivered ones
            shard.apply_logged([(6, records.DELETE_IDS, b""), (5, records.DELETE_IDS, b"")])
        assert shard.write_problem() is None  # a bad batch changes nothing: the shard goes on
        with pytest.raises(DataLoss, match="record 9 does not decode"):
            shard.apply_logged([(9, records.DELETE_IDS, b"not json")])
        assert shard.applied_seq == 7 and shard.count(None) == 2
    finally:
        shard.close()


def test_deletes_report_how_many_documents_they_removed(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    try:
        shard.apply_logged([upsert(log, 2, range(0, 6), "a"), upsert(log, 4, range(6, 10), "b")])
        batch = [
            delete_ids(log, 5, ["d0", "d1", "missing"]),
            delete_filter(log, 9, Filter(must=(Match("group", "b"),))),
            delete_ids(log, 11, ["d0"]),  # gone already
        ]
        assert shard.apply_logged(batch) == [2, 4, 0]
        assert [shard.result_of(seq) for seq in (5, 9, 11)] == [2, 4, 0]
        assert shard.count(None) == 4 and shard.label_of("d7") is None
    finally:
        shard.close()


def test_result_of_keeps_the_last_results_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from braid.index.shard import sequencer

    monkeypatch.setattr(sequencer, "RESULTS_KEPT", 3)
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    try:
        shard.apply_logged([delete_ids(log, seq, ["x"]) for seq in range(1, 6)])
        assert [shard.result_of(seq) for seq in range(1, 6)] == [None, None, 0, 0, 0]
    finally:
        shard.close()


def test_wait_applied(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    shard.apply_logged([upsert(log, 3, range(2))])
    assert shard.wait_applied(3, 0) is True
    assert shard.wait_applied(2, 0) is True  # a seq the log skipped: covered by a later one
    assert shard.wait_applied(4, 0.05) is False  # the timeout passes

    waited: list[object] = []
    waiter = threading.Thread(target=lambda: waited.append(shard.wait_applied(9, 10)), daemon=True)
    waiter.start()
    shard.apply_logged([upsert(log, 5, range(2, 3))])
    waiter.join(0.2)
    assert waiter.is_alive()  # 5 < 9: still waiting
    shard.apply_logged([upsert(log, 9, range(3, 4))])
    waiter.join(10)
    assert waited == [True]

    def wait_for_ever() -> None:
        try:
            waited.append(shard.wait_applied(100, 30))
        except Exception as err:
            waited.append(err)

    waiter = threading.Thread(target=wait_for_ever, daemon=True)
    waiter.start()
    waiter.join(0.1)
    shard.close()
    waiter.join(10)
    assert not waiter.is_alive(), "a close does not wake wait_applied"
    assert isinstance(waited[-1], Unavailable) and "closed" in str(waited[-1])
    with pytest.raises(Unavailable):
        shard.wait_applied(100, 1)
    assert shard.wait_applied(9, 1) is True  # applied before the close


def test_checkpoint_and_reopen_replay_only_the_records_after_it(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    shard.apply_logged([upsert(log, 3, range(0, 10)), upsert(log, 7, range(10, 20))])
    shard.flush()
    shard.apply_logged([upsert(log, 8, range(5, 12), "b"), delete_ids(log, 20, ["d0", "d19"])])
    before = labels(shard, range(20))
    assert shard.count(None) == 18
    shard.flush()
    shard.close()
    manifest = json.loads((tmp_path / "s" / "MANIFEST.json").read_text())
    assert manifest["wal_seq"] == 20  # the last seq applied, not the last one + 1 nor a count
    assert "wal_crc32" not in manifest  # the log keeps no CRCs
    assert log.truncated == [7, 20]
    assert not (tmp_path / "s" / "wal").exists()  # nothing of the shard's own under wal/
    with pytest.raises(DataLoss, match="holds no log"):
        read_manifest(tmp_path / "s")  # what a local log's shard would be told
    assert read_manifest(tmp_path / "s", local_log=False)["wal_seq"] == 20  # type: ignore[index]

    log.replayed.clear()
    reopened = follower(tmp_path / "s", log)
    try:
        assert log.opened[-1] == (21, None) and log.reads[-1] == 20
        assert log.replayed == []  # everything is in the checkpoint
        assert reopened.applied_seq == 20 and reopened.count(None) == 18
        assert labels(reopened, range(20)) == before
        assert reopened.count(Filter(must=(Match("group", "b"),))) == 7
        assert dense_top(reopened, 11) == "d11" and bm25_top(reopened, 11) == ["d11"]
        # re-delivery of what the checkpoint holds is skipped after a restart too
        assert reopened.apply_logged(log.records) == []
    finally:
        reopened.close()


def test_reopen_replays_what_the_log_got_meanwhile(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    shard.apply_logged([upsert(log, 3, range(0, 10))])
    shard.flush()
    shard.apply_logged([upsert(log, 5, range(10, 15))])  # applied, not checkpointed
    before = labels(shard, range(15))
    shard.close()
    # The log went on while the shard was down.
    upsert(log, 9, range(15, 20))
    delete_filter(log, 12, Filter(must=(Match("group", "a"),), must_not=(Match("group", "a"),)))  # matches none
    delete_ids(log, 30, ["d1", "d16"])

    log.replayed.clear()
    reopened = follower(tmp_path / "s", log)
    try:
        assert log.reads[-1] == 3 and log.replayed == [5, 9, 12, 30]
        assert reopened.applied_seq == 30 and reopened.count(None) == 18
        assert [reopened.result_of(seq) for seq in (5, 9, 12, 30)] == [5, 5, 0, 2]
        assert reopened.wait_applied(30, 0) is True
        assert reopened.label_of("d16") is None and bm25_top(reopened, 17) == ["d17"]
        assert labels(reopened, range(15)) == {**before, "d1": None}  # replay hands out the same labels
        fresh = log.add(31, records.UPSERT, records.encode_upsert([doc(40)]))
        assert reopened.apply_logged([*log.records[-3:-1], fresh]) == [1]
        assert reopened.count(None) == 19
    finally:
        reopened.close()


def test_local_writes_are_refused(tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    try:
        message = "shard 0 follows a replicated log; write through the router"
        with pytest.raises(FailedPrecondition, match=message):
            shard.upsert([doc(1)])
        with pytest.raises(FailedPrecondition, match=message):
            shard.delete_ids(["d1"])
        with pytest.raises(FailedPrecondition, match=message):
            shard.delete_filter(Filter(must=(Match("group", "a"),)))
        assert shard.count(None) == 0
    finally:
        shard.close()


def test_a_local_shard_takes_no_logged_records(tmp_path: Path) -> None:
    shard = Shard.open(tmp_path / "s", SCHEMA, 0)
    try:
        with pytest.raises(FailedPrecondition, match="writes its own log"):
            shard.apply_logged([(1, records.DELETE_IDS, records.encode_delete_ids(["x"]))])
        assert shard.upsert([doc(1)]) == 1
        assert shard.applied_seq == 1
    finally:
        shard.close()


def test_an_opener_whose_log_is_not_what_it_said_is_refused(tmp_path: Path) -> None:
    def lying(directory: Path, first_seq: int, checkpoint_crc: int | None) -> ShardLog:
        return open_local_wal(directory, first_seq, checkpoint_crc)  # says nothing: taken for external

    with pytest.raises(FailedPrecondition, match="external=True"):
        Shard.open(tmp_path / "s", SCHEMA, 0, log_opener=lying)

    def local(directory: Path, first_seq: int, checkpoint_crc: int | None) -> ShardLog:
        return open_local_wal(directory, first_seq, checkpoint_crc)

    local.external = False  # type: ignore[attr-defined]
    shard = Shard.open(tmp_path / "s", SCHEMA, 0, log_opener=local)
    try:
        assert shard.upsert([doc(1)]) == 1
    finally:
        shard.close()


@pytest.fixture
def faults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    from braid.index.shard import health

    monkeypatch.setattr(health, "REOPEN_BACKOFF_S", 0.0)
    flags = tmp_path / "faults"
    diskfaults.install(flags)
    yield flags
    diskfaults.uninstall()


def test_a_full_disk_makes_a_follower_read_only_until_heal_rereads_the_log(faults: Path, tmp_path: Path) -> None:
    log = ListLog()
    shard = follower(tmp_path / "s", log)
    try:
        shard.apply_logged([upsert(log, 2, range(5))])
        shard.flush()
        shard.apply_logged([upsert(log, 4, range(5, 8))])
        (faults / "apply").touch()
        batch = [upsert(log, 6, range(8, 10)), delete_ids(log, 7, ["d0"])]
        with pytest.raises(DiskFull, match="disk full: shard 0"):
            shard.apply_logged(batch)
        assert shard.count(None) in (8, 10)  # reads go on (the failed apply may be partly visible)
        with pytest.raises(Unavailable, match=r"cannot apply log record 7 now .*disk full"):
            shard.wait_applied(7, 5)  # the record is logged: a waiter may ask another replica
        with pytest.raises(DiskFull):
            shard.apply_logged(batch)  # no room yet: still read-only
        (faults / "apply").unlink()
        shard.heal()  # reopens: checkpoint + the external log from seq 2 on
        assert shard.write_problem() is None
        assert shard.applied_seq == 7 and shard.wait_applied(7, 0) is True
        assert [shard.result_of(seq) for seq in (4, 6, 7)] == [3, 2, 1]
        assert shard.apply_logged(batch) == []  # applied by the reopen
        assert shard.count(None) == 9 and shard.label_of("d0") is None
        assert shard.apply_logged([upsert(log, 8, range(20, 21))]) == [1]
    finally:
        shard.close()
