"""Character n-gram language model for CTC beam search: estimated from transcriptions, ARPA in/out.

Every character is one LM "word" (token). A space is the token `|` (the beam search's word
boundary); a literal `|`, other whitespace and unprintable characters are written `<U+XXXX>`, so
that every token is one whitespace-free ARPA word. Each line is a sentence: `<s>` before it,
`</s>` after it; characters the LM never saw score as `<unk>`.

Smoothing (`decode.lm_smoothing`); all three interpolate every order with the next lower one,
P(w|h) = alpha(w|h) + gamma(h) * P(w|h'), h' being h without its first token, and a uniform
distribution over the vocabulary (`</s>` and `<unk>` included) below order 1:
- kneser_ney: interpolated modified Kneser-Ney (Chen & Goodman 1998, as KenLM's lmplz): three
  discounts per order from counts of counts, continuation counts below the highest order
  (n-grams that start with `<s>` keep their raw counts); fixed discounts 0.5/1/1.5 when the
  counts of counts give none (tiny corpora, as lmplz --discount_fallback).
- witten_bell: gamma(h) = T(h) / (c(h) + T(h)), T(h) the number of distinct tokens after h.
- add_k: k pseudo-counts per vocabulary token, spread by the lower order (uniform at order 1,
  where this is textbook add-k): P(w|h) = (c(h, w) + k V P(w|h')) / (c(h) + k V).

Such a model is exactly a backoff model: the probability of a seen n-gram is the interpolated
one, the backoff weight of a context is gamma(h). So it is written as a standard ARPA file that
KenLM (and flashlight's KenLM wrapper) reads, and read back by `NgramLM.read_arpa`. Log-probs in
memory are natural logs; ARPA files hold log10.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

from crnn.config import LM_SMOOTHINGS
from crnn.errors import DataError

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
SPACE = "|"
KN_FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)
ARPA_NEVER = -99.0  # log10 prob that ARPA files give <s>, which is never predicted
LN10 = math.log(10.0)


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
    """Transcriptions from a text file (one per line, UTF-8) or a parquet file (column `text`).

    Empty lines are skipped, as the data sources skip empty transcriptions.
    """
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
    """Raw counts: counts[k - 1][gram] for k-grams, k = 1..order, over `<s> tokens </s>`.

    `<s>` is only ever a context, so no gram ends with it (no unigram `<s>`).
    """
    counts = [Counter() for _ in range(order)]
    for tokens in sentences:
        padded = (BOS, *tokens, EOS)
        counts[0].update((token,) for token in padded[1:])
        for k in range(2, order + 1):
            counts[k - 1].update(zip(*(padded[i:] for i in range(k)), strict=False))  # shifted copies
    return counts


def kneser_ney_counts(raw: list[Counter]) -> list[dict]:
    """Adjusted counts: raw at the highest order; below it, the number of distinct tokens seen
    before the gram (continuation count), except for grams starting with `<s>`, which have none."""
    adjusted: list[dict] = [dict(counter) for counter in raw]
    for k in range(len(raw) - 1, 0, -1):  # adjust the k-grams from the (k + 1)-grams
        continuation = Counter(gram[1:] for gram in raw[k])
        adjusted[k - 1] = {gram: count if gram[0] == BOS else continuation[gram]
                           for gram, count in raw[k - 1].items()}
    return adjusted


def kneser_ney_discounts(counts: dict) -> tuple[float, float, float]:
    """Modified Kneser-Ney discounts D1, D2, D3+ of one order from its counts of counts."""
    count_of_counts = Counter(count for count in counts.values() if count <= 4)
    n1, n2, n3, n4 = (count_of_counts[i] for i in range(1, 5))
    if min(n1, n2, n3) == 0:
        return KN_FALLBACK_DISCOUNTS
    y = n1 / (n1 + 2 * n2)
    discounts = (1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3)
    if not all(0 < discount < limit for discount, limit in zip(discounts, (1, 2, 3), strict=True)):
        return KN_FALLBACK_DISCOUNTS
    return discounts


class _Interpolation:
    """alpha(count | context) and gamma(context) of one order, for one smoothing method."""

    def __init__(self, counts: dict, smoothing: str, vocabulary_size: int, add_k: float):
        self.smoothing, self.pseudo = smoothing, add_k * vocabulary_size
        self.discounts = kneser_ney_discounts(counts) if smoothing == "kneser_ney" else (0.0,) * 3
        self.totals: dict[tuple, float] = defaultdict(float)  # c(h)
        self.types: dict[tuple, int] = defaultdict(int)  # T(h), distinct followers
        self.discounted: dict[tuple, float] = defaultdict(float)  # sum of discounts after h
        for gram, count in counts.items():
            context = gram[:-1]
            self.totals[context] += count
            self.types[context] += 1
            self.discounted[context] += self.discount(count)

    def discount(self, count: float) -> float:
        return self.discounts[min(int(count), 3) - 1] if count > 0 else 0.0

    def alpha(self, count: float, context: tuple) -> float:
        total = self.totals[context]
        if self.smoothing == "kneser_ney":
            return (count - self.discount(count)) / total
        if self.smoothing == "witten_bell":
            return count / (total + self.types[context])
        return count / (total + self.pseudo)

    def gamma(self, context: tuple) -> float:
        total = self.totals[context]
        if self.smoothing == "kneser_ney":
            return self.discounted[context] / total
        if self.smoothing == "witten_bell":
            return self.types[context] / (total + self.types[context])
        return self.pseudo / (total + self.pseudo)


class NgramLM:
    """A backoff n-gram model over tokens (see `char_to_token`). Log-probs are natural logs.

    log_probs[gram]: log P(gram[-1] | gram[:-1]) for every seen gram (plus `<unk>` and `<s>`);
    backoffs[context]: log backoff weight of every gram that is followed by something.
    """

    def __init__(self, order: int, log_probs: dict[tuple[str, ...], float],
                 backoffs: dict[tuple[str, ...], float]):
        self.order, self.log_probs, self.backoffs = order, log_probs, backoffs
        self.vocabulary = {gram[0] for gram in log_probs if len(gram) == 1}

    @classmethod
    def estimate(cls, texts: Iterable[str], order: int = 6, smoothing: str = "kneser_ney",
                 add_k: float = 0.1) -> NgramLM:
        """Estimate from transcriptions (one sentence each), interpolating order 1 up to `order`."""
        if smoothing not in LM_SMOOTHINGS:
            raise DataError(f"LM smoothing must be one of {', '.join(LM_SMOOTHINGS)}, got '{smoothing}'")
        if order < 1:
            raise DataError(f"LM order must be >= 1, got {order}")
        raw = count_ngrams((text_to_tokens(text) for text in texts), order)
        if not raw[0]:
            raise DataError("cannot estimate a language model from no text")
        counts = kneser_ney_counts(raw) if smoothing == "kneser_ney" else [dict(c) for c in raw]
        vocabulary_size = len(raw[0]) + 1  # seen tokens and </s>, plus <unk>
        probs: dict[tuple[str, ...], float] = {}
        backoffs: dict[tuple[str, ...], float] = {}
        for k, order_counts in enumerate(counts, start=1):
            rule = _Interpolation(order_counts, smoothing, vocabulary_size, add_k)
            for gram, count in order_counts.items():
                lower = probs[gram[1:]] if k > 1 else 1.0 / vocabulary_size
                probs[gram] = rule.alpha(count, gram[:-1]) + rule.gamma(gram[:-1]) * lower
            if k == 1:
                probs[(UNK,)] = rule.gamma(()) / vocabulary_size
            backoffs.update((context, math.log(rule.gamma(context))) for context in rule.totals if context)
        log_probs = {gram: math.log(prob) for gram, prob in probs.items()}
        log_probs[(BOS,)] = ARPA_NEVER * LN10
        return cls(order, log_probs, backoffs)

    def log_prob(self, context: tuple[str, ...], token: str) -> float:
        """log P(token | context), backing off to shorter contexts; unknown tokens score as <unk>."""
        if (token,) not in self.log_probs:
            token = UNK
        context = context[max(0, len(context) - self.order + 1):] if self.order > 1 else ()
        penalty = 0.0
        while True:
            found = self.log_probs.get((*context, token))
            if found is not None:
                return penalty + found
            penalty += self.backoffs.get(context, 0.0)
            context = context[1:]

    def advance(self, context: tuple[str, ...], token: str) -> tuple[tuple[str, ...], float]:
        """(next context, log P(token | context)). The next context is the longest suffix that the
        model can extend, so equal futures share one context (and one cache entry)."""
        score = self.log_prob(context, token)
        token = token if (token,) in self.log_probs else UNK
        following = (*context, token)[max(0, len(context) + 2 - self.order):] if self.order > 1 else ()
        while following and following not in self.backoffs:
            following = following[1:]
        return following, score

    def sentence_log_prob(self, text: str) -> float:
        """log P(`<s>` text `</s>`): the sum of every token's log-prob, end of sentence included."""
        context, total = (BOS,), 0.0
        for token in [*text_to_tokens(text), EOS]:
            context, score = self.advance(context, token)
            total += score
        return total

    def write_arpa(self, path: str | Path) -> None:
        """Write a standard ARPA file (log10 probabilities and backoff weights)."""
        by_order: list[list[tuple[str, ...]]] = [[] for _ in range(self.order)]
        for gram in self.log_probs:
            by_order[len(gram) - 1].append(gram)
        lines = ["\\data\\"] + [f"ngram {k}={len(grams)}" for k, grams in enumerate(by_order, 1)]
        for k, grams in enumerate(by_order, start=1):
            lines += ["", f"\\{k}-grams:"]
            for gram in grams:
                prob = ARPA_NEVER if gram == (BOS,) else self.log_probs[gram] / LN10
                backoff = self.backoffs.get(gram)
                tail = f"\t{backoff / LN10:.7f}" if backoff is not None else ""
                lines.append(f"{prob:.7f}\t{' '.join(gram)}{tail}")
        lines += ["", "\\end\\", ""]
        Path(path).write_text("\n".join(lines), encoding="utf-8")

    @classmethod
    def read_arpa(cls, path: str | Path) -> NgramLM:
        """Read an ARPA file (ours or KenLM's lmplz); DataError naming the line if malformed."""
        log_probs: dict[tuple[str, ...], float] = {}
        backoffs: dict[tuple[str, ...], float] = {}
        order, section = 0, 0
        with open(path, encoding="utf-8") as stream:
            for number, line in enumerate(stream, start=1):
                parts = line.split()
                if not parts or parts[0].startswith("ngram") or parts[0] in ("\\data\\", "\\end\\"):
                    continue
                if parts[0].endswith("-grams:"):
                    section = int(parts[0][1:].split("-")[0])
                    order = max(order, section)
                    continue
                try:
                    if section == 0 or len(parts) not in (section + 1, section + 2):
                        raise ValueError
                    gram = tuple(parts[1: section + 1])
                    log_probs[gram] = float(parts[0]) * LN10
                    if len(parts) == section + 2:
                        backoffs[gram] = float(parts[-1]) * LN10
                except ValueError:
                    raise DataError(f"{path} line {number}: not an ARPA n-gram line: {line.strip()!r}") from None
        if not order:
            raise DataError(f"{path}: no n-grams found; is it an ARPA file?")
        log_probs.setdefault((UNK,), ARPA_NEVER * LN10)  # as KenLM does for a file without <unk>
        return cls(order, log_probs, backoffs)
