"""Text normalisation (`data.normalization`): every source's texts in one Unicode form with their
white space collapsed, the form stored with the model, and a fine-tune told what a new form does."""

from __future__ import annotations

import pytest

from crnn.checkpoint import load_checkpoint
from crnn.config import load_config
from crnn.data import load_records
from crnn.errors import ConfigError
from tests.helpers import TINY, draw_line, run_tool

DECOMPOSED = "cafe\u0301  au lait "  # e + combining acute, two spaces, a trailing one
FORMS = {"NFC": "caf\u00e9 au lait", "NFD": "cafe\u0301 au lait", "NFKC": "caf\u00e9 au lait",
         "none": "cafe\u0301 au lait"}


def folder_with(tmp_path, texts):
    folder = tmp_path / "lines"
    folder.mkdir()
    for i, _ in enumerate(texts):
        draw_line("x").save(folder / f"{i}.png")
    (folder / "gt.tsv").write_text("".join(f"{i}.png\t{text}\n" for i, text in enumerate(texts)), encoding="utf-8")
    return folder


@pytest.mark.parametrize("form", FORMS)
def test_every_source_gives_its_texts_in_the_configured_form(form, tmp_path, parquet_split):
    folder = folder_with(tmp_path, [DECOMPOSED, "\ufb01n"])
    cfg = load_config(TINY, ["data.source=folder", f"data.train={folder}", f"data.normalization={form}"])
    texts = list(load_records(cfg.data, "train").texts)
    assert texts[0] == FORMS[form]
    assert texts[1] == ("fin" if form == "NFKC" else "\ufb01n")  # only the compatibility forms fold the ligature
    parquet, _ = parquet_split(texts=(DECOMPOSED, "plain"))
    lazy = load_records(load_config(TINY, ["data.source=parquet", f"data.train={parquet}",
                                            f"data.normalization={form}"]).data, "train").texts
    assert lazy[0] == FORMS[form] and lazy[0:2] == [FORMS[form], "plain"] and list(lazy)[1] == "plain"


def test_an_unknown_form_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="'data.normalization' must be one of NFC, NFD, NFKC, NFKD, none, got 'NFX'"):
        load_config(TINY, ["data.normalization=NFX"])


@pytest.mark.slow
def test_the_form_is_stored_with_the_model_and_a_fine_tune_says_what_a_new_one_changes(tmp_path, checkpoint):
    folder = folder_with(tmp_path, ["\u00e9t\u00e9 " * 2, "caf\u00e9", "abc", "d\u00e9j\u00e0"] * 4)
    run = tmp_path / "run"
    data = ["data.source=folder", f"data.train={folder}", f"data.validation={folder}"]
    result = run_tool("tools/train.py", "--cfg", TINY, *data, "data.normalization=NFD", f"train.output_dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    saved = load_checkpoint(run / "checkpoints" / "last.pt")
    assert saved["config"]["data"]["normalization"] == "NFD"
    assert "\u0301" in saved["vocab"] and "\u00e9" not in saved["vocab"]  # the alphabet of NFD text
    same = run_tool("tools/train.py", "--cfg", TINY, *data, f"train.init_from={run / 'checkpoints' / 'last.pt'}",
                    f"train.output_dir={tmp_path / 'same'}")  # the starting model's form, unless told
    assert same.returncode == 0 and "data.normalization" not in same.stderr
    assert load_checkpoint(tmp_path / "same" / "checkpoints" / "last.pt")["config"]["data"]["normalization"] == "NFD"
    other = run_tool("tools/train.py", "--cfg", TINY, *data, f"train.init_from={checkpoint}",
                     "data.normalization=NFKD", f"train.output_dir={tmp_path / 'other'}")
    assert other.returncode == 0, other.stderr[-2000:]
    assert "data.normalization=NFKD, but train.init_from's model read NFC text" in other.stderr


def test_build_lm_reads_its_texts_in_the_model_form(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text(f"{DECOMPOSED}\n", encoding="utf-8")
    for form, tokens in (("NFC", "c a f \u00e9 | a u | l a i t"), ("NFD", "c a f e \u0301 | a u | l a i t")):
        out = tmp_path / f"{form}.txt"
        result = run_tool("tools/build_lm.py", texts, "--tokens-out", out, "--normalization", form)
        assert result.returncode == 0, result.stderr
        assert out.read_text(encoding="utf-8") == tokens + "\n"
