"""Calibration: probabilities a user can take at their word, fitted on a labelled split
(`fit_calibration`): a temperature `T` (posteriors `softmax(log_probs / T)`), then a line model
giving each line's `p_exact` (logistic) and expected character errors (Poisson, which counts the
dropped characters the character confidences miss). What each part is and how well it holds:
docs/calibration.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.utils.rnn import pad_sequence

from crnn.data import Vocab
from crnn.decoding import char_spans, greedy_paths
from crnn.errors import DataError
from crnn.metrics import aligned_hits, char_errors

MIN_LINES = 50  # labelled lines a fit needs at least
TEMPERATURE_RANGE = (0.2, 5.0)
TEMPERATURE_PRECISION = 1e-3  # the search stops when log T is known to this (T to 0.1%)
LINES_PER_BATCH = 128  # lines padded into one batch for the CTC computations
# what `line_features` measures of a line
FEATURES = ("bias", "doubt", "missed", "entropy", "log_chars", "weakest", "log_p_reading", "log_doubt", "log_missed")
# what the line model is fitted on: the sums as logs, so that a line far beyond the fitted ones is
# not extrapolated exponentially
LINE_MODEL = ("bias", "log_doubt", "log_missed", "entropy", "log_chars", "weakest", "log_p_reading")
LEGACY_FEATURES = FEATURES[:6]  # what a calibration stored without its feature names was fitted on
LOG_P_FLOOR = -50.0  # the reading's log-probability is clipped here (a line read very unsurely)
L2 = 1e-3  # ridge on the line model's weights (not the bias): a stable fit on small splits
GLM_MAX_ETA = 20.0  # the Poisson model's log-rate is capped here (e^20 errors: never a real line)


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration (see the module docstring); the identity when nothing was fitted."""

    temperature: float = 1.0
    exact_weights: tuple[float, ...] = ()  # logistic regression of "read exactly" on `features`
    error_weights: tuple[float, ...] = ()  # Poisson regression of character errors on `features`
    features: tuple[str, ...] = LINE_MODEL  # the names of the FEATURES the weights apply to, in order
    # each feature's range on the lines fitted on, which a line's features are clipped to (empty: none)
    feature_low: tuple[float, ...] = ()
    feature_high: tuple[float, ...] = ()
    dispersion: float = 1.0  # variance / mean of the errors around the Poisson model, on the fit split
    length_ratio: float = 1.0  # reference characters / characters read, on the fit split
    lines: int = 0  # labelled lines it was fitted on
    fitted_on: str = ""  # which split, for the record

    @property
    def fitted(self) -> bool:
        return bool(self.error_weights)

    def to_dict(self) -> dict:
        return {name: list(value) if isinstance(value, tuple) else value
                for name, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, state: dict | None) -> Calibration:
        if not state:
            return cls()
        known = {name: state[name] for name in cls.__dataclass_fields__ if name in state}
        for name in ("exact_weights", "error_weights", "feature_low", "feature_high"):
            known[name] = tuple(float(value) for value in known.get(name, ()))
        known["features"] = tuple(known.get("features", LEGACY_FEATURES))
        unknown = [name for name in known["features"] if name not in FEATURES]
        if unknown:
            raise ValueError(f"calibration: unknown line feature(s) {unknown}; this version knows {list(FEATURES)}")
        return cls(**known)

    def scale(self, log_probs: torch.Tensor) -> torch.Tensor:
        """Calibrated log-probs (over the last dimension)."""
        if self.temperature == 1.0:
            return log_probs
        return F.log_softmax(log_probs.float() / self.temperature, dim=-1)

    def line_estimates(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_exact, expected character errors) of lines with `features` `(N, len(FEATURES))`."""
        x = features.double()[:, [FEATURES.index(name) for name in self.features]]
        if self.feature_low:
            x = torch.clamp(x, x.new_tensor(self.feature_low), x.new_tensor(self.feature_high))
        errors = torch.exp((x @ x.new_tensor(self.error_weights)).clamp(max=GLM_MAX_ETA))
        return torch.sigmoid(x @ x.new_tensor(self.exact_weights)), errors

    def estimate_cer(self, expected_errors: Sequence[float],
                     read_chars: Sequence[int]) -> tuple[float, tuple[float, float]]:
        """(estimate, (low, high)) of the CER from its lines' expected errors and characters read."""
        reference = float(sum(read_chars)) * self.length_ratio
        return cer_estimate(float(sum(expected_errors)), reference, self.dispersion)


def cer_estimate(errors: float, reference: float, dispersion: float) -> tuple[float, tuple[float, float]]:
    """(errors / reference, its 95% interval): Poisson's spread, widened (never narrowed) by `dispersion`."""
    reference = max(reference, 1.0)
    spread = 1.96 * math.sqrt(max(dispersion, 1.0) * errors)
    return errors / reference, (max(errors - spread, 0.0) / reference, (errors + spread) / reference)


def padded(lines: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Lines' log-probs `(T_i, C)` as one batch: (log_probs `(T, N, C)` float32, zero-padded; lengths `(N,)`)."""
    return pad_sequence([line.float() for line in lines]), torch.tensor([len(line) for line in lines])


def reading_log_probs(log_probs: torch.Tensor, lengths: torch.Tensor, readings: Sequence[Sequence[int]]) -> torch.Tensor:
    """log P(reading | line) of each line `(N,)` under its log-probs `(T, N, C)`: CTC's sum over
    the reading's alignments (`readings`: class indices), clipped at LOG_P_FLOOR."""
    if not len(log_probs):  # no frames at all: the empty reading, surely
        return torch.zeros(len(readings), dtype=torch.float64)
    targets = torch.tensor([c for reading in readings for c in reading], dtype=torch.long)
    loss = F.ctc_loss(log_probs.float(), targets, lengths, torch.tensor([len(r) for r in readings]), blank=0,
                      reduction="none")
    return (-loss.double()).clamp(min=LOG_P_FLOOR)  # an infeasible reading (never the greedy one): the floor


def line_features(log_probs: torch.Tensor, lengths: torch.Tensor,
                  paths: list[tuple[list[int], list[int]]] | None = None) -> torch.Tensor:
    """FEATURES `(N, len(FEATURES))` float64 of lines from their calibrated log-probs `(T, N, C)`
    and greedy paths (`crnn.decoding.greedy_paths`), in words in docs/calibration.md ("doubt": the
    summed 1 - confidence of the characters read; "missed": the non-blank mass of blank frames)."""
    log_probs = log_probs.float()
    paths = greedy_paths(log_probs, lengths) if paths is None else paths
    probs = log_probs.exp()
    valid = (torch.arange(len(log_probs))[:, None] < lengths[None, :]).float()  # (T, N)
    missed = ((1.0 - probs[..., 0]) * (probs.argmax(dim=-1) == 0) * valid).sum(dim=0).double()
    entropy = (-(probs * log_probs).sum(dim=-1) * valid).sum(dim=0).double() / lengths.clamp(min=1)
    reading = reading_log_probs(log_probs, lengths, [labels for labels, _ in paths])
    rows = []
    for i, (labels, frames) in enumerate(paths):
        confidences = [confidence for confidence, _, _ in char_spans(log_probs[: lengths[i], i], labels, frames)]
        doubt = sum(1.0 - confidence for confidence in confidences)
        weakest = min(max(min(confidences, default=1.0), 1e-6), 1 - 1e-6)
        rows.append([1.0, doubt, float(missed[i]), float(entropy[i]), math.log1p(len(confidences)),
                     math.log(weakest / (1 - weakest)), float(reading[i]), math.log1p(doubt), math.log1p(float(missed[i]))])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, len(FEATURES))


def fit_temperature(log_probs: Sequence[torch.Tensor], targets: Sequence[Sequence[int]]) -> float:
    """The T minimising the CTC loss of `targets` (class indices) under `softmax(log_probs / T)`, lines
    `(T_i, C)`: a golden-section search on log T (the loss is smooth and, in practice, unimodal there)."""
    usable = [(line, list(target)) for line, target in zip(log_probs, targets, strict=True) if len(target) <= len(line)]
    if not usable:
        raise DataError("no line to fit a temperature on (every reference longer than its frames)")
    usable.sort(key=lambda pair: len(pair[0]))  # batches of lines of similar lengths: little padding
    chunks = [usable[start: start + LINES_PER_BATCH] for start in range(0, len(usable), LINES_PER_BATCH)]
    batches = [(*padded([line for line, _ in chunk]),
                torch.tensor([c for _, target in chunk for c in target], dtype=torch.long),
                torch.tensor([len(target) for _, target in chunk])) for chunk in chunks]

    def loss(log_t: float) -> float:
        return sum(float(F.ctc_loss(F.log_softmax(batch / math.exp(log_t), dim=-1), flat, lengths, target_lengths,
                                    blank=0, reduction="sum", zero_infinity=True))
                   for batch, lengths, flat, target_lengths in batches)

    low, high = math.log(TEMPERATURE_RANGE[0]), math.log(TEMPERATURE_RANGE[1])
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    loss_a, loss_b = loss(a), loss(b)
    while high - low > TEMPERATURE_PRECISION:
        if loss_a < loss_b:
            high, b, loss_b = b, a, loss_a
            a = high - ratio * (high - low)
            loss_a = loss(a)
        else:
            low, a, loss_a = a, b, loss_b
            b = low + ratio * (high - low)
            loss_b = loss(b)
    return math.exp((low + high) / 2)


def _fit_glm(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Weights of a logistic (kind='logistic', y in {0, 1}) or Poisson (kind='poisson', y counts)
    regression of `y` on `x` (first column the bias), by Newton's method with a small ridge, each
    step halved until the penalised likelihood grows (a plain Newton step diverges when few lines
    are positive and a feature all but separates them)."""
    weights = torch.zeros(x.shape[1], dtype=torch.float64)
    rate = min(max(float(y.mean()), 1e-3), 1 - 1e-3 if kind == "logistic" else math.inf)
    weights[0] = math.log(rate) if kind == "poisson" else math.log(rate / (1 - rate))
    ridge = torch.full((x.shape[1],), L2 * len(y), dtype=torch.float64)
    ridge[0] = 0.0

    def objective(w: torch.Tensor) -> float:  # the penalised log-likelihood, up to a constant
        eta = x @ w
        fit = y @ eta - (torch.exp(eta.clamp(max=GLM_MAX_ETA)).sum() if kind == "poisson" else F.softplus(eta).sum())
        return float(fit - 0.5 * (ridge * w * w).sum())

    current = objective(weights)
    for _ in range(100):
        eta = x @ weights
        mean = torch.exp(eta.clamp(max=GLM_MAX_ETA)) if kind == "poisson" else torch.sigmoid(eta)
        variance = mean if kind == "poisson" else mean * (1 - mean)
        gradient = x.T @ (y - mean) - ridge * weights
        hessian = (x * variance.unsqueeze(1)).T @ x + torch.diag(ridge + 1e-9)
        step = torch.linalg.solve(hessian, gradient)
        for _ in range(40):
            candidate = objective(weights + step)
            if candidate >= current - 1e-12:
                break
            step = step / 2
        weights, current = weights + step, max(candidate, current)
        if float(step.abs().max()) < 1e-8:
            break
    return weights


def fit_line_model(features: torch.Tensor, errors: Sequence[int], reference_chars: Sequence[int],
                   read_chars: Sequence[int], names: Sequence[str] = LINE_MODEL) -> dict:
    """The line model's fields of a `Calibration` from labelled lines: their FEATURES `(N, F)`, the
    character errors of each reading, and the characters of each reference and each reading; the
    model sees the features `names` (the bias first), standardised for the fit."""
    chosen = features.double()[:, [FEATURES.index(name) for name in names]]
    mean, scale = chosen.mean(dim=0), chosen.std(dim=0).clamp(min=1e-6)
    mean[0], scale[0] = 0.0, 1.0
    x = (chosen - mean) / scale
    y_errors = torch.tensor(list(errors), dtype=torch.float64)
    exact = _fit_glm(x, (y_errors == 0).double(), "logistic")
    poisson = _fit_glm(x, y_errors, "poisson")

    def unscaled(weights: torch.Tensor) -> tuple[float, ...]:  # the same model on the raw features
        raw = weights / scale
        raw[0] = weights[0] - float((weights[1:] * mean[1:] / scale[1:]).sum())
        return tuple(raw.tolist())

    predicted = torch.exp((x @ poisson).clamp(max=GLM_MAX_ETA))
    dispersion = float(((y_errors - predicted) ** 2 / predicted.clamp(min=1e-6)).sum()) / max(
        len(y_errors) - x.shape[1], 1)
    return {"exact_weights": unscaled(exact), "error_weights": unscaled(poisson), "features": tuple(names),
            "feature_low": tuple(chosen.min(dim=0).values.tolist()),
            "feature_high": tuple(chosen.max(dim=0).values.tolist()),
            "dispersion": dispersion, "length_ratio": sum(reference_chars) / max(sum(read_chars), 1)}


def check_enough(lines: int, where: str) -> None:
    if lines < MIN_LINES:
        raise DataError(f"{where}: {lines} labelled line(s) to fit a calibration on; it needs at least {MIN_LINES}")


class CalibrationProbe:
    """The greedy decoder, keeping for each line it reads, in order, its FEATURES and its
    characters' confidences under `calibration`'s temperature (for `judgements`)."""

    def __init__(self, calibration: Calibration, vocab: Vocab):
        self.calibration, self.vocab = calibration, vocab
        self.features: list[torch.Tensor] = []
        self.confidences: list[list[float]] = []

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[str]:
        scaled, lengths = self.calibration.scale(log_probs.float().cpu()), lengths.cpu()
        paths = greedy_paths(scaled, lengths)
        self.features.append(line_features(scaled, lengths, paths))
        self.confidences += [[confidence for confidence, _, _ in char_spans(scaled[:length, i], labels, frames)]
                             for i, ((labels, frames), length) in enumerate(zip(paths, lengths.tolist(), strict=True))]
        return [self.vocab.decode(labels) for labels, _ in paths]

    def read_lines(self, lines: Sequence[torch.Tensor]) -> list[str]:
        """The readings of lines given as log-probs `(T_i, C)`."""
        return [text for start in range(0, len(lines), LINES_PER_BATCH)
                for text in self(*padded(lines[start: start + LINES_PER_BATCH]))]

    def judgements(self, hypotheses: Sequence[str]) -> dict[str, list]:
        """Per line read so far (`hypotheses`, its readings), what `calibration_report` takes."""
        calibration = self.calibration
        p_exact, expected = calibration.line_estimates(torch.cat(self.features))
        return {"p_exact": p_exact.tolist(), "expected_errors": expected.tolist(),
                "expected_reference": [len(text) * calibration.length_ratio for text in hypotheses],
                "dispersion": [calibration.dispersion] * len(hypotheses), "confidences": list(self.confidences)}


def fit_calibration(log_probs: Sequence[torch.Tensor], references: Sequence[str], vocab: Vocab,
                    where: str) -> Calibration:
    """The temperature, then the line model, on labelled lines (each line's raw log-probs `(T_i, C)`
    and its reference); DataError naming `where` with fewer than MIN_LINES lines."""
    check_enough(len(log_probs), where)
    # a reference with a character the model has no class for would fit the temperature to a text
    # without it (flatter posteriors): those lines are left out of the temperature, not of the line model
    known = [(line, [vocab.index[char] for char in reference]) for line, reference in
             zip(log_probs, references, strict=True) if not vocab.unknown_in([reference])]
    temperature = fit_temperature([line for line, _ in known], [target for _, target in known])
    probe = CalibrationProbe(Calibration(temperature=temperature), vocab)
    texts = probe.read_lines(log_probs)
    fields = fit_line_model(torch.cat(probe.features),
                            [char_errors(reference, text) for reference, text in zip(references, texts, strict=True)],
                            [len(reference) for reference in references], [len(text) for text in texts])
    return Calibration(temperature=temperature, **fields, lines=len(log_probs), fitted_on=where)


# --- how well calibrated: measured on labelled lines -------------------------------------------

def expected_calibration_error(probabilities: Sequence[float], outcomes: Sequence[bool]) -> float:
    """ECE: the mean |accuracy - confidence| over the `reliability` bins, weighted by their counts."""
    rows = reliability(probabilities, outcomes)
    return sum(row["count"] * abs(row["accuracy"] - row["confidence"]) for row in rows) / max(len(probabilities), 1)


def reliability(probabilities: Sequence[float], outcomes: Sequence[bool], bins: int = 10) -> list[dict]:
    """Per bin of the predicted probability: its range, lines, mean confidence and accuracy."""
    rows = []
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        chosen = [(p, o) for p, o in zip(probabilities, outcomes, strict=True)
                  if low <= p < high or (b == bins - 1 and p >= 1.0)]
        if chosen:
            rows.append({"low": low, "high": high, "count": len(chosen),
                         "confidence": sum(p for p, _ in chosen) / len(chosen),
                         "accuracy": sum(o for _, o in chosen) / len(chosen)})
    return rows


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """The probability that a random positive scores above a random negative (ties count half)."""
    positive = torch.tensor(list(positives), dtype=torch.bool)
    count, others = int(positive.sum()), int((~positive).sum())
    if not count or not others:
        return float("nan")
    _, inverse, ties = torch.unique(torch.tensor(list(scores), dtype=torch.float64), return_inverse=True,
                                    return_counts=True)
    ends = ties.cumsum(0).double()
    ranks = ((ends - ties + 1 + ends) / 2)[inverse]  # 1-based, tied scores sharing their mean rank
    return (float(ranks[positive].sum()) - count * (count + 1) / 2) / (count * others)


def errors_in_least_confident(order_scores: Sequence[float], errors: Sequence[int]) -> float:
    """The share of all character errors held by the 20% of lines with the highest `order_scores`
    (e.g. expected errors: the lines a reviewer would look at first)."""
    total = sum(errors)
    if not total:
        return float("nan")
    ranked = sorted(zip(order_scores, errors, strict=True), key=lambda pair: -pair[0])
    return sum(e for _, e in ranked[: max(1, round(0.2 * len(ranked)))]) / total


def calibration_report(judged: dict[str, list], references: Sequence[str], hypotheses: Sequence[str]) -> dict:
    """How well a calibration holds on labelled lines it judged (`CalibrationProbe.judgements`,
    perhaps pooled over several calibrations), against their references."""
    p_exact, expected = judged["p_exact"], judged["expected_errors"]
    errors = [char_errors(ref, hyp) for ref, hyp in zip(references, hypotheses, strict=True)]
    exact = [e == 0 for e in errors]
    char_p = [c for confidences in judged["confidences"] for c in confidences]
    char_hit = [hit for ref, hyp in zip(references, hypotheses, strict=True) for hit in aligned_hits(ref, hyp)]
    dispersion = sum(judged["dispersion"]) / max(len(judged["dispersion"]), 1)
    estimate, (low, high) = cer_estimate(sum(expected), sum(judged["expected_reference"]), dispersion)
    true_cer = sum(errors) / max(sum(len(r) for r in references), 1)
    return {
        "lines": len(errors), "true_cer": true_cer, "estimated_cer": estimate, "interval": [low, high],
        "estimate_relative_error": (estimate - true_cer) / true_cer if true_cer else float("nan"),
        "ece_p_exact": expected_calibration_error(p_exact, exact),
        "ece_characters": expected_calibration_error(char_p, char_hit),
        "auroc_lines_with_errors": auroc([1 - p for p in p_exact], [not e for e in exact]),
        "errors_in_least_confident_20pct": errors_in_least_confident(expected, errors),
        "errors_in_most_errors_20pct": errors_in_least_confident(errors, errors),  # a perfect order's share
        "reliability_p_exact": reliability(p_exact, exact),
        "reliability_characters": reliability(char_p, char_hit),
    }


def fold_blocks(lines: int, folds: int, where: str) -> list[tuple[int, int]]:
    """`lines` cut into `folds` contiguous blocks (low, high), as `cross_fitted_report` reads them;
    DataError naming `where` and the --folds that work unless each block holds a line and each fit
    (the other blocks) MIN_LINES lines. Known from the number of lines alone: checked before any work."""
    def blocks(count: int) -> list[tuple[int, int]]:
        bounds = [round(k * lines / count) for k in range(count + 1)]
        return list(zip(bounds, bounds[1:], strict=False))

    def usable(count: int) -> bool:
        sizes = [high - low for low, high in blocks(count)]
        return min(sizes) >= 1 and lines - max(sizes) >= MIN_LINES

    if folds >= 2 and usable(folds):
        return blocks(folds)
    fewest = next((count for count in range(2, lines + 1) if usable(count)), None)
    what = f"{fewest} to {lines} folds can" if fewest else "no number of folds can: give more lines"
    raise DataError(f"{where}: {lines} labelled line(s) cannot be cut into {folds} folds with a line in each and "
                    f"{MIN_LINES} in each fit (the other folds); {what}")


def cross_fitted_report(log_probs: Sequence[torch.Tensor], references: Sequence[str], vocab: Vocab, folds: int,
                        where: str, progress: Callable[[str], None] = lambda line: None) -> dict:
    """`calibration_report`, plus "folds" and each fold's "temperatures", of lines (raw log-probs
    `(T_i, C)`, references) cut into `folds` contiguous blocks (`fold_blocks`: a page's rows stay
    together), each block read by the calibration fitted on the others; `progress` hears of each fold."""
    judged: dict[str, list] = {}
    hypotheses: list[str] = []
    temperatures = []
    for fold, (low, high) in enumerate(fold_blocks(len(log_probs), folds, where), start=1):
        fitted = fit_calibration([*log_probs[:low], *log_probs[high:]], [*references[:low], *references[high:]],
                                 vocab, where)
        probe = CalibrationProbe(fitted, vocab)
        texts = probe.read_lines(log_probs[low:high])
        for key, values in probe.judgements(texts).items():
            judged.setdefault(key, []).extend(values)
        hypotheses += texts
        temperatures.append(fitted.temperature)
        progress(f"fold {fold} of {folds}: fitted on {fitted.lines} lines (temperature {fitted.temperature:.3f}), "
                 f"read lines {low + 1}-{high}")
    report = calibration_report(judged, references, hypotheses)
    return {**report, "folds": folds, "temperatures": temperatures}


def describe_report(report: dict) -> list[str]:
    """A `calibration_report` as lines of text."""
    low, high = report["interval"]
    no_errors = report["true_cer"] == 0  # then the relative error and the review share are undefined
    relative = "no error to compare with" if no_errors else f"{report['estimate_relative_error']:+.1%} relative"
    if math.isnan(report["auroc_lines_with_errors"]):  # one class only: every line read exactly, or none
        exact = "every line was read exactly" if no_errors else "no line was read exactly"
        finding = f"AUROC of finding the lines with errors undefined ({exact})"
    else:
        finding = f"AUROC of finding the lines with errors {report['auroc_lines_with_errors']:.3f}"
    review = "no error for a review order to find" if no_errors else (
        f"the 20% of lines with the most expected errors hold {report['errors_in_least_confident_20pct']:.1%} "
        f"of the errors (the 20% with the most errors: {report['errors_in_most_errors_20pct']:.1%})")
    return [f"  estimated CER {report['estimated_cer']:.2%} ({low:.2%} to {high:.2%}) against the true "
            f"{report['true_cer']:.2%} ({relative})",
            f"  ECE of p_exact {report['ece_p_exact']:.4f}, of the character confidences {report['ece_characters']:.4f}",
            f"  {finding}; {review}"]


def reliability_diagram(curves: dict[str, list[dict]], size: int = 360) -> Image.Image:
    """A reliability diagram (RGB): per curve (name -> `reliability` rows), accuracy against
    confidence, one dot per bin sized by its count, over the diagonal of perfect calibration."""
    margin, plot = 40, size - 60
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def at(x: float, y: float) -> tuple[float, float]:
        return margin + x * plot, margin + (1 - y) * plot - 10

    draw.rectangle([at(0, 1), at(1, 0)], outline="black")
    draw.line([at(0, 0), at(1, 1)], fill=(160, 160, 160))
    for tick in (0.0, 0.5, 1.0):
        draw.text((at(tick, 0)[0] - 8, at(tick, 0)[1] + 4), f"{tick:g}", fill="black")
        draw.text((4, at(0, tick)[1] - 6), f"{tick:g}", fill="black")
    draw.text((margin + plot / 2 - 30, size - 18), "confidence", fill="black")
    draw.text((4, 4), "accuracy", fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44)]
    for k, (name, rows) in enumerate(curves.items()):
        colour, total = colours[k % len(colours)], max(sum(row["count"] for row in rows), 1)
        points = [at(row["confidence"], row["accuracy"]) for row in rows]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for (x, y), row in zip(points, rows, strict=True):
            radius = 2 + 6 * math.sqrt(row["count"] / total)
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
        draw.text((margin + 8, margin + 4 + 14 * k), name, fill=colour)
    return image
