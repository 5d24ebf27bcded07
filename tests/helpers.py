"""Plain helpers shared by the test modules (fixtures live in conftest.py): paths, the data the tests
draw or render themselves, running the tools in a fresh Python, reading a run's metrics."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
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
    as text; `env` is laid over this process's environment."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


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
