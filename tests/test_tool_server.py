"""The tests' tool runner (tests/tool_server.py) against a fresh Python: the same status, output and
surroundings for a script, so the tool tests that run through it test what a user's shell runs."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, ToolServer

SCRIPT = r"""
import json, os, sys, threading, atexit, time
import torch
mode = sys.argv[1]
atexit.register(lambda: print("atexit ran"))
if mode == "surroundings":
    print(json.dumps({"argv": sys.argv[1:], "cwd": os.getcwd(), "path0": sys.path[0], "name": __name__,
                      "marker": os.environ.get("CRNN_MARKER"), "threads": torch.get_num_threads()}))
    sys.stdout.write("carriage\rreturn\r\nend\n")
elif mode == "status":
    print("to stdout"); print("to stderr", file=sys.stderr); sys.exit(3)
elif mode == "message":
    sys.exit("a message")
elif mode == "raises":
    raise ValueError("broken here")
elif mode == "signal":
    import signal; os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)
elif mode == "thread":
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread joined"))).start()
elif mode == "sleep":
    time.sleep(30)
"""


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "probe.py"
    path.write_text(SCRIPT)
    return path


def both(script, *args, env=None, timeout=60):
    """(the server's result, a fresh Python's) of `python script *args` from the repository root."""
    command = [sys.executable, str(script), *args]
    env = {**os.environ, "CRNN_MARKER": "here", **(env or {})}
    return (ToolServer.shared().run(command, env, timeout),
            subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=timeout))


@pytest.mark.parametrize("mode", ["surroundings", "status", "message", "signal", "thread"])
def test_a_script_run_by_the_server_is_what_a_fresh_python_gives(script, mode):
    served, fresh = both(script, mode, env={"OMP_NUM_THREADS": "1"})
    assert (served.returncode, served.stdout, served.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    expected_status = {"surroundings": 0, "status": 3, "message": 1, "signal": -15, "thread": 0}[mode]
    assert served.returncode == expected_status
    if mode == "surroundings":
        assert '"threads": 1' in served.stdout and '"marker": "here"' in served.stdout
        assert served.stdout.endswith("carriage\nreturn\nend\natexit ran\n")
    if mode == "thread":
        assert served.stdout == "thread joined\natexit ran\n"


def test_an_uncaught_exception_gives_its_traceback_and_status_1(script):
    served, fresh = both(script, "raises")
    assert served.returncode == fresh.returncode == 1
    assert "Traceback" in served.stderr and served.stderr.splitlines()[-1] == "ValueError: broken here"
    assert served.stderr.splitlines()[-1] == fresh.stderr.splitlines()[-1]


def test_a_script_past_its_timeout_is_killed_and_reported(script):
    with pytest.raises(subprocess.TimeoutExpired):
        ToolServer.shared().run([sys.executable, str(script), "sleep"], dict(os.environ), 1)
    assert ToolServer.shared().run([sys.executable, str(script), "status"], dict(os.environ), 60).returncode == 3
