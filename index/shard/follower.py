"""A follower shard's write path: records already durable in an external log, applied in order.

A follower (a shard whose ``log_opener`` opens an external log, such as a replicated one
in cluster mode) refuses the local writes and takes its log's records through
``apply_logged``, in seq order (seqs increase but may skip numbers; re-delivered ones are
skipped); ``wait_applied`` and ``result_of`` tell a writer when its record is applied and
what it did (index/shard/sequencer.py keeps both).

A mixin of ``Shard`` (index/shard/core.py), not an object of its own: applying a batch
takes the shard's gate, write path, free-space check, sequencer, apply and write locks,
indexes and checkpoint trigger, the same ones as the local write path beside it, so an
object would need the shard's internals everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import records
from ..errors import BraidError, DataLoss, FailedPrecondition
from .ops import RECORD_OVERHEAD, Op, decode

if TYPE_CHECKING:
    from .core import Shard


class FollowerMixin:
    """``apply_logged`` and what waits on it; see the module doc."""

    def apply_logged(self: Shard, records: list[tuple[int, int, bytes]]) -> list[int]:
        """Apply (seq, kind, payload) records already durable in the external log, in order.

        For a follower (package doc), from its one applier thread. Records with seq <=
        ``applied_seq`` are skipped (re-delivered after a reconnect) and give no result; the
        others must have increasing seqs (else DataLoss, nothing applied). Returns one result
        per applied record, what the write did: documents upserted, or deleted. The batch is
        prepared, committed to tantivy once and applied under one hold of the write lock.
        A failure after preparing starts fails the shard as on the local write path (a full
        disk: read-only, until ``heal`` or the next call reopens it and replays the external
        log from the checkpoint, these records included).
        """
        if not self._external:
            raise FailedPrecondition(f"shard {self.number} writes its own log; it does not follow one")
        with self._gate:
            if self._disk.failed_disk_full:
                self._reopen_if_room()
            with self._write_path.read():
                return self._apply_logged_admitted(records)

    def _apply_logged_admitted(self: Shard, batch: list[tuple[int, int, bytes]]) -> list[int]:
        if self._disk.failed:
            raise self._disk.refusal()
        sequencer = self._sequencer
        ops: list[tuple[int, Op]] = []
        previous: int | None = None
        upserted_bytes = logged_bytes = 0
        for seq, kind, payload in batch:
            if previous is not None and seq <= previous:
                raise DataLoss(f"shard {self.number}: log record seq {seq} follows seq {previous}: seqs must increase")
            previous = seq
            if seq <= sequencer.applied_seq:
                continue  # applied already: a re-delivery
            try:
                op = decode(kind, payload)
            except BraidError:
                raise
            except Exception as err:  # a payload the log holds but no writer of ours encoded
                raise DataLoss(f"shard {self.number}: log record {seq} does not decode: {err!r}") from err
            ops.append((seq, op))
            logged_bytes += len(payload)
            if kind == records.UPSERT:
                upserted_bytes += len(payload) + RECORD_OVERHEAD
        if not ops:
            return []
        if upserted_bytes:  # below the floor: refused before anything changes (deletes pass, as locally)
            self._space.check(upserted_bytes)
            self._wait_for_room()
        last = ops[-1][0]
        self._logged_bytes += logged_bytes
        try:
            for _, op in ops:
                self.indexes.prepare(op)
        except BaseException as err:  # incl. tantivy's PanicException
            raise self._fail_logged(ops[0][0], last, "prepare", err) from err
        sequencer.prepared_seq = last
        sequencer.commit_text(last, self.text)  # compares seqs only: gaps between them are fine
        results: list[int] = []
        try:
            with self._apply_lock, self._lock.write():
                for seq, op in ops:
                    result = self.indexes.apply(op)
                    self._count_written(op, result)
                    results.append(result)
                    sequencer.remember(seq, result)  # before applied_seq: a waiter that sees it finds the result
                    sequencer.applied_seq = seq
        except BaseException as err:  # incl. tantivy's PanicException
            raise self._fail_logged(ops[0][0], last, "apply", err) from err
        with sequencer.cond:
            sequencer.committed_seq = max(sequencer.committed_seq, last)
            sequencer.cond.notify_all()
        self._maybe_checkpoint()
        self.merger.maybe_start()
        return results

    def _fail_logged(self: Shard, first: int, last: int, step: str, err: BaseException) -> BraidError:
        """Records durable in the external log could not be applied: memory no longer matches
        the log, so the shard stops (a full disk: read-only until a reopen replays them).
        Returns the refusal to raise."""
        self._disk.fail(f"log records {first}..{last} failed in {step}: {err!r}", err)
        return self._disk.refusal()

    @property
    def applied_seq(self: Shard) -> int:
        """The seq of the last log record applied (what a checkpoint records as ``wal_seq``)."""
        return self._sequencer.applied_seq

    def result_of(self: Shard, seq: int) -> int | None:
        """What applying record ``seq`` did (``Sequencer.result_of``); a follower's, else None."""
        return self._sequencer.result_of(seq)

    def wait_applied(self: Shard, seq: int, timeout_s: float) -> bool:
        """Block until record ``seq`` is applied (True) or ``timeout_s`` passes (False); raises the
        close error, or Unavailable while the shard is failed (``Sequencer.wait_applied``)."""
        return self._sequencer.wait_applied(seq, timeout_s)
