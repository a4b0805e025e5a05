"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class RlhfError(Exception):
    """Base class: a problem with the user's input or environment, explained in one message.

    every_rank: raised by all ranks together (the same config, data or agreed decision), so printed once."""

    exit_code = 1
    every_rank = False


class ConfigError(RlhfError):
    """A config key, value, override or path is wrong. Exit code 2 (usage error)."""

    exit_code = 2
    every_rank = True


class DataError(RlhfError):
    """A data file or row is malformed; the message names the file and row."""

    every_rank = True


class CheckpointError(RlhfError):
    """A checkpoint or output directory is missing, incomplete or incompatible."""


class NonFinite(RlhfError):
    """A loss, reward, log-prob, value or gradient norm is NaN or infinite (ranks agree before raising)."""

    every_rank = True
