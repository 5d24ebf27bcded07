"""A wrong answer is worse than an error: a config or a split that cannot give a true result is refused
with one `error:` line naming the key, file or line, before anything of the run is written
(docs/faults.md, "Refused rather than wrong")."""

from __future__ import annotations

import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from crnn.config import load_config
from crnn.errors import ConfigError
from tests.helpers import TINY, run_tool


def unresolvable_parquet(path):
    """A Teklia/IAM-line parquet whose image cells hold relative paths to files that do not exist."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cells = pa.array([{"bytes": None, "path": f"lines/{i}.png"} for i in range(3)], image)
    pq.write_table(pa.table({"image": cells, "text": ["abc", "hello", "the cat"]}), path)
    return path


@pytest.mark.slow
def test_evaluating_a_split_that_cannot_be_read_is_an_error_not_a_perfect_score(tmp_path, checkpoint):
    split = unresolvable_parquet(tmp_path / "test.parquet")
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--json", tmp_path / "out.json",
                      "data.source=parquet", f"data.test={split}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error: data.test: no line of" in result.stderr
    assert f"image file {tmp_path / 'lines' / '0.png'} not found" in result.stderr  # the path it tried
    assert "0.00%" not in result.stdout and not (tmp_path / "out.json").exists()


def test_training_on_a_split_that_cannot_be_read_writes_nothing(tmp_path):
    split = unresolvable_parquet(tmp_path / "train.parquet")
    run_dir = tmp_path / "run"
    result = run_tool("tools/train.py", "--cfg", TINY, "data.source=parquet", f"data.train={split}",
                      f"data.validation={split}", f"train.output_dir={run_dir}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: data.train: no line of" in result.stderr and "not found" in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("text, where", [
    ("data:\n  batch_size: 8\ntrain:\n  epochs: 2\ndata:\n  source: folder\n", "line 5: 'data' is set twice (lines 1 and 5)"),
    ("data:\n  batch_size: 8\n  batch_size: 2\n", "line 3: 'data.batch_size' is set twice (lines 2 and 3)"),
])
def test_a_key_set_twice_in_yaml_is_refused_with_both_lines(tmp_path, text, where):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path} {where}")):
        load_config(path)


@pytest.mark.slow
def test_a_refused_resume_leaves_the_run_record_as_it_was(tmp_path, run_dir):
    run = shutil.copytree(run_dir, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "train_texts.txt", "metrics.jsonl")}
    result = run_tool("tools/train.py", "--cfg", TINY, f"train.output_dir={run}", "train.resume=auto",
                      "model.channels=[16,48]", "data.synthetic.train=24")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot resume: the checkpoint's model differs in model.channels" in result.stderr
    assert {name: (run / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("key", ["train.lr", "data.augment.prob", "train.weight_decay", "decode.lm_weight",
                                 "train.max_minutes", "train.stop_after_minutes", "data.cache_mb", "train.grad_clip"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused_for_every_float_option(key, value):
    with pytest.raises(ConfigError, match=rf"command-line override: '{key}' must be a finite number, got {value}"):
        load_config(TINY, [f"{key}={value}"])


def test_nan_in_a_yaml_file_is_refused_with_its_line(tmp_path):
    path = tmp_path / "nan.yaml"
    path.write_text("train:\n  epochs: 1\n  lr: .nan\n")
    with pytest.raises(ConfigError, match=rf"{path} line 3: 'train.lr' must be a finite number, got nan"):
        load_config(path)


@pytest.mark.parametrize("key, shown, named", [
    ("train.lr\u200b", r"'train.lr\u200b'", "U+200B ZERO WIDTH SPACE"),
    ("data.b\u0430tch_size", "'data.b\u0430tch_size'", "U+0430 CYRILLIC SMALL LETTER A"),
])
def test_a_look_alike_key_is_shown_with_its_odd_character(key, shown, named):
    with pytest.raises(ConfigError) as refused:
        load_config(TINY, [f"{key}=1"])
    message = str(refused.value)
    assert f"unknown config key {shown}." in message and named in message
    assert "Did you mean" in message


@pytest.mark.slow
def test_a_run_stopped_before_any_validation_does_not_claim_a_best_cer(tmp_path):
    result = run_tool("tools/train.py", "--cfg", TINY, f"train.output_dir={tmp_path / 'run'}",
                      "train.stop_after_minutes=0.00001")
    assert "done: no validation yet" in result.stderr, result.stderr[-2000:]
    assert "CER inf" not in result.stderr


@pytest.mark.slow
def test_lines_wider_than_max_width_are_reported_when_evaluating(folder_split, checkpoint):
    folder, texts = folder_split(texts=("abc", "hello world, a line far too wide for its limit"))
    widest = 12 * len(texts[1]) + 16  # draw_line's width, at its height of 32
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "data.source=folder", f"data.test={folder}",
                      "data.max_width=200")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"1 line(s) wider than data.max_width=200 px at height 32 (the widest {widest} px) are squeezed" in result.stderr
