"""Errors a user can act on. The tools print them as one line and exit with status 2 (`tool_main`)."""

import faulthandler
import functools
import sys
from collections.abc import Callable


class CrnnError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class ConfigError(CrnnError):
    """A config file, key or value is wrong."""


class DataError(CrnnError):
    """A dataset, file, image or transcription cannot be used."""


class CheckpointError(CrnnError):
    """A checkpoint is missing, corrupt or from another project."""


def report_failure(err: CrnnError | OSError) -> int:
    """Print a CrnnError, or an OSError (a file that could not be read or written), as one line on
    stderr; the exit status to return (2)."""
    if isinstance(err, OSError) and err.filename is not None:
        print(f"error: {err.filename}: {err.strerror or err}", file=sys.stderr)
    else:
        print(f"error: {err}", file=sys.stderr)
    return 2


def enable_crash_traceback() -> None:
    """Dump the Python stack of every thread on stderr should the process die of SIGSEGV, SIGABRT,
    SIGBUS, SIGFPE or SIGILL (a no-op where already enabled, or where stderr is not a real file)."""
    if faulthandler.is_enabled():
        return
    try:
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError, OSError, RuntimeError):  # stderr None, or without a file descriptor
        pass


def tool_main(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """The one entry of every tool: `main(argv)` runs, and a user error (CrnnError, or an OSError
    from a file it could not read or write) ends it as one `error: ...` line and exit status 2,
    never a traceback. Use as a decorator on each tool's `main`.

    A crash below Python (a segfault or an abort in a native library) prints the Python stack of
    every thread on stderr first (`faulthandler`), so that a report of one says where it happened."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        enable_crash_traceback()
        try:
            return main(argv)
        except (CrnnError, OSError) as err:
            return report_failure(err)

    return run
