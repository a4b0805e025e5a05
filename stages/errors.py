"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""

import os


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


#: set (to "1") by `rlhf pipeline` in the environment of the stages it runs, whose advice on resuming then names
#: the pipeline (a PYTHON* variable: DeepSpeed's runner passes those on to every node)
PIPELINE_STAGE_VAR = "PYTHON_RLHF_PIPELINE_STAGE"


def resume_with(setting: str = "") -> str:
    """How a user continues a run that stopped: "with --resume" (and " --set SETTING"); for a stage that `rlhf
    pipeline` runs (PIPELINE_STAGE_VAR set), "by running the pipeline again" (and " with SETTING in a `set:`
    list of the pipeline file ... or in the stage's config": a key free on resume, such as monitor.action), as the
    pipeline resumes a partial stage itself and takes no --resume.

    >>> resume_with(), resume_with("monitor.action=warn")
    ('with --resume', 'with --resume --set monitor.action=warn')
    """
    if os.environ.get(PIPELINE_STAGE_VAR):
        return "by running the pipeline again" + (
            f" with {setting} in a `set:` list of the pipeline file (the stage's, or the PPO run's) or in the "
            "stage's config" if setting else "")
    return "with --resume" + (f" --set {setting}" if setting else "")
