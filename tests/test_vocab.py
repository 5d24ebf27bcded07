import pytest

from crnn.data.vocab import BLANK, Vocab
from crnn.errors import DataError


def test_round_trip_and_blank_is_zero():
    vocab = Vocab.from_texts(["héllo wörld", "abc 123!"])
    text = "héllo 321 wörld!"
    indices = [vocab.index[char] for char in text]
    assert BLANK not in indices and min(indices) == 1
    assert vocab.decode(indices) == text
    assert len(vocab) == len(set("héllo wörldabc 123!")) + 1
    assert Vocab(vocab.chars) == vocab  # rebuilt from the list stored in a checkpoint


def test_unknown_character_is_named():
    vocab = Vocab.from_texts(["abc"])
    assert vocab.unknown("abxd") == {"x", "d"}


def test_characters_must_be_distinct_and_single():
    with pytest.raises(DataError, match="vocab must be distinct single characters"):
        Vocab(["a", "a"])
    with pytest.raises(DataError, match="vocab must be distinct single characters"):
        Vocab(["ab"])
