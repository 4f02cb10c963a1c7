"""The single table that maps index-layer and encoder errors to gRPC status codes, and the
codes a call may be retried on."""

from __future__ import annotations

import logging

import grpc

from braid.encoders import errors as encoder_errors
from braid.index import errors

from .admission import TimedOut

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
