"""Typed errors. The CLI prints any ``DiffusekitError`` as one line (no traceback unless --debug)."""

from __future__ import annotations


class DiffusekitError(Exception):
    """Base class for every error the project raises about the user's input or files."""


class ConfigError(DiffusekitError, ValueError):
    """A bad config file, key, value or command-line flag (a ``ValueError`` too: a bad value)."""


class DataError(DiffusekitError):
    """A dataset or image file that cannot be used; the message names the file."""


class CheckpointError(DiffusekitError):
    """A checkpoint that is missing, corrupt, incomplete or does not fit the model."""


class TrainingError(DiffusekitError):
    """Training cannot go on (for example, a non-finite loss); the message names the step."""


class SamplingError(DiffusekitError):
    """Sampling produced values that cannot be written or scored (NaN or infinity)."""


class OutputError(DiffusekitError):
    """A destination that cannot be written (not a folder, not ours, read-only, full); the message names it."""


class CheckpointFormatWarning(UserWarning):
    """A checkpoint of an older format that loads but cannot be verified as fully as the current one."""
