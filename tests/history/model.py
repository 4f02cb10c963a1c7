"""Operations of a history and the recorder that collects them from many threads.

Every operation touches one key (the document id). A write is an upsert of a new version of
the key (versions are unique per key and grow with each upsert) or a delete; a read returns
the version it found, or ABSENT. Each operation has a start and an end (``time.monotonic()``
in the recording process) and an outcome:

* ``ok``: acknowledged (a write) or answered (a read);
* ``fail``: refused, and known not to have been applied (the request never reached a
  server, or the server refused it before storing anything);
* ``info``: indeterminate: it may or may not have been applied (a timeout, a dropped
  connection, or an error that says the write may have been stored). It may take effect at
  any time after its start.

:func:`outcome_of` reads a gRPC error as ``fail`` or ``info``; anything it is not sure about
is ``info``, which only ever weakens the check, never raises a false alarm.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import grpc

ABSENT = -1  # the value of a deleted (or never written) key
OK, FAIL, INFO = "ok", "fail", "info"
UPSERT, DELETE, READ = "upsert", "delete", "read"


@dataclass
class Op:
    kind: str  # UPSERT, DELETE or READ
    key: str
    value: int  # UPSERT: the version written; DELETE: ABSENT; READ: what was found (ABSENT if nothing)
    start: float
    end: float
    status: str  # OK, FAIL or INFO
    process: str = ""  # the thread (and for a cluster, the router) that ran it
    detail: str = ""  # the error's code and message, the ack mode, ...

    def describe(self, since: float = 0.0) -> str:
        shown = "absent" if self.value == ABSENT else f"v{self.value}"
        extra = f" ({self.detail[:160]})" if self.detail else ""
        return (
            f"{self.kind} {self.key}={shown} {self.status} [{self.start - since:.3f}, {self.end - since:.3f}] "
            f"by {self.process}{extra}"
        )


@dataclass
class Recorder:
    """The history: every operation any thread finished, and counters of what went wrong how."""

    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: dict[str, int] = field(default_factory=dict)  # "kind outcome CODE message-shape" -> count
    failed_reads: int = 0

    def add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)

    def note_error(self, kind: str, outcome: str, err: grpc.RpcError) -> None:
        message = re.sub(r"[0-9]+", "N", re.sub(r"/\S+", "<path>", details(err)))
        shape = f"{kind} {outcome} {code_name(err)} {message[:240]}"
        with self.lock:
            self.errors[shape] = self.errors.get(shape, 0) + 1
            if kind == READ:
                self.failed_reads += 1

    def snapshot(self) -> list[Op]:
        with self.lock:
            return list(self.ops)


def code_name(err: grpc.RpcError) -> str:
    code = err.code() if hasattr(err, "code") else None
    return code.name if code is not None else "UNKNOWN"


def details(err: grpc.RpcError) -> str:
    return (err.details() if hasattr(err, "details") else str(err)) or ""


# The client never reached a server: nothing was sent, so nothing was applied.
_NOT_SENT = ("failed to connect", "connection refused", "connections to all backends failing", "dns resolution")
# A server said it stored nothing. Braid's words for it: the free-space floor refuses a write
# before logging it; a failed log append leaves the log as it was (index/shard/); a router
# whose publish stored no part says so ("none were stored", later "it was not stored (no part was stored").
_NOT_STORED = (
    "below the floor",
    "write-ahead log append to",
    "parts for shards none were stored",
    "it was not stored",
    "no part was stored",
)
# Codes a server answers only before it does anything (validation, routing, auth).
_REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
}


def outcome_of(err: grpc.RpcError) -> str:
    """FAIL when the error proves the write was not applied, else INFO.

    A RESOURCE_EXHAUSTED "disk full" counts as not applied only when the floor refused it
    before logging or the log append itself failed: a write whose record was logged before
    the disk filled may be applied after all (index/shard/health.py). An UNAVAILABLE counts as not
    applied only when the call never left this process or the router said no part was
    stored, and the message does not also say it may have been stored."""
    code = err.code() if hasattr(err, "code") else None
    text = details(err).lower()
    if code in _REFUSED:
        return FAIL
    if "may have been stored" in text or "may be stored" in text:
        return INFO
    if code == grpc.StatusCode.UNAVAILABLE and any(marker in text for marker in _NOT_SENT + _NOT_STORED):
        return FAIL
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(marker in text for marker in _NOT_STORED):
        return FAIL
    return INFO
