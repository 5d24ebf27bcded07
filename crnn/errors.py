"""Errors a user can act on; the tools print them as one line and exit with status 2 (`tool_main`)."""

import faulthandler
import functools
import sys
from collections.abc import Callable

import torch


class CrnnError(Exception):
    """Base class: the message says what is wrong, where, and what to do."""


class ConfigError(CrnnError):
    """A config file, key or value is wrong."""


class DataError(CrnnError):
    """A dataset, file, image or transcription cannot be used."""


class CheckpointError(CrnnError):
    """A checkpoint is missing, corrupt or from another project."""


def tool_main(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """The one entry of every tool (a decorator on its `main(argv)`): a CrnnError, an OSError from a
    file, or running out of memory ends it as one `error: ...` line and status 2, never a traceback;
    a crash below Python (a segfault in a native library) prints every thread's stack first."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        if not faulthandler.is_enabled():
            try:
                faulthandler.enable(all_threads=True)
            except (AttributeError, ValueError, OSError, RuntimeError):  # stderr None, or without a file descriptor
                pass
        try:
            return main(argv)
        except (MemoryError, torch.OutOfMemoryError) as err:  # the keys that lower the memory a step takes
            print(f"error: out of memory ({str(err).splitlines()[0] if str(err) else 'no detail'}): lower "
                  f"data.batch_size or data.max_width, or use train.amp=bf16", file=sys.stderr)
            return 2
        except (CrnnError, OSError) as err:
            if isinstance(err, OSError) and err.filename is not None:
                print(f"error: {err.filename}: {err.strerror or err}", file=sys.stderr)
            else:
                print(f"error: {err}", file=sys.stderr)
            return 2

    return run
