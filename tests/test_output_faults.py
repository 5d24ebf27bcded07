"""Issue 70, what predict, calibrate and export write: wide and too narrow lines, strict JSON, lines
a calibration cannot hold, write targets and folds checked before the forward pass, bundle modes."""

import json
import os
import shutil
from pathlib import Path

from PIL import Image

import crnn.inference
import crnn.outputs
from crnn.checkpoint import load_checkpoint
from tests.helpers import run_tool, synthetic_folder


def strict_rows(stdout: str) -> list[dict]:
    """predict --json's rows, read as a strict parser would (NaN and Infinity are not JSON)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in stdout.strip().splitlines()]


def no_forward_pass(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the forward pass ran before the refusal")
    monkeypatch.setattr(crnn.inference, "collect_emissions", refuse)


def test_a_line_wider_than_max_width_is_reported_and_left_out_of_the_estimate(calibrated_checkpoint,
                                                                             tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 2)
    wide = Image.new("L", (1100, 8), 255)  # 4400 px at the tiny model's data.height 32; data.max_width 4000
    wide.paste(0, (0, 3, 1100, 5))
    wide.save(lines / "wide.png")
    result = run_tool("tools/predict.py", "--ckpt", calibrated_checkpoint, lines, "--json", "--summary")
    assert result.returncode == 0, result.stderr
    assert (f"warning: {lines / 'wide.png'}: 4400 px wide at data.height 32, over data.max_width "
            f"4000: squeezed to 4000 px") in result.stderr
    rows = strict_rows(result.stdout)
    assert [row["squeezed_from"] for row in rows[:3]] == [None, None, 4400]
    assert rows[3]["summary"]["lines"] == 2 and rows[3]["summary"]["squeezed"] == 1
    text = run_tool("tools/predict.py", "--ckpt", calibrated_checkpoint, lines, "--summary")
    assert "summary: 2 line(s), estimated CER" in text.stderr
    assert "1 line(s) squeezed to data.max_width are not in the estimate" in text.stderr


def test_a_line_too_narrow_for_one_frame_gives_strict_json_and_no_estimate(calibrated_checkpoint, tmp_path):
    narrow = tmp_path / "narrow.png"
    Image.new("L", (1, 32), 0).save(narrow)
    result = run_tool("tools/predict.py", "--ckpt", calibrated_checkpoint, "--json", narrow)
    assert result.returncode == 0, result.stderr
    (row,) = strict_rows(result.stdout)
    assert row["text"] == "" and row["confidence"] is None
    assert row["p_exact"] is None and row["expected_errors"] is None and row["expected_cer"] is None
    warning = f"warning: {narrow}: 1 px wide at data.height 32, too narrow for one frame of the model"
    assert warning in result.stderr


def test_calibrate_fits_the_temperature_without_lines_outside_the_vocabulary(calibrated_checkpoint,
                                                                            folder_split, tmp_path):
    known = (calibrated_checkpoint.parents[1] / "train_texts.txt").read_text(encoding="utf-8").splitlines()
    texts = [known[i % len(known)] + ("Ж" if i < 10 else "") for i in range(110)]  # 10 the fit cannot hold
    lines, _ = folder_split("lines", tuple(texts))
    result = run_tool("tools/calibrate.py", "--ckpt", calibrated_checkpoint, "--out", tmp_path / "copy.pt",
                      "--folds", "2", "--json", tmp_path / "report.json", "data.source=folder",
                      f"data.validation={lines}")
    assert result.returncode == 0, result.stderr
    assert "10 line(s)" in result.stderr and "'Ж'" in result.stderr
    assert "left out of the temperature's fit" in result.stderr and "fold 2 of 2" in result.stderr
    assert strict_rows((tmp_path / "report.json").read_text().replace("\n", ""))[0]["lines"] == 110
    only_known, _ = folder_split("known", tuple(texts[10:]))
    run_tool("tools/calibrate.py", "--ckpt", calibrated_checkpoint, "--out", tmp_path / "known.pt",
             "data.source=folder", f"data.validation={only_known}")
    with_unknown, without = (load_checkpoint(tmp_path / name)["calibration"] for name in ("copy.pt", "known.pt"))
    assert with_unknown["lines"] == 110 and without["lines"] == 100
    assert with_unknown["temperature"] == without["temperature"]  # the 10 lines did not move it


def test_summary_over_no_readable_line_gives_no_estimate(calibrated_checkpoint, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    result = run_tool("tools/predict.py", "--ckpt", calibrated_checkpoint, broken, "--summary")
    assert result.returncode == 2 and "estimated CER" not in result.stderr
    assert "--summary: no line was read, so there is no estimate" in result.stderr


def test_calibrate_checks_where_it_writes_before_the_forward_pass(calibrated_checkpoint, tmp_path,
                                                                  monkeypatch):
    folder = tmp_path / "read_only"
    folder.mkdir()
    shutil.copyfile(calibrated_checkpoint, folder / "best.pt")
    access = os.access
    def denied(path, mode):  # as root chmod bars nothing: the check is told the folder is read-only
        return Path(path) != folder and access(path, mode)
    monkeypatch.setattr(crnn.outputs.os, "access", denied)
    no_forward_pass(monkeypatch)
    result = run_tool("tools/calibrate.py", "--ckpt", folder / "best.pt")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot write in" in result.stderr and "give --out" in result.stderr


def test_calibrate_refuses_more_folds_than_the_lines_allow_before_the_forward_pass(calibrated_checkpoint,
                                                                                  tmp_path, monkeypatch):
    no_forward_pass(monkeypatch)
    result = run_tool("tools/calibrate.py", "--ckpt", calibrated_checkpoint, "--out", tmp_path / "copy.pt",
                      "--folds", "100")
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: data.validation: 60 labelled line(s) cannot be cut into 100 folds")
    assert "6 to 60 folds can" in result.stderr


def test_export_bundle_files_get_the_modes_of_the_umask(checkpoint, tmp_path):
    previous = os.umask(0o022)
    try:
        result = run_tool("tools/export.py", "--ckpt", checkpoint, "--out", tmp_path / "bundle")
        assert result.returncode == 0, result.stderr
    finally:
        os.umask(previous)
    modes = {path.name: oct(path.stat().st_mode & 0o777) for path in (tmp_path / "bundle").iterdir()}
    assert set(modes.values()) == {"0o644"}, modes
