"""The check of a history (tests/history/model.py) and of the state read back after healing.

Per key, one writer thread issues the writes one after another, so they are totally ordered
(index 1..n; index 0 is the initial state, ABSENT, acknowledged at -inf). The state of a key
is the value of the last write that took effect, and writes take effect in that order: an
acknowledged write took effect before its end, a failed one never, an indeterminate one
maybe, at any time after its start but never after a later write took effect (that would
undo, "roll back", an acknowledged write). So a state is a write index ``i``, and:

* a read that began after write ``a`` was acknowledged, or after another read of the key
  that saw write ``l`` had ended, must see a write ``i >= max(a, l)``, not failed, begun
  before the read ended; else the read is **stale** (older than what was acknowledged or
  already seen), or a **phantom** (a value never written, or written only after the read
  ended), or **failed_visible** (a write answered as not applied);
* the final state, on every replica and through every router, is a write ``i >=`` the last
  acknowledged one and the last one any read saw, not failed; else the acknowledged write is
  **lost** (absent, an older version, a deleted key back), or it is a phantom / failed_visible;
* every copy of a shard holds the same state (**diverged** otherwise), and each place's Count
  equals the number of keys it holds and lies between the keys that are surely present and
  those that may be (**count_mismatch** otherwise).

A delete's value is ABSENT, shared by all deletes and the initial state: an ABSENT read
stands for the earliest allowed write whose value is ABSENT.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from .model import ABSENT, DELETE, FAIL, INFO, OK, READ, UPSERT, Op

CATEGORIES = ("lost", "stale", "phantom", "failed_visible", "diverged", "count_mismatch")
_INITIAL = Op(DELETE, "", ABSENT, -math.inf, -math.inf, OK, "initial")


@dataclass
class Final:
    """What one place holds after healing: a replica of some shards, or a router's answer."""

    where: str
    values: dict[str, int]  # key -> version, or ABSENT; the keys this place answers for
    count: int | None = None  # its Count over the same keys (None: not asked)


@dataclass
class Fault:
    kind: str
    target: str
    start: float
    end: float | None = None
    note: str = ""


@dataclass
class Report:
    seed: int
    mode: str
    since: float = 0.0  # the start of the run, for relative times
    ops: dict[str, int] = field(default_factory=dict)  # "upsert ok" -> count
    faults: list[Fault] = field(default_factory=list)
    violations: dict[str, list[str]] = field(default_factory=lambda: {c: [] for c in CATEGORIES})
    errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # healing, catch-up, what was read where
    problems: list[str] = field(default_factory=list)  # the run itself went wrong (a crashed thread, no heal)
    keys: int = 0
    finals: int = 0
    tally: dict[str, int] = field(default_factory=dict)  # what the run did besides calls: snapshots, trims, ...

    def add(self, category: str, message: str) -> None:
        self.violations[category].append(message)

    def count(self, category: str) -> int:
        return len(self.violations[category])

    @property
    def ok(self) -> bool:
        return not any(self.violations.values()) and not self.problems

    def acknowledged_writes(self) -> int:
        return self.ops.get(f"{UPSERT} {OK}", 0) + self.ops.get(f"{DELETE} {OK}", 0)

    def assert_held(self, faults: int, min_writes: int = 30, min_reads: int = 30) -> None:
        """A short run's verdict: it made progress enough to test anything, injected its
        ``faults``, read states back after healing, and the check found nothing."""
        assert self.acknowledged_writes() >= min_writes, "the writers made too little progress to test anything"
        assert self.ops.get(f"{READ} {OK}", 0) >= min_reads, "the readers made too little progress to test anything"
        assert len(self.faults) == faults
        assert self.finals > 0, "nothing was read back after healing"
        assert self.ok, self.text()

    def text(self, examples: int = 8) -> str:
        lines = [
            f"history check ({self.mode}, seed {self.seed}): {'PASSED' if self.ok else 'FAILED'}",
            "  ops: " + ", ".join(f"{k} {v}" for k, v in sorted(self.ops.items())) + f" over {self.keys} keys",
            f"  acknowledged writes {self.acknowledged_writes()}; final states checked {self.finals}",
            "  " + ", ".join(f"{c} {self.count(c)}" for c in CATEGORIES),
            f"  faults injected: {len(self.faults)}",
        ]
        for fault in self.faults:
            end = f"{fault.end - self.since:7.2f}" if fault.end is not None else "   open"
            note = f" ({fault.note})" if fault.note else ""
            lines.append(f"    {fault.start - self.since:7.2f} .. {end} s  {fault.kind} {fault.target}{note}")
        if self.errors:
            lines.append("  errors seen (op outcome code message):")
            for shape, n in sorted(self.errors.items(), key=lambda item: -item[1])[:20]:
                lines.append(f"    {n:5d} x {shape}")
        lines += [f"  {note}" for note in self.notes]
        lines += [f"  PROBLEM: {problem}" for problem in self.problems]
        for category in CATEGORIES:
            found = self.violations[category]
            if found:
                lines.append(f"  {category}: {len(found)}, e.g.")
                lines += [f"    - {message}" for message in found[:examples]]
        return "\n".join(lines)


class _Key:
    """One key's writes in order (index 0: the initial state) and its consistent reads."""

    def __init__(self, key: str, writes: list[Op]) -> None:
        self.key = key
        self.writes = [_INITIAL, *sorted(writes, key=lambda op: op.start)]
        self.by_version = {op.value: i for i, op in enumerate(self.writes) if op.kind == UPSERT}
        self.last_ok = max(i for i, op in enumerate(self.writes) if op.status == OK)
        self.seen: list[tuple[float, int]] = []  # (end, index) of each read that passed

    def acked_before(self, t: float) -> int:
        return max(i for i, op in enumerate(self.writes) if op.status == OK and op.end < t)

    def begun_before(self, t: float) -> int:
        return max(i for i, op in enumerate(self.writes) if op.start < t)

    def seen_before(self, t: float) -> int:
        return max((index for end, index in self.seen if end < t), default=0)

    def place(self, value: int, low: int, high: int) -> tuple[int | None, str]:
        """The write index ``value`` stands for, in [low, high], or (None, the category and why)."""
        if value != ABSENT:
            i = self.by_version.get(value)
            if i is None:
                return None, f"phantom: v{value} was never written"
            op = self.writes[i]
            if op.status == FAIL:
                return None, f"failed_visible: v{value} was answered as not applied ({op.detail[:160]})"
            if i > high:
                return None, f"phantom: v{value} was written only after the read ended (write #{i})"
            if i < low:
                late = " (an indeterminate write: it may have landed after a later one)" if op.status == INFO else ""
                return None, f"older than write #{low}: v{value} is write #{i}{late}"
            return i, ""
        for i in range(low, high + 1):
            if self.writes[i].value == ABSENT and self.writes[i].status != FAIL:
                return i, ""
        failed = [i for i in range(low, high + 1) if self.writes[i].value == ABSENT]
        if failed:  # only a delete answered as not applied explains it
            detail = self.writes[failed[0]].detail[:160]
            return None, f"failed_visible: absent, as only delete #{failed[0]} would make it ({detail})"
        return None, f"absent, but every write from #{low} on that may hold is an upsert"

    def history(self, since: float, around: int, width: int = 3) -> str:
        shown = self.writes[max(1, around - width) : around + width + 1]
        return "; ".join(f"#{self.writes.index(op)} {op.describe(since)}" for op in shown)


def check(
    ops: Iterable[Op],
    finals: Iterable[Final],
    report: Report,
    replicas_of: dict[str, list[str]] | None = None,
) -> Report:
    """Check ``ops`` and ``finals`` into ``report`` (returned). ``replicas_of`` maps a group name
    (a shard) to the ``where`` of the Finals that must hold the same state (its copies)."""
    ops = list(ops)
    finals = list(finals)
    since = report.since
    for op in ops:
        report.ops[f"{op.kind} {op.status}"] = report.ops.get(f"{op.kind} {op.status}", 0) + 1
    writes: dict[str, list[Op]] = {}
    reads: dict[str, list[Op]] = {}
    for op in ops:
        (reads if op.kind == READ else writes).setdefault(op.key, []).append(op)
    keys = {key: _Key(key, writes.get(key, [])) for key in set(writes) | set(reads)}
    for final in finals:
        for key in final.values:
            keys.setdefault(key, _Key(key, []))
    report.keys = len(keys)

    # Reads, in order of their start: each is checked against the writes and the reads before it.
    for key, model in keys.items():
        for read in sorted(reads.get(key, []), key=lambda op: op.start):
            if read.status != OK:
                continue
            acked = model.acked_before(read.start)
            low = max(acked, model.seen_before(read.start))
            index, why = model.place(read.value, low, model.begun_before(read.end))
            if index is not None:
                model.seen.append((read.end, index))
                continue
            category = why.split(":")[0] if why.startswith(("phantom", "failed_visible")) else "stale"
            report.add(
                category,
                f"{read.describe(since)}: {why}; acknowledged before it began: write #{acked}; "
                f"writes: {model.history(since, low)}",
            )

    # Final states: every place, every key it answers for.
    for final in finals:
        present = 0
        for key, value in final.values.items():
            model = keys[key]
            present += value != ABSENT
            low = max(model.last_ok, max((index for _, index in model.seen), default=0))
            index, why = model.place(value, low, len(model.writes) - 1)
            report.finals += 1
            if index is None:
                category = why.split(":")[0] if why.startswith(("phantom", "failed_visible")) else "lost"
                report.add(
                    category,
                    f"{final.where}: {key} is {'absent' if value == ABSENT else f'v{value}'}: {why}; last acknowledged "
                    f"write #{model.last_ok}; writes: {model.history(since, low)}",
                )
        if final.count is not None:
            sure = sum(1 for key in final.values if _surely_present(keys[key]))
            maybe = sum(1 for key in final.values if _maybe_present(keys[key]))
            if final.count != present or not sure <= final.count <= maybe:
                report.add(
                    "count_mismatch",
                    f"{final.where}: Count says {final.count}; it holds {present} of the keys; the model allows "
                    f"{sure}..{maybe}",
                )

    # Indeterminate upserts whose version was seen: they were stored after all.
    seen_values: dict[str, set[int]] = {}
    for op in ops:
        if op.kind == READ and op.status == OK:
            seen_values.setdefault(op.key, set()).add(op.value)
    for final in finals:
        for key, value in final.values.items():
            seen_values.setdefault(key, set()).add(value)
    unknown = [op for op in ops if op.kind == UPSERT and op.status == INFO]
    landed = sum(1 for op in unknown if op.value in seen_values.get(op.key, set()))
    report.notes.append(f"indeterminate upserts: {len(unknown)}, of which seen applied later: {landed}")

    # Copies of one shard hold the same state.
    by_where = {final.where: final for final in finals}
    for group, places in (replicas_of or {}).items():
        copies = [by_where[where] for where in places if where in by_where]
        if len(copies) < 2:
            continue
        for key in sorted(set().union(*(copy.values for copy in copies))):
            seen = {copy.where: copy.values.get(key, ABSENT) for copy in copies}
            if len(set(seen.values())) > 1:
                shown = {where: "absent" if v == ABSENT else f"v{v}" for where, v in seen.items()}
                report.add("diverged", f"{group}: {key}: {shown}")
    return report


def _allowed_finals(model: _Key) -> list[int]:
    low = max(model.last_ok, max((index for _, index in model.seen), default=0))
    return [op.value for op in model.writes[low:] if op.status != FAIL]


def _surely_present(model: _Key) -> bool:
    return all(value != ABSENT for value in _allowed_finals(model))


def _maybe_present(model: _Key) -> bool:
    return any(value != ABSENT for value in _allowed_finals(model))
