"""Plain helpers shared by the test modules (fixtures live in conftest.py): paths, the data the tests
draw or render themselves, running the tools in a fresh Python, reading a run's metrics."""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from crnn.config import AugmentConfig, load_config
from crnn.data import Preprocess, Vocab, build_dataset, build_loader, load_records, synthetic
from crnn.engine import EpochStats, TrainSetup, train_epoch
from crnn.models import build_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "experiments" / "tiny.yaml"

STRONG = AugmentConfig(prob=0.8, shear=0.4, rotation=1.5, scale=0.2, distortion=3.0, morphology=2.0)


def run_tool(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    """`python *args` from the repository root (e.g. "tools/train.py", "--cfg", TINY), output captured
    as text; `env` is laid over this process's environment. A script in tools/ runs in a child of
    tests/tool_server.py (a Python with torch and crnn already imported: each call saves their 2-4 s
    of imports); anything else ("-m", "-c"), or every call when CRNN_TEST_FRESH_PYTHON=1, in a fresh
    Python."""
    command, env = [sys.executable, *map(str, args)], {**os.environ, **(env or {})}
    if os.environ.get("CRNN_TEST_FRESH_PYTHON") != "1" and (REPO / command[1]).resolve().parent == REPO / "tools":
        return ToolServer.shared().run(command, env, timeout)
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


class ToolServer:
    """The one tests/tool_server.py of this test session, started at its first call."""

    _shared: ToolServer | None = None

    @classmethod
    def shared(cls) -> ToolServer:
        if cls._shared is None or cls._shared.process.poll() is not None:
            cls._shared = cls()
        return cls._shared

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="crnn-tools-"))
        with open(self.folder / "server.log", "w") as log:
            self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "tool_server.py")], cwd=REPO,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.calls = 0
        atexit.register(self.close)

    def run(self, command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
        self.calls += 1
        out, err = self.folder / f"{self.calls}.out", self.folder / f"{self.calls}.err"
        request = {"argv": command[1:], "env": env, "cwd": str(REPO), "stdout": str(out), "stderr": str(err),
                   "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"tests/tool_server.py ended: {(self.folder / 'server.log').read_text()[-3000:]}")
        answer = json.loads(answer)
        stdout, stderr = (self.text(path) for path in (out, err))
        if answer.get("timed_out"):
            raise subprocess.TimeoutExpired(command, timeout, stdout, stderr)
        return subprocess.CompletedProcess(command, answer["returncode"], stdout, stderr)

    @staticmethod
    def text(path: Path) -> str:
        """A captured stream as `subprocess.run(text=True)` gives it (universal newlines)."""
        text = path.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n").replace("\r", "\n")
        path.unlink()
        return text

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


def torchrun(script, *args, procs=2) -> subprocess.CompletedProcess:
    """`script` under torchrun with `procs` processes on this machine, one thread each; asserted to succeed."""
    result = run_tool("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", script, *args,
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


def run_epoch(model, loader, setup, epoch, step=0, stop_at=None) -> tuple[EpochStats, int]:
    """`crnn.engine.train_epoch` consumed as the trainer consumes it, to the end of the loader or, with
    `stop_at`, up to that step: (the epoch's stats, the step after it)."""
    stats, last = EpochStats(), step  # train_epoch adds to `stats` in place
    for last, _ in train_epoch(model, loader, setup, epoch, step, stats, show_progress=False):
        if stop_at is not None and last >= stop_at:
            break
    return stats, last


def overfit_tiny(lines, max_epochs, stop_below, *overrides):
    """tiny.yaml trained on the `folder` split `lines` (batch 4, no augmentation, constant LR 1e-2)
    until an epoch's loss is below `stop_below`: (cfg, records, vocab, model, loader, (first epoch's
    stats, last epoch's stats))."""
    cfg = load_config(TINY, ["data.source=folder", f"data.train={lines}", "data.batch_size=4",
                             "data.augment.enabled=false", "model.shortcut=false", "train.lr=1e-2",
                             "train.grad_clip=0", "train.warmup_steps=0", "train.schedule=constant", *overrides])
    records = load_records(cfg.data, "train")
    vocab = Vocab.from_texts(records.texts)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab))
    setup = TrainSetup.from_config(cfg, model=model, device=torch.device("cpu"), total_steps=max_epochs)
    loader = build_loader(cfg.data, build_dataset(cfg.data, records, vocab, train=True), train=True)
    first = None
    for epoch in range(max_epochs):
        loader.batch_sampler.set_epoch(epoch)
        stats, _ = run_epoch(model, loader, setup, epoch)
        first = first or stats
        if stats.loss < stop_below:
            break
    return cfg, records, vocab, model, loader, (first, stats)
