"""CER / WER: edit distances on known examples, corpus-level sums, edge cases, error listings."""

import pytest
import torch

from crnn.metrics import ErrorCounts, char_errors, word_errors, worst_lines_first


@pytest.mark.parametrize("reference, hypothesis, errors", [
    ("cat", "cat", 0),
    ("cat", "cut", 1),  # substitution
    ("cat", "cats", 1),  # insertion
    ("cat", "ct", 1),  # deletion
    ("kitten", "sitting", 3),
    ("abc", "", 3),  # empty hypothesis: every reference character deleted
    ("", "ab", 2),  # empty reference: every hypothesis character inserted
    ("", "", 0),
])
def test_char_errors_count_edits(reference, hypothesis, errors):
    assert char_errors(reference, hypothesis) == errors


def test_words_are_whitespace_separated_tokens():
    assert word_errors("the cat sat", "the cat sat") == 0
    assert word_errors("the cat sat", "the  cat\tsat ") == 0  # runs of whitespace are one separator
    assert char_errors("the cat sat", "the  cat sat") == 1
    assert word_errors("the cat sat", "the hat") == 2  # one substitution, one deletion
    assert word_errors("the cat", "") == 2
    assert word_errors("", "a b") == 2


def test_corpus_rates_are_sums_not_averages_of_lines():
    counts = ErrorCounts()
    counts.update(["a", "abcdefghij"], ["b", "abcdefghij"])
    assert (counts.char_errors, counts.chars, counts.lines) == (1, 11, 2)
    assert counts.cer == pytest.approx(1 / 11)  # the mean of the line CERs would be 0.5
    assert counts.wer == pytest.approx(1 / 2)


def test_counts_add_up_over_batches():
    counts = ErrorCounts()
    counts.update(["abc", "hello world"], ["abd", "hello"])
    counts.update(["the end"], [""])
    # chars: 1 + 6 (" world" deleted) + 7; words: 1 + 1 + 2
    assert (counts.char_errors, counts.chars, counts.word_errors, counts.words, counts.lines) == (14, 21, 4, 5, 3)
    assert counts.cer == pytest.approx(14 / 21)
    assert counts.wer == pytest.approx(4 / 5)


def test_empty_references_are_defined():
    nothing = ErrorCounts()
    assert (nothing.cer, nothing.wer) == (0.0, 0.0)
    exact = ErrorCounts()
    exact.update([""], [""])
    assert (exact.cer, exact.wer, exact.lines) == (0.0, 0.0, 1)
    inserted = ErrorCounts()
    inserted.update([""], ["ab c"])  # nothing to divide by: the rates are the error counts
    assert (inserted.cer, inserted.wer) == (4.0, 2.0)
    assert [line.cer for line in worst_lines_first([("a", "", "ab"), ("b", "", "")])] == [2.0, 0.0]


def test_counts_survive_the_tensor_round_trip_of_all_reduce():
    counts = ErrorCounts()
    counts.update(["hello world", "abc"], ["hallo world", ""])
    total = ErrorCounts.from_tensor(counts.to_tensor() + counts.to_tensor())  # as if two ranks
    assert (total.char_errors, total.chars, total.word_errors, total.words, total.lines) == (8, 28, 4, 6, 4)
    assert total.cer == pytest.approx(counts.cer)
    assert counts.to_tensor().dtype == torch.float64


def test_worst_lines_first_orders_by_cer_then_errors_then_id():
    lines = worst_lines_first([("b", "abcd", "abcd"), ("a", "ab", "xy"), ("c", "abcd", "xycd"),
                               ("d", "a", "b"), ("e", "abcd", "abc")])
    assert [line.id for line in lines] == ["a", "d", "c", "e", "b"]
    assert [line.char_errors for line in lines] == [2, 1, 2, 1, 0]
    assert [line.cer for line in lines] == [1.0, 1.0, 0.5, 0.25, 0.0]
