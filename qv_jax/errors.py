"""Typed errors raised by qv-jax.

Every error a user can cause with bad input derives from :class:`QVError`, so callers can catch the whole family
or one kind. Messages name the offending file, tensor or argument and the cause.
"""

from __future__ import annotations


class QVError(Exception):
    """Base class of every error qv-jax raises on purpose."""


class VideoError(QVError):
    """A video cannot be opened, probed or decoded (missing, empty, corrupt, truncated, no video stream)."""

    def __init__(self, path: object, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class DecodeWorkerError(VideoError):
    """A decoder worker process crashed, hung past its timeout, or reported a decoding failure."""


class CheckpointError(QVError):
    """A model directory or checkpoint is missing files, or holds missing, unexpected or misshaped tensors."""


class ConfigError(QVError):
    """A model or run configuration is invalid or unsupported."""


class InputError(QVError, ValueError):
    """Arguments to a public function are inconsistent (shapes, token counts, sampling options)."""


class MemoryMismatchError(QVError):
    """A saved VideoMemory was made by a different model or configuration than the one asked to use it."""


class OutputError(QVError):
    """An output path cannot be written: it is an input, a path of the wrong kind, or an existing output that may
    not be replaced (not empty and no ``overwrite``, or not written by qv-jax)."""

    def __init__(self, path: object, cause: str):
        self.path = str(path)
        self.cause = cause
        super().__init__(f"{self.path}: {cause}")


class ShardingError(QVError):
    """A model or cache cannot be laid out on the requested device mesh."""
