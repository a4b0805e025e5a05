"""The `rlhf` command line: config loading, launching, reports. Imports `stages`, never the reverse."""

import os

# torch's profiler (kineto; logging.profile_step, rlhf bench ppo) writes "USDT: ... profiler_start/stop" lines
# to stderr at every log level below 6, which silences it (its rare errors too: the profile's Python side still
# raises). A KINETO_LOG_LEVEL of the user's wins. kineto reads it when torch loads: before anything imports torch.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

from stages import __version__  # noqa: E402 - after the environment it must see

__all__ = ["__version__"]
