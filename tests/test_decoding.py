"""Greedy, beam and beam + LM decoding on hand-made log-probs; the character n-gram LM."""

import math

import pytest
import torch

from crnn.config import DecodeConfig
from crnn.data import Vocab
from crnn.decoding import BeamDecoder, GreedyDecoder, build_decoders, char_spans, decoder_tokens, greedy_paths
from crnn.errors import ConfigError
from crnn.lm import BOS, EOS, UNK, NgramLM, char_to_token, read_texts, text_to_tokens

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
    assert greedy_paths(log_probs, lengths(7)) == [([1, 1, 2, 1], [0, 3, 4, 6])]  # classes, first frames
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
        decoder = build_decoders(["beam_lm"], vocab, DecodeConfig(lm_order=3, lm_weight=1.0, workers=1), texts)
        assert decoder["beam_lm"](log_probs, lengths(5)) == [word]


def test_kenlm_scores_our_arpa_file_with_the_estimated_probabilities(tmp_path):
    from flashlight.lib.text.decoder.kenlm import KenLM
    from flashlight.lib.text.dictionary import Dictionary

    lm = NgramLM.estimate(CAT_TEXTS, order=4)
    lm.write_arpa(tmp_path / "lm.arpa")
    tokens = decoder_tokens(Vocab(list(" acdefhmorsty")))[0]
    kenlm = KenLM(str(tmp_path / "lm.arpa"), Dictionary(tokens))
    state, context = kenlm.start(0), (BOS,)
    for token in text_to_tokens("the cot"):  # "cot": a context the LM backs off from
        state, score = kenlm.score(state, tokens.index(token))
        assert score * math.log(10) == pytest.approx(lm.log_prob(context, token), abs=1e-5)
        context += (token,)
    assert kenlm.finish(state)[1] * math.log(10) == pytest.approx(lm.log_prob(context, EOS), abs=1e-5)


def test_an_lm_file_decodes_like_the_lm_built_from_the_same_texts(tmp_path):
    vocab = Vocab(list(" acost"))
    log_probs = frames(vocab, {"c": .9}, {"-": .9}, {"a": .45, "o": .45}, {" ": .3, "-": .7}, {"t": .9})
    NgramLM.estimate(CAT_TEXTS, order=4).write_arpa(tmp_path / "lm.arpa")
    options = {"lm_weight": 0.7, "word_score": 0.5, "nbest": 3, "lm_order": 4, "workers": 1}
    from_texts = build_decoders(["beam_lm"], vocab, DecodeConfig(**options), CAT_TEXTS)["beam_lm"]
    from_file = build_decoders(["beam_lm"], vocab, DecodeConfig(**options, lm_path=str(tmp_path / "lm.arpa")))["beam_lm"]
    expected, found = from_texts.nbest(log_probs, lengths(5))[0], from_file.nbest(log_probs, lengths(5))[0]
    assert expected[0].text == "cat"
    assert [h.text for h in found] == [h.text for h in expected]
    assert [h.score for h in found] == pytest.approx([h.score for h in expected], abs=1e-4)


def test_an_lm_order_kenlm_cannot_read_is_an_error_naming_the_order(tmp_path):
    vocab = Vocab(list(" acost"))
    with pytest.raises(ConfigError, match="decode.lm_order=7: KenLM reads orders up to 6"):
        build_decoders(["beam_lm"], vocab, DecodeConfig(lm_order=7, workers=1), CAT_TEXTS)
    NgramLM.estimate(CAT_TEXTS, order=7).write_arpa(tmp_path / "lm7.arpa")
    with pytest.raises(ConfigError, match="decode.lm_path: KenLM cannot read .*lm7.arpa: This model has order 7"):
        build_decoders(["beam_lm"], vocab, DecodeConfig(lm_path=str(tmp_path / "lm7.arpa"), workers=1))


def test_build_decoders_by_name_and_its_errors(tmp_path):
    vocab = Vocab(list(" ab"))
    decoders = build_decoders(["greedy", "beam", "beam_lm"], vocab, DecodeConfig(workers=1), lm_texts=["ab ba"])
    assert list(decoders) == ["greedy", "beam", "beam_lm"]
    log_probs = frames(vocab, {"a": .9}, {"b": .9})
    assert [decoder(log_probs, lengths(2)) for decoder in decoders.values()] == [["ab"]] * 3
    with pytest.raises(ConfigError, match="unknown decoder 'viterbi'"):
        build_decoders(["viterbi"], vocab, DecodeConfig())
    with pytest.raises(ConfigError, match="decode.lm_path"):
        build_decoders(["beam_lm"], vocab, DecodeConfig())  # no LM file, no texts
    (tmp_path / "texts.txt").write_text("ab\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="KenLM cannot read .*texts.txt: first non-empty line was \"ab\""):
        build_decoders(["beam_lm"], vocab, DecodeConfig(lm_path=str(tmp_path / "texts.txt")))
    with pytest.raises(ConfigError, match="not found"):
        build_decoders(["beam_lm"], vocab, DecodeConfig(lm_path=str(tmp_path / "missing.arpa")))


# ---------------------------------------------------------------------------------------------
# the character n-gram LM


def test_lm_tokens_keep_one_character_each_and_no_whitespace():
    assert [char_to_token(c) for c in " a|\té\u00a0"] == ["|", "a", "<U+007C>", "<U+0009>", "é", "<U+00A0>"]


@pytest.mark.parametrize("order", [1, 2, 3, 5])
def test_lm_probabilities_sum_to_one_after_any_context(order):
    lm = NgramLM.estimate(CAT_TEXTS + ["zebra crossing", "a|b"], order)
    tokens = sorted(lm.vocabulary - {BOS})
    assert UNK in tokens and EOS in tokens
    for context in [(BOS,), (BOS, "c"), ("c", "a"), ("t", "|", "c"), ("q", "q"), ()]:
        total = sum(math.exp(lm.log_prob(context, token)) for token in tokens)
        assert total == pytest.approx(1.0, abs=1e-9), context
    assert lm.log_prob(("c",), "Ω") == lm.log_prob(("c",), UNK) > -math.inf  # unseen: <unk>


def test_lm_known_values():
    # "ab" at order 1: a, b, </s> seen once each; no counts of counts, so the fallback discount
    # D1 = 0.5 and gamma = 3 * 0.5 / 3; vocabulary size 4 with <unk>
    lm = NgramLM.estimate(["ab"], 1)
    assert math.exp(lm.log_prob((), "a")) == pytest.approx(0.5 / 3 + 0.5 / 4)
    assert math.exp(lm.log_prob((), UNK)) == pytest.approx(0.5 / 4)


def test_kneser_ney_uses_continuation_counts():
    # 'z' is frequent but only ever follows 'x'; 'y' is rarer but follows three tokens
    lm = NgramLM.estimate(["xz"] * 6 + ["ay", "by", "cy"], 2)
    assert lm.log_prob(("q",), "z") < lm.log_prob(("q",), "y")
    assert lm.log_prob(("x",), "z") > lm.log_prob(("x",), "y")


def test_read_texts_splits_on_newlines_only(tmp_path):
    path = tmp_path / "train_texts.txt"
    path.write_bytes("first line\r\n\nsecond\u2028line\n".encode())
    assert read_texts(path) == ["first line", "second\u2028line"]


# ---------------------------------------------------------------------------------------------
# a character's confidence and frames


def test_a_character_is_as_sure_as_its_strongest_frame_in_its_run():
    vocab = Vocab(list("ab"))
    log_probs = frames(vocab, {"a": .6, "-": .4}, {"a": .9, "-": .1}, {"-": .9, "b": .1}, {"b": .7, "-": .3},
                       {"a": .5, "b": .4, "-": .1})[:, 0]
    # greedy: "a" over frames 0-1, "b" at frame 3, "a" at frame 4
    (labels, starts), = greedy_paths(log_probs[:, None], lengths(5))
    spans = char_spans(log_probs, labels, starts)
    assert [(first, last) for _, first, last in spans] == [(0, 1), (3, 3), (4, 4)]
    assert [round(confidence, 3) for confidence, _, _ in spans] == [0.9, 0.7, 0.5]
    # a beam search may emit a character where it is not the most probable class: that frame alone
    assert char_spans(log_probs, [2], [4]) == [(pytest.approx(0.4, abs=1e-3), 4, 4)]
    assert char_spans(log_probs, [], []) == []
