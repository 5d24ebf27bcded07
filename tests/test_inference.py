"""Decoding at the CPU cores' pace and what predict returns: parallel beam search, the C++ LM,
LM tuning, confidences and character spans, n-best readings, the export bundle."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from crnn.checkpoint import save_checkpoint
from crnn.config import DecodeConfig
from crnn.data import Vocab
from crnn.decoding import BeamDecoder, DecoderPool, build_decoders
from crnn.inference import load_trained_model
from tests.helpers import overfit_tiny, run_tool, synthetic_folder


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A tiny model that has learnt to read four lines (so its confidence means something), saved
    as tools/train.py saves a run: checkpoints/best.pt and train_texts.txt."""
    root = tmp_path_factory.mktemp("reader")
    lines = synthetic_folder(root / "lines", 4)
    cfg, records, vocab, model, _, _ = overfit_tiny(lines, 400, 0.05, f"data.validation={lines}")
    run = root / "run"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict(), "vocab": vocab.chars},
                    run / "checkpoints" / "best.pt")
    (run / "train_texts.txt").write_text("".join(text + "\n" for text in records.texts * 5), encoding="utf-8")
    return run / "checkpoints" / "best.pt", lines


def peaked_log_probs(vocab, count=24, frames=60, seed=0):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(frames, count, len(vocab), generator=generator) * 2
    logits[..., 0] += 2.5
    return logits.log_softmax(-1), torch.randint(20, frames + 1, (count,), generator=generator)


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


def test_the_lm_runs_in_cpp_by_default_and_decodes_as_the_python_one():
    vocab = Vocab(list(" abcdefghij"))
    texts = ["abc def", "ghi jab", "cab bad fig", "bad cafe"] * 20
    log_probs, lengths = peaked_log_probs(vocab, seed=1)
    kenlm = build_decoders(["beam_lm"], vocab, DecodeConfig(workers=1), texts)["beam_lm"]
    python = build_decoders(["beam_lm"], vocab, DecodeConfig(workers=1, lm_backend="python"), texts)["beam_lm"]
    assert type(kenlm.decoder.lm).__name__ == "KenLM" and type(python.decoder.lm).__name__ == "NgramDecoderLM"
    with_lm = kenlm(log_probs, lengths)
    assert with_lm == python(log_probs, lengths)
    assert with_lm != BeamDecoder(vocab)(log_probs, lengths)  # the LM does change readings


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
    tuned.unlink()


def garbled(image):
    """The same line with its columns shuffled: ink of the same kind, no letters."""
    pixels = np.asarray(image).copy()
    columns = np.random.default_rng(0).permutation(pixels.shape[1])
    return Image.fromarray(pixels[:, columns])


def test_predict_json_gives_confidences_spans_and_nbest(reader, tmp_path):
    checkpoint, lines = reader
    Image.open(lines / "0.png").save(tmp_path / "clean.png")
    garbled(Image.open(lines / "0.png")).save(tmp_path / "garbled.png")
    result = run_tool("tools/predict.py", "--ckpt", checkpoint, "--json", "--decoder", "beam", "--nbest", "3",
                      tmp_path / "clean.png", tmp_path / "garbled.png", "--workers", "1")
    assert result.returncode == 0, result.stderr
    clean, noise = (json.loads(line) for line in result.stdout.strip().splitlines())
    reference = (lines / "gt.tsv").read_text().splitlines()[0].split("\t")[1]
    assert clean["text"] == reference and clean["path"].endswith("clean.png")
    for line in (clean, noise):
        assert 0.0 <= line["confidence"]["min"] <= line["confidence"]["mean"] <= 1.0
    assert clean["confidence"]["mean"] > noise["confidence"]["mean"] and clean["confidence"]["min"] > noise["confidence"]["min"]
    width = Image.open(tmp_path / "clean.png").width
    spans = [(char["x0"], char["x1"]) for char in clean["characters"]]
    assert "".join(char["char"] for char in clean["characters"]) == clean["text"]
    assert all(0 <= x0 < x1 <= width for x0, x1 in spans)
    assert all(a[1] <= b[0] + 1e-6 for a, b in zip(spans, spans[1:], strict=False))  # left to right, no overlap
    assert 1 <= len(clean["nbest"]) <= 3 and clean["nbest"][0]["text"] == clean["text"]
    assert [h["score"] for h in clean["nbest"]] == sorted((h["score"] for h in clean["nbest"]), reverse=True)
    plain = run_tool("tools/predict.py", "--ckpt", checkpoint, tmp_path / "clean.png")
    assert plain.stdout == f"{tmp_path / 'clean.png'}\t{reference}\n"


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
    assert set(found) == {("greedy inference", 1), ("greedy", 1), ("beam", 1), ("beam", 2), ("beam_lm", 1), ("beam_lm", 2)}
    assert found[("beam", 1)][4] == found[("beam", 2)][4]  # the same CER whatever the workers
    assert all(float(row[3]) > 0 for row in rows)
