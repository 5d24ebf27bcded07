"""CTC decoding: greedy (best path), beam search, beam search + character LM (docs/decoding.md).

Every decoder is a `Decoder`: `(log_probs (T, N, C) float32, lengths (N,)) -> N strings`, the n
best from `.nbest()`. Beam search is flashlight's lexicon-free CTC beam search (torchaudio
`ctc_decoder`, CPU) with `log_add` on, so a labelling's probability sums over its alignments. The
space is its silence token, i.e. its word boundary: `decode.word_score` is added on every frame
labelled space (never, for a vocab without a space: its silence token is past the last class).
`decode.lm_weight` multiplies natural-log LM probabilities.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torchaudio.models.decoder import ctc_decoder

from crnn.config import DecodeConfig
from crnn.data.vocab import BLANK, Vocab
from crnn.errors import ConfigError
from crnn.lm import KENLM_MAX_ORDER, NgramLM, char_to_token

DECODER_NAMES = ("greedy", "beam", "beam_lm")
BEAM_SIZE_TOKEN = 16  # classes considered per frame
Decoder = Callable[[torch.Tensor, torch.Tensor], list[str]]
BLANK_TOKEN = "<blank>"
NO_SPACE_SIL_TOKEN = "<sil>"  # a silence token for vocabs without a space: past the last class


def greedy_paths(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Best path: argmax per frame, merge repeats, drop blanks. log_probs `(T, N, C)`, lengths
    `(N,)` -> per line, its class indices and the frame where each one starts."""
    best = log_probs.argmax(dim=-1).T  # (N, T)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    keep &= torch.arange(best.shape[1], device=best.device)[None, :] < lengths.to(best.device)[:, None]
    best, keep = best.cpu(), keep.cpu()  # one transfer for the whole batch
    return [(row[mask].tolist(), mask.nonzero().flatten().tolist()) for row, mask in zip(best, keep, strict=True)]


def char_spans(log_probs: torch.Tensor, labels: Sequence[int], frames: Sequence[int]) -> list[tuple[float, int, int]]:
    """Per character of one line's reading (class `labels[i]` emitted at frame `frames[i]`), from its
    log-probs `(T, C)`: (confidence, first frame, last frame) of the run of frames around its own
    where it is the most probable class (docs/decoding.md; its own frame alone where it is not)."""
    if not len(labels):
        return []
    probs = log_probs.float().exp()
    best, argmax = probs.max(dim=-1)
    _, run, counts = torch.unique_consecutive(argmax, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0) - 1
    starts = ends - counts + 1
    run_best = best.new_zeros(len(starts)).scatter_reduce(0, run, best, "amax")
    frames, labels = torch.tensor(frames), torch.tensor(labels)
    inside, own = argmax[frames] == labels, run[frames]
    confidence = torch.where(inside, run_best[own], probs[frames, labels])
    first, last = torch.where(inside, starts[own], frames), torch.where(inside, ends[own], frames)
    return list(zip(confidence.tolist(), first.tolist(), last.tolist(), strict=True))


def char_cuts(spans: Sequence[tuple[float, int, int]]) -> list[tuple[float, float]]:
    """Each character's extent in frames, [start, end) (frame t covers t to t + 1), from its
    `char_spans` run: it reaches from the boundary with the character before it to the boundary
    with the one after, each boundary the middle of the frames between their two runs; the first
    starts at its run, the last ends with its run."""
    firsts, lasts = [first for _, first, _ in spans], [last + 1 for _, _, last in spans]
    bounds = [(end + start) / 2 for end, start in zip(lasts, firsts[1:], strict=False)]
    return list(zip(firsts[:1] + bounds, bounds + lasts[-1:], strict=True))


def word_ranges(text: str) -> list[tuple[int, int]]:
    """The words of `text` (split at spaces): the index of each one's first character and one past its last."""
    return [(match.start(), match.end()) for match in re.finditer(r"[^ ]+", text)]


class Hypothesis(NamedTuple):
    text: str
    score: float  # the decoder's total log score (acoustic + weighted LM + word scores)
    frames: tuple[int, ...] = ()  # per character, the frame the decoder emitted it at


class GreedyDecoder:
    """log_probs `(T, N, C)`, lengths `(N,)` -> N strings."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [self.vocab.decode(indices) for indices, _ in greedy_paths(log_probs, lengths)]

    def nbest(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[Hypothesis]]:
        """The best path as the one hypothesis of each line (score: its summed log-probs)."""
        scores = log_probs.detach().float().max(dim=-1).values  # (T, N)
        return [[Hypothesis(self.vocab.decode(indices), float(scores[:length, i].sum()), tuple(frames))]
                for i, ((indices, frames), length) in enumerate(zip(greedy_paths(log_probs, lengths),
                                                                     lengths.tolist(), strict=True))]


def decoder_tokens(vocab: Vocab) -> tuple[list[str], str]:
    """Flashlight's token list (index = class, `<blank>` first) and its silence token, characters
    named as the LM names them (`crnn.lm.char_to_token`: a space is `|`)."""
    tokens = [BLANK_TOKEN] + [char_to_token(char) for char in vocab.chars]
    if " " in vocab.index:
        return tokens, char_to_token(" ")
    return [*tokens, NO_SPACE_SIL_TOKEN], NO_SPACE_SIL_TOKEN


class BeamDecoder:
    """The beam search of the module docstring; `lm`: None or flashlight's KenLM (`load_kenlm`)."""

    def __init__(self, vocab: Vocab, beam_size: int = 10, beam_threshold: float = 25.0, nbest: int = 1,
                 lm=None, lm_weight: float = 0.0, word_score: float = 0.0):
        tokens, sil_token = decoder_tokens(vocab)
        self.vocab = vocab
        self.decoder = ctc_decoder(
            lexicon=None, tokens=tokens, lm=lm, nbest=nbest, beam_size=beam_size,
            beam_size_token=min(BEAM_SIZE_TOKEN, len(tokens)), beam_threshold=beam_threshold,
            lm_weight=lm_weight * math.log(10.0), sil_score=word_score, log_add=True,
            blank_token=BLANK_TOKEN, sil_token=sil_token)

    def nbest(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[Hypothesis]]:
        """log_probs `(T, N, C)`, lengths `(N,)` -> per line, its best hypotheses, best first."""
        emissions = log_probs.detach().float().cpu().transpose(0, 1).contiguous()  # (N, T, C)
        lengths = lengths.detach().cpu()
        results = self.decoder(emissions, lengths)
        return [[self._hypothesis(hypothesis, int(length)) for hypothesis in line]
                for line, length in zip(results, lengths, strict=True)]

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [line[0].text if line else "" for line in self.nbest(log_probs, lengths)]

    def _hypothesis(self, hypothesis, length: int) -> Hypothesis:
        # flashlight's path has a silence node before the first frame (step 0) and one after the
        # last (step length + 1); a character's node at step s is frame s - 1
        kept = [(token, step - 1) for token, step in zip(hypothesis.tokens.tolist(), hypothesis.timesteps.tolist(),
                                                          strict=True) if 0 < step <= length]
        return Hypothesis(self.vocab.decode([token for token, _ in kept]), float(hypothesis.score),
                          tuple(frame for _, frame in kept))


@contextlib.contextmanager
def quiet_stderr():
    """Silence what C++ code writes to file descriptor 2 (Python's own stderr is unaffected)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def load_kenlm(path: str | Path, vocab: Vocab):
    """Flashlight's KenLM over an ARPA or binary file, its words indexed like the decoder's tokens
    (not `ctc_decoder(lm=path)`, which orders a lexicon-free LM's words otherwise than the tokens
    it scores); ConfigError naming decode.lm_path if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"decode.lm_path: language model file not found: {path}")
    try:
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary
    except ImportError:
        raise ConfigError("beam_lm needs flashlight-text built with KenLM (pip install flashlight-text)") from None
    try:
        with quiet_stderr():  # KenLM draws a progress bar of asterisks while it reads an ARPA file
            return KenLM(str(path), Dictionary(decoder_tokens(vocab)[0]))
    except RuntimeError as err:
        lines = str(err).splitlines()
        raise ConfigError(f"decode.lm_path: KenLM cannot read {path}: {(lines[1:] or lines)[0]} (an ARPA file or "
                          f"KenLM binary of order at most {KENLM_MAX_ORDER}: python tools/build_lm.py TEXTS "
                          f"--out lm.arpa)") from None


def build_language_model(vocab: Vocab, decode_cfg: DecodeConfig, lm_texts: Sequence[str] | None):
    """beam_lm's KenLM: from `decode.lm_path` if set, else estimated from `lm_texts` with
    `decode.lm_order` (written as an ARPA file, read by KenLM)."""
    if decode_cfg.lm_path:
        return load_kenlm(decode_cfg.lm_path, vocab)
    if lm_texts is None:
        raise ConfigError("the beam_lm decoder needs a language model: set decode.lm_path (e.g. from "
                          "python tools/build_lm.py TEXTS --out lm.arpa) or give training texts")
    if decode_cfg.lm_order > KENLM_MAX_ORDER:
        raise ConfigError(f"decode.lm_order={decode_cfg.lm_order}: KenLM reads orders up to {KENLM_MAX_ORDER}")
    with tempfile.TemporaryDirectory() as folder:  # KenLM holds the model in memory once read
        arpa = Path(folder) / "lm.arpa"
        NgramLM.estimate(lm_texts, decode_cfg.lm_order).write_arpa(arpa)
        return load_kenlm(arpa, vocab)


def decoder_workers(decode_cfg: DecodeConfig) -> int:
    """`decode.workers`, 0 meaning one per CPU core this process may use."""
    if decode_cfg.workers:
        return decode_cfg.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_decoders(names: Iterable[str], vocab: Vocab, decode_cfg: DecodeConfig,
                   lm_texts: Sequence[str] | None = None) -> dict[str, Decoder]:
    """Decoders by name, in the order given; beam_lm without `decode.lm_path` reads `lm_texts`
    (training transcriptions); with `decode.workers` > 1 the beam decoders run in a `DecoderPool`."""
    names = list(names)
    unknown = [name for name in names if name not in DECODER_NAMES]
    if unknown:
        raise ConfigError(f"unknown decoder '{unknown[0]}'; choose from {', '.join(DECODER_NAMES)}")
    beams = [name for name in names if name != "greedy"]
    local = build_local_decoders(beams, vocab, decode_cfg, lm_texts)  # its errors here, not in a worker
    if beams and (workers := decoder_workers(decode_cfg)) > 1:
        pool = DecoderPool(beams, vocab, decode_cfg, lm_texts, workers)
        local = {name: PooledDecoder(pool, name) for name in beams}
    return {name: GreedyDecoder(vocab) if name == "greedy" else local[name] for name in names}


def build_local_decoders(names: Iterable[str], vocab: Vocab, decode_cfg: DecodeConfig,
                         lm_texts: Sequence[str] | None) -> dict[str, BeamDecoder]:
    options = {"beam_size": decode_cfg.beam_size, "beam_threshold": decode_cfg.beam_threshold, "nbest": decode_cfg.nbest}
    return {name: BeamDecoder(vocab, **options) if name == "beam" else
            BeamDecoder(vocab, **options, lm=build_language_model(vocab, decode_cfg, lm_texts),
                        lm_weight=decode_cfg.lm_weight, word_score=decode_cfg.word_score)
            for name in names}


# Beam search in worker processes, each with its own decoders (flashlight holds the GIL while it
# searches); a batch is cut into one contiguous chunk per worker and put back in order.

_WORKER_DECODERS: dict[str, BeamDecoder] = {}


def _start_worker(names: list[str], vocab: Vocab, decode_cfg: DecodeConfig, lm_texts) -> None:
    torch.set_num_threads(1)
    _WORKER_DECODERS.update(build_local_decoders(names, vocab, decode_cfg, lm_texts))


def _worker_ready() -> int:
    time.sleep(0.05)  # stay busy a moment, so that the other tasks go to the other workers
    return os.getpid()


def _decode_chunk(name: str, emissions, lengths) -> list[list[Hypothesis]]:
    """emissions `(n, T, C)` float32 numpy, lengths `(n,)` -> per line, its hypotheses."""
    return _WORKER_DECODERS[name].nbest(torch.from_numpy(emissions).transpose(0, 1), torch.from_numpy(lengths))


class DecoderPool:
    """Beam decoders (`names`) in `workers` processes: results identical to one process's, in
    order. `submit` returns at once with a function that waits for the result, so that the caller
    can run the next batch's forward pass meanwhile (`crnn.engine.evaluate` does)."""

    def __init__(self, names: list[str], vocab: Vocab, decode_cfg: DecodeConfig, lm_texts, workers: int):
        self.workers = workers
        self.executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(names, vocab, dataclasses.replace(decode_cfg, workers=1), lm_texts))
        atexit.register(self.close)
        ready: set[int] = set()  # every worker started, its decoders (and LM) built, before any line
        while len(ready) < workers:
            ready |= {future.result() for future in [self.executor.submit(_worker_ready) for _ in range(workers)]}

    def submit(self, name: str, log_probs: torch.Tensor, lengths: torch.Tensor) -> Callable[[], list[list[Hypothesis]]]:
        emissions = log_probs.detach().float().cpu().transpose(0, 1).contiguous().numpy()  # (N, T, C)
        lengths = lengths.detach().cpu().numpy()
        chunks = zip(*(np.array_split(array, self.workers) for array in (emissions, lengths)), strict=True)
        futures = [self.executor.submit(_decode_chunk, name, *chunk) for chunk in chunks if len(chunk[1])]
        return lambda: [line for future in futures for line in future.result()]

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class PooledDecoder:
    """One of a `DecoderPool`'s decoders, used like a `BeamDecoder`."""

    def __init__(self, pool: DecoderPool, name: str):
        self.pool, self.name = pool, name

    def submit(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> Callable[[], list[str]]:
        result = self.pool.submit(self.name, log_probs, lengths)
        return lambda: [line[0].text if line else "" for line in result()]

    def nbest(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[Hypothesis]]:
        return self.pool.submit(self.name, log_probs, lengths)()

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return self.submit(log_probs, lengths)()

    def close(self) -> None:
        self.pool.close()
