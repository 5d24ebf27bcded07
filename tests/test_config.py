from pathlib import Path

import pytest

from crnn.config import (
    Config,
    DecodeConfig,
    config_from_dict,
    config_yaml,
    load_config,
    parse_overrides,
    validate,
)
from crnn.errors import ConfigError
from tests.helpers import REPO, run_tool


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_yaml_and_overrides_merge_in_order(tmp_path):
    path = write(tmp_path, "data:\n  height: 48\n  batch_size: 4\ntrain:\n  lr: 1e-3\n  epochs: 7\n")
    cfg = load_config(path, ["train.epochs=5", "model.channels=[8,16,32]"])
    assert cfg.data.height == 48  # from the file
    assert cfg.data.batch_size == 4
    assert cfg.train.lr == pytest.approx(1e-3)  # YAML's '1e-3' string is read as a float
    assert cfg.train.epochs == 5  # the override wins over the file
    assert cfg.model.channels == (8, 16, 32)
    assert cfg.model.lstm_hidden == Config().model.lstm_hidden  # untouched default
    assert cfg.train.output_dir == "runs/exp"  # runs/<config stem>


def test_unknown_key_in_file_names_key_line_and_valid_keys(tmp_path):
    path = write(tmp_path, "data:\n  height: 48\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path} line 4" in message
    assert "'train.epoch'" in message and "Did you mean 'train.epochs'" in message
    assert "warmup_steps" in message  # lists the valid keys


def test_unknown_override_and_wrong_types_are_rejected():
    with pytest.raises(ConfigError, match=r"unknown config key 'data.batchsize'.*'data.batch_size'"):
        load_config(None, ["data.batchsize=3"])
    with pytest.raises(ConfigError, match=r"'train.epochs' must be int, got 'many'"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match=r"'train.amp' must be one of auto, bf16, fp16, off"):
        load_config(None, ["train.amp=fp8"])
    with pytest.raises(ConfigError, match="must look like section.key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match=r"'data.batch_size' must be > 0"):
        load_config(None, ["data.batch_size=0"])


def test_wrong_type_in_file_points_at_the_line(tmp_path):
    path = write(tmp_path, "model:\n  channels: 64\n")
    with pytest.raises(ConfigError, match=rf"{path} line 2: 'model.channels' must be a list"):
        load_config(path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "data: [1,\n"))


def test_round_trip_through_dict_is_frozen_and_equal():
    cfg = load_config(None, ["data.height=40"])
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(AttributeError):
        cfg.data.height = 3


def test_parse_overrides_nests_dotted_keys():
    assert parse_overrides(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": "1"}, "d": "x"}}


def test_config_is_deeply_frozen_hashable_and_round_trips_through_yaml(tmp_path):
    cfg = load_config(REPO / "experiments" / "base.yaml")
    assert hash(cfg) == hash(load_config(REPO / "experiments" / "base.yaml"))
    assert hash(cfg) != hash(load_config(REPO / "experiments" / "base.yaml", ["model.channels=[8,16,32]"]))
    assert cfg.model.strides == ((1, 2), (2, 2), (2, 2)) and isinstance(cfg.model.channels, tuple)
    assert {cfg: "a dict key"}[load_config(REPO / "experiments" / "base.yaml")] == "a dict key"
    saved = tmp_path / "config.yaml"
    saved.write_text(config_yaml(cfg), encoding="utf-8")
    assert load_config(saved) == cfg
    assert cfg.to_dict()["model"]["strides"] == [[1, 2], [2, 2], [2, 2]]  # plain lists in files


@pytest.mark.parametrize("override,message", [
    ("decode.beam_size=0", "'decode.beam_size' must be >= 1, got 0"),
    ("decode.nbest=0", "'decode.nbest' must be >= 1"),
    ("decode.beam_threshold=0", "'decode.beam_threshold' must be > 0"),
    ("decode.lm_order=0", r"'decode.lm_order' must be in \[1, 6\]"),
    ("data.synthetic.max_words=1", "'data.synthetic.max_words' must be >= 2"),
    ("train.device=gpu", "'train.device' must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("train.min_lr_ratio=2", r"'train.min_lr_ratio' must be in \[0, 1\]"),
    ("data.augment.shear=-1", "'data.augment.shear' must be >= 0"),
    ("model.shortcut_weight=-0.1", "'model.shortcut_weight' must be >= 0"),
])
def test_every_bad_value_is_refused_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(REPO / "experiments" / "synthetic.yaml", override.split())


def test_train_tool_refuses_a_bad_decode_value_before_reading_data(tmp_path):
    run_dir = tmp_path / "run"
    result = run_tool("tools/train.py", "--cfg", "experiments/base.yaml", "decode.beam_size=0",
                      f"train.output_dir={run_dir}")
    assert result.returncode == 2
    assert "'decode.beam_size' must be >= 1, got 0" in result.stderr
    assert "Traceback" not in result.stderr and "hub" not in result.stderr  # before the (offline) data
    assert not run_dir.exists()


def test_a_config_built_in_code_is_checked_like_a_loaded_one():
    with pytest.raises(ConfigError, match="'decode.beam_size' must be >= 1"):
        validate(Config(decode=DecodeConfig(beam_size=0)))


def test_a_saved_config_of_an_earlier_version_loads_without_its_retired_keys():
    saved = Config().to_dict()
    saved["model"].update(downsample="maxpool", upsample=1, attention_layers=0, name="crnn")
    saved["train"].update(ema=0.0, memory_format="auto", init_sha256="ab" * 32)
    saved["data"]["augment"]["enabled"] = True
    assert config_from_dict(saved) == Config()
    saved["model"]["upsample"] = 2
    with pytest.raises(ConfigError, match=r"'model.upsample=2' is no longer supported \(this version builds 1 only\)"):
        config_from_dict(saved)
