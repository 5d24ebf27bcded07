"""Right-to-left lines (`data.direction`): trained on in the order the image shows them, read back in
logical order with the characters' positions and words where the image has them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont, features

from crnn.benchmark import draw_text
from crnn.config import load_config
from crnn.data import Vocab, load_records
from crnn.data.direction import logical, visual
from crnn.decoding import GreedyDecoder
from crnn.errors import ConfigError
from crnn.inference import load_trained_model, reading
from crnn.trainer import fit
from tests.helpers import TINY, overfit_config, read_metrics, run_tool

LINES = ("שלום עולם", "ספר 12 טוב", "מים abc אש", "(גדול) חדש")


def test_a_right_to_left_line_is_shown_reversed_with_numbers_and_latin_kept_left_to_right():
    assert visual("שלום 12 עולם", "rtl") == "םלוע 12 םולש"
    assert visual("מים abc אש", "rtl") == "שא abc םימ"
    assert visual("(גדול)", "rtl") == "(לודג)"  # brackets mirrored: the image shows them turned
    assert visual("abc שלום", "auto") == "abc םולש" and visual("abc שלום", "ltr") == "abc שלום"
    for text in LINES:
        assert logical(visual(text, "rtl"), "rtl")[0] == text


def test_records_give_the_texts_in_the_order_their_images_show(folder_split):
    folder, texts = folder_split(texts=LINES)
    cfg = load_config(TINY, ["data.source=folder", f"data.train={folder}", "data.direction=rtl"])
    assert list(load_records(cfg.data, "train").texts) == [visual(text, "rtl") for text in texts]


def test_a_reading_comes_back_in_logical_order_with_each_character_where_the_image_has_it():
    vocab = Vocab(list("אב "))
    shown = [2, 0, 1, 0]  # the image shows "ב" at its left, then "א": the line "אב" read right to left
    posteriors = torch.full((4, 4), 0.02)
    posteriors[torch.arange(4), torch.tensor(shown)] = 0.94
    hypotheses = GreedyDecoder(vocab).nbest(posteriors.log()[:, None], torch.tensor([4]))[0]
    line = reading(posteriors.log(), hypotheses, vocab, image_width=40, direction="rtl")
    assert line.text == "אב" and line.nbest[0]["text"] == "אב"
    assert [(c["char"], c["x0"], c["x1"]) for c in line.characters] == [("א", 15.0, 30.0), ("ב", 0.0, 15.0)]
    assert line.words == [{"text": "אב", "x0": 0.0, "x1": 30.0, "confidence": 0.94}]


def hebrew_font() -> str:
    """DejaVu Sans, whose Hebrew letters the tests draw, as libraqm (a bidirectional layout that is
    not ours) lays a right-to-left line out."""
    try:
        ImageFont.truetype("DejaVuSans.ttf", 20)
    except OSError:
        pytest.skip("no DejaVu Sans font (Debian: fonts-dejavu-core) to draw Hebrew with")
    if not features.check("raqm"):
        pytest.skip("Pillow without libraqm: no bidirectional layout to draw right-to-left lines with")
    return "DejaVuSans.ttf"


def ink_profile(image: Image.Image) -> np.ndarray:
    """The ink of a line between its first and last inked column, resampled to 100 columns."""
    ink = 255 - np.asarray(image)
    columns = np.flatnonzero(ink.any(axis=0))
    return np.asarray(Image.fromarray(ink[:, columns[0]:columns[-1] + 1]).resize((100, 32)), dtype=float)


def test_the_order_we_train_on_is_the_order_a_bidirectional_layout_draws():
    """libraqm (FriBiDi) draws each line as `visual` orders it, digits, Latin and brackets included:
    far closer to our order drawn as it is than to the logical order drawn as it is."""
    font = hebrew_font()
    for text in (*LINES, "שלום 12 abc עולם"):
        drawn = ink_profile(draw_text(text, font, "rtl"))
        ours, logical_order = (ink_profile(draw_text(shown, font, "ltr")) for shown in (visual(text, "rtl"), text))
        assert np.abs(drawn - ours).mean() * 3 < np.abs(drawn - logical_order).mean(), text


@pytest.mark.slow
def test_a_model_trained_on_rendered_right_to_left_lines_reads_them_in_logical_order(tmp_path):
    font, folder = hebrew_font(), tmp_path / "lines"
    folder.mkdir()
    for i, text in enumerate(LINES):
        draw_text(text, font, "rtl").save(folder / f"{i}.png")
    (folder / "gt.tsv").write_text("".join(f"{i}.png\t{t}\n" for i, t in enumerate(LINES)), encoding="utf-8")
    fit(overfit_config(folder, tmp_path / "run", "train.epochs=300", "data.direction=rtl"))
    assert min(m["val_cer"] for m in read_metrics(tmp_path / "run")) == 0.0
    trained = load_trained_model(tmp_path / "run" / "checkpoints" / "best.pt", device="cpu")
    readings = trained.read([Image.open(folder / f"{i}.png").convert("L") for i in range(len(LINES))],
                            trained.decoders(["greedy"])["greedy"])
    assert [line.text for line in readings] == list(LINES)
    first_word = readings[0].words[0]  # "שלום": the right-hand word of its image
    assert first_word["text"] == "שלום" and first_word["x0"] > readings[0].words[1]["x1"] - 1


def test_an_unknown_direction_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="'data.direction' must be one of ltr, rtl, auto, got 'up'"):
        load_config(TINY, ["data.direction=up"])


def test_build_lm_turns_its_texts_to_the_order_of_the_images(tmp_path):
    texts, out = tmp_path / "texts.txt", tmp_path / "tokens.txt"
    texts.write_text("שלום 12\n", encoding="utf-8")
    result = run_tool("tools/build_lm.py", texts, "--tokens-out", out, "--direction", "rtl")
    assert result.returncode == 0, result.stderr
    assert out.read_text(encoding="utf-8") == "1 2 | ם ו ל ש\n"
