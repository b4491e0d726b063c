"""What can go wrong with a checkpoint; every message names the checkpoint or file.

``checkpoint.resume=auto`` falls back past an :class:`UnusableCheckpointError` (to the
previous complete checkpoint) and stops on any other :class:`CheckpointError`; a
checkpoint named explicitly is refused either way.
"""

from __future__ import annotations

from common.errors import UserError


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


class UnusableCheckpointError(CheckpointError):
    """A complete-looking checkpoint that this trainer does not resume from: it lacks
    what format 2 records (its ``format``, a file's SHA-256), or its bytes cannot be
    trusted (:class:`DamagedCheckpointError`)."""


class DamagedCheckpointError(UnusableCheckpointError):
    """A checkpoint whose bytes cannot be trusted: a checksum mismatch, an unreadable
    file, non-finite weights."""


class NonFiniteStateError(CheckpointError):
    """The state to be saved holds NaN or Inf values; nothing was written."""
