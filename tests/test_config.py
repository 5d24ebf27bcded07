from pathlib import Path

import pytest

from crnn.config import Config, config_from_dict, load_config, parse_overrides
from crnn.errors import ConfigError


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
    assert cfg.model.channels == [8, 16, 32]
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
