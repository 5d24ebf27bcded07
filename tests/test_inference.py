"""Decoding at the CPU cores' pace and what predict returns: parallel beam search, LM tuning,
confidences and character spans, n-best readings, the export bundle."""

import json
import math
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from crnn.config import DecodeConfig
from crnn.data import Vocab
from crnn.decoding import DecoderPool, GreedyDecoder, build_decoders
from crnn.inference import load_trained_model, reading
from tests.helpers import run_tool, synthetic_folder


@pytest.fixture
def reader(checkpoint, tmp_path):
    """The session's tiny trained run copied (checkpoints/best.pt, train_texts.txt), so that a test
    may write into its run directory; and a folder of 4 lines."""
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(checkpoint, run / "checkpoints" / "best.pt")
    shutil.copy(checkpoint.parent.parent / "train_texts.txt", run / "train_texts.txt")
    return run / "checkpoints" / "best.pt", synthetic_folder(tmp_path / "lines", 4)


def peaked_log_probs(vocab, count=24, frames=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(frames, count, len(vocab), generator=generator) * 2
    logits[..., 0] += 2.5
    return logits.log_softmax(-1), torch.randint(20, frames + 1, (count,), generator=generator)


@pytest.mark.slow
def test_beam_search_over_worker_processes_equals_one_process():
    vocab = Vocab(list(" abcdefghij"))
    texts = ["abc def", "ghi jab", "cab bad fig"] * 20
    log_probs, lengths = peaked_log_probs(vocab)
    local = build_decoders(["beam", "beam_lm"], vocab, DecodeConfig(workers=1), texts)
    pooled = build_decoders(["beam", "beam_lm"], vocab, DecodeConfig(workers=2), texts)
    assert isinstance(pooled["beam"].pool, DecoderPool) and pooled["beam"].pool.workers == 2
    try:
        for name in ("beam", "beam_lm"):
            waiting = pooled[name].submit(log_probs, lengths)  # returns at once; the workers decode
            assert waiting() == local[name](log_probs, lengths)
            assert pooled[name].nbest(log_probs[:, :3], lengths[:3]) == local[name].nbest(log_probs[:, :3], lengths[:3])
    finally:
        pooled["beam"].close()
    assert local["beam_lm"](log_probs, lengths) != local["beam"](log_probs, lengths)  # the LM does change readings


def test_tune_lm_writes_the_best_pair_where_evaluate_and_predict_find_it(reader):
    checkpoint, _ = reader
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--tune-lm", "--lm-weights", "0,2",
                      "--word-scores", "0,-5", "decode.workers=1")
    assert result.returncode == 0, result.stderr
    table = result.stdout.strip().splitlines()
    assert table[0].split() == ["lm_weight", "word_score", "CER", "WER"] and len(table) == 5
    cers = [float(row.split()[2].rstrip("%")) for row in table[1:]]
    assert cers == sorted(cers)
    best_weight, best_score = (float(value) for value in table[1].split()[:2])
    tuned = checkpoint.parent.parent / "decode.yaml"
    assert tuned.is_file() and "decode.yaml" in result.stderr
    decode = load_trained_model(checkpoint).config.decode
    assert (decode.lm_weight, decode.word_score) == (best_weight, best_score)
    assert load_trained_model(checkpoint, ["decode.lm_weight=0.3"]).config.decode.lm_weight == 0.3  # overrides win


def test_a_reading_gives_each_character_its_confidence_and_its_columns():
    vocab = Vocab(list("ab"))
    posteriors = torch.tensor([[0.1, 0.6, 0.3], [0.2, 0.8, 0.0], [0.9, 0.05, 0.05], [0.3, 0.0, 0.7]])
    hypotheses = GreedyDecoder(vocab).nbest(posteriors.log()[:, None], torch.tensor([4]))[0]
    line = reading(posteriors.log(), hypotheses, vocab, image_width=100)
    assert line.text == "ab" and line.nbest == [{"text": "ab", "score": round(math.log(0.6 * 0.8 * 0.9 * 0.7), 4)}]
    # "a" is the most probable class in frames 0-1 (of 4, 25 columns each), "b" in frame 3: the cut
    # between them is the middle of the blank frame 2, at 62.5
    assert line.characters == [{"char": "a", "confidence": 0.8, "x0": 0.0, "x1": 62.5},
                               {"char": "b", "confidence": 0.7, "x0": 62.5, "x1": 100.0}]
    assert line.words == [{"text": "ab", "x0": 0.0, "x1": 100.0, "confidence": 0.75}]
    assert (line.confidence_mean, line.confidence_min) == (0.75, 0.7)
    empty = reading(posteriors.log(), [], vocab, image_width=100)  # nothing read: the best path's mean posterior
    assert empty.text == "" and empty.confidence_mean == empty.confidence_min == round((0.6 + 0.8 + 0.9 + 0.7) / 4, 4)


def test_predict_json_gives_confidences_spans_and_nbest(reader, tmp_path):
    checkpoint, lines = reader
    result = run_tool("tools/predict.py", "--ckpt", checkpoint, "--json", "--decoder", "beam", "--nbest", "3",
                      lines / "0.png", lines / "1.png", "--workers", "1")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [row["path"] for row in rows] == [str(lines / "0.png"), str(lines / "1.png")]
    for row in rows:
        assert 0.0 <= row["confidence"]["min"] <= row["confidence"]["mean"] <= 1.0
        assert "".join(char["char"] for char in row["characters"]) == row["text"]
        spans = [(char["x0"], char["x1"]) for char in row["characters"]]
        assert all(0 <= x0 < x1 <= Image.open(row["path"]).width for x0, x1 in spans)
        assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:], strict=False))  # left to right
        assert 1 <= len(row["nbest"]) <= 3 and row["nbest"][0]["text"] == row["text"]
        assert [h["score"] for h in row["nbest"]] == sorted((h["score"] for h in row["nbest"]), reverse=True)
    plain = run_tool("tools/predict.py", "--ckpt", checkpoint, lines / "0.png", "--decoder", "beam", "--workers", "1")
    assert plain.stdout == f"{lines / '0.png'}\t{rows[0]['text']}\n"


def test_export_bundle_onnx_matches_pytorch_and_predict_loads_it(reader, tmp_path):
    import onnxruntime

    checkpoint, lines = reader
    bundle = tmp_path / "bundle"
    result = run_tool("tools/export.py", "--ckpt", checkpoint, "--out", bundle)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert {"model.safetensors", "config.yaml", "vocab.json", "model.onnx", "lm.arpa"} == set(manifest["files"].values())
    assert manifest["onnx_max_abs_log_prob_difference"] <= manifest["onnx_tolerance"] == 1e-4
    trained = load_trained_model(checkpoint, device="cpu")
    session = onnxruntime.InferenceSession(str(bundle / "model.onnx"), providers=["CPUExecutionProvider"])
    images, widths = torch.rand(2, 1, 32, 320), torch.tensor([320, 131])  # other shapes than exported
    log_probs, lengths = session.run(None, {"images": images.numpy(), "widths": widths.numpy()})
    with torch.no_grad():
        expected = trained.model(images, widths)
    assert lengths.tolist() == expected.lengths.tolist()
    for i, length in enumerate(lengths):
        assert np.abs(log_probs[:length, i] - expected.log_probs[:length, i].numpy()).max() <= 1e-4
    from_checkpoint = run_tool("tools/predict.py", "--ckpt", checkpoint, lines, "--decoder", "beam_lm")
    from_bundle = run_tool("tools/predict.py", "--ckpt", bundle, lines, "--decoder", "beam_lm")
    assert from_bundle.returncode == 0, from_bundle.stderr
    assert from_bundle.stdout == from_checkpoint.stdout and len(from_bundle.stdout.splitlines()) == 4


def test_benchmark_reports_each_decoder_per_worker_count(reader):
    checkpoint, lines = reader
    result = run_tool("tools/benchmark.py", "--decoding", checkpoint, "--workers", "1,2", "--split", "validation")
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines()[2:]]
    found = {(row[0].strip(), int(row[1])): row for row in rows}
    assert set(found) == {("forward + greedy", 1), ("greedy", 1), ("beam", 1), ("beam", 2), ("beam_lm", 1), ("beam_lm", 2)}
    assert found[("beam", 1)][4] == found[("beam", 2)][4]  # the same CER whatever the workers
    assert all(float(row[3]) > 0 for row in rows)
