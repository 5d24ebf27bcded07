"""crnn/calibration.py: the fits recover what generated the data; the measures of calibration."""

import math

import pytest
import torch

from crnn.calibration import (
    FEATURES,
    MIN_LINES,
    Calibration,
    auroc,
    check_enough,
    errors_in_least_confident,
    expected_calibration_error,
    fit_line_model,
    fit_temperature,
    line_features,
)
from crnn.errors import DataError


def ctc_lines(count, frames=30, classes=6, sharpen=2.0, seed=0):
    """Lines whose references are drawn from the frame posteriors softmax(z) (CTC's own model),
    with the log-probs a network `sharpen` times too confident would give: log_softmax(sharpen * z)."""
    generator = torch.Generator().manual_seed(seed)
    log_probs, targets = [], []
    for _ in range(count):
        z = torch.randn(frames, classes, generator=generator) * 1.5
        z[:, 0] += 1.0  # blank the most common class, as in a trained model
        path = torch.multinomial(torch.softmax(z, dim=-1), 1, generator=generator).squeeze(1).tolist()
        target = [c for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]
        log_probs.append(torch.log_softmax(sharpen * z, dim=-1))
        targets.append(target)
    return log_probs, targets


def test_a_known_temperature_is_recovered_from_synthetic_logits():
    log_probs, targets = ctc_lines(300, sharpen=2.0)
    assert fit_temperature(log_probs, targets) == pytest.approx(2.0, rel=0.08)
    honest, targets = ctc_lines(300, sharpen=1.0, seed=1)
    assert fit_temperature(honest, targets) == pytest.approx(1.0, rel=0.08)
    calibration = Calibration(temperature=2.0)
    assert torch.allclose(calibration.scale(log_probs[0]).exp(), torch.softmax(log_probs[0] / 2.0, dim=-1), atol=1e-6)


def test_the_line_model_recovers_known_weights():
    generator = torch.Generator().manual_seed(0)
    count = 4000
    features = torch.cat([torch.ones(count, 1), torch.rand(count, len(FEATURES) - 1, generator=generator)], dim=1)
    true_errors = torch.tensor([-1.0, 2.0, 1.0, 0.0, 0.5, -0.5], dtype=torch.float64)
    errors = torch.poisson(torch.exp(features.double() @ true_errors), generator=generator).long().tolist()
    fitted = fit_line_model(features, errors, reference_chars=[20] * count, read_chars=[19] * count)
    assert torch.allclose(torch.tensor(fitted["error_weights"], dtype=torch.float64), true_errors, atol=0.25)
    assert fitted["length_ratio"] == pytest.approx(20 / 19)
    assert fitted["dispersion"] == pytest.approx(1.0, abs=0.15)  # Poisson data: no overdispersion
    calibration = Calibration(**fitted, lines=count)
    p_exact, expected = calibration.line_estimates(features)
    exact = torch.tensor([e == 0 for e in errors], dtype=torch.float64)
    assert abs(float(p_exact.mean()) - float(exact.mean())) < 0.01  # logistic: mean matches on its data
    cer, (low, high) = calibration.estimate_cer(expected.tolist(), [19] * count)
    true_cer = sum(errors) / (20 * count)
    assert low < true_cer < high and cer == pytest.approx(true_cer, rel=0.05)
    assert Calibration.from_dict(calibration.to_dict()) == calibration


def test_features_of_a_line():
    certain = torch.log(torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.6, 0.01, 0.39]]))
    doubt, missed = line_features(certain)[1:3].tolist()
    assert doubt == pytest.approx(0.02) and missed == pytest.approx(0.02 + 0.4)
    assert line_features(certain)[4] == pytest.approx(math.log(2))  # one character read


def test_measures_of_calibration():
    assert expected_calibration_error([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    # the most doubtful fifth of 10 lines (2 lines) holds 6 of the 8 errors
    assert errors_in_least_confident(list(range(10)), [0] * 7 + [2, 2, 4]) == pytest.approx(6 / 8)


def test_too_few_lines_name_the_minimum():
    with pytest.raises(DataError, match=f"validation: 12 labelled line\\(s\\) .* at least {MIN_LINES}"):
        check_enough(12, "validation")
