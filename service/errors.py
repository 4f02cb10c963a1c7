"""The single table that maps index-layer and encoder errors to gRPC status codes, and the
status codes a failed call may be tried again on (each caller's table, side by side)."""

from __future__ import annotations

import logging

import grpc

from braid.encoders import errors as encoder_errors
from braid.index import errors

from .admission import RETRY_PUSHBACK_KEY, TimedOut

log = logging.getLogger("braid.service")
MAX_MESSAGE_BYTES = 1536

STATUS_OF: dict[type[Exception], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    encoder_errors.UnknownModel: grpc.StatusCode.NOT_FOUND,
    encoder_errors.ModelNotExported: grpc.StatusCode.FAILED_PRECONDITION,
    encoder_errors.InvalidModel: grpc.StatusCode.FAILED_PRECONDITION,
    encoder_errors.TextTooLong: grpc.StatusCode.INVALID_ARGUMENT,
    TimedOut: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# Codes a failed call to a replica (or a client's call) may be retried on: the call may not have
# reached its server, or the server could not answer in time. A write answered with one of them
# may or may not have happened (its message says which it knows); sending the same write again
# is safe, as an upsert or delete applied twice leaves the same documents. The other codes are
# answers about the request itself, the same from every replica.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# Codes a client sends the same unary call again on, after a pause inside the call's one
# deadline (service/aio.py): the server did not take the call. Not DEADLINE_EXCEEDED: the
# tries share that deadline, so its time is spent (or a write's outcome is unknown).
CLIENT_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE})

# What grpc core answers a call that reached a stopping server before any handler took it
# (grpc/grpc#41785): CANCELLED with this exact message, though the client cancelled nothing.
# The call never ran, so it is as safe to send again as UNAVAILABLE; a client's own
# cancellation reads "Locally cancelled by application!".
DROPPED_AT_STOP_DETAILS = "CANCELLED"

# Codes a bulk job resends its unacknowledged batches on over a new stream, after a backoff,
# or exits retryable (service/jobs/sender.py): the server was away or the stream's time ran
# out. Its writes are upserts: sending one again leaves the same document.
RESEND_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})


def dropped_at_stop(err: grpc.RpcError) -> bool:
    """The server was stopping and dropped the call before running it (DROPPED_AT_STOP_DETAILS)."""
    return err.code() == grpc.StatusCode.CANCELLED and err.details() == DROPPED_AT_STOP_DETAILS


def server_away(err: grpc.RpcError) -> bool:
    """The server did not take the call: CLIENT_RETRY_CODES, or dropped by a stopping server."""
    return err.code() in CLIENT_RETRY_CODES or dropped_at_stop(err)


def pushback_s(err: grpc.RpcError) -> float | None:
    """The server's retry hint (``grpc-retry-pushback-ms``) in seconds; None when it gave none.
    gRPC's convention: a negative value means do not retry."""
    for key, text in err.trailing_metadata() or ():
        if key == RETRY_PUSHBACK_KEY:
            try:
                return int(text) / 1000
            except (TypeError, ValueError):
                return None
    return None


def overloaded(err: grpc.RpcError) -> bool:
    """RESOURCE_EXHAUSTED with a retry hint: an overload turned the call away before any work
    (service/admission.py), so it may be sent again after the hint (clients and jobs alike)."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    hint = pushback_s(err)
    return hint is not None and hint >= 0


def status_of(err: BaseException) -> grpc.StatusCode:
    for cls in type(err).__mro__:
        code = STATUS_OF.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def describe(err: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client gets for err; unexpected errors are logged as INTERNAL."""
    code = status_of(err)
    if code is grpc.StatusCode.INTERNAL:
        log.error("internal error", exc_info=err)
        return code, bounded(f"internal error: {type(err).__name__}: {err}")
    return code, bounded(str(err))


def bounded(message: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``message`` cut to ``limit`` UTF-8 bytes (on a character boundary), saying how much was cut.

    Messages echo client values (names, texts); the status travels in a header that gRPC
    percent-encodes (up to 3x) and caps at 8 KiB, and a longer one turns any status into
    RESOURCE_EXHAUSTED "received metadata size exceeds hard limit".
    """
    data = message.encode()
    if len(data) <= limit:
        return message
    kept = data[:limit].decode(errors="ignore")
    return f"{kept}... ({len(data) - len(kept.encode())} more bytes)"
