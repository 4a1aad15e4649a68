"""The project's error types: the CLI turns each into one line and exit code 1."""

from __future__ import annotations


class DuQuantError(Exception):
    """Base of every error duquant raises on purpose; its message is meant for the user."""


class ConfigError(DuQuantError, ValueError):
    """An option or option combination that cannot work (bad --bits, bad regex...)."""


class CheckpointError(DuQuantError):
    """A checkpoint that cannot be read: missing, empty, corrupt, unsupported tensors."""


class PackError(DuQuantError):
    """A pack that cannot be written or read: exists, corrupt, newer format, missing tensors."""


class MismatchError(DuQuantError):
    """A pack that does not fit a model or checkpoint (shapes, names, stale source weights)."""


class TransformError(DuQuantError):
    """A transform that failed its checks (not orthogonal, not a permutation, not finite)."""
