"""Runs the tools for the tests, each in a child forked from this Python, which has already imported
torch and crnn: a fresh Python spends 2-4 s of every tool call on those imports (most of the test
suite's time on a slow CPU), a forked child none. `tests/helpers.run_tool` starts it and talks to
it; nothing else should.

Protocol: one JSON request per line on stdin, {"argv": [script, *args], "env": {...}, "cwd": DIR,
"stdout": FILE, "stderr": FILE, "timeout": SECONDS}; one JSON answer per line on stdout,
{"returncode": N} or {"timed_out": true}. The child is what `python script *args` would be, as far
as a tool can tell: its own environment, working directory, sys.argv and sys.path[0], file
descriptors 0-2 (/dev/null, the two files), the interpreter's exit (non-daemon threads joined,
atexit handlers run), and its status (an uncaught exception: the traceback and 1; killed by a
signal: minus the signal). Not the same: what was read from the environment at import time (torch's
thread count is set again from OMP_NUM_THREADS, the one such variable the tests change).
"""

from __future__ import annotations

import atexit
import json
import os
import pkgutil
import runpy
import signal
import sys
import threading
import time
import traceback
from importlib import import_module

import numpy as np
import torch

import crnn

for module in pkgutil.walk_packages(crnn.__path__, "crnn."):
    import_module(module.name)

POLL_SECONDS = 0.01


def exit_status(code: object) -> int:
    """The process status Python gives `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run_child(request: dict, channel: tuple[int, int]) -> None:
    """In the forked child: become `python argv...` and exit; never returns."""
    status = 1
    try:
        for fd in channel:
            os.close(fd)
        for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                                (1, request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                                (2, request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
            opened = os.open(path, flags, 0o644)
            os.dup2(opened, fd)
            os.close(opened)
        sys.stdin = sys.__stdin__ = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stdout = sys.__stdout__ = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
        sys.stderr = sys.__stderr__ = open(2, "w", buffering=1, encoding="utf-8",  # noqa: SIM115
                                           errors="backslashreplace", closefd=False)
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(max(int(os.environ["OMP_NUM_THREADS"]), 1))
        np.random.seed()  # a fresh Python's global numpy stream is its own, not the server's
        script = request["argv"][0]
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as done:
            status = exit_status(done.code)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        except BaseException:  # noqa: BLE001 - as the interpreter would: the traceback, then status 1
            sys.excepthook(*sys.exc_info())
            status = 1
        threading._shutdown()  # the interpreter's exit: join non-daemon threads, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    except BaseException:  # noqa: BLE001 - the server's own failure: to its log (or the child's stderr)
        traceback.print_exc()
    finally:
        os._exit(status)


def wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"timed_out": True}
        time.sleep(POLL_SECONDS)


def serve() -> None:
    requests, answers = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)  # nothing but the answers reaches the channel
    with open(requests, encoding="utf-8") as lines:
        for line in lines:
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                run_child(request, (requests, answers))
            os.write(answers, (json.dumps(wait(pid, request["timeout"])) + "\n").encode())


if __name__ == "__main__":
    serve()
