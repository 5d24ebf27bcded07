"""Several sources per split: the config's lists and their errors, the training weights, each
validation source's figures and the best-model rule, resume, fine-tuning, evaluate and calibrate
on one source or all, DDP."""

import json
import math

import numpy as np
import pytest

from crnn.checkpoint import load_checkpoint
from crnn.config import load_config
from crnn.data import Vocab, load_records
from crnn.data.samplers import WidthBatchSampler
from crnn.errors import ConfigError, DataError
from crnn.finetune import load_run_config
from crnn.inference import labelled_lines, load_trained_model
from crnn.trainer import fit
from tests.helpers import TINY, read_metrics, run_tool, synthetic_folder, torchrun


def source_list(**sources) -> str:
    """`name=(path, weight)` -> the YAML list of folder sources a split override takes."""
    return "[" + ", ".join(f"{{name: {name}, source: folder, path: '{path}', weight: {weight}}}"
                           for name, (path, weight) in sources.items()) + "]"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    sizes = {"a": 12, "b": 8, "va": 6, "vb": 5}
    return {name: synthetic_folder(root / name, count, seed=i) for i, (name, count) in enumerate(sizes.items())}


def overrides(folders, run_dir, *extra, weight_b=2):
    return [f"data.train={source_list(a=(folders['a'], 1), b=(folders['b'], weight_b))}",
            f"data.validation={source_list(va=(folders['va'], 1), vb=(folders['vb'], 1))}",
            "data.source=folder", "train.epochs=2", f"train.output_dir={run_dir}", *extra]


@pytest.fixture(scope="module")
def mixed_run(folders, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("mixed") / "run"
    fit(load_config(TINY, overrides(folders, run_dir)))
    return run_dir


@pytest.mark.parametrize("override,message", [
    ("data.train=[{source: pdf, path: x}]", "'data.train[0].source' must be one of \"\", hf, parquet"),
    ("data.train=[{path: x}, {path: y, weight: 0}]", "'data.train[1].weight' must be > 0, got 0.0"),
    ("data.train=[{path: x, weight: -1}]", "'data.train[0].weight' must be > 0"),
    ("data.train=[]", "'data.train' is an empty list"),
    ("data.validation=[{source: folder}]", "'data.validation[0].path' is not set: a folder source needs"),
    ("data.train=[{path: a/train.parquet}, {path: a/validation.parquet}]",
     "'data.train[1]' and 'data.train[0]' are both named 'a'"),
    ("data.train=[{path: x, wieght: 2}]", "unknown config key 'data.train[0].wieght'. Did you mean 'data.train[0].weight'"),
    ("data.normalization=NFX", "'data.normalization' must be one of NFC, NFD, NFKC, NFKD, none, got 'NFX'"),
])
def test_bad_source_lists_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(TINY, ["data.source=parquet", "data.validation=v.parquet", override])
    assert message in str(caught.value)


def test_a_best_rule_naming_no_validation_source_is_refused_when_the_run_starts(folders, tmp_path):
    cfg = load_config(TINY, overrides(folders, tmp_path / "run", "train.best=cremma18"))
    with pytest.raises(ConfigError, match="'train.best' must be mean or the name of one of the data.validation "
                                          "sources: va, vb; got 'cremma18'"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow  # trains
def test_a_model_chosen_on_one_source_evaluates_on_any_data(folders, tmp_path):
    fit(load_config(TINY, overrides(folders, tmp_path / "run", "train.best=vb", "train.epochs=1")))
    result = run_tool("tools/evaluate.py", "--ckpt", tmp_path / "run" / "checkpoints" / "best.pt", "--split",
                      "validation", f"data.validation={folders['va']}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].split()[-3] == "6"  # greedy's lines: va's 6


def test_a_bad_entry_in_a_yaml_list_names_the_file_line(tmp_path):
    path = tmp_path / "mixed.yaml"
    path.write_text("data:\n  source: parquet\n  train:\n    - {path: a.parquet}\n    - {path: b.parquet, source: zip}\n")
    with pytest.raises(ConfigError, match=r"mixed.yaml line 3: 'data.train\[1\].source' must be one of"):
        load_config(path)


def test_names_default_to_the_collection_and_train_best_takes_one():
    cfg = load_config(TINY, ["data.source=parquet", "train.best=cremma18-h64", "data.validation="
                             "[{path: data/copiste-h64/validation.parquet}, {path: data/cremma18-h64/validation.parquet}]"])
    names = [entry.label("parquet") for entry in cfg.data.validation]
    assert names == ["copiste-h64", "cremma18-h64"] and cfg.train.best == "cremma18-h64"


def test_a_source_without_a_readable_line_is_refused_before_the_run_directory(folders, tmp_path):
    broken = synthetic_folder(tmp_path / "broken", 3)
    for image in broken.glob("*.png"):
        image.write_bytes(b"")
    cfg = load_config(TINY, [f"data.train={source_list(a=(folders['a'], 1), broken=(broken, 1))}",
                             f"data.validation={folders['va']}", "data.source=folder",
                             f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DataError, match=r"data.train\[1\]: no line of .*broken can be read; 3 left out"):
        fit(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_an_unknown_source_name_lists_the_split_s_sources(folders, tmp_path):
    cfg = load_config(TINY, overrides(folders, tmp_path))
    with pytest.raises(DataError, match="no source of data.validation is named 'vc'; its sources: va, vb"):
        load_records(cfg.data, "validation", "vc")


def test_weights_draw_each_source_as_often_as_asked():
    widths = np.random.default_rng(0).integers(20, 400, 30)
    parts = [(0, 10, 2.0), (10, 30, 0.25)]  # 10 lines drawn twice, 5 of the other 20 once
    samplers = [WidthBatchSampler(widths, 4, shuffle=True, seed=5, rank=r, world_size=2, weights=parts) for r in (0, 1)]
    for epoch in (1, 2):
        drawn = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            drawn += [index for batch in sampler for index, _ in batch]
        counts = np.bincount(drawn, minlength=30)
        assert counts[:10].tolist() == [2] * 10
        assert sorted(set(counts[10:].tolist())) == [0, 1] and counts[10:].sum() == 5
        assert len(samplers[0]) == len(samplers[1]) == 4  # 25 lines in batches of 4: 7, made 8 for 2 ranks
    plain, weighted = (WidthBatchSampler(widths, 4, shuffle=True, seed=5, weights=w) for w in ((), [(0, 30, 1.0)]))
    plain.set_epoch(3), weighted.set_epoch(3)
    assert list(plain) == list(weighted)  # weight 1 changes nothing


@pytest.mark.slow  # trains
def test_each_validation_source_is_reported_and_best_follows_the_mean(mixed_run, folders):
    metrics = read_metrics(mixed_run)
    assert [m["step"] for m in metrics] == [4, 8]  # 12 lines + 8 lines twice = 28, in batches of 8
    for record in metrics:
        sources = record["val_sources"]
        assert {name: value["lines"] for name, value in sources.items()} == {"va": 6, "vb": 5}
        assert record["val_cer"] == pytest.approx((sources["va"]["cer"] + sources["vb"]["cer"]) / 2)
        assert record["best_by"] == "mean"
    best = load_checkpoint(mixed_run / "checkpoints" / "best.pt")
    assert best["metrics"]["val_cer"] == min(m["val_cer"] for m in metrics)
    texts = load_records(load_config(TINY, overrides(folders, mixed_run)).data, "train").texts
    assert best["vocab"] == Vocab.from_texts(list(texts)).chars  # the union of the train sources'
    assert len((mixed_run / "train_texts.txt").read_text().splitlines()) == 20


@pytest.mark.slow  # trains
def test_each_source_has_its_tensorboard_curve(mixed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(mixed_run)).Reload().Tags()["scalars"]
    assert {"val_sources/va/cer", "val_sources/vb/cer", "val_sources/va/wer", "val/cer"} <= set(tags)


@pytest.mark.slow  # trains
def test_evaluate_reports_every_source_or_the_one_asked_for(mixed_run, tmp_path):
    checkpoint = mixed_run / "checkpoints" / "best.pt"
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--split", "validation", "--json", tmp_path / "all.json")
    assert result.returncode == 0, result.stderr
    assert "\n  va " in result.stdout and "\n  vb " in result.stdout
    greedy = json.loads((tmp_path / "all.json").read_text())["greedy"]
    assert greedy["lines"] == 11 and {name: row["lines"] for name, row in greedy["sources"].items()} == {"va": 6, "vb": 5}
    assert greedy["char_errors"] == sum(row["char_errors"] for row in greedy["sources"].values())
    result = run_tool("tools/evaluate.py", "--ckpt", checkpoint, "--split", "validation", "--source", "vb",
                      "--json", tmp_path / "vb.json")
    assert result.returncode == 0, result.stderr
    alone = json.loads((tmp_path / "vb.json").read_text())["greedy"]
    assert "sources" not in alone and alone["lines"] == 5 and alone["cer"] == greedy["sources"]["vb"]["cer"]
    trained = load_trained_model(checkpoint, device="cpu")
    lines = labelled_lines(trained, "validation", check=False, source="va")  # what calibrate --source fits on
    assert sorted(lines.references) == sorted(load_records(trained.config.data, "validation", "va").texts)
    assert len(lines.references) == 6 and "va" in lines.where


@pytest.mark.slow  # trains
def test_best_can_follow_one_named_source(folders, tmp_path):
    fit(load_config(TINY, overrides(folders, tmp_path / "run", "train.best=vb", "train.epochs=3")))
    metrics = read_metrics(tmp_path / "run")
    assert all(m["val_cer"] == m["val_sources"]["vb"]["cer"] and m["best_by"] == "vb" for m in metrics)
    best = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")
    assert best["metrics"]["epoch"] == min(metrics, key=lambda m: (m["val_sources"]["vb"]["cer"], m["epoch"]))["epoch"]


@pytest.mark.slow  # trains
def test_a_resumed_weighted_run_continues_like_an_unbroken_one(folders, tmp_path):
    fit(load_config(TINY, overrides(folders, tmp_path / "unbroken", weight_b=1.5)))
    fit(load_config(TINY, overrides(folders, tmp_path / "broken", "train.epochs=1", weight_b=1.5)))
    fit(load_config(TINY, overrides(folders, tmp_path / "broken", "train.resume=auto", weight_b=1.5)))
    unbroken, resumed = read_metrics(tmp_path / "unbroken"), read_metrics(tmp_path / "broken")
    assert [m["step"] for m in resumed] == [m["step"] for m in unbroken] == [3, 6]  # 12 + 12 lines
    assert resumed[1]["train_loss"] == pytest.approx(unbroken[1]["train_loss"], rel=1e-6)
    assert resumed[1]["val_sources"] == unbroken[1]["val_sources"]


@pytest.mark.slow  # trains
def test_fine_tuning_on_several_sources_adds_their_characters(mixed_run, folders, tmp_path):
    extra = synthetic_folder(tmp_path / "extra", 6, seed=9)
    (extra / "gt.tsv").write_text("".join(f"{i}.png\tΩ{i}\n" for i in range(6)), encoding="utf-8")
    start = mixed_run / "checkpoints" / "best.pt"
    cfg, model = load_run_config(TINY, [f"train.init_from={start}", "data.source=folder", "train.epochs=1",
                                        f"data.train={source_list(a=(folders['a'], 1), extra=(extra, 3))}",
                                        f"data.validation={source_list(va=(folders['va'], 1), extra=(extra, 1))}",
                                        f"train.output_dir={tmp_path / 'tuned'}"])
    fit(cfg, model)
    vocab = load_checkpoint(tmp_path / "tuned" / "checkpoints" / "last.pt")["vocab"]
    started = load_checkpoint(start)["vocab"]
    assert vocab[:len(started)] == started and "Ω" in vocab
    (record,) = read_metrics(tmp_path / "tuned")
    assert record["step"] == 4 and set(record["val_sources"]) == {"va", "extra"}  # 12 + 18 lines


@pytest.mark.slow
def test_two_processes_count_each_validation_line_once(folders, tmp_path):
    torchrun("tools/train.py", "--cfg", TINY, *overrides(folders, tmp_path / "run", "train.epochs=1"))
    (record,) = read_metrics(tmp_path / "run")
    assert {name: value["lines"] for name, value in record["val_sources"].items()} == {"va": 6, "vb": 5}
    assert record["step"] == 2  # 28 lines, 2 processes x batch 8
    assert math.isfinite(record["val_cer"])
