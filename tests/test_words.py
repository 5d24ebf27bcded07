"""Where each character and word of a reading lies: cuts from the CTC alignment, words between
spaces, and how well the words find the ink the synthetic renderer drew (docs/decoding.md)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from crnn.benchmark import overlap, word_rows
from crnn.data import Vocab
from crnn.data.synthetic import render_line, render_line_words
from crnn.decoding import GreedyDecoder, char_cuts, word_ranges
from crnn.inference import reading
from tests.helpers import run_tool


def test_a_character_reaches_to_the_middle_of_the_gaps_beside_it():
    # runs of frames 2-3, 6, 10-11 (confidence, first, last): cuts in the middle of 4-5 and 7-9
    assert char_cuts([(0.9, 2, 3), (0.8, 6, 6), (0.7, 10, 11)]) == [(2, 5.0), (5.0, 8.5), (8.5, 12)]
    assert char_cuts([(0.9, 4, 4)]) == [(4, 5)] and char_cuts([]) == []


def test_words_are_the_characters_between_spaces():
    assert word_ranges("ab  cde f") == [(0, 2), (4, 7), (8, 9)]
    assert word_ranges(" ") == [] and word_ranges("") == []


def test_a_reading_gives_each_word_its_extent_and_confidence():
    vocab = Vocab(list("ab "))
    frames = [1, 0, 3, 0, 2, 2]  # "a", blank, " ", blank, "b" over two frames
    posteriors = torch.full((6, 4), 0.02)
    posteriors[torch.arange(6), torch.tensor(frames)] = 0.94
    hypotheses = GreedyDecoder(vocab).nbest(posteriors.log()[:, None], torch.tensor([6]))[0]
    line = reading(posteriors.log(), hypotheses, vocab, image_width=60)
    assert line.text == "a b"
    assert [(w["text"], w["x0"], w["x1"]) for w in line.words] == [("a", 0.0, 15.0), ("b", 35.0, 60.0)]
    assert [(c["x0"], c["x1"]) for c in line.characters] == [(0.0, 15.0), (15.0, 35.0), (35.0, 60.0)]
    assert line.words[0]["confidence"] == line.characters[0]["confidence"] == 0.94


def test_the_renderer_knows_where_it_drew_each_word():
    text = "left middle right"
    image, words = render_line_words(text, random.Random(3), 64)
    assert image.tobytes() == render_line(text, random.Random(3), 64).tobytes()  # the same line
    assert len(words) == 3 and 0 <= words[0][0] < words[0][1] < words[1][0] < words[1][1] < words[2][0]
    assert words[2][1] <= image.width
    ink = (255 - torch.from_numpy(np.asarray(image, dtype=np.float32))).sum(dim=0)
    gap = ink[round(words[0][1]) + 1: int(words[1][0]) - 1]  # between two words: paper only
    assert len(gap) and float(gap.max()) < float(ink.max()) / 4


def test_overlap_is_the_iou_of_two_spans():
    assert overlap((0, 10), (5, 15)) == pytest.approx(5 / 15)
    assert overlap((0, 10), (10, 20)) == 0.0 and overlap((2, 4), (2, 4)) == 1.0


@pytest.mark.slow
def test_word_rows_measure_each_decoder(checkpoint):
    rows = word_rows(checkpoint, ["decode.workers=1"], 8)
    assert [row["decoder"] for row in rows] == ["greedy", "beam"]
    for row in rows:
        assert row["lines"] == 8 and row["words"] >= 8 and 0.0 <= row["median_iou"] <= 1.0
        assert 0.0 <= row["iou_0.5_all"] <= 1.0 and row["read_lines_per_s"] > 0


@pytest.mark.slow
def test_predict_json_gives_words_in_image_pixels(checkpoint, tmp_path):
    image = tmp_path / "line.png"
    render_line("the words", random.Random(0), 32).save(image)
    result = run_tool("tools/predict.py", "--ckpt", checkpoint, "--json", image)
    assert result.returncode == 0, result.stderr
    row = json.loads(result.stdout)
    assert [word["text"] for word in row["words"]] == row["text"].split()
    assert all(0 <= w["x0"] <= w["x1"] <= Image.open(image).width for w in row["words"])
