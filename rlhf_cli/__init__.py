"""The `rlhf` command line: config loading, launching, reports. Imports `stages`, never the reverse."""

from stages import __version__

__all__ = ["__version__"]
