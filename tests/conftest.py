"""Shared fixtures: small datasets that the tests build themselves (no downloads, no shared data),
and the tiny models trained once per session for every test that reads one.

The `slow` marker (setup.cfg) marks what takes seconds: training, a tool's run, a real process. A
test that uses a trained model of this file (run_dir, checkpoint, calibrated_checkpoint) is marked
slow here, so `pytest -m "not slow"` never trains one."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

# Keep tests deterministic and light on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# The fixtures import tests.helpers only when they run: it imports crnn and torch, which this file,
# loaded before any test module, leaves to the tests (torch must start after the setting above).

TRAINED = {"run_dir", "checkpoint", "calibrated_checkpoint"}


def pytest_collection_modifyitems(items):
    for item in items:
        if TRAINED.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", autouse=True)
def index_dir(tmp_path_factory) -> Path:
    """The data indexes the tests build (crnn.data.index) go to a folder of the test session, not
    to the user's cache (the tools run in a fresh Python inherit it too)."""
    folder = tmp_path_factory.mktemp("index")
    os.environ["CRNN_INDEX_DIR"] = str(folder)
    return folder


@pytest.fixture
def folder_split(tmp_path: Path):
    """A folder split: 6 PNG lines and gt.tsv; returns (folder, texts)."""
    from tests.helpers import draw_line

    def make(name: str = "lines", texts: tuple[str, ...] = ("abc", "hello world", "the cat", "a b c", "dog", "bed")):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for i, text in enumerate(texts):
            draw_line(text).save(folder / f"line{i}.png")
            rows.append(f"line{i}.png\t{text}")
        (folder / "gt.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return folder, list(texts)
    return make


@pytest.fixture
def parquet_split(tmp_path: Path):
    """A parquet file in the Teklia/IAM-line schema, written through `datasets`."""
    import datasets

    from tests.helpers import draw_line

    def make(name: str = "train.parquet", texts: tuple[str, ...] = ("abc", "hello", "the cat")):
        features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
        table = datasets.Dataset.from_dict(
            {"image": [draw_line(t).convert("RGB") for t in texts], "text": list(texts)}, features=features)
        path = tmp_path / name
        table.to_parquet(str(path))
        return path, list(texts)
    return make


@pytest.fixture
def rng() -> random.Random:
    return random.Random(0)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory) -> Path:
    """A tiny model trained once (one epoch on synthetic lines): checkpoints + train_texts.txt."""
    from crnn.config import load_config
    from crnn.trainer import fit
    from tests.helpers import TINY

    path = tmp_path_factory.mktemp("tiny_run")
    fit(load_config(TINY, [f"train.output_dir={path}"]))
    return path


@pytest.fixture(scope="session")
def checkpoint(run_dir) -> Path:
    return run_dir / "checkpoints" / "best.pt"


@pytest.fixture(scope="session")
def calibrated_checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained once with a validation split large enough for its calibration to be
    fitted at the end of the run: checkpoints/best.pt."""
    from crnn.config import load_config
    from crnn.trainer import fit
    from tests.helpers import TINY

    path = tmp_path_factory.mktemp("calibrated_run")
    fit(load_config(TINY, [f"train.output_dir={path}", "data.synthetic.validation=60"]))
    return path / "checkpoints" / "best.pt"
