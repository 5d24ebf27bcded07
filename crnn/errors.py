"""Errors a user can act on. The tools print them as one line and exit with status 2."""

import sys


class CrnnError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class ConfigError(CrnnError):
    """A config file, key or value is wrong."""


class DataError(CrnnError):
    """A dataset, file, image or transcription cannot be used."""


class CheckpointError(CrnnError):
    """A checkpoint is missing, corrupt or from another project."""


def report_failure(err: Exception) -> int:
    """Print a tool's CrnnError, or the OSError of an output it could not write, as one line on
    stderr; the exit status to return (2)."""
    if isinstance(err, OSError):
        print(f"error: cannot write {err.filename}: {err.strerror}", file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)
    return 2
