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


#: what a CUDA library's RuntimeError says when an allocation failed: torch's allocator (a wrapped error), the CUDA
#: runtime, NCCL ("Cuda failure 'out of memory'", as a DistBackendError)
OUT_OF_MEMORY_TEXTS = ("CUDA out of memory", "CUDA error: out of memory", "Cuda failure 'out of memory'")


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA allocation that failed: torch's OutOfMemoryError, or a RuntimeError saying so (OUT_OF_MEMORY_TEXTS)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and any(text in str(exc) for text in OUT_OF_MEMORY_TEXTS))


#: attribute of an out-of-memory error: what the rank was doing (`while_doing`), for the CLI's message
WHILE_ATTR = "rlhf_while"


def while_doing(exc: BaseException, what: str) -> BaseException:
    """`exc` marked with what failed (the first mark stays): "writing checkpoint-00000004", say."""
    if not hasattr(exc, WHILE_ATTR):
        setattr(exc, WHILE_ATTR, what)
    return exc
