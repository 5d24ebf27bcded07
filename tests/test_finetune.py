"""Starting a new run from a trained model: the alphabet (union, new, keep), freezing, bad input."""

import json

import pytest
import torch
import yaml

import crnn.finetune
import crnn.trainer
from crnn.checkpoint import load_checkpoint
from crnn.checkpoint import read_model_file as load_model
from crnn.config import load_config
from crnn.data import Preprocess, Vocab, collate, make_sample
from crnn.decoding import GreedyDecoder
from crnn.distributed import DistInfo
from crnn.errors import CheckpointError, ConfigError
from crnn.finetune import load_run_config
from crnn.models import build_model
from crnn.trainer import build_run, fit
from tests.helpers import REPO, TINY, draw_line, run_tool, torchrun

pytestmark = pytest.mark.slow  # every test here trains a model or starts processes

CPU = DistInfo(0, 0, 1, torch.device("cpu"))


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """A tiny model trained for two epochs on synthetic lines: the starting point."""
    run = tmp_path_factory.mktemp("start") / "run"
    fit(load_config(TINY, ["train.epochs=2", f"train.output_dir={run}"]))
    return run / "checkpoints" / "best.pt"


@pytest.fixture
def new_hand(start, tmp_path):
    """A folder of lines of a 'new hand' with characters the starting model has never seen."""
    known = set(load_checkpoint(start)["vocab"])
    unseen = [char for char in "QZXJ#&@%" if char not in known][:2]
    texts = [f"the {unseen[0]}at", f"{unseen[1]} dog", "a bed", f"{unseen[0]}{unseen[1]}"]
    folder = tmp_path / "lines"
    folder.mkdir()
    for i, text in enumerate(texts):
        draw_line(text).save(folder / f"{i}.png")
    (folder / "gt.tsv").write_text("".join(f"{i}.png\t{text}\n" for i, text in enumerate(texts)), encoding="utf-8")
    return folder, texts, "".join(unseen)


def finetune_config(start, lines, tmp_path, *overrides):
    """The command line a user types, through tools/train.py's own loading: (config, starting model)."""
    return load_run_config(REPO / "experiments" / "finetune.yaml", [
        f"train.init_from={start}", "data.source=folder", f"data.train={lines}", f"data.validation={lines}",
        "data.num_workers=0", "train.device=cpu", f"train.output_dir={tmp_path / 'ft'}", *overrides])


def finetune_run(start, lines, tmp_path, *overrides):
    """The run tools/train.py builds for that command line, from the starting model it read once."""
    cfg, starting = finetune_config(start, lines, tmp_path, *overrides)
    return build_run(cfg, CPU, starting)


def read(model, vocab, image_batch):
    model.eval()
    with torch.no_grad():
        output = model(image_batch.images.float() / 255, image_batch.widths)
    return GreedyDecoder(vocab)(output.log_probs, output.lengths)


def test_union_keeps_every_learned_row_and_reads_as_before(start, new_hand, tmp_path):
    lines, _, unseen = new_hand
    state = load_checkpoint(start)
    cfg, starting = finetune_config(start, lines, tmp_path)
    assert cfg.model == load_config(TINY).model  # model keys from the checkpoint
    assert cfg.data.height == 32
    run = build_run(cfg, CPU, starting)
    old = len(state["vocab"]) + 1
    assert run.vocab.chars[: old - 1] == state["vocab"] and "".join(run.vocab.chars[old - 1:]) == "".join(sorted(unseen))
    weights = run.model.state_dict()
    for name in ("head.classifier.weight", "head.classifier.bias", "shortcut.conv.weight", "shortcut.conv.bias"):
        assert torch.equal(weights[name][:old], state["model"][name]), name
        assert weights[name].shape[0] == old + len(unseen)
    assert weights["head.classifier.bias"][old:].max() < state["model"]["head.classifier.bias"].min()
    before = build_model(cfg.model, old)
    before.load_state_dict(state["model"])
    batch = collate([make_sample(i, draw_line(text), "", run.vocab, Preprocess(32), "predict")
                     for i, text in enumerate(("abc", "the dog", "a bed"))])
    readings = read(run.model, run.vocab, batch)
    assert readings == read(before, Vocab(state["vocab"]), batch) and any(readings)


def test_new_and_keep_alphabets(start, new_hand, tmp_path):
    lines, texts, unseen = new_hand
    state = load_checkpoint(start)
    new = finetune_run(start, lines, tmp_path, "train.init_vocab=new")
    assert new.vocab.chars == sorted(set("".join(texts)))
    shared = next(char for char in new.vocab.chars if char in state["vocab"])
    row_new, row_old = new.vocab.index[shared], state["vocab"].index(shared) + 1
    assert torch.equal(new.model.state_dict()["head.classifier.weight"][row_new],
                       state["model"]["head.classifier.weight"][row_old])
    keep = finetune_run(start, lines, tmp_path / "k", "train.init_vocab=keep")
    assert keep.vocab.chars == state["vocab"]
    dataset = keep.train_loader.dataset
    sample = dataset[(0, None)]  # "the Qat": the unseen letter is left out of the target
    assert sample.text == texts[0] and len(sample.target) == len(texts[0]) - texts[0].count(unseen[0])
    assert dataset[(3, None)].image is None  # nothing left of it to learn: the line is left out


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_the_frozen_encoder_does_not_move_then_does(start, new_hand, tmp_path, optimizer):
    lines, _, _ = new_hand
    trained = load_checkpoint(start)["model"]
    common = ["train.freeze_encoder_steps=3", "data.batch_size=2", "train.warmup_steps=0", f"train.optimizer={optimizer}"]
    for epochs in (1, 3):  # 2 steps an epoch: 2 steps inside the freeze, then 6 beyond it
        cfg, starting = finetune_config(start, lines, tmp_path / str(epochs), f"train.epochs={epochs}", *common)
        fit(cfg, starting)
        weights = load_checkpoint(tmp_path / str(epochs) / "ft" / "checkpoints" / "last.pt")["model"]
        moved = [name for name in weights if name.startswith("encoder.") and not torch.equal(weights[name], trained[name])]
        assert not torch.equal(weights["head.lstm.forward_layers.0.weight_ih_l0"],
                               trained["head.lstm.forward_layers.0.weight_ih_l0"])
        if epochs == 1:
            assert moved == []  # weights and BatchNorm statistics held
        else:
            assert any(name.endswith("weight") for name in moved) and any("running_mean" in name for name in moved)


def test_bad_starting_points_are_refused_before_any_data(start, new_hand, tmp_path):
    lines, _, _ = new_hand
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(start.read_bytes()[:1000])
    (tmp_path / "notes.pt").write_text("hello")
    for path, message in ((tmp_path / "missing.pt", "checkpoint not found"),
                          (truncated, "corrupt or truncated checkpoint"),
                          (tmp_path / "notes.pt", "notes.pt: not a crnn checkpoint")):
        with pytest.raises(CheckpointError, match=message):
            finetune_config(path, lines, tmp_path)
    with pytest.raises(ConfigError, match=r"'model.channels' is \(8, 16\).*has \(16, 32\).*Remove model.channels"):
        finetune_config(start, lines, tmp_path, "model.channels=[8,16]")
    with pytest.raises(ConfigError, match=r"'model.lstm_hidden' is 64 .*has 32.*Remove model.lstm_hidden"):
        finetune_config(start, lines, tmp_path, "model.lstm_hidden=64")
    with pytest.raises(ConfigError, match="'train.resume' and 'train.init_from' together: resume continues"):
        finetune_config(start, lines, tmp_path, "train.resume=auto")
    result = run_tool("tools/train.py", "--cfg", "experiments/base.yaml", f"train.init_from={tmp_path / 'missing.pt'}",
                      f"train.output_dir={tmp_path / 'x'}")
    assert result.returncode == 2 and f"checkpoint not found: {tmp_path / 'missing.pt'}" in result.stderr
    assert "hub" not in result.stderr and not (tmp_path / "x").exists()


def test_the_fine_tuned_run_records_its_start_and_its_tools_use_its_alphabet(start, new_hand, tmp_path):
    lines, _, unseen = new_hand
    run_dir = tmp_path / "ft"
    result = run_tool("tools/train.py", "--cfg", "experiments/finetune.yaml", f"train.init_from={start}",
                      "data.source=folder", f"data.train={lines}", f"data.validation={lines}", "train.epochs=1",
                      "data.num_workers=0", f"train.output_dir={run_dir}")
    assert result.returncode == 0, result.stderr
    assert "added" in result.stderr and unseen[0] in result.stderr
    assert f"weights sha256 {load_model(start).sha256()}" in result.stderr
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["init_from"] == str(start)
    checkpoint = run_dir / "checkpoints" / "best.pt"
    assert set(unseen) <= set(load_checkpoint(checkpoint)["vocab"])
    evaluated = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--split", "validation", "--json",
                         tmp_path / "r.json", "data.num_workers=0")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "r.json").read_text())["greedy"]["lines"] == 4
    assert "not in the checkpoint's vocab" not in evaluated.stderr
    predicted = run_tool("tools/predict.py", "--ckpt", checkpoint, lines)
    assert predicted.returncode == 0 and len(predicted.stdout.splitlines()) == 4


def test_fine_tuning_under_torchrun(start, new_hand, tmp_path):
    lines, _, _ = new_hand
    run_dir = tmp_path / "ddp"
    torchrun("tools/train.py", "--cfg", "experiments/finetune.yaml", f"train.init_from={start}", "data.source=folder",
             f"data.train={lines}", f"data.validation={lines}", "train.epochs=1", "data.num_workers=0",
             "data.batch_size=1", f"train.output_dir={run_dir}")
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 alone writes
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1


def test_the_starting_model_is_read_once(start, new_hand, tmp_path, monkeypatch):
    lines, _, _ = new_hand
    reads = []
    monkeypatch.setattr(crnn.finetune, "read_model_file",
                        lambda *args, read=crnn.finetune.read_model_file: reads.append(args) or read(*args))
    run = finetune_run(start, lines, tmp_path)
    assert len(reads) == 1 and run.vocab.chars[: len(load_checkpoint(start)["vocab"])] == load_checkpoint(start)["vocab"]
    crnn.trainer.shut_down(run.train_loader)
    # a config loaded without its starting model is refused, naming the function that reads it
    cfg = load_config(REPO / "experiments" / "finetune.yaml", [
        f"train.init_from={start}", "data.source=folder", f"data.train={lines}", f"data.validation={lines}",
        "data.num_workers=0", f"train.output_dir={tmp_path / 'direct'}"])
    with pytest.raises(ConfigError, match="crnn.finetune.load_run_config"):
        build_run(cfg, CPU)
    assert not (tmp_path / "direct").exists()
