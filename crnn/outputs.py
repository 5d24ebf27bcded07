"""Where the package writes: output paths checked before the model or the data is read (a
mistyped path costs one error line and nothing else), files and folders replaced whole (readers
and crashes see the old one or the new one, never a partial one), and the one file lock (a run
directory's, a data index's build).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
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
    """`write(stream)` into a temporary file beside `path`, fsynced and renamed over it (on any error
    `path` is as it was); `before_replace` runs between the write and the rename."""
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
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write` for UTF-8 text."""
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def replace_folder(out: Path, write: Callable[[Path], None], keep_existing: bool = False) -> None:
    """Run `write(folder)` on a fresh folder beside `out`, then put it in `out`'s place; the old
    `out`, if any, is moved aside first and removed after, or with `keep_existing` kept (ours is
    dropped: of several processes writing the same folder, the first one's stays, as others may be
    reading it). On any error the partial folder is removed and `out` is as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fresh = out.with_name(f".{out.name}.{os.getpid()}.new")
    old = out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    try:
        write(fresh)
        if out.exists() and not keep_existing:
            os.replace(out, old)
        try:
            os.replace(fresh, out)
        except OSError:
            if not (keep_existing and out.is_dir()):
                raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        shutil.rmtree(old, ignore_errors=True)


def lock_file(path: Path, wait: bool = True) -> IO[str] | None:
    """`path` (created if missing) opened and locked (`flock`, exclusive) until the returned file is
    closed (the OS releases it on any exit); without `wait`, None if another process holds it. A
    lock file its holder removed while we opened it is skipped for the one at `path` now."""
    while True:
        stream = open(path, "a+", encoding="utf-8")  # never truncate a lock another process holds
        try:
            fcntl.flock(stream.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            stream.close()
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(stream.fileno()), os.stat(path)):
                return stream
        stream.close()


def _check_folder(folder: Path, what: str, target: Path) -> None:
    """`folder` can be made or written into, for writing `target`; CrnnError naming `what` if not."""
    existing = next((candidate for candidate in (folder, *folder.parents) if candidate.exists()), Path("."))
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
    """The one-writer lock of a run directory (`.lock` in it, created with the folder if needed):
    a second run on the same folder is refused, naming the process that holds it; a lock file left
    by a dead process holds no lock and is taken over (`taken_over`: what it said of its holder)."""

    def __init__(self, folder: Path | str, what: str):
        self.folder, self.what = Path(folder).expanduser(), what
        self.path = self.folder / LOCK_NAME
        self.taken_over: dict | None = None
        self._stream: IO[str] | None = None
        self._created_folder = False

    def acquire(self) -> RunLock:
        check_output_dir(self.folder, self.what)
        self._created_folder = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        stream = lock_file(self.path, wait=False)
        if stream is None:
            holder = _read_holder(self.path)
            described = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, started "
                         f"{holder.get('started', '?')}") if holder else "process unknown"
            raise CrnnError(f"{self.what}: {self.folder} is in use by another run ({described}); wait for it "
                            f"to end, stop it, or give another {self.what}")
        self.taken_over = _read_holder(self.path) or None
        stream.truncate(0)
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
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                self.folder.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def json_text(value, **options) -> str:
    """`json.dumps(value, **options)` with NaN and infinities (in dicts, lists, tuples) as null:
    JSON has no such numbers, and strict parsers refuse the file."""
    def finite(item):
        if isinstance(item, dict):
            return {key: finite(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [finite(inner) for inner in item]
        return None if isinstance(item, float) and not math.isfinite(item) else item

    return json.dumps(finite(value), allow_nan=False, **options)
