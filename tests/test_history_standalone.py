"""The history checker (tests/history/): its unit tests on hand-made histories, and a short
seeded run against a real standalone server under kill -9, a disk that fills and empties
(a tmpfs of its own, filled to the last byte, when the tests run as root) and kill -9 in a
CreateSnapshot call.

The long runs are ``python bench/history.py --mode standalone --faults 50 --seed N``.
"""

from __future__ import annotations

import grpc
import pytest

from tests.history.checker import Final, Report, check
from tests.history.model import ABSENT, DELETE, FAIL, INFO, OK, READ, UPSERT, Op, outcome_of
from tests.history.standalone import run_standalone

# Draws the disk filling below the floor, kill -9 in a CreateSnapshot call, ENOSPC at the log fsync
# (then kill -9), the disk full to the last byte (below the floor where the run cannot mount a
# tmpfs), kill -9 on a full disk with the restart on it, and kill -9 in a CreateSnapshot call again,
# in that order.
SEED = 20263589


def _w(key: str, version: int, start: float, end: float, status: str = OK) -> Op:
    return Op(DELETE if version == ABSENT else UPSERT, key, version, start, end, status, "writer")


def _r(key: str, value: int, start: float, end: float) -> Op:
    return Op(READ, key, value, start, end, OK, "reader")


def _check(ops: list[Op], finals: list[Final], replicas: dict[str, list[str]] | None = None) -> Report:
    return check(ops, finals, Report(seed=0, mode="unit"), replicas)


# ------------------------------------------------------------------ the checker on hand-made histories

HISTORY = [
    _w("a", 1, 0, 1),
    _w("a", 2, 2, 3),
    _w("a", 3, 4, 5, INFO),  # indeterminate: may be there or not
    _w("b", 1, 0, 1),
    _w("b", ABSENT, 2, 3),
    _w("c", 1, 0, 1, FAIL),  # known not applied
]


def test_history_checker_passes_a_consistent_history() -> None:
    ops = [*HISTORY, _r("a", 2, 3.5, 3.6), _r("a", 3, 4.5, 4.6), _r("b", 1, 1.5, 2.5), _r("c", ABSENT, 2, 3)]
    report = _check(ops, [Final("node", {"a": 3, "b": ABSENT, "c": ABSENT}, count=1)])
    assert report.ok, report.text()
    report = _check(HISTORY, [Final("node", {"a": 2, "b": ABSENT, "c": ABSENT}, count=1)])
    assert report.ok, report.text()  # the indeterminate v3 may also not have landed


def test_history_checker_reports_a_lost_write() -> None:
    report = _check(HISTORY, [Final("node", {"a": 1, "b": ABSENT, "c": ABSENT}, count=1)])
    assert report.count("lost") == 1 and "node: a is v1" in report.violations["lost"][0], report.text()
    report = _check(HISTORY, [Final("node", {"a": ABSENT, "b": 1, "c": ABSENT}, count=1)])
    assert report.count("lost") == 2, report.text()  # a's v2 gone, b's delete undone
    assert not report.ok and "lost 2" in report.text()


def test_history_checker_reports_a_stale_read() -> None:
    report = _check([*HISTORY, _r("a", 1, 3.5, 3.6)], [Final("node", {"a": 2, "b": ABSENT, "c": ABSENT})])
    assert report.count("stale") == 1 and "read a=v1" in report.violations["stale"][0], report.text()
    # A read after another read saw v3 may not go back to v2, although v2 was the last acknowledged.
    report = _check([*HISTORY, _r("a", 3, 4.5, 4.6), _r("a", 2, 4.7, 4.8)], [])
    assert report.count("stale") == 1 and "read a=v2" in report.violations["stale"][0], report.text()
    # A read concurrent with a write may see either; after a delete's ack, the old version is stale.
    report = _check([*HISTORY, _r("b", 1, 2.5, 2.6), _r("b", 1, 3.1, 3.2)], [])
    assert report.count("stale") == 1 and "[3.100" in report.violations["stale"][0], report.text()


def test_history_checker_reports_phantoms_and_failed_writes_that_were_applied() -> None:
    ops = [*HISTORY, _r("a", 7, 3.5, 3.6), _r("a", 3, 3.0, 3.9), _r("c", 1, 2, 3)]
    report = _check(ops, [Final("node", {"a": 9, "b": ABSENT, "c": 1})])
    assert report.count("phantom") == 3, report.text()  # v7 never written, v3 only after, final v9
    assert report.count("failed_visible") == 2, report.text()  # c's failed v1 read, and held at the end
    # A delete answered as not applied, then the key absent although its last acknowledged write is v1.
    ops = [_w("d", 1, 0, 1), _w("d", ABSENT, 2, 3, FAIL), _r("d", ABSENT, 4, 5)]
    report = _check(ops, [Final("node", {"d": ABSENT})])
    assert report.count("failed_visible") == 2 and "only delete #2" in report.violations["failed_visible"][0]
    assert report.count("stale") == report.count("lost") == 0, report.text()


def test_history_checker_reports_diverged_replicas_and_wrong_counts() -> None:
    finals = [Final("r1", {"a": 2, "b": ABSENT}, count=1), Final("r2", {"a": 3, "b": ABSENT}, count=2)]
    report = _check(HISTORY, finals, {"shard 0": ["r1", "r2"]})
    assert report.count("diverged") == 1 and "shard 0: a" in report.violations["diverged"][0], report.text()
    assert report.count("count_mismatch") == 1 and "r2: Count says 2" in report.violations["count_mismatch"][0]
    assert report.count("lost") == 0


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self._code, self._message = code, message

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._message


def test_history_outcomes_of_errors() -> None:
    unavailable = grpc.StatusCode.UNAVAILABLE
    assert outcome_of(_Error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")) == INFO
    assert outcome_of(_Error(unavailable, "Socket closed")) == INFO
    assert outcome_of(_Error(unavailable, "failed to connect to all addresses; Connection refused")) == FAIL
    assert outcome_of(_Error(unavailable, "it is not acknowledged (parts for shards none were stored and")) == FAIL
    assert outcome_of(_Error(unavailable, "not acknowledged; it may have been stored")) == INFO
    assert outcome_of(_Error(unavailable, "did not store the write: it was not stored (no part was stored)")) == FAIL
    assert outcome_of(_Error(grpc.StatusCode.RESOURCE_EXHAUSTED, "disk full: 1 bytes free, below the floor")) == FAIL
    assert outcome_of(_Error(grpc.StatusCode.RESOURCE_EXHAUSTED, "disk full: shard 0 is read-only")) == INFO
    full_log = "disk full: write-ahead log append to /d/wal failed: [Errno 28] No space left on device"
    assert outcome_of(_Error(grpc.StatusCode.RESOURCE_EXHAUSTED, full_log)) == FAIL
    assert outcome_of(_Error(grpc.StatusCode.INVALID_ARGUMENT, "documents: bad")) == FAIL


# ------------------------------------------------------------------ a short seeded run


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_history_standalone_under_kill9_a_full_disk_and_snapshots(tmp_path) -> None:
    report = run_standalone(tmp_path / "run", SEED, faults=6, keys=30, min_run_s=15.0)
    print("\n" + report.text())
    report.assert_held(faults=6)
    assert [fault.kind for fault in report.faults].count("kill -9 mid-CreateSnapshot") == 2
