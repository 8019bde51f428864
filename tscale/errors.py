"""The project's exception types.

Every error a user can cause derives from :class:`TscaleError`; the CLI prints its message on one
line and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class TscaleError(Exception):
    """Base class of the errors a user can cause and fix (bad config, bad data, bad path)."""


class ConfigError(TscaleError):
    """A YAML config or a command-line override is invalid; the message names the key path."""


class DataError(TscaleError):
    """A dataset, a record or a tokenizer is unusable; the message names the file or row."""


class CheckpointError(TscaleError):
    """A checkpoint is missing, incomplete or does not match the run it is loaded into."""


class ShapeError(TscaleError):
    """Arguments of a library function disagree in shape, structure or dtype."""


class TrainingError(TscaleError):
    """Training cannot go on as configured (e.g. every step's gradients are non-finite); the
    message says what happened, where the last good checkpoint is, and which key to change."""


class RewardError(TrainingError):
    """A reward function broke its contract (wrong length or type, a non-finite value, a column
    it needs is missing) or raised too often; the message names the function."""
