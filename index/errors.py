"""The one error hierarchy of Braid's index layer.

Every failure a caller can cause or observe is one of these classes. The
service layer maps each class to a gRPC status code in a single table
(service/errors.py); nothing else in index/ knows about status codes.
Messages name the offending field and give the expected and received values.
"""

from __future__ import annotations


class BraidError(Exception):
    """Base class of every error the index layer raises on purpose."""


class InvalidArgument(BraidError):
    """The request is malformed: bad field, wrong type, wrong dimension, ..."""

    @classmethod
    def field(cls, field: str, problem: str) -> InvalidArgument:
        return cls(f"{field}: {problem}")

    @classmethod
    def dimension(cls, field: str, expected: int, received: int) -> InvalidArgument:
        return cls(f"{field}: vector dimension error: expected dim {expected}, got {received}")

    @classmethod
    def choice(cls, field: str, received: object, valid: list[str] | tuple[str, ...]) -> InvalidArgument:
        return cls(f"{field}: unknown value {received!r}; valid: {', '.join(sorted(valid))}")


class NotFound(BraidError):
    """A named thing (collection, field) does not exist."""


class AlreadyExists(BraidError):
    """A thing with that name exists already."""


class FailedPrecondition(BraidError):
    """The system is not in a state that allows the operation."""


class ResourceExhausted(BraidError):
    """A configured limit (batch size, result limit, memory) was exceeded."""


class DiskFull(ResourceExhausted):
    """The disk has no room for a write (ENOSPC/EDQUOT, or below the free-space floor).

    The message starts with "disk full:". Writes resume by themselves once space is freed
    (index/shard/health.py); reads keep working meanwhile.
    """


class Unavailable(BraidError):
    """The service is shutting down or a shard is not open."""


class DataLoss(BraidError):
    """On-disk state is corrupt beyond what recovery can repair."""


class Unauthenticated(BraidError):
    """The caller gave no credentials, or credentials the server does not know."""


class PermissionDenied(BraidError):
    """The caller is known but its role or scope does not allow the operation."""
