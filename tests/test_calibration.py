"""crnn/calibration.py: the fits recover what generated the data; the measures of calibration."""

import itertools
import json
import math

import pytest
import torch
from PIL import Image

from crnn.calibration import (
    FEATURES,
    LEGACY_FEATURES,
    LINE_MODEL,
    LOG_P_FLOOR,
    MIN_LINES,
    TEMPERATURE_RANGE,
    Calibration,
    auroc,
    calibration_report,
    check_enough,
    cross_fitted_report,
    describe_report,
    errors_in_least_confident,
    expected_calibration_error,
    fit_line_model,
    fit_temperature,
    line_features,
    reading_log_probs,
)
from crnn.checkpoint import load_checkpoint
from crnn.config import load_config
from crnn.data import Vocab
from crnn.errors import DataError
from crnn.inference import load_trained_model
from crnn.metrics import aligned_hits
from crnn.trainer import fit
from tests.helpers import TINY, run_tool, synthetic_folder


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
    columns = [FEATURES.index(name) for name in LINE_MODEL]
    true_errors = torch.tensor([-1.0, 2.0, 1.0, 0.0, 0.5, -0.5, 0.3], dtype=torch.float64)
    errors = torch.poisson(torch.exp(features[:, columns].double() @ true_errors), generator=generator).long().tolist()
    fitted = fit_line_model(features, errors, reference_chars=[20] * count, read_chars=[19] * count)
    assert fitted["features"] == LINE_MODEL
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

    # a line far outside the fitted range (features in [0, 1]) is read as one at its edge
    beyond, edge = features[:1].clone(), features[:1].clone()
    beyond[0, columns[1]], edge[0, columns[1]] = 40.0, max(calibration.feature_high[1], 0.0)
    assert torch.allclose(torch.cat(calibration.line_estimates(beyond)), torch.cat(calibration.line_estimates(edge)))
    assert calibration.feature_high[1] == pytest.approx(float(features[:, columns[1]].max()))


def test_a_fit_with_few_exact_lines_nearly_separated_converges():
    # 12 exact lines out of 250, told apart by one feature almost perfectly: a plain Newton step
    # overshoots there; the fit must stay finite and keep the rate of exact lines on its data
    generator = torch.Generator().manual_seed(2)
    features = torch.cat([torch.ones(250, 1), torch.rand(250, len(FEATURES) - 1, generator=generator)], dim=1)
    column = FEATURES.index(LINE_MODEL[1])
    errors = [0 if i < 12 else 3 for i in range(250)]
    features[:12, column] = 0.01 * torch.rand(12, generator=generator)
    features[12:, column] += 0.02
    calibration = Calibration(**fit_line_model(features, errors, [20] * 250, [20] * 250), lines=250)
    assert all(math.isfinite(w) and abs(w) < 1e4 for w in calibration.exact_weights)
    p_exact, _ = calibration.line_estimates(features)
    assert float(p_exact.mean()) == pytest.approx(12 / 250, abs=0.01)


def test_features_of_a_line():
    certain = torch.log(torch.tensor([[0.98, 0.01, 0.01], [0.01, 0.98, 0.01], [0.6, 0.01, 0.39]]))
    features = line_features(certain[:, None], torch.tensor([3]))[0]
    doubt, missed = features[1:3].tolist()
    assert doubt == pytest.approx(0.02) and missed == pytest.approx(0.02 + 0.4)
    assert features[4] == pytest.approx(math.log(2))  # one character read
    # the reading "1" (class 1): every 3-frame path that collapses to it, summed by hand
    p = certain.exp().tolist()
    paths = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (0, 1, 1), (1, 1, 1)]
    by_hand = sum(math.prod(p[t][c] for t, c in enumerate(path)) for path in paths)
    assert features[FEATURES.index("log_p_reading")] == pytest.approx(math.log(by_hand))


def test_the_features_of_a_padded_batch_are_those_of_each_line_alone():
    lines = [torch.log_softmax(torch.randn(frames, 5, generator=torch.Generator().manual_seed(frames)) * 3, dim=-1)
             for frames in (9, 4, 0, 7)]
    batch = torch.nn.utils.rnn.pad_sequence(lines, padding_value=-3.0)  # padding that reads as characters
    lengths = torch.tensor([len(line) for line in lines])
    alone = torch.cat([line_features(line[:, None], lengths[i: i + 1]) for i, line in enumerate(lines)])
    assert torch.allclose(line_features(batch, lengths), alone, atol=1e-5)


def test_the_log_probability_of_a_reading():
    log_probs = torch.log_softmax(torch.randn(12, 5, generator=torch.Generator().manual_seed(3)), dim=-1)

    def probability(frames, reading):
        return math.exp(reading_log_probs(log_probs[:frames, None], torch.tensor([frames]), [reading])[0])

    # every reading of these frames, summed over: the probabilities of all readings add up to one
    total = sum(probability(12, reading) for length in range(0, 4)
                for reading in itertools.product(range(1, 5), repeat=length))
    assert 0.0 < total < 1.0  # readings of up to 3 characters hold part of the mass
    assert math.log(probability(2, [1, 1, 1])) == pytest.approx(LOG_P_FLOOR)  # no room for 3 characters
    sure = torch.log(torch.tensor([[0.001, 0.999], [0.999, 0.001]]))
    assert float(reading_log_probs(sure[:, None], torch.tensor([2]), [[1]])[0]) == pytest.approx(
        math.log(0.999 * 0.999 + 0.999 * 0.001 + 0.001 * 0.001), abs=1e-6)


def test_a_calibration_stored_before_the_reading_feature_still_reads_its_features():
    generator = torch.Generator().manual_seed(1)
    features = torch.cat([torch.ones(300, 1), torch.rand(300, len(FEATURES) - 1, generator=generator)], dim=1)
    errors = torch.poisson(torch.exp(features[:, :6].double() @ torch.tensor([-1.0, 2, 1, 0, 0.5, -0.5],
                           dtype=torch.float64)), generator=generator).long().tolist()
    legacy = fit_line_model(features, errors, [20] * 300, [20] * 300, names=LEGACY_FEATURES)
    state = Calibration(**legacy, lines=300).to_dict()
    for name in ("features", "feature_low", "feature_high"):  # as a checkpoint written before these were stored
        del state[name]
    calibration = Calibration.from_dict(state)
    assert calibration.features == LEGACY_FEATURES and len(calibration.error_weights) == 6
    assert calibration.feature_low == ()  # nothing to clip to: used as fitted
    p_exact, expected = calibration.line_estimates(features)
    weights = torch.tensor(calibration.error_weights, dtype=torch.float64)
    assert torch.allclose(expected, torch.exp(features[:, :6].double() @ weights))
    assert p_exact.shape == (300,)
    with pytest.raises(ValueError, match="unknown line feature"):
        Calibration.from_dict({**state, "features": ["bias", "sharpness"]})


def test_cross_fitting_measures_every_line_out_of_fold():
    log_probs, targets = ctc_lines(180, frames=10, sharpen=2.0, seed=4)  # short: some lines read exactly
    vocab = Vocab(list("abcde"))
    references = [vocab.decode(target) for target in targets]
    report = cross_fitted_report(log_probs, references, vocab, 3, "validation")
    assert report["lines"] == 180 and report["folds"] == 3 and len(report["temperatures"]) == 3
    assert all(t == pytest.approx(2.0, rel=0.15) for t in report["temperatures"])  # each fit finds the sharpening
    assert 0.0 <= report["ece_p_exact"] < 0.1 and 0.5 < report["auroc_lines_with_errors"] <= 1.0
    assert abs(report["estimate_relative_error"]) < 0.25
    assert report["errors_in_least_confident_20pct"] <= report["errors_in_most_errors_20pct"] <= 1.0
    with pytest.raises(DataError, match=f"validation: 60 labelled line\\(s\\) cannot be cut into 3 folds with a "
                                        f"line in each and {MIN_LINES} in each fit .* 6 to 60 folds can"):
        cross_fitted_report(log_probs[:60], references[:60], vocab, 3, "validation")


def test_measures_of_calibration():
    assert expected_calibration_error([0.9] * 10, [True] * 9 + [False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.9] * 10, [True] * 5 + [False] * 5) == pytest.approx(0.4)
    assert auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == 1.0
    assert auroc([0.5, 0.5], [False, True]) == 0.5
    # the most doubtful fifth of 10 lines (2 lines) holds 6 of the 8 errors
    assert errors_in_least_confident(list(range(10)), [0] * 7 + [2, 2, 4]) == pytest.approx(6 / 8)


def judged(p_exact, hypotheses):
    """`CalibrationProbe.judgements`' fields for these readings, each with its p_exact."""
    return {"p_exact": p_exact, "expected_errors": [4 * (1 - p) for p in p_exact], "expected_reference": [4.0] * len(p_exact),
            "dispersion": [1.0] * len(p_exact), "confidences": [[p] * len(h) for p, h in zip(p_exact, hypotheses, strict=True)]}


def test_the_report_of_lines_all_read_exactly_or_all_wrong_says_why_a_measure_is_undefined():
    perfect = describe_report(calibration_report(judged([0.9, 0.8, 0.7], ["abcd"] * 3), ["abcd"] * 3, ["abcd"] * 3))
    assert "nan" not in "\n".join(perfect)
    assert "(no error to compare with)" in perfect[0]
    assert perfect[2] == ("  AUROC of finding the lines with errors undefined (every line was read exactly); "
                          "no error for a review order to find")
    wrong = describe_report(calibration_report(judged([0.2, 0.1, 0.3], ["abce", "xbcd", "ab"]), ["abcd"] * 3,
                                          ["abce", "xbcd", "ab"]))
    assert "nan" not in "\n".join(wrong)
    assert wrong[2].startswith("  AUROC of finding the lines with errors undefined (no line was read exactly); "
                               "the 20% of lines with the most expected errors hold 25.0% of the errors "
                               "(the 20% with the most errors: 50.0%)")
    mixed = describe_report(calibration_report(judged([0.9, 0.1], ["abcd", "ab"]), ["abcd"] * 2, ["abcd", "ab"]))
    assert mixed[2].startswith("  AUROC of finding the lines with errors 1.000; ")


def test_too_few_lines_name_the_minimum():
    with pytest.raises(DataError, match=f"validation: 12 labelled line\\(s\\) .* at least {MIN_LINES}"):
        check_enough(12, "validation")


def test_a_run_fits_its_calibration_which_survives_export_and_reload(calibrated_checkpoint, tmp_path):
    best = calibrated_checkpoint
    stored = load_checkpoint(best)["calibration"]
    assert stored["lines"] == 60 and TEMPERATURE_RANGE[0] < stored["temperature"] < TEMPERATURE_RANGE[1]
    assert len(stored["error_weights"]) == len(stored["exact_weights"]) == len(LINE_MODEL)
    trained = load_trained_model(best, device="cpu")
    assert trained.calibration == Calibration.from_dict(stored) and trained.calibration.fitted
    bundle = tmp_path / "bundle"
    assert run_tool("tools/export.py", "--ckpt", best, "--out", bundle).returncode == 0
    assert json.loads((bundle / "calibration.json").read_text()) == json.loads(json.dumps(stored))
    assert load_trained_model(bundle, device="cpu").calibration == trained.calibration

    # tools/calibrate.py: into a copy (the original untouched), or refused on a split too small
    before = best.read_bytes()
    copy = tmp_path / "copy.pt"
    result = run_tool("tools/calibrate.py", "--ckpt", best, "--out", copy, "--split", "validation",
                      "data.synthetic.validation=70")
    assert result.returncode == 0, result.stderr
    assert best.read_bytes() == before and load_checkpoint(copy)["calibration"]["lines"] == 70
    # measured on lines it was not fitted on: two folds of 55 lines, each read by the other's fit
    measured = tmp_path / "crossfit.json"
    result = run_tool("tools/calibrate.py", "--ckpt", best, "--out", tmp_path / "copy2.pt", "--folds", "2",
                      "--json", measured, "data.synthetic.validation=110")
    assert result.returncode == 0, result.stderr
    report = json.loads(measured.read_text())
    assert report["lines"] == 110 and report["folds"] == 2 and len(report["temperatures"]) == 2
    assert 0.0 <= report["ece_p_exact"] <= 1.0 and "cross-fitted over 2 folds" in result.stdout
    assert load_checkpoint(tmp_path / "copy2.pt")["calibration"]["lines"] == 110  # stored: the fit on all lines
    refused = run_tool("tools/calibrate.py", "--ckpt", best, "--folds", "1")
    assert refused.returncode == 2 and "--folds 1: give 0 (no cross-fitting) or at least 2 folds" in refused.stderr
    small = run_tool("tools/calibrate.py", "--ckpt", bundle, "--split", "test")
    assert small.returncode == 2 and small.stderr.strip() == (
        f"error: data.test: 16 labelled line(s) to fit a calibration on; it needs at least {MIN_LINES}")


@pytest.mark.slow
def test_a_run_with_a_small_validation_split_warns_and_stores_none(tmp_path, caplog):
    fit(load_config(TINY, [f"train.output_dir={tmp_path / 'run'}"]))
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["calibration"] == {}
    assert (f"no calibration fitted: data.validation: 16 labelled line(s) to fit a calibration on; it needs at least "
            f"{MIN_LINES}") in caplog.text


def test_predict_gives_calibrated_fields_a_summary_and_a_review(calibrated_checkpoint, tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 5)
    result = run_tool("tools/predict.py", "--ckpt", calibrated_checkpoint, lines, "--json", "--summary", "--review", "2")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    readings, review, summary = rows[:5], rows[5]["review"], rows[6]["summary"]
    calibration = load_trained_model(calibrated_checkpoint, device="cpu").calibration
    for row in readings:
        assert 0.0 <= row["p_exact"] <= 1.0 and row["expected_errors"] >= 0.0
        assert row["expected_cer"] == pytest.approx(
            row["expected_errors"] / max(len(row["text"]) * calibration.length_ratio, 1.0), abs=1e-3)  # both rounded
    ranked = sorted(readings, key=lambda row: -row["expected_errors"])[:2]
    assert [line["path"] for line in review] == [row["path"] for row in ranked]
    estimate, (low, high) = calibration.estimate_cer([row["expected_errors"] for row in readings],
                                                     [len(row["text"]) for row in readings])
    assert summary["lines"] == 5 and summary["estimated_cer"] == pytest.approx(estimate, abs=1e-3)
    assert summary["interval"][0] == pytest.approx(low, abs=1e-3) and summary["interval"][1] == pytest.approx(
        high, abs=1e-3)
    text = run_tool("tools/predict.py", "--ckpt", calibrated_checkpoint, lines, "--summary")
    assert text.returncode == 0 and len(text.stdout.strip().splitlines()) == 5
    assert f"summary: 5 line(s), estimated CER {estimate:.1%} ({low:.1%} to {high:.1%}, 95% interval)" in text.stderr


def test_summary_needs_a_calibrated_model(checkpoint, tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 1)
    result = run_tool("tools/predict.py", "--ckpt", checkpoint, lines, "--summary")
    assert result.returncode == 2 and "has no calibration: fit one with python tools/calibrate.py" in result.stderr
    plain = run_tool("tools/predict.py", "--ckpt", checkpoint, lines, "--json")
    row = json.loads(plain.stdout)
    assert row["p_exact"] is None and row["expected_cer"] is None  # the keys are there, empty


def test_aligned_hits_mark_the_characters_read_right():
    assert aligned_hits("chat", "chat") == [True] * 4
    assert aligned_hits("chat", "cbat") == [True, False, True, True]
    assert aligned_hits("chat", "chaat") == [True, True, True, False, True] or aligned_hits(
        "chat", "chaat") == [True, True, False, True, True]
    assert aligned_hits("chat", "") == [] and aligned_hits("", "ab") == [False, False]


def test_evaluate_measures_the_calibration_against_the_truth(calibrated_checkpoint, tmp_path):
    result = run_tool("tools/evaluate.py", "--ckpt", calibrated_checkpoint, "--split", "test", "--decoders", "beam",
                      "--json", tmp_path / "r.json", "--reliability", tmp_path / "reliability.png")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report) == {"beam", "calibration"}  # greedy read for the calibration, not reported
    calibration = report["calibration"]
    assert calibration["lines"] == 16 and 0 <= calibration["ece_p_exact"] <= 1 and 0 <= calibration["ece_characters"] <= 1
    greedy = run_tool("tools/evaluate.py", "--ckpt", calibrated_checkpoint, "--split", "test", "--json",
                      tmp_path / "g.json")
    assert greedy.returncode == 0 and "estimated CER" in greedy.stdout  # with greedy asked for: reported
    assert calibration["true_cer"] == pytest.approx(json.loads((tmp_path / "g.json").read_text())["greedy"]["cer"])
    low, high = calibration["interval"]
    assert low <= calibration["estimated_cer"] <= high
    assert sum(row["count"] for row in calibration["reliability_p_exact"]) == 16
    assert "estimated CER" in result.stdout and "AUROC of finding the lines with errors" in result.stdout
    assert Image.open(tmp_path / "reliability.png").size == (360, 360)
