"""Greedy, beam and beam + LM decoding on hand-made log-probs; the character n-gram LM."""

import math

import pytest
import torch

from crnn.config import LM_SMOOTHINGS, DecodeConfig, load_config
from crnn.data import Vocab
from crnn.decoding import (
    BeamDecoder,
    GreedyDecoder,
    NgramDecoderLM,
    build_decoders,
    decoder_tokens,
    greedy_decode,
)
from crnn.errors import ConfigError, DataError
from crnn.lm import BOS, EOS, UNK, NgramLM, char_to_token, read_texts

CAT_TEXTS = ["the cat sat", "a cat", "cat food", "my cat"]


def frames(vocab: Vocab, *distributions: dict[str, float]) -> torch.Tensor:
    """Log-probs `(T, 1, C)` from one {char: prob} per frame ('-' is the blank); the rest share 1e-4."""
    rows = []
    for distribution in distributions:
        probs = torch.full((len(vocab),), 1e-4)
        for char, prob in distribution.items():
            probs[0 if char == "-" else vocab.index[char]] = prob
        rows.append(probs / probs.sum())
    return torch.stack(rows).log()[:, None, :]


def lengths(*values: int) -> torch.Tensor:
    return torch.tensor(values)


# ---------------------------------------------------------------------------------------------
# greedy and beam


def test_greedy_merges_repeats_drops_blanks_and_stops_at_the_length():
    vocab = Vocab(list("ab"))
    log_probs = frames(vocab, {"a": .9}, {"a": .9}, {"-": .9}, {"a": .9}, {"b": .9}, {"b": .9}, {"a": .9})
    assert greedy_decode(log_probs, lengths(7)) == [[1, 1, 2, 1]]
    assert GreedyDecoder(vocab)(log_probs, lengths(7)) == ["aaba"]
    assert GreedyDecoder(vocab)(log_probs, lengths(5)) == ["aab"]


def test_beam_sums_alignments_and_beats_greedy():
    # Two frames, blank 0.6 / 'a' 0.4 each: the best path is blank-blank (""), p = 0.36, but
    # "a" has three alignments (aa, a-, -a): p = 0.16 + 0.24 + 0.24 = 0.64.
    vocab = Vocab(["a"])
    log_probs = torch.tensor([[[0.6, 0.4]], [[0.6, 0.4]]]).log()
    assert GreedyDecoder(vocab)(log_probs, lengths(2)) == [""]
    beam = BeamDecoder(vocab, beam_size=4, nbest=2)
    assert beam(log_probs, lengths(2)) == ["a"]
    best, second = beam.nbest(log_probs, lengths(2))[0]
    assert (best.text, second.text) == ("a", "")
    assert best.score == pytest.approx(math.log(0.64), abs=1e-5)
    assert second.score == pytest.approx(math.log(0.36), abs=1e-5)


def test_beam_decodes_a_padded_batch_line_by_line():
    vocab = Vocab(list(" ab"))
    line = frames(vocab, {"a": .9}, {" ": .9}, {"b": .9}, {"b": .9}, {"a": .9})
    short = frames(vocab, {"b": .9}, {"-": .9}, {"b": .9}, {"a": .99}, {"a": .99})  # last 2 frames: padding
    log_probs = torch.cat([line, short], dim=1)
    expected = ["a ba", "bb"]
    assert GreedyDecoder(vocab)(log_probs, lengths(5, 3)) == expected
    assert BeamDecoder(vocab)(log_probs, lengths(5, 3)) == expected


def test_vocab_without_space_gets_a_silence_token_past_the_classes():
    vocab = Vocab(list("ab|"))
    tokens, silence = decoder_tokens(vocab)
    assert tokens == ["<blank>", "a", "b", "<U+007C>", "<sil>"] and silence == "<sil>"
    log_probs = frames(vocab, {"a": .9}, {"|": .9}, {"b": .9})
    assert BeamDecoder(vocab, word_score=5.0)(log_probs, lengths(3)) == ["a|b"]
    assert decoder_tokens(Vocab(list(" a")))[1] == "|"


def test_word_score_rewards_or_penalises_spaces():
    vocab = Vocab(list(" ab"))
    log_probs = frames(vocab, {"a": .9}, {" ": .5, "-": .5}, {"b": .9})  # a space, or none?
    assert BeamDecoder(vocab, word_score=2.0)(log_probs, lengths(3)) == ["a b"]
    assert BeamDecoder(vocab, word_score=-2.0)(log_probs, lengths(3)) == ["ab"]


def test_language_model_picks_the_in_language_word_on_a_tie():
    vocab = Vocab(list(" acost"))
    log_probs = frames(vocab, {"c": .9}, {"-": .9}, {"a": .45, "o": .45}, {"-": .9}, {"t": .9})
    acoustic = BeamDecoder(vocab, nbest=2).nbest(log_probs, lengths(5))[0]
    assert {hypothesis.text for hypothesis in acoustic} == {"cat", "cot"}
    assert acoustic[0].score == pytest.approx(acoustic[1].score, abs=1e-3)  # the acoustics alone tie
    for texts, word in ((CAT_TEXTS, "cat"), ([text.replace("cat", "cot") for text in CAT_TEXTS], "cot")):
        lm = NgramDecoderLM(NgramLM.estimate(texts, order=3), vocab)
        assert BeamDecoder(vocab, lm=lm, lm_weight=1.0)(log_probs, lengths(5)) == [word]


def test_kenlm_reads_our_arpa_and_decodes_like_the_python_lm(tmp_path):
    pytest.importorskip("flashlight.lib.text.decoder.kenlm")
    vocab = Vocab(list(" acost"))
    log_probs = frames(vocab, {"c": .9}, {"-": .9}, {"a": .45, "o": .45}, {" ": .3, "-": .7}, {"t": .9})
    lm = NgramLM.estimate(CAT_TEXTS, order=4)
    lm.write_arpa(tmp_path / "lm.arpa")
    options = {"lm_weight": 0.7, "word_score": 0.5, "nbest": 3, "lm_order": 4}
    python_lm = build_decoders(["beam_lm"], vocab, DecodeConfig(**options), CAT_TEXTS)["beam_lm"]
    kenlm = build_decoders(["beam_lm"], vocab, DecodeConfig(**options, lm_path=str(tmp_path / "lm.arpa")))["beam_lm"]
    expected, found = python_lm.nbest(log_probs, lengths(5))[0], kenlm.nbest(log_probs, lengths(5))[0]
    assert expected[0].text == "cat"
    assert [h.text for h in found] == [h.text for h in expected]
    assert [h.score for h in found] == pytest.approx([h.score for h in expected], abs=1e-4)


def test_an_arpa_file_kenlm_cannot_load_is_read_in_python(tmp_path):
    # order 7 is over the pip wheels' KenLM maximum (6); with no KenLM at all the same path is taken
    vocab = Vocab(list(" acost"))
    log_probs = frames(vocab, {"c": .9}, {"-": .9}, {"a": .45, "o": .45}, {"-": .9}, {"t": .9})
    NgramLM.estimate(CAT_TEXTS, order=7).write_arpa(tmp_path / "lm7.arpa")
    options = {"lm_weight": 1.0, "nbest": 2, "lm_order": 7}
    from_file = build_decoders(["beam_lm"], vocab, DecodeConfig(**options, lm_path=str(tmp_path / "lm7.arpa")))
    from_texts = build_decoders(["beam_lm"], vocab, DecodeConfig(**options), CAT_TEXTS)
    found, expected = (d["beam_lm"].nbest(log_probs, lengths(5))[0] for d in (from_file, from_texts))
    assert [h.text for h in found] == [h.text for h in expected] == ["cat", "cot"]
    assert [h.score for h in found] == pytest.approx([h.score for h in expected], abs=1e-4)


def test_build_decoders_by_name_and_its_errors(tmp_path):
    vocab = Vocab(list(" ab"))
    decoders = build_decoders(["greedy", "beam", "beam_lm"], vocab, DecodeConfig(), lm_texts=["ab ba"])
    assert list(decoders) == ["greedy", "beam", "beam_lm"]
    log_probs = frames(vocab, {"a": .9}, {"b": .9})
    assert [decoder(log_probs, lengths(2)) for decoder in decoders.values()] == [["ab"]] * 3
    with pytest.raises(ConfigError, match="unknown decoder 'viterbi'"):
        build_decoders(["viterbi"], vocab, DecodeConfig())
    with pytest.raises(ConfigError, match="decode.lm_path"):
        build_decoders(["beam_lm"], vocab, DecodeConfig())  # no LM file, no texts
    (tmp_path / "texts.txt").write_text("ab\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="neither an ARPA file"):
        build_decoders(["beam_lm"], vocab, DecodeConfig(lm_path=str(tmp_path / "texts.txt")))
    with pytest.raises(ConfigError, match="not found"):
        build_decoders(["beam_lm"], vocab, DecodeConfig(lm_path=str(tmp_path / "missing.arpa")))


def test_the_cuda_beam_search_that_aborts_on_h100_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match=r"'decode.cuda=true' is no longer supported.*aborts the process.*"
                                          r"decode.cuda=false"):
        load_config(None, ["decode.cuda=true"])


# ---------------------------------------------------------------------------------------------
# the character n-gram LM


def test_lm_tokens_keep_one_character_each_and_no_whitespace():
    assert [char_to_token(c) for c in " a|\té\u00a0"] == ["|", "a", "<U+007C>", "<U+0009>", "é", "<U+00A0>"]


@pytest.mark.parametrize("smoothing", LM_SMOOTHINGS)
@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_lm_probabilities_sum_to_one_after_any_context(smoothing, order):
    lm = NgramLM.estimate(CAT_TEXTS + ["zebra crossing", "a|b"], order, smoothing)
    tokens = sorted(lm.vocabulary - {BOS})
    assert UNK in tokens and EOS in tokens
    for context in [(BOS,), (BOS, "c"), ("c", "a"), ("t", "|", "c"), ("q", "q"), ()]:
        total = sum(math.exp(lm.log_prob(context, token)) for token in tokens)
        assert total == pytest.approx(1.0, abs=1e-9), context
    assert lm.log_prob(("c",), "Ω") == lm.log_prob(("c",), UNK) > -math.inf  # unseen: <unk>


def test_lm_known_values():
    # "ab": unigrams a, b, </s> seen once each, vocabulary size 4 with <unk>.
    witten_bell = NgramLM.estimate(["ab"], 2, "witten_bell")
    unigram_b = 1 / 6 + 3 / 6 * 1 / 4  # alpha = c / (N + T), gamma = T / (N + T), then uniform
    assert math.exp(witten_bell.log_prob((), "b")) == pytest.approx(unigram_b)
    assert math.exp(witten_bell.log_prob(("a",), "b")) == pytest.approx(1 / 2 + 1 / 2 * unigram_b)
    add_k = NgramLM.estimate(["ab"], 1, "add_k", add_k=0.1)
    assert math.exp(add_k.log_prob((), "a")) == pytest.approx(1.1 / (3 + 0.4))  # (c + k) / (N + kV)
    assert math.exp(add_k.log_prob((), UNK)) == pytest.approx(0.1 / (3 + 0.4))


def test_kneser_ney_uses_continuation_counts():
    # 'z' is frequent but only ever follows 'x'; 'y' is rarer but follows three tokens
    texts = ["xz"] * 6 + ["ay", "by", "cy"]
    kneser_ney = NgramLM.estimate(texts, 2, "kneser_ney")
    witten_bell = NgramLM.estimate(texts, 2, "witten_bell")
    assert kneser_ney.log_prob(("q",), "z") < kneser_ney.log_prob(("q",), "y")
    assert witten_bell.log_prob(("q",), "z") > witten_bell.log_prob(("q",), "y")


def test_lm_prefers_seen_text_and_survives_an_arpa_round_trip(tmp_path):
    lm = NgramLM.estimate(CAT_TEXTS, 4)
    assert lm.sentence_log_prob("the cat") > lm.sentence_log_prob("the cot") > lm.sentence_log_prob("teh tco")
    lm.write_arpa(tmp_path / "lm.arpa")
    again = NgramLM.read_arpa(tmp_path / "lm.arpa")
    assert again.order == 4 and again.vocabulary == lm.vocabulary
    for text in ["the cat", "a zebra", ""]:
        assert again.sentence_log_prob(text) == pytest.approx(lm.sentence_log_prob(text), abs=1e-5)


def test_a_malformed_arpa_file_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "bad.arpa"
    path.write_text("\\data\\\nngram 1=2\n\n\\1-grams:\n-1.0\ta\n-x.5\tb\n\\end\\\n", encoding="utf-8")
    with pytest.raises(DataError, match="bad.arpa line 6: not an ARPA n-gram line"):
        NgramLM.read_arpa(path)


def test_read_texts_splits_on_newlines_only(tmp_path):
    path = tmp_path / "train_texts.txt"
    path.write_bytes("first line\r\n\nsecond\u2028line\n".encode())
    assert read_texts(path) == ["first line", "second\u2028line"]
