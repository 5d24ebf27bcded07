"""Where the tools write, guarded: output paths checked before any work, one writer per run
directory, folders replaced whole.

- `check_output_dir` / `check_output_file`: a path a tool will write is usable (no file where a
  folder is needed, the nearest existing folder writable), checked before the model or the data is
  read, so a mistyped path costs one error line and nothing else.
- `RunLock`: the lock of a run directory (`.lock` in it, an OS file lock held for the life of the
  run and released by the OS on any exit, SIGKILL included): a second `tools/train.py` on the
  same `train.output_dir` is refused, naming the process that holds it; a lock file left by a dead
  process holds no lock and is taken over.
- `atomic_write`: a file written beside its destination, synced and renamed over it (checkpoints,
  configs, XML pages, metrics), so readers and crashes see the old file or the new one.
- `replace_folder`: a folder written beside its destination and renamed into place, so the
  destination is the old folder or the new one, never a mix (tools/export.py).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from crnn.errors import CrnnError

LOCK_NAME = ".lock"


def atomic_write(path: Path, write: Callable[[IO[bytes]], None],
                 before_replace: Callable[[], None] | None = None) -> None:
    """Write `path` through `write(stream)` into a temporary file beside it, fsync, rename over.

    Readers (and a crash at any instant) see the old content or the new, never a partial file. On
    an OSError the temporary file is removed and the error raised. `before_replace` runs between
    the write and the rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # never shared by two writers
    try:
        with open(temporary, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` for UTF-8 text."""
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def _first_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_folder(folder: Path, what: str, target: Path) -> None:
    """`folder` can be made or written into, for writing `target`; CrnnError naming `what` if not."""
    existing = _first_existing(folder)
    if not existing.is_dir():
        where = "it is" if existing == target else f"{existing} is"
        raise CrnnError(f"{what}: {target}: {where} a file, not a folder; give a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CrnnError(f"{what}: {target}: cannot write in {existing} (permission denied)")


def check_output_dir(path: Path | str, what: str) -> Path:
    """A folder a tool will create or write into: CrnnError naming `what` (the option or config
    key) if a file stands where it or one of its parents should be, or if it cannot be written."""
    path = Path(path).expanduser()
    _check_folder(path, what, path)
    return path


def check_output_file(path: Path | str, what: str) -> Path:
    """A file a tool will write: CrnnError naming `what` if it is a folder, if its folder cannot be
    made or written, or if it exists and cannot be overwritten."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CrnnError(f"{what}: {path} is a folder; give a file name")
    _check_folder(path.parent, what, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise CrnnError(f"{what}: {path}: cannot overwrite it (permission denied)")
    return path


class RunLock:
    """The one-writer lock of a run directory; `acquire` creates the folder if needed. Use as
    `with RunLock(folder, "train.output_dir"):` or acquire/release. `taken_over` says, after
    acquiring, which dead process's lock file was found (None if none)."""

    def __init__(self, folder: Path | str, what: str):
        self.folder, self.what = Path(folder).expanduser(), what
        self.path = self.folder / LOCK_NAME
        self.taken_over: dict | None = None
        self._stream = None
        self._created_folder = False

    def acquire(self) -> RunLock:
        check_output_dir(self.folder, self.what)
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            stream = open(self.path, "a+", encoding="utf-8")  # never truncate a lock another process holds
            try:
                fcntl.flock(stream.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = _describe(_read_holder(stream))
                stream.close()
                raise CrnnError(f"{self.what}: {self.folder} is in use by another run ({holder}); wait for it "
                                f"to end, stop it, or give another {self.what}") from None
            if self.path.exists() and os.path.samefile(self.path, stream.name):
                break
            stream.close()  # its holder removed this file as we opened it: lock the one there now
        previous = _read_holder(stream)
        self.taken_over = previous or None
        stream.seek(0)
        stream.truncate()
        stream.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        stream.flush()
        self._stream = stream
        return self

    def release(self) -> None:
        """Give the lock up (idempotent). A folder this lock created and nothing else wrote into is
        removed too (a run that failed before writing anything leaves nothing behind)."""
        if self._stream is None:
            return
        self.path.unlink(missing_ok=True)  # while still held: no one else can be holding this file
        self._stream.close()
        self._stream = None
        if self._created_folder:
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(stream) -> dict:
    stream.seek(0)
    try:
        holder = json.loads(stream.read() or "{}")
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "process unknown"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def replace_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` on a fresh folder beside `out`, then put it in `out`'s place (the old
    `out`, if any, is moved aside first and removed after). On any error the partial folder is
    removed and `out` is as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = out.with_name(f".{out.name}.{os.getpid()}.new")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    try:
        write(fresh)
        if out.exists():
            os.replace(out, old)
        os.replace(fresh, out)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
