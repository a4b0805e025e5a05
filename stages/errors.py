"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class RlhfError(Exception):
    """Base class: a problem with the user's input or environment, explained in one message."""

    exit_code = 1


class ConfigError(RlhfError):
    """A config key, value, override or path is wrong. Exit code 2 (usage error)."""

    exit_code = 2


class DataError(RlhfError):
    """A data file or row is malformed; the message names the file and row."""


class CheckpointError(RlhfError):
    """A checkpoint or output directory is missing, incomplete or incompatible."""
