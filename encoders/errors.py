"""The encoders' own error classes (encoders/ imports neither index/ nor service/).

service/errors.py maps each class to a gRPC status code in the same single table
as the index errors. Messages name the model or field and say how to fix it.
"""

from __future__ import annotations


class EncoderError(Exception):
    """Base class of every error the encoders raise on purpose."""


class UnknownModel(EncoderError):
    """No built-in or registered model has that name."""


class ModelNotExported(EncoderError):
    """The model is known but its ONNX files are not in the models directory."""


class InvalidModel(EncoderError):
    """A model directory is incomplete, corrupt or has the wrong shape for its kind."""


class TextTooLong(EncoderError):
    """A text is over the size the server accepts for encoding."""
