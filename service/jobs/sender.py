"""The sending side of a bulk job: encoded batches -> UpsertStream, with retries and rejects.

Batches go out in order over one UpsertStream call with a small window in flight; each
acknowledgement (the batch is durable) is handed to ``on_ack``, which checkpoints it.
When the stream fails:

- UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, a stream a stopping server dropped before it ran
  (CANCELLED "CANCELLED"), and RESOURCE_EXHAUSTED that is an overload (a retry pushback) or
  a full disk: a new stream after exponential backoff with full jitter, resending the
  batches left without an ack first (an upsert sent twice is the same document).
  ``max_retries`` failures in a row without an ack end the job as retryable (exit 75).
- INVALID_ARGUMENT naming ``documents[i]``: the failing batch is the first one without an
  ack; that document is rejected with its file, line and id (``skip_invalid``) and the
  batch is sent again without it, or the job stops as bad input (exit 2).
- anything else (NOT_FOUND, PERMISSION_DENIED, FAILED_PRECONDITION...): bad input or
  configuration, exit 2; an INTERNAL-like failure: exit 1.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from braid.v1 import braid_pb2 as pb

from ..client import BraidClient, StreamFailed
from ..errors import RESEND_CODES, dropped_at_stop, overloaded
from ..errors import pushback_s as hint_s
from .encode import Encoded, Reject, document_index

EXIT_OK = 0
EXIT_FAILED = 1  # a server or job fault: look at the message
EXIT_BAD_INPUT = 2  # the corpus, the options or the collection: rerunning as is fails again
EXIT_RETRYABLE = 75  # EX_TEMPFAIL: the server was unavailable; rerun (resumes from the checkpoint)

_CONFIGURATION = {
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}


class JobFailed(Exception):
    """A job that cannot go on; ``exit_code`` tells a retryable failure from a bad input."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def failure_of(err: grpc.RpcError, doing: str) -> JobFailed:
    """A gRPC error as the job's failure, classified for the exit code."""
    code = err.code()
    message = f"{doing}: {code.name}: {err.details()}"
    if retryable(err):
        return JobFailed(message, EXIT_RETRYABLE)
    return JobFailed(message, EXIT_BAD_INPUT if code in _CONFIGURATION else EXIT_FAILED)


def retryable(err: grpc.RpcError) -> bool:
    """Worth a new stream later: service/errors.py's RESEND_CODES, a stream a stopping server
    dropped before running it, an overload, or a full disk (writes refused until space is freed)."""
    if err.code() in RESEND_CODES or dropped_at_stop(err) or overloaded(err):
        return True
    return err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk full" in (err.details() or "")


def pushback_s(err: grpc.RpcError) -> float:
    """The server's retry hint (grpc-retry-pushback-ms), 0 when it gave none."""
    return hint_s(err) or 0.0


@dataclass
class Backoff:
    """Exponential backoff with full jitter: attempt n waits uniform(0, min(cap, base * 2**n))."""

    base_s: float = 0.25
    cap_s: float = 20.0
    max_retries: int = 10
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, attempt: int, floor_s: float = 0.0) -> float:
        return max(floor_s, self.rng.uniform(0, min(self.cap_s, self.base_s * 2**attempt)))


@dataclass
class SendStats:
    retried: int = 0  # streams reopened after a transient failure
    resent: int = 0  # batches sent again in those


class Sender:
    """Send encoded batches in order and call ``on_ack`` for each once durable. A document the
    server refused (with ``skip_invalid``) joins its batch's ``rejects``, which the ack carries."""

    def __init__(
        self,
        client: BraidClient,
        on_ack: Callable[[Encoded, int], None],
        *,
        window: int = 4,
        skip_invalid: bool = False,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.client = client
        self.on_ack = on_ack
        self.window = window
        self.skip_invalid = skip_invalid
        self.backoff = backoff or Backoff()
        self.sleep = sleep
        self.stats = SendStats()

    def run(self, batches: Iterator[Encoded]) -> None:
        behind: dict[int, Encoded] = {}  # id(request) -> the batch it came from

        def requests() -> Iterator[pb.UpsertRequest]:
            for encoded in batches:
                request = pb.UpsertRequest.FromString(encoded.request)
                behind[id(request)] = encoded
                yield request

        source = requests()
        # Batches to send before any new one: those a failed stream took without an ack, then
        # those a stream never got to take. A stream that fails at once takes few or none of
        # them, so they stay here for the next one: none is ever dropped.
        pending: deque[pb.UpsertRequest] = deque()

        def next_batches() -> Iterator[pb.UpsertRequest]:
            # Not ``yield from source``: closing a failed stream's generator must not close ``source``.
            while True:
                if pending:
                    yield pending.popleft()
                    continue
                request = next(source, None)
                if request is None:
                    return
                yield request

        failures = 0
        while True:
            try:
                for request, ack in self.client.upsert_stream(next_batches(), self.window):
                    self.on_ack(behind.pop(id(request)), ack.upserted)
                    failures = 0
                return
            except StreamFailed as failed:
                pending.extendleft(reversed(failed.unacked))
                unacked = len(failed.unacked)
                err = failed.error
            if err.code() == grpc.StatusCode.INVALID_ARGUMENT and unacked:
                self._reject(pending[0], behind[id(pending[0])], err)
                continue
            if not retryable(err):
                raise failure_of(err, "writing")
            failures += 1
            if failures > self.backoff.max_retries:
                raise JobFailed(
                    f"writing: {failures - 1} retries without progress; last: {err.code().name}: {err.details()}",
                    EXIT_RETRYABLE,
                )
            self.stats.retried += 1
            self.stats.resent += unacked
            self.sleep(self.backoff.delay(failures, pushback_s(err)))

    def _reject(self, request: pb.UpsertRequest, encoded: Encoded, err: grpc.RpcError) -> None:
        """Take the document the server refused out of the batch (in place), or stop the job."""
        details = err.details() or ""
        at = document_index(details)
        if at is None or not 0 <= at < len(request.documents):
            raise JobFailed(f"writing: the server refused a batch: {details}", EXIT_BAD_INPUT)
        row = encoded.rows[at]
        if not self.skip_invalid:
            raise JobFailed(
                f"{row.file}:{row.line}: document {row.id!r} refused: {details} (--skip-invalid writes such "
                "documents to the rejects file and goes on)",
                EXIT_BAD_INPUT,
            )
        encoded.rejects.append(Reject(row.file, row.line, row.id, details))
        del request.documents[at]
        del encoded.rows[at]
