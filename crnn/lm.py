"""Character n-gram language model for CTC beam search: estimated from transcriptions, written as
an ARPA file that flashlight's KenLM reads.

Every character is one LM "word" (`char_to_token`: a space is `|`, the beam search's word boundary;
`<U+XXXX>` keeps every token one whitespace-free ARPA word). Each line is a sentence between `<s>`
and `</s>`; characters the LM never saw score as `<unk>`.

Smoothing: interpolated modified Kneser-Ney (Chen & Goodman 1998, as KenLM's lmplz), every order
interpolated with the next lower one, P(w|h) = alpha(w|h) + gamma(h) * P(w|h'), and a uniform
distribution over the vocabulary below order 1 (counts and discounts: `kneser_ney_counts`,
`kneser_ney_discounts`). Such a model is exactly a backoff model (the backoff weight of a context
is gamma(h)), hence a standard ARPA file. Log-probs in memory are natural logs; ARPA files hold log10.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from crnn.errors import DataError
from crnn.outputs import atomic_write_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPACE = "|"
KN_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
ARPA_NEVER = -99.0  # log10 prob that ARPA files give <s>, which is never predicted
LN10 = math.log(10.0)
KENLM_MAX_ORDER = 6  # the largest order the pip wheels of flashlight-text's KenLM read


def char_to_token(char: str) -> str:
    """One character -> its LM token: ' ' -> '|'; '|', other whitespace, unprintables -> '<U+XXXX>'."""
    if char == " ":
        return SPACE
    if char == SPACE or char.isspace() or not char.isprintable():
        return f"<U+{ord(char):04X}>"
    return char


def text_to_tokens(text: str) -> list[str]:
    return [char_to_token(char) for char in text]


def read_texts(path: str | Path) -> list[str]:
    """Transcriptions: a UTF-8 text file's non-empty lines, or a parquet file's `text` column."""
    path = Path(path)
    if path.suffix == ".parquet" or path.is_dir():
        from crnn.data.sources import parquet_texts

        return parquet_texts(str(path), str(path))
    try:
        content = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"text file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read {path} as UTF-8 text: {err}") from None
    # split on "\n" only: str.splitlines would also cut at characters such as U+2028
    return [line.removesuffix("\r") for line in content.split("\n") if line.removesuffix("\r")]


def count_ngrams(sentences: Iterable[list[str]], order: int) -> list[Counter]:
    """counts[k - 1][gram] for k-grams, k = 1..order, over `<s> tokens </s>` (no gram ends with `<s>`)."""
    counts = [Counter() for _ in range(order)]
    for tokens in sentences:
        padded = (BOS, *tokens, EOS)
        counts[0].update((token,) for token in padded[1:])
        for k in range(2, order + 1):
            counts[k - 1].update(zip(*(padded[i:] for i in range(k)), strict=False))
    return counts


def kneser_ney_counts(raw: list[Counter]) -> list[dict]:
    """Raw counts at the highest order; below it, the number of distinct tokens seen before the
    gram (continuation count), except for grams starting with `<s>`, which keep their raw count."""
    continuations = [Counter(gram[1:] for gram in higher) for higher in raw[1:]]
    return [{gram: count if gram[0] == BOS else continuation[gram] for gram, count in counts.items()}
            for counts, continuation in zip(raw[:-1], continuations, strict=True)] + [dict(raw[-1])]


def kneser_ney_discounts(counts: dict) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ of one order from its counts of counts;
    KN_FALLBACK_DISCOUNTS when they give none (as lmplz --discount_fallback)."""
    count_of_counts = Counter(count for count in counts.values() if count <= 4)
    n1, n2, n3, n4 = (count_of_counts[i] for i in range(1, 5))
    if min(n1, n2, n3) > 0:
        y = n1 / (n1 + 2 * n2)
        discounts = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
        if all(0 < discount < limit for discount, limit in zip(discounts, (1, 2, 3), strict=True)):
            return discounts
    return KN_FALLBACK_DISCOUNTS


class NgramLM:
    """A backoff n-gram model over tokens (see `char_to_token`), natural-log probabilities:
    log_probs[gram] = log P(gram[-1] | gram[:-1]) for every seen gram (plus `<unk>` and `<s>`),
    backoffs[context] = the log backoff weight of every gram that is followed by something."""

    def __init__(self, order: int, log_probs: dict[tuple[str, ...], float], backoffs: dict[tuple[str, ...], float]):
        self.order, self.log_probs, self.backoffs = order, log_probs, backoffs
        self.vocabulary = {gram[0] for gram in log_probs if len(gram) == 1}

    @classmethod
    def estimate(cls, texts: Iterable[str], order: int = 6) -> NgramLM:
        """Estimate from transcriptions (one sentence each), interpolating order 1 up to `order`."""
        raw = count_ngrams((text_to_tokens(text) for text in texts), order)
        if not raw[0]:
            raise DataError("cannot estimate a language model from no text")
        vocabulary_size = len(raw[0]) + 1  # seen tokens and </s>, plus <unk>
        probs: dict[tuple[str, ...], float] = {}
        backoffs: dict[tuple[str, ...], float] = {}
        for k, counts in enumerate(kneser_ney_counts(raw), start=1):
            discounts = kneser_ney_discounts(counts)
            totals: dict[tuple, float] = defaultdict(float)  # c(h)
            discounted: dict[tuple, float] = defaultdict(float)  # the discounts taken after h
            for gram, count in counts.items():
                totals[gram[:-1]] += count
                discounted[gram[:-1]] += discounts[min(count, 3) - 1]
            for gram, count in counts.items():
                context = gram[:-1]
                lower = probs[gram[1:]] if k > 1 else 1.0 / vocabulary_size
                alpha = (count - discounts[min(count, 3) - 1]) / totals[context]
                probs[gram] = alpha + discounted[context] / totals[context] * lower
            if k == 1:
                probs[(UNK,)] = discounted[()] / totals[()] / vocabulary_size
            backoffs.update((context, math.log(discounted[context] / totals[context])) for context in totals if context)
        log_probs = {gram: math.log(prob) for gram, prob in probs.items()}
        log_probs[(BOS,)] = ARPA_NEVER * LN10
        return cls(order, log_probs, backoffs)

    def log_prob(self, context: tuple[str, ...], token: str) -> float:
        """log P(token | context), backing off to shorter contexts; unknown tokens score as <unk>."""
        if (token,) not in self.log_probs:
            token = UNK
        context = context[max(0, len(context) - self.order + 1):]
        penalty = 0.0
        while True:
            found = self.log_probs.get((*context, token))
            if found is not None:
                return penalty + found
            penalty += self.backoffs.get(context, 0.0)
            context = context[1:]

    def write_arpa(self, path: str | Path) -> None:
        """Write a standard ARPA file (log10 probabilities and backoff weights)."""
        by_order = [[gram for gram in self.log_probs if len(gram) == k] for k in range(1, self.order + 1)]
        lines = ["\\data\\"] + [f"ngram {k}={len(grams)}" for k, grams in enumerate(by_order, 1)]
        for k, grams in enumerate(by_order, start=1):
            lines += ["", f"\\{k}-grams:"]
            for gram in grams:
                prob = ARPA_NEVER if gram == (BOS,) else self.log_probs[gram] / LN10
                backoff = self.backoffs.get(gram)
                tail = f"\t{backoff / LN10:.7f}" if backoff is not None else ""
                lines.append(f"{prob:.7f}\t{' '.join(gram)}{tail}")
        lines += ["", "\\end\\", ""]
        atomic_write_text(Path(path), "\n".join(lines))
