"""tools/evaluate.py, tools/predict.py and tools/build_lm.py end to end, on a tiny trained run."""

import csv
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crnn.metrics import char_errors, word_errors
from tests.helpers import TINY, draw_line, run_tool

DECODERS = ("greedy", "beam", "beam_lm")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failed tool's stderr, asserted to be exactly one `error: ...` line."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def read_errors_tsv(path: Path) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\"))


@pytest.fixture(scope="session")
def evaluation(checkpoint, tmp_path_factory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    """evaluate.py with all three decoders on the test split: (JSON, output folder, process)."""
    out = tmp_path_factory.mktemp("evaluation")
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--split", "test", "--decoders",
                      ",".join(DECODERS), "--json", out / "results.json", "--errors", out / "errors.tsv")
    assert result.returncode == 0, result.stderr
    return json.loads((out / "results.json").read_text()), out, result


def test_evaluate_json_equals_a_recount_of_the_errors_files(evaluation):
    results, out, process = evaluation
    table = process.stdout.strip().splitlines()
    assert table[0].split()[:4] == ["decoder", "CER", "WER", "lines"]
    assert [row.split()[0] for row in table[1:]] == list(DECODERS)
    assert list(results) == list(DECODERS)
    for name in DECODERS:
        rows = read_errors_tsv(out / f"errors.{name}.tsv")
        assert len(rows) == results[name]["lines"] == 16  # the tiny config's test split
        assert len({row["id"] for row in rows}) == 16
        chars = sum(len(row["reference"]) for row in rows)
        edits = sum(char_errors(row["reference"], row["hypothesis"]) for row in rows)
        words = sum(len(row["reference"].split()) for row in rows)
        word_edits = sum(word_errors(row["reference"], row["hypothesis"]) for row in rows)
        assert (results[name]["chars"], results[name]["char_errors"]) == (chars, edits)
        assert (results[name]["words"], results[name]["word_errors"]) == (words, word_edits)
        assert results[name]["cer"] == pytest.approx(edits / chars)
        assert results[name]["wer"] == pytest.approx(word_edits / words)
        line_cers = [float(row["cer"]) for row in rows]
        assert line_cers == sorted(line_cers, reverse=True)  # worst first
        assert line_cers[0] == pytest.approx(round(char_errors(rows[0]["reference"], rows[0]["hypothesis"])
                                                   / len(rows[0]["reference"]), 4))
        assert results[name]["lines_per_s"] > 0 and results[name]["decode_lines_per_s"] > 0


def test_an_lm_file_from_build_lm_decodes_like_the_lm_built_from_train_texts(run_dir, checkpoint, evaluation,
                                                                           tmp_path):
    built = run_tool("tools/build_lm.py", run_dir / "train_texts.txt", "--out", tmp_path / "lm.arpa")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "lm.arpa").read_text(encoding="utf-8").startswith("\\data\\\nngram 1=")
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--split", "test", "--decoders", "beam_lm",
                      "--lm", tmp_path / "lm.arpa", "--json", tmp_path / "lm.json")
    assert result.returncode == 0, result.stderr
    from_file = json.loads((tmp_path / "lm.json").read_text())["beam_lm"]
    on_the_fly = evaluation[0]["beam_lm"]
    assert (from_file["char_errors"], from_file["chars"]) == (on_the_fly["char_errors"], on_the_fly["chars"])


def test_evaluate_counts_characters_outside_the_vocab_as_errors(checkpoint, folder_split, tmp_path):
    texts = ("ßüß", "hello €42", "the cat", "naïve ∑")
    vocab = set(torch.load(checkpoint, weights_only=True)["vocab"])
    unseen = {char for text in texts for char in text if char not in vocab}
    assert {"ß", "ü", "€", "ï", "∑"} <= unseen
    folder, _ = folder_split("other", texts)
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "data.source=folder", f"data.test={folder}",
                      "--json", tmp_path / "r.json", "--errors", tmp_path / "errors.tsv")
    assert result.returncode == 0, result.stderr
    assert "not in the checkpoint's vocab" in result.stderr and "€" in result.stderr
    greedy = json.loads((tmp_path / "r.json").read_text())["greedy"]
    assert (greedy["lines"], greedy["chars"]) == (4, sum(map(len, texts)))
    for row in read_errors_tsv(tmp_path / "errors.tsv"):
        missing = sum(char in unseen for char in row["reference"])
        assert not unseen & set(row["hypothesis"])  # the model cannot write them...
        assert char_errors(row["reference"], row["hypothesis"]) >= missing  # ...so each one is an error
    assert greedy["char_errors"] >= sum(char in unseen for text in texts for char in text)


def save_formats(folder: Path) -> list[Path]:
    """One grayscale line saved as RGB PNG, palette PNG, RGBA WebP (lossless), 16-bit TIFF, JPEG."""
    folder.mkdir()
    line = draw_line("the cat")
    pixels = np.asarray(line)
    paths = {"a_rgb.png": line.convert("RGB"), "b_palette.png": line.convert("P"),
             "c_rgba.webp": line.convert("RGBA"),
             "d_16bit.tif": Image.fromarray(pixels.astype(np.uint16) * 257),
             "e_photo.jpg": line.convert("RGB")}
    for name, image in paths.items():
        image.save(folder / name, **({"lossless": True} if name.endswith(".webp") else {}))
    (folder / "notes.txt").write_text("not an image, not listed\n")
    return sorted(folder / name for name in paths)


def test_predict_prints_one_line_per_image(checkpoint, tmp_path):
    images = save_formats(tmp_path / "lines")
    result = run_tool("tools/predict.py", "--ckpt", checkpoint, tmp_path / "lines", images[0],
                      "--batch-size", "1", "--decoder", "beam")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(path) for path in images + images[:1]]
    assert all(line.count("\t") == 1 for line in lines)
    texts = dict(line.split("\t") for line in lines)
    lossless = [texts[str(path)] for path in images if path.suffix != ".jpg"]
    assert len(set(lossless)) == 1  # the same pixels in any mode or format read the same


def test_predict_reports_unreadable_images_and_goes_on(checkpoint, tmp_path):
    good = save_formats(tmp_path / "lines")[0]
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a PNG")
    result = run_tool("tools/predict.py", "--ckpt", checkpoint, tmp_path / "zero.png", good,
                      tmp_path / "corrupt.png")
    assert result.returncode == 2
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == [str(good)]
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors)
    assert "zero.png: empty file (0 bytes)" in errors[0]
    assert "corrupt.png: unreadable image" in errors[1]


def test_predict_on_an_empty_directory_is_one_error_line(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(run_tool("tools/predict.py", "--ckpt", checkpoint, tmp_path / "empty"))
    assert "no image files in this directory" in line and str(tmp_path / "empty") in line


@pytest.mark.parametrize("tool", ["tools/evaluate.py", "tools/predict.py"])
@pytest.mark.parametrize("kind, message", [
    ("missing", "checkpoint not found"),
    ("foreign dict", "not a crnn checkpoint"),
    ("state_dict", "not a crnn checkpoint"),
])
def test_bad_checkpoints_are_one_error_line(tool, kind, message, tmp_path):
    path = tmp_path / "model.pt"
    if kind == "foreign dict":
        torch.save({"epoch": 3, "weights": torch.zeros(2), "config": {"lr": 0.1}}, path)
    elif kind == "state_dict":
        torch.save(torch.nn.Linear(4, 2).state_dict(), path)
    image = tmp_path / "line.png"
    draw_line("abc").save(image)
    extra = [image] if tool.endswith("predict.py") else []
    line = one_error_line(run_tool(tool, "--ckpt", path, *extra))
    assert message in line and str(path) in line


def test_evaluate_precision_follows_the_one_amp_rule(checkpoint, tmp_path):
    bf16 = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--amp", "bf16", "--json", tmp_path / "bf16.json")
    assert bf16.returncode == 0, bf16.stderr
    assert json.loads((tmp_path / "bf16.json").read_text())["greedy"]["lines"] == 16
    if not torch.cuda.is_available():
        assert "'--amp=fp16' needs a CUDA device" in one_error_line(
            run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--amp", "fp16"))


def test_every_tool_ends_a_user_error_with_one_line_and_status_2(checkpoint, run_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder is needed", encoding="utf-8")
    bundle = one_error_line(run_tool("tools/export.py", "--ckpt", checkpoint, "--out", blocker / "bundle"))
    assert bundle == f"error: --out: {blocker / 'bundle'}: {blocker} is a file, not a folder; give a folder"
    missing_split = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--split", "test", "data.source=folder",
                             f"data.validation={tmp_path}")
    assert missing_split.returncode == 2
    assert one_error_line(missing_split) == ("error: 'data.test' is not set: data.source=folder needs a path for "
                                             "the test split")
    report = one_error_line(run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--json", blocker / "results.json"))
    assert report == f"error: --json: {blocker / 'results.json'}: {blocker} is a file, not a folder; give a folder"
    lm = one_error_line(run_tool("tools/build_lm.py", run_dir / "train_texts.txt", "--out", blocker / "lm.arpa"))
    assert lm == f"error: --out: {blocker / 'lm.arpa'}: {blocker} is a file, not a folder; give a folder"
    data = one_error_line(run_tool("tools/check_data.py", "--cfg", TINY, "data.source=folder",
                                   f"data.train={tmp_path / 'nowhere'}", "--splits", "train"))
    assert str(tmp_path / "nowhere") in data
