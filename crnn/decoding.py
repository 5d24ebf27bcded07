"""CTC decoding: greedy (best path), beam search, beam search + character language model.

Every decoder is a `Decoder`: a callable `(log_probs (T, N, C) float32, lengths (N,)) -> N
strings`, as `crnn.engine.evaluate` runs them; beam decoders also give the n best with `.nbest()`.
`build_decoders(names, vocab, cfg.decode, lm_texts)` builds them by name: greedy, beam, beam_lm.

Beam search is flashlight's lexicon-free CTC beam search (torchaudio `ctc_decoder`, CPU), with
`log_add` on, so a labelling's probability sums over its alignments. (torchaudio's CUDA beam
search aborts the process on H100 GPUs: `decode.cuda=true` is refused when the config loads.)

Tokens: blank is index 0 and the vocab's characters follow (as in `crnn.data.Vocab`). The space
character is the decoder's silence token, i.e. its word boundary: `decode.word_score` is
flashlight's `sil_score`, added on every frame labelled space (with a peaky CTC model, about once
per word). A vocab without a space gets a silence token past the last class, which no frame
can take: then `word_score` has no effect.

Language model (beam_lm): `decode.lm_path` (an ARPA file or a KenLM binary, loaded by
flashlight's KenLM), else a character n-gram (`crnn.lm.NgramLM`) estimated from the training
transcriptions, run by flashlight's KenLM (C++) by default or, with `decode.lm_backend=python`,
plugged in through torchaudio's `CTCDecoderLM` interface. `decode.lm_weight`
multiplies natural-log LM probabilities in both cases (KenLM's log10 scores are rescaled).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torchaudio.models.decoder import CTCDecoderLM, CTCDecoderLMState, ctc_decoder

from crnn.config import DecodeConfig
from crnn.data.vocab import BLANK, Vocab
from crnn.errors import ConfigError
from crnn.lm import BOS, EOS, UNK, NgramLM, char_to_token

DECODER_NAMES = ("greedy", "beam", "beam_lm")
KENLM_MAX_ORDER = 6  # what the pip wheels of flashlight-text are compiled for
Decoder = Callable[[torch.Tensor, torch.Tensor], list[str]]
BLANK_TOKEN = "<blank>"
NO_SPACE_SIL_TOKEN = "<sil>"  # a silence token for vocabs without a space: past the last class


def greedy_paths(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Best path: argmax per frame, merge repeats, drop blanks.

    log_probs `(T, N, C)`, lengths `(N,)` -> per line, its class indices and the frame where each
    one starts.
    """
    best = log_probs.argmax(dim=-1).T  # (N, T)
    keep = best != BLANK
    keep[:, 1:] &= best[:, 1:] != best[:, :-1]
    keep &= torch.arange(best.shape[1], device=best.device)[None, :] < lengths.to(best.device)[:, None]
    best, keep = best.cpu(), keep.cpu()  # one transfer for the whole batch
    return [(row[mask].tolist(), mask.nonzero().flatten().tolist()) for row, mask in zip(best, keep, strict=True)]


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """`greedy_paths` without the frames: N lists of class indices."""
    return [indices for indices, _ in greedy_paths(log_probs, lengths)]


class Hypothesis(NamedTuple):
    text: str
    score: float  # the decoder's total log score (acoustic + weighted LM + word scores)
    frames: tuple[int, ...] = ()  # per character, the frame the decoder emitted it at


class GreedyDecoder:
    """log_probs `(T, N, C)`, lengths `(N,)` -> N strings."""

    name = "greedy"

    def __init__(self, vocab: Vocab):
        self.vocab = vocab

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        return [self.vocab.decode(indices) for indices in greedy_decode(log_probs, lengths)]

    def nbest(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[Hypothesis]]:
        """The best path as the one hypothesis of each line (score: its summed log-probs)."""
        scores = log_probs.detach().float().max(dim=-1).values  # (T, N)
        return [[Hypothesis(self.vocab.decode(indices), float(scores[: int(length), i].sum()), tuple(frames))]
                for i, ((indices, frames), length) in enumerate(zip(greedy_paths(log_probs, lengths),
                                                                     lengths.tolist(), strict=True))]


def decoder_tokens(vocab: Vocab) -> tuple[list[str], str]:
    """Flashlight's token list (index = class, `<blank>` first) and its silence token.

    Characters are named as the LM names them (`crnn.lm.char_to_token`: a space is `|`), so that
    a KenLM file built from tokenised text finds them.
    """
    tokens = [BLANK_TOKEN] + [char_to_token(char) for char in vocab.chars]
    if " " in vocab.index:
        return tokens, char_to_token(" ")
    return [*tokens, NO_SPACE_SIL_TOKEN], NO_SPACE_SIL_TOKEN


class NgramDecoderLM(CTCDecoderLM):
    """A `crnn.lm.NgramLM` behind torchaudio's custom-LM interface, scoring class indices.

    Flashlight merges two hypotheses only when their LM states are the same object, so states
    follow the decoder's prefix tree (`state.child(token)`), as its KenLM wrapper's do: equal
    prefixes merge (their alignments are summed), different ones never do. Each state maps to the
    id of its n-gram context. Flashlight asks for every (hypothesis, class) pair at every frame,
    so the LM's answers are cached per (context id, class) across lines. Scores are natural-log
    probabilities; flashlight multiplies them by its `lm_weight`.
    """

    CACHE_LIMIT = 4_000_000  # (context, class) answers kept before the cache starts over

    def __init__(self, lm: NgramLM, vocab: Vocab):
        CTCDecoderLM.__init__(self)
        self.lm = lm
        # class index -> LM token; the blank (0) is never scored
        self.words = [UNK] + [char_to_token(char) for char in vocab.chars]
        self.context_ids: dict[tuple[str, ...], int] = {}  # at most one per context of the model
        self.contexts: list[tuple[str, ...]] = []
        self.steps: dict[int, tuple[int, float]] = {}  # context id * classes + class -> (id, log p)
        self.states: dict[CTCDecoderLMState, int] = {}  # the current line's states -> context id

    def context_id(self, context: tuple[str, ...]) -> int:
        if context not in self.context_ids:
            self.context_ids[context] = len(self.contexts)
            self.contexts.append(context)
        return self.context_ids[context]

    def start(self, start_with_nothing: bool) -> CTCDecoderLMState:
        # called at the start of every line: the previous line's states are gone from the decoder
        self.states.clear()
        state = CTCDecoderLMState()
        self.states[state] = self.context_id(() if start_with_nothing else (BOS,))
        return state

    def score(self, state: CTCDecoderLMState, usr_token_idx: int) -> tuple[CTCDecoderLMState, float]:
        key = self.states[state] * len(self.words) + usr_token_idx
        step = self.steps.get(key)
        if step is None:
            step = self.advance(key)
        child = state.child(usr_token_idx)
        self.states[child] = step[0]
        return child, step[1]

    def advance(self, key: int) -> tuple[int, float]:
        context_id, token = divmod(key, len(self.words))
        following, log_prob = self.lm.advance(self.contexts[context_id], self.words[token])
        if len(self.steps) >= self.CACHE_LIMIT:
            self.steps.clear()
        self.steps[key] = (self.context_id(following), log_prob)
        return self.steps[key]

    def finish(self, state: CTCDecoderLMState) -> tuple[CTCDecoderLMState, float]:
        return state, self.lm.log_prob(self.contexts[self.states[state]], EOS)


class BeamDecoder:
    """Flashlight's lexicon-free CTC beam search (torchaudio `ctc_decoder`), on the CPU.

    `lm`: None or a flashlight LM (a `CTCDecoderLM`, or flashlight's KenLM from `load_kenlm`);
    `lm_weight` multiplies the LM's scores as they come (see `build_language_model` for units);
    `word_score` is added on every frame labelled space. `beam_size_token` 0 means all classes.
    """

    def __init__(self, vocab: Vocab, beam_size: int = 10, beam_threshold: float = 25.0,
                 beam_size_token: int = 0, nbest: int = 1, lm: CTCDecoderLM | None = None,
                 lm_weight: float = 0.0, word_score: float = 0.0):
        tokens, sil_token = decoder_tokens(vocab)
        self.vocab = vocab
        try:
            self.decoder = ctc_decoder(
                lexicon=None, tokens=tokens, lm=lm, nbest=nbest, beam_size=beam_size,
                beam_size_token=beam_size_token or None, beam_threshold=beam_threshold,
                lm_weight=lm_weight, sil_score=word_score, log_add=True,
                blank_token=BLANK_TOKEN, sil_token=sil_token)
        except RuntimeError as err:
            raise ConfigError(f"cannot build the beam search decoder: {str(err).splitlines()[0]}") from None

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
        # Flashlight's path has one node per frame plus a silence node before the first frame
        # (step 0) and one after the last (step length + 1): those are not characters; a
        # character's node at step s is frame s - 1.
        kept = [(token, step - 1) for token, step in zip(hypothesis.tokens.tolist(), hypothesis.timesteps.tolist(),
                                                          strict=True) if 0 < step <= length]
        return Hypothesis(self.vocab.decode([token for token, _ in kept]), float(hypothesis.score),
                          tuple(frame for _, frame in kept))


# ---------------------------------------------------------------------------------------------
# Building decoders from the `decode` config section.


def lm_file_kind(path: str | Path) -> str:
    """'arpa' or 'kenlm' (a KenLM binary), from the file's first bytes; ConfigError otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"decode.lm_path: language model file not found: {path}")
    with open(path, "rb") as stream:
        head = stream.read(4096)
    if head.startswith(b"mmap lm "):
        return "kenlm"
    if b"\\data\\" in [line.strip() for line in head.splitlines()]:
        return "arpa"
    raise ConfigError(f"decode.lm_path: {path} is neither an ARPA file (with a \\data\\ line) nor a "
                      f"KenLM binary; build one with: python tools/build_lm.py TEXTS --out lm.arpa")


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


def load_kenlm(path: str | Path, vocab: Vocab) -> CTCDecoderLM | None:
    """Flashlight's KenLM over an ARPA or binary file, its words indexed like the decoder's tokens.

    Not torchaudio's `ctc_decoder(lm=path)`: for lexicon-free decoding it builds the LM's word
    dictionary in another order than the tokens, while flashlight scores token indices, so the LM
    would score the wrong characters. None if flashlight-text was built without KenLM.
    """
    try:
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary
    except ImportError:
        return None
    try:
        with quiet_stderr():  # KenLM draws a progress bar of asterisks while it reads an ARPA file
            return KenLM(str(path), Dictionary(decoder_tokens(vocab)[0]))
    except RuntimeError as err:
        raise ConfigError(f"decode.lm_path: KenLM cannot read {path}: {str(err).splitlines()[0]}") from None


def load_lm_file(path: str | Path, vocab: Vocab) -> tuple[CTCDecoderLM, float]:
    """An LM file for flashlight, and the factor that turns its scores into natural logs.

    KenLM (log10 scores) reads it when it can; an ARPA file that it cannot load (no KenLM, or an
    order above KenLM's compiled maximum, 6 in the pip wheels) is read by `NgramLM.read_arpa`:
    the same probabilities, scored in Python.
    """
    kind = lm_file_kind(path)
    try:
        kenlm = load_kenlm(path, vocab)
    except ConfigError:
        if kind == "kenlm":
            raise
        kenlm = None
    if kenlm is not None:
        return kenlm, math.log(10.0)
    if kind == "kenlm":
        raise ConfigError(f"decode.lm_path: {path} is a KenLM binary, but flashlight-text was built "
                          f"without KenLM; use an ARPA file (python tools/build_lm.py)")
    return NgramDecoderLM(NgramLM.read_arpa(path), vocab), 1.0


def build_language_model(vocab: Vocab, decode_cfg: DecodeConfig,
                         lm_texts: Sequence[str] | None) -> tuple[CTCDecoderLM, float]:
    """The beam_lm language model and the factor that turns its scores into natural logs: give
    flashlight `decode.lm_weight` times it, so that the weight means the same whatever the LM.

    From `decode.lm_path` if set (`load_lm_file`), else estimated from `lm_texts` with
    `decode.lm_order` and `decode.lm_smoothing`, then run by flashlight's KenLM in C++ (written as
    an ARPA file first: the same probabilities) unless `decode.lm_backend=python`, the order is above
    KenLM's compiled maximum, or flashlight-text lacks KenLM: then in Python (`NgramDecoderLM`).
    """
    if decode_cfg.lm_path:
        return load_lm_file(decode_cfg.lm_path, vocab)
    if lm_texts is None:
        raise ConfigError("the beam_lm decoder needs a language model: set decode.lm_path (e.g. from "
                          "python tools/build_lm.py TEXTS --out lm.arpa) or give training texts")
    lm = NgramLM.estimate(lm_texts, decode_cfg.lm_order, decode_cfg.lm_smoothing)
    if decode_cfg.lm_backend == "kenlm" and decode_cfg.lm_order <= KENLM_MAX_ORDER:
        with tempfile.TemporaryDirectory() as folder:  # KenLM holds the model in memory once read
            arpa = Path(folder) / "lm.arpa"
            lm.write_arpa(arpa)
            kenlm = load_kenlm(arpa, vocab)
        if kenlm is not None:
            return kenlm, math.log(10.0)
    return NgramDecoderLM(lm, vocab), 1.0


def decoder_workers(decode_cfg: DecodeConfig) -> int:
    """`decode.workers`, 0 meaning one per CPU core this process may use."""
    if decode_cfg.workers:
        return decode_cfg.workers
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_decoders(names: Iterable[str], vocab: Vocab, decode_cfg: DecodeConfig,
                   lm_texts: Sequence[str] | None = None) -> dict[str, Decoder]:
    """Decoders by name (greedy, beam, beam_lm), in the order given, configured by `decode_cfg`.

    `lm_texts` (training transcriptions) are only read for beam_lm without `decode.lm_path`. The
    values of `decode_cfg` were checked when the config was loaded (`crnn.config`). With more than
    one `decode.workers`, the beam decoders run in a `DecoderPool` of that many processes.
    """
    names = list(names)
    unknown = [name for name in names if name not in DECODER_NAMES]
    if unknown:
        raise ConfigError(f"unknown decoder '{unknown[0]}'; choose from {', '.join(DECODER_NAMES)}")
    beams = [name for name in names if name != "greedy"]
    pool = None
    if beams and decoder_workers(decode_cfg) > 1:
        build_local_decoders(beams, vocab, decode_cfg, lm_texts)  # its errors here, not in a worker
        pool = DecoderPool(beams, vocab, decode_cfg, lm_texts, decoder_workers(decode_cfg))
        local = {}
    else:
        local = build_local_decoders(beams, vocab, decode_cfg, lm_texts)
    return {name: GreedyDecoder(vocab) if name == "greedy" else (PooledDecoder(pool, name) if pool else local[name])
            for name in names}


def build_local_decoders(names: Iterable[str], vocab: Vocab, decode_cfg: DecodeConfig,
                         lm_texts: Sequence[str] | None) -> dict[str, BeamDecoder]:
    """The beam decoders of `names` in this process."""
    beam_options = {"beam_size": decode_cfg.beam_size, "beam_threshold": decode_cfg.beam_threshold,
                    "beam_size_token": decode_cfg.beam_size_token, "nbest": decode_cfg.nbest}
    decoders = {}
    for name in names:
        if name == "beam":
            decoders[name] = BeamDecoder(vocab, **beam_options)
        else:
            lm, to_natural_log = build_language_model(vocab, decode_cfg, lm_texts)
            decoders[name] = BeamDecoder(vocab, **beam_options, lm=lm, lm_weight=decode_cfg.lm_weight * to_natural_log,
                                         word_score=decode_cfg.word_score)
    return decoders


# ---------------------------------------------------------------------------------------------
# Beam search over several processes. Flashlight's decoder holds the GIL while it searches (two
# threads decode no faster than one), so lines are decoded in worker processes, each with its
# own decoders; a batch is cut into one contiguous chunk per worker and put back in order.

_WORKER_DECODERS: dict[str, BeamDecoder] = {}


def _start_worker(names: list[str], chars: list[str], decode_cfg: DecodeConfig, lm_texts) -> None:
    torch.set_num_threads(1)
    _WORKER_DECODERS.update(build_local_decoders(names, Vocab(chars), decode_cfg, lm_texts))


def _worker_ready() -> int:
    time.sleep(0.05)  # stay busy a moment, so that the other tasks go to the other workers
    return os.getpid()


def _decode_chunk(name: str, emissions, lengths) -> list[list[Hypothesis]]:
    """emissions `(n, T, C)` float32 numpy, lengths `(n,)` -> per line, its hypotheses."""
    log_probs = torch.from_numpy(emissions).transpose(0, 1)
    return _WORKER_DECODERS[name].nbest(log_probs, torch.from_numpy(lengths))


class DecoderPool:
    """Beam decoders (`names`) in `workers` processes: results identical to one process's, in order.

    `submit` returns at once with a function that waits for the result, so that the caller can
    run the next batch's forward pass meanwhile (`crnn.engine.evaluate` does)."""

    def __init__(self, names: list[str], vocab: Vocab, decode_cfg: DecodeConfig, lm_texts, workers: int):
        self.workers = workers
        self.executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(names, list(vocab.chars), dataclasses.replace(decode_cfg, workers=1),
                      list(lm_texts) if lm_texts is not None else None))
        atexit.register(self.close)
        ready: set[int] = set()  # every worker started, its decoders (and LM) built, before any line
        while len(ready) < workers:
            ready |= {future.result() for future in [self.executor.submit(_worker_ready) for _ in range(workers)]}

    def submit(self, name: str, log_probs: torch.Tensor, lengths: torch.Tensor) -> Callable[[], list[list[Hypothesis]]]:
        emissions = log_probs.detach().float().cpu().transpose(0, 1).contiguous().numpy()  # (N, T, C)
        lengths = lengths.detach().cpu().numpy()
        chunks = [chunk for chunk in np.array_split(np.arange(len(lengths)), self.workers) if len(chunk)]
        futures = [self.executor.submit(_decode_chunk, name, emissions[chunk[0]: chunk[-1] + 1],
                                        lengths[chunk[0]: chunk[-1] + 1]) for chunk in chunks]
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
