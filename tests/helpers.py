"""Plain helpers shared by the test modules (fixtures live in conftest.py): paths, the data the tests
draw or render themselves, calling the tools (in this Python, or in a fresh one), reading a run's metrics."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import os
import random
import signal
import subprocess
import sys
import traceback
import xml.etree.ElementTree as ET
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import xmlschema
from PIL import Image, ImageDraw

from crnn.config import AugmentConfig, load_config
from crnn.data import Preprocess, synthetic

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny.yaml"
SCHEMAS = REPO / "tests" / "schemas"  # the official XSDs, vendored with their licences (README.md there)

STRONG = AugmentConfig(prob=0.8, shear=0.4, rotation=1.5, scale=0.2, distortion=3.0, morphology=2.0)


def run_tool(script, *args, env=None) -> subprocess.CompletedProcess:
    """A tool of tools/ called in this Python: `main([*args])` of `script` (e.g. "tools/train.py"),
    from the repository root, as `python script *args` would run it but without a new interpreter's
    2-4 s of imports. Returns its exit status (an uncaught exception: its traceback on stderr and 1,
    as a fresh Python gives) and what it printed on stdout and stderr, console log lines included.
    `env` is laid over os.environ for the call. What the process-wide state of the test session
    would keep from the call (root log handlers and level, the working directory, sys.argv, the
    RNGs, torch's thread count and deterministic mode) is put back afterwards. For what only a
    real process shows (signals, kills, torchrun, import time) use `run_python`."""
    argv = [str(arg) for arg in args]
    main = load_tool(script).main
    stdout, stderr = io.StringIO(), io.StringIO()
    with tool_surroundings(script, argv, env), redirect_stdout(stdout), redirect_stderr(stderr):
        try:
            status = main(argv)
        except SystemExit as done:  # argparse's --help and usage errors
            status = done.code
        except Exception:
            traceback.print_exc()
            status = 1
    if status is None:
        status = 0
    elif not isinstance(status, int):
        stderr.write(f"{status}\n")
        status = 1
    return subprocess.CompletedProcess([script, *argv], status, stdout.getvalue(), stderr.getvalue())


@functools.cache
def _load_tool(path: Path):
    spec = importlib.util.spec_from_file_location(f"tools_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (dataclasses and pickle look a class's module up)
    spec.loader.exec_module(module)
    return module


def load_tool(script):
    """The module of a tools/ script (imported once per test session, not as __main__)."""
    return _load_tool((REPO / script).resolve())


@contextmanager
def tool_surroundings(script, argv: list[str], env: dict | None):
    """What a fresh `python script *argv` starts with, as far as a tool's main can tell, for the
    time of one call: the working directory, sys.argv, the environment, and a root logger with no
    handlers (so that `crnn.runlog.setup_console_logging` logs to the captured stderr, as it would
    in a new process); then the test session's state back as it was."""
    saved_env, saved_cwd, saved_argv = dict(os.environ), os.getcwd(), sys.argv
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    saved_torch = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    saved_cudnn = torch.backends.cudnn.benchmark
    try:
        os.environ.update({key: str(value) for key, value in (env or {}).items()})
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():
            torch.set_num_threads(max(int(os.environ["OMP_NUM_THREADS"]), 1))
        os.chdir(REPO)
        sys.argv = [str(script), *argv]
        root.handlers = []
        root.setLevel(logging.WARNING)
        yield
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers, root.level = saved_handlers, saved_level
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        torch.set_num_threads(saved_torch[0])
        torch.use_deterministic_algorithms(saved_torch[1])
        torch.backends.cudnn.benchmark = saved_cudnn


def run_python(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python *args` in a fresh Python from the repository root (e.g. "-m", "torch.distributed.run",
    ... or "tools/train.py", ...), output captured as text; `env` is laid over this process's
    environment. For what only a real process shows: its exit on a signal, a kill, torchrun's ranks,
    what happens at import time; everything else calls the tool in this Python (`run_tool`). Past
    `timeout` (or on Ctrl-C) it is killed with every process it started (torchrun's ranks too)."""
    command = [sys.executable, *map(str, args)]
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}, start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except BaseException:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def torchrun(script, *args, procs=2) -> subprocess.CompletedProcess:
    """`script` under torchrun with `procs` processes on this machine, one thread each; asserted to succeed."""
    result = run_python("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", script, *args,
                      env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(run_dir) -> list[dict]:
    """The records of a run directory's metrics.jsonl, one per epoch."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def draw_line(text: str, height: int = 32) -> Image.Image:
    """A plain printed line (PIL's default font) on white paper, mode 'L'."""
    image = Image.new("L", (12 * len(text) + 16, height), 255)
    ImageDraw.Draw(image).text((8, height // 4), text, fill=0)
    return image


def synthetic_folder(root, count, seed=0):
    """Synthetic handwriting-like lines written as PNG + gt.tsv (a `folder` split)."""
    root.mkdir(parents=True)
    rows = []
    for i in range(count):
        text = synthetic.sample_text(random.Random(f"{seed}:{i}"), 1, 2)
        synthetic.render_line(text, random.Random(f"{seed}:{i}:img"), 32).save(root / f"{i}.png")
        rows.append(f"{i}.png\t{text}")
    (root / "gt.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return root


def ink_lines(count, height=64, seed=0):
    """Synthetic handwriting as float ink `(1, H, W)` in [0, 1], of varied widths."""
    lines = []
    for i in range(count):
        text = synthetic.sample_text(random.Random(f"{seed}:{i}"), 1, 3)
        image = synthetic.render_line(text, random.Random(f"{seed}:{i}:image"), height)
        lines.append(Preprocess(height)(image).float() / 255)
    return lines


def pad_batch(lines, width=None):
    width = width or max(line.shape[-1] for line in lines)
    return torch.stack([F.pad(line, (0, width - line.shape[-1])) for line in lines]), torch.tensor(
        [line.shape[-1] for line in lines])


def overfit_config(lines, run_dir, *overrides):
    """tiny.yaml on the `folder` split `lines` (train = validation), batch 4, no augmentation, no
    shortcut head, a constant LR of 1e-2: a model that learns a few lines by heart."""
    return load_config(TINY, ["data.source=folder", f"data.train={lines}", f"data.validation={lines}",
                              "data.batch_size=4", "data.augment.prob=0", "model.shortcut=false", "train.lr=1e-2",
                              "train.grad_clip=0", "train.warmup_steps=0", "train.min_lr_ratio=1",
                              "train.val_images=0", f"train.output_dir={run_dir}", *overrides])


@functools.cache
def _schema(namespace: str) -> xmlschema.XMLSchema:
    """The official schema of an ALTO v4 (any 4.x: alto-4-4.xsd) or PAGE 2019 namespace, read from
    tests/schemas only: `allow="local"` refuses any network fetch, and ALTO's xlink import is the
    vendored copy."""
    files = {"http://www.loc.gov/standards/alto/ns-v4#": "alto-4-4.xsd",
             "http://schema.primaresearch.org/PAGE/gts/pagecontent/2019-07-15": "pagecontent-2019-07-15.xsd"}
    assert namespace in files, f"no vendored schema for the namespace {namespace!r}"
    return xmlschema.XMLSchema(str(SCHEMAS / files[namespace]), allow="local",
                               locations={"http://www.w3.org/1999/xlink": str(SCHEMAS / "xlink.xsd")})


def schema_errors(path) -> list[str]:
    """Why the ALTO v4 or PAGE 2019 file `path` breaks its schema (the namespace it declares picks
    it), as short messages; [] when it validates."""
    namespace = ET.parse(path).getroot().tag[1:].split("}", 1)[0]
    return [f"{error.path}: {error.reason}" for error in _schema(namespace).iter_errors(str(path))]

