"""Writes through the log: validate and encode here (replicas never run a model), split by
shard with the same hash as standalone, publish, wait for a replica's apply.

Each shard's part is published as one record per message (split further to fit NATS's
max_payload) with a message id, and acknowledged once JetStream stored every part and, by
default (WRITE_ACK_APPLIED), one replica of each affected shard applied it. Nothing unstored
is acknowledged, and a failure says only what Braid knows: a publish is retried with the same
message id (JetStream keeps one copy) across a paused or killed NATS node until the call's
deadline; "it was not stored" (UNAVAILABLE) only when no try may have stored it; else
UNAVAILABLE, or DEADLINE_EXCEEDED once the deadline passed, saying the write may have been
stored (sending it again is safe). The wait for a replica's apply retries a replica that is
down or restarting until the deadline, then DEADLINE_EXCEEDED saying the write is stored.

A BulkUpsert stream pipelines (``PipelinedWriter``): each batch is acknowledged once the log
stored it, and the replicas' apply is waited for only every ``PIPELINE_BATCHES`` batches.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc

from braid.cluster.v1 import shard_pb2 as spb
from braid.index import records
from braid.index.errors import ResourceExhausted, Unavailable
from braid.index.filters import Filter
from braid.index.records import DocumentWrite
from braid.index.validate import check_documents, check_ids
from braid.v1 import braid_pb2 as pb

from ... import convert
from ...admission import TimedOut
from ..nats_link import NatsUnreachable, NotStored
from .replicas import CollectionBase, default_deadline

if TYPE_CHECKING:
    from .collection import RemoteCollection
    from .rpcs import RouterRpcs

HEADER_ROOM = 1024  # bytes of a NATS message left for headers
PIPELINE_BATCHES = 16  # a BulkUpsert stream waits for the replicas at least this often
APPLIED_RETRY_S = 0.05  # a replica that failed a WaitApplied is asked again after this (doubling)...
APPLIED_RETRY_MAX_S = 0.5  # ...up to this


class OutcomeUnknown(Unavailable):
    """UNAVAILABLE for a write that may or may not have been stored (the message says so)."""


class OutcomeUnknownDeadline(TimedOut):
    """DEADLINE_EXCEEDED for a write that may or may not have been stored (the message says so)."""


class AppliedUnknown(TimedOut):
    """DEADLINE_EXCEEDED for a write the log stored that no replica reported applying in time."""


def _publish_failure(err: BaseException) -> str:
    return str(err) or type(err).__name__


class CollectionWrites(CollectionBase):
    """A collection's writes: published to its stream, then waited for on its replicas."""

    def upsert(self, docs: list[DocumentWrite], ack: int = 0) -> int:
        count, by_shard = self.upsert_logged(docs)
        if ack != pb.WRITE_ACK_LOGGED:
            self.wait_applied(by_shard, default_deadline())
        return count

    def upsert_logged(self, docs: list[DocumentWrite]) -> tuple[int, dict[int, list[int]]]:
        """Validate and store in the log: (documents, {shard: sequences})."""
        check_documents(docs, self.schema, self.payload, self.limits)
        batch = list({doc.id: doc for doc in docs}.values())  # a repeated id: the last one wins, as standalone
        parts: list[tuple[int, int, bytes]] = []
        for shard, group in self._group(batch, lambda doc: doc.id).items():
            parts += [(shard, records.UPSERT, payload) for payload in self._chunks(group)]
        return len(batch), self.publish(parts, default_deadline())

    def delete_ids(self, ids: list[str], ack: int = 0) -> int:
        check_ids(ids, self.limits)
        parts = [
            (shard, records.DELETE_IDS, records.encode_delete_ids(group))
            for shard, group in self._group(ids, lambda doc_id: doc_id).items()
        ]
        return self._write(parts, ack)

    def delete_filter(self, flt: Filter, ack: int = 0) -> int:
        self.payload.validate_filter(flt)
        payload = records.encode_delete_filter(flt)
        return self._write([(shard, records.DELETE_FILTER, payload) for shard in self.shards], ack)

    def _group(self, items: list, key: Callable[[Any], str]) -> dict[int, list]:
        from braid.index.collection import shard_of

        groups: dict[int, list] = {}
        for item in items:
            groups.setdefault(shard_of(key(item), len(self.shards)), []).append(item)
        return groups

    def _chunks(self, docs: list[DocumentWrite]) -> list[bytes]:
        """The documents as UPSERT records, each small enough for one NATS message."""
        limit = self.catalog.link.max_payload - HEADER_ROOM
        payload = records.encode_upsert(docs)
        if len(payload) <= limit:
            return [payload]
        if len(docs) == 1:
            raise ResourceExhausted(
                f"documents: document {docs[0].id!r} encodes to {len(payload)} bytes, over the log's "
                f"message limit of {limit} bytes (NATS max_payload)"
            )
        half = len(docs) // 2
        return self._chunks(docs[:half]) + self._chunks(docs[half:])

    def _write(self, parts: list[tuple[int, int, bytes]], ack: int) -> int:
        """Publish every part; then (WRITE_ACK_APPLIED) wait for a replica of each shard to apply
        its last part. Returns the sum of what applying each part did (0 when not waited for)."""
        deadline = default_deadline()
        by_shard = self.publish(parts, deadline)
        if ack == pb.WRITE_ACK_LOGGED or not by_shard:
            return 0
        return self.wait_applied(by_shard, deadline, results=True)

    def publish(self, parts: list[tuple[int, int, bytes]], deadline: float) -> dict[int, list[int]]:
        """Store (shard, kind, payload) records in the log; {shard: their sequences}.

        Unless every part was stored, the answer says what Braid knows: Unavailable "not stored"
        only when no part may have been stored by this call's failed parts (JetStream refused
        them, or NATS was unreachable all along); otherwise OutcomeUnknown (UNAVAILABLE, or
        DEADLINE_EXCEEDED once the deadline passed) saying the write may have been stored."""
        if not parts:
            return {}
        write_id = uuid.uuid4().hex
        items = [
            (self.meta.subject(shard), payload, kind, f"{write_id}.{i}")
            for i, (shard, kind, payload) in enumerate(parts)
        ]
        try:
            seqs = self.catalog.link.publish_many(items, self.meta.stream, max(deadline - time.monotonic(), 0.1))
        except NatsUnreachable as err:
            raise Unavailable(f"the log (NATS JetStream) did not store the write: {err}; it was not stored") from None
        except Unavailable as err:
            raise self._unknown(f"the log (NATS JetStream) did not answer: {err}", deadline) from None
        failed = [(parts[i][0], seq) for i, seq in enumerate(seqs) if isinstance(seq, BaseException)]
        if failed:
            stored = sorted({parts[i][0] for i, seq in enumerate(seqs) if not isinstance(seq, BaseException)})
            shards = ", ".join(str(shard) for shard in sorted({shard for shard, _ in failed}))
            why = _publish_failure(failed[0][1])
            also = f"parts for shards {stored} were stored and will apply" if stored else "no part was stored"
            if all(isinstance(err, NotStored) for _, err in failed):
                raise Unavailable(
                    f"the log (NATS JetStream) did not store the write for shard {shards}: {why}; it was not stored "
                    f"({also}; retrying is safe)"
                )
            raise self._unknown(
                f"the log (NATS JetStream) did not confirm the write for shard {shards}: {why}", deadline
            )
        by_shard: dict[int, list[int]] = {}
        for (shard, _, _), seq in zip(parts, seqs, strict=True):
            by_shard.setdefault(shard, []).append(int(seq))  # type: ignore[arg-type]
        for shard, shard_seqs in by_shard.items():
            self.catalog.note_acked(self.meta.uid, shard, max(shard_seqs))
        return by_shard

    @staticmethod
    def _unknown(what: str, deadline: float) -> BaseException:
        """A write whose outcome Braid cannot know: DEADLINE_EXCEEDED once the deadline passed, else
        UNAVAILABLE; either way saying it may have been stored, and that a retry is safe."""
        message = (
            f"{what}; the write may have been stored (and will then apply) or not: retrying the same write is "
            f"safe (an upsert or delete applied twice leaves the same documents)"
        )
        return OutcomeUnknownDeadline(message) if time.monotonic() >= deadline - 0.5 else OutcomeUnknown(message)

    def wait_applied(self, by_shard: dict[int, list[int]], deadline: float, results: bool = False) -> int:
        """Until one replica of each shard has applied its sequences; with ``results``, the sum of
        what applying each did (documents upserted or deleted)."""
        total = 0
        for shard, shard_seqs in by_shard.items():  # the shards' replicas are all asked at once
            response, address = self._first_applied(shard, max(shard_seqs), deadline)
            if not results:
                continue
            if len(shard_seqs) == 1:
                total += max(response.result, 0)
                continue
            stub = self.catalog.clients.stub(address)
            for seq in shard_seqs:  # the results of the earlier parts, from the replica that applied the last
                request = spb.WaitAppliedRequest(replica=self._ref(shard), seq=seq)
                try:
                    total += max(stub.WaitApplied(request, timeout=max(deadline - time.monotonic(), 0.001)).result, 0)
                except grpc.RpcError as err:
                    raise Unavailable(
                        f"collection {self.name!r} shard {shard}: the write is stored and applied, but its count "
                        f"could not be read: {err.code().name} {err.details()}"
                    ) from None
        return total

    def _first_applied(self, shard: int, seq: int, deadline: float) -> tuple[Any, str]:
        """Ask every replica of ``shard`` to report once it applied ``seq``; the first answer wins,
        so a replica that is down or still catching up delays nothing. A replica whose call
        fails (down, restarting, still opening its shard) is asked again after a pause, at the
        address the view has for it then, until ``deadline``: the write is stored, and the
        wait is for its deadline, not for the first failure."""
        request = spb.WaitAppliedRequest(replica=self._ref(shard), seq=seq)
        done = threading.Condition()
        calls: dict[str, tuple[str, Any]] = {}  # node -> (address, call in flight)
        next_try: dict[str, float] = {}
        pauses: dict[str, float] = {}
        failures: dict[str, str] = {}

        def notify(_: Any) -> None:
            with done:
                done.notify_all()

        try:
            with done:
                while True:
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    known = self.catalog.state.addresses()
                    for node in self.meta.placement[shard]:
                        if node in calls or next_try.get(node, 0.0) > now:
                            continue
                        address = known.get(node)
                        if address is None:
                            failures[node] = "never heard of"
                            next_try[node] = now + APPLIED_RETRY_MAX_S
                            continue
                        call = self.catalog.clients.stub(address).WaitApplied.future(
                            request, timeout=max(deadline - now, 0.001)
                        )
                        calls[node] = (address, call)
                        call.add_done_callback(notify)
                    for node, (address, call) in list(calls.items()):
                        if not call.done():
                            continue
                        error = call.exception()
                        if error is None:
                            return call.result(), address
                        del calls[node]
                        failures[node] = f"{error.code().name} {error.details()}"
                        pause = pauses[node] = min(pauses.get(node, APPLIED_RETRY_S / 2) * 2, APPLIED_RETRY_MAX_S)
                        next_try[node] = now + pause
                    wake = min([deadline, *(at for node, at in next_try.items() if node not in calls)])
                    done.wait(min(max(wake - time.monotonic(), 0.001), 1.0))
        finally:
            for _, call in calls.values():
                call.cancel()
        for node in self.meta.placement[shard]:
            if node in calls:
                failures[node] = "no answer"
        why = "; ".join(f"{node}: {failures.get(node, 'not asked')}" for node in self.meta.placement[shard])
        raise AppliedUnknown(
            f"collection {self.name!r} shard {shard}: the write is stored in the log (sequence {seq}) but no replica "
            f"reported applying it before the deadline ({why}); it will apply when a replica can"
        )

    def flush(self) -> None:
        """Checkpoint every replica; Unavailable naming a shard none of whose replicas could."""
        deadline = default_deadline()
        known = self.catalog.state.addresses()  # live or not: a stalled heartbeat says little about a server
        for shard, nodes in enumerate(self.meta.placement):
            failures, flushed = [], 0
            for node in nodes:
                if node not in known:
                    failures.append(f"{node}: never heard of")
                    continue
                try:
                    timeout = max(deadline - time.monotonic(), 0.001)
                    self.catalog.clients.stub(known[node]).Flush(
                        spb.FlushRequest(replica=self._ref(shard)), timeout=timeout
                    )
                    flushed += 1
                except grpc.RpcError as err:
                    failures.append(f"{node}: {err.code().name} {err.details()}")
            if not flushed:
                raise Unavailable(
                    f"collection {self.name!r} shard {shard}: no replica checkpointed ({'; '.join(failures)})"
                )


class PipelinedWriter:
    """A BulkUpsert stream through a router: each batch is acknowledged once the log stored it,
    and the stream waits for the replicas' apply only every ``PIPELINE_BATCHES`` batches and at
    its end (when some batch asked for WRITE_ACK_APPLIED). Replicas apply while the router
    validates and encodes the next batches, and they never fall more than that far behind.
    A batch counted in a failed stream's ``braid-batches-applied`` is stored in the log: it
    applies, but a search may not see it until the replicas catch up."""

    rest_s = 0.0  # a router never rests (index/pacing.py): the shard servers' searches are elsewhere

    def __init__(self, rpcs: RouterRpcs) -> None:
        self.rpcs = rpcs
        self.pending: dict[str, tuple[RemoteCollection, dict[int, list[int]]]] = {}
        self.wants_applied = False
        self.batches = 0
        self.resolved: dict[str, str] = {}

    def upsert(self, request: pb.UpsertRequest) -> int:
        name = self.resolved.get(request.collection)
        if name is None:  # an alias is resolved once per stream, as standalone (service/rpcs.py)
            name = self.resolved[request.collection] = self.rpcs.catalog.resolve(request.collection)
        collection = self.rpcs.catalog.get(name)
        docs = convert.documents_from_proto(request.documents)
        self.rpcs.encoding.fill_documents(collection.schema, docs)
        count, by_shard = collection.upsert_logged(docs)
        _, pending = self.pending.setdefault(collection.meta.uid, (collection, {}))
        for shard, seqs in by_shard.items():
            pending.setdefault(shard, []).append(max(seqs))
        self.wants_applied |= request.ack != pb.WRITE_ACK_LOGGED
        self.batches += 1
        if self.batches % PIPELINE_BATCHES == 0:
            self._wait(final=False)
        return count

    def finish(self) -> None:
        self._wait(final=True)

    def _wait(self, final: bool) -> None:
        pending, self.pending = self.pending, {}
        if not (self.wants_applied or not final):
            return
        deadline = default_deadline()
        for collection, by_shard in pending.values():
            collection.wait_applied({shard: [max(seqs)] for shard, seqs in by_shard.items()}, deadline)
