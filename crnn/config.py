"""One typed, frozen Config: dataclass defaults <- YAML file <- `key=value` overrides.

    cfg = load_config("experiments/base.yaml", ["train.epochs=5", "data.batch_size=8"])

Every key is checked against the dataclasses below: an unknown key or a value of the wrong type
is a ConfigError naming the key (and the YAML line), the valid keys and, where it helps, the
closest match. Only `build_*` functions read the Config; modules below them take plain arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crnn.errors import ConfigError


def _choice(default: str, *choices: str) -> Any:
    return field(default=default, metadata={"choices": choices})


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the rendered splits of `data.source=synthetic` (lines are rendered on the fly)."""

    train: int = 20000
    validation: int = 500
    test: int = 500
    seed: int = 1234
    min_words: int = 2
    max_words: int = 7


@dataclass(frozen=True)
class AugmentConfig:
    """Train-only augmentation; each op fires with probability `prob` (0 turns it off)."""

    enabled: bool = True
    prob: float = 0.5
    shear: float = 0.3  # max |tan(shear angle)|, horizontal
    rotation: float = 1.0  # max degrees
    scale: float = 0.15  # max relative change of size (height is restored afterwards)
    distortion: float = 3.0  # grid distortion: max displacement in pixels at height 64
    morphology: float = 1.0  # erosion/dilation kernel up to 1 + 2*round(value) pixels at height 64
    brightness: float = 0.3
    contrast: float = 0.3


@dataclass(frozen=True)
class DataConfig:
    source: str = _choice("hf", "hf", "parquet", "folder", "synthetic")
    name: str = "Teklia/IAM-line"  # hub id for source=hf
    train: str | None = None  # file or folder path for source=parquet|folder
    validation: str | None = None
    test: str | None = None
    height: int = 128
    # keep_aspect: height fixed, width follows; squash: resized to height x width (aspect lost);
    # fit: scaled into a height x width canvas keeping the aspect ratio, then padded.
    resize: str = _choice("keep_aspect", "keep_aspect", "squash", "fit")
    width: int = 0  # target width for resize=squash|fit
    max_width: int = 4000  # lines wider than this (after resizing) are scaled down to it
    batch_size: int = 16  # per process
    num_workers: int = 2
    shuffle_window: int = 50  # batches drawn from windows of this many batches, sorted by width
    check: bool = False  # before training, decode every image and log every problem found
    synthetic: SyntheticConfig = SyntheticConfig()
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class ModelConfig:
    name: str = "crnn"  # key in crnn.models.MODELS
    stem_channels: int = 32
    stem_kernel: list[int] = field(default_factory=lambda: [7, 7])
    stem_stride: list[int] = field(default_factory=lambda: [2, 2])  # (height, width)
    stem_pool: bool = False  # 3x3 stride-2 max-pool after the stem, as in ImageNet ResNets
    channels: list[int] = field(default_factory=lambda: [64, 128, 256])
    blocks: list[int] = field(default_factory=lambda: [2, 2, 2])
    strides: list[list[int]] = field(default_factory=lambda: [[1, 1], [2, 2], [2, 1]])
    # conv: a stage's stride is applied by its first block; maxpool: by a max-pool before it
    downsample: str = _choice("conv", "conv", "maxpool")
    column_pool: str = _choice("max", "max", "avg")
    frames: int = 0  # 0: frames follow each line's width; N > 0: adaptive-pool to N frames
    lstm_layers: int = 2
    lstm_hidden: int = 256
    lstm_dropout: float = 0.2
    head_dropout: float = 0.2
    shortcut: bool = True
    shortcut_weight: float = 0.1
    shortcut_kernel: int = 3
    shortcut_dropout: float = 0.2


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 100
    max_steps: int = 0  # stop after this many optimizer steps (0: no limit)
    max_minutes: float = 0.0  # stop when the training steps have taken this long (0: no limit)
    lr: float = 1e-3  # peak LR; with lr_scaling it is the LR of one process (see README)
    # LR under N processes (effective batch = N x data.batch_size): none keeps train.lr,
    # linear multiplies it by N, sqrt by sqrt(N)
    lr_scaling: str = _choice("none", "none", "linear", "sqrt")
    weight_decay: float = 5e-5
    warmup_steps: int = 500
    schedule: str = _choice("cosine", "cosine", "constant")
    min_lr_ratio: float = 0.02
    grad_clip: float = 5.0  # max gradient norm (0: off)
    amp: str = _choice("auto", "auto", "bf16", "fp16", "off")
    output_dir: str = ""  # "" -> runs/<config file stem>
    resume: str = ""  # "" (new run), "auto" (continue from last.pt if present) or a path
    seed: int = 0
    patience: int = 0  # early stopping: epochs without a better validation CER (0: off)
    val_images: int = 4  # validation images logged to TensorBoard each epoch
    log_every: int = 20  # steps between TensorBoard training scalars
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row
    checkpoint_every_steps: int = 0  # also write checkpoints/last.pt every N steps (0: epoch ends only)
    oom_retry: bool = True  # on out-of-memory, retry the batch in two halves (single process only)
    data_parallel: bool = False
    sync_bn: bool = False
    compile: bool = False
    deterministic: bool = False


@dataclass(frozen=True)
class DecodeConfig:
    """Beam search (torchaudio's flashlight `ctc_decoder`, lexicon-free) and its language model."""

    beam_size: int = 10
    beam_threshold: float = 25.0  # prune hypotheses this far (log-prob) below the best
    beam_size_token: int = 16  # tokens considered per frame (0: all); 16 loses nothing measurable
    nbest: int = 1
    cuda: bool = False  # on CUDA use torchaudio's cuda_ctc_decoder for the plain beam search
    lm_path: str = ""  # character LM file (tools/build_lm.py, or a KenLM ARPA/binary); "" = built
    lm_order: int = 6  # n-gram order of the character LM built from the training transcriptions
    lm_smoothing: str = _choice("kneser_ney", "kneser_ney", "witten_bell", "add_k")
    lm_weight: float = 0.5
    word_score: float = 0.0  # added at each word boundary (space)


@dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with errors that name the key and the file line.


def _describe(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently convert) one value against a field type; raise ConfigError otherwise."""
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)][0]
        return _coerce(value, inner, key, where)
    origin = typing.get_origin(tp)
    if origin is list:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list ({_describe(tp)}), got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item, item_type, f"{key}[{i}]", where) for i, item in enumerate(value)]
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
    elif tp in (int, float):
        if isinstance(value, str):
            try:
                return tp(value)
            except ValueError:
                pass
        # an int is a valid float, but neither a float nor a bool is a valid int
        elif isinstance(value, tp if tp is int else (int, float)) and not isinstance(value, bool):
            return tp(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: '{key}' must be {_describe(tp)}, got {value!r}")


def _unknown_key(key: str, prefix: str, valid: list[str], where: str) -> ConfigError:
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    return ConfigError(
        f"{where}: unknown config key '{full}'.{hint} Valid keys in {section}: {', '.join(valid)}"
    )


def _build(cls: type, data: dict, prefix: str, where: Any) -> Any:
    """Build dataclass `cls` from a nested dict; `where(key)` says where a key came from."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where(prefix[:-1])}: '{prefix[:-1]}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise _unknown_key(str(key), prefix, sorted(fields), where(full))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{full}.", where)
            continue
        kwargs[key] = _coerce(value, tp, full, where(full))
        choices = fields[key].metadata.get("choices")
        if choices and kwargs[key] not in choices:
            raise ConfigError(
                f"{where(full)}: '{full}' must be one of {', '.join(choices)}, got {value!r}"
            )
    return cls(**kwargs)


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _yaml_with_lines(path: Path) -> tuple[dict, dict[str, int]]:
    """Parse a YAML mapping and remember the line of every dotted key (for error messages)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {path}: {err}") from None
    try:
        root = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, train)")
    lines: dict[str, int] = {}

    def visit(node: yaml.Node, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = f"{prefix}{key_node.value}"
                lines[key] = key_node.start_mark.line + 1
                visit(value_node, f"{key}.")

    visit(root, "")
    return data, lines


def parse_overrides(overrides: list[str]) -> dict:
    """['train.epochs=5', ...] -> nested dict of raw strings (types are checked when building)."""
    nested: dict = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' must look like section.key=value, e.g. train.epochs=5")
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override of '{part}'")
        node[leaf] = value
    return nested


def merge_overrides(data: dict, overrides: list[str]) -> dict:
    """A plain config dict (e.g. a checkpoint's) with `key=value` overrides merged in."""
    return _merge(data, parse_overrides(list(overrides)))


def config_from_dict(data: dict, source: str = "config") -> Config:
    """Rebuild and validate a Config from a plain dict (e.g. the one stored in a checkpoint)."""
    cfg = _build(Config, data, "", lambda key: source)
    validate(cfg, source)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- YAML file (optional) <- overrides. `train.output_dir` defaults to runs/<stem>."""
    data, lines = ({}, {}) if path is None else _yaml_with_lines(Path(path))

    def where_in_file(key: str) -> str:
        line = lines.get(key)
        return f"{path} line {line}" if line else f"{path}"

    _build(Config, data, "", where_in_file)  # errors in the file point at the file
    override_data = parse_overrides(list(overrides))
    _build(Config, override_data, "", lambda key: "command-line override")
    merged = _merge(data, override_data)
    train = merged.setdefault("train", {})
    if not train.get("output_dir"):
        train["output_dir"] = str(Path("runs") / (Path(path).stem if path else "default"))
    return config_from_dict(merged, f"{path}" if path else "config")


def _check_ranges(cfg: Config, where: str) -> None:
    data, model, train = cfg.data, cfg.model, cfg.train
    positive = {
        "data.height": data.height, "data.batch_size": data.batch_size, "data.max_width": data.max_width,
        "data.shuffle_window": data.shuffle_window, "model.stem_channels": model.stem_channels,
        "model.lstm_hidden": model.lstm_hidden, "train.epochs": train.epochs, "train.lr": train.lr,
        "train.log_every": train.log_every,
    }
    non_negative = {
        "data.num_workers": data.num_workers, "model.frames": model.frames,
        "model.lstm_layers": model.lstm_layers, "train.max_steps": train.max_steps,
        "train.max_minutes": train.max_minutes, "train.warmup_steps": train.warmup_steps,
        "train.weight_decay": train.weight_decay, "train.grad_clip": train.grad_clip,
        "train.patience": train.patience, "train.max_bad_steps": train.max_bad_steps,
        "train.checkpoint_every_steps": train.checkpoint_every_steps,
    }
    fractions = {
        "model.lstm_dropout": model.lstm_dropout, "model.head_dropout": model.head_dropout,
        "model.shortcut_dropout": model.shortcut_dropout, "data.augment.prob": data.augment.prob,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{where}: '{key}' must be > 0, got {value}")
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"{where}: '{key}' must be >= 0, got {value}")
    for key, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}: '{key}' must be in [0, 1], got {value}")


def _check_model_shape(model: ModelConfig, where: str) -> None:
    if not (len(model.channels) == len(model.blocks) == len(model.strides)) or not model.channels:
        raise ConfigError(
            f"{where}: 'model.channels', 'model.blocks' and 'model.strides' must be non-empty lists "
            f"of the same length (one entry per stage), got {model.channels}, {model.blocks}, "
            f"{model.strides}"
        )
    if min(model.blocks) < 1 or min(model.channels) < 1:
        raise ConfigError(f"{where}: 'model.blocks' and 'model.channels' must be >= 1")
    pairs = {"model.stem_kernel": model.stem_kernel, "model.stem_stride": model.stem_stride}
    pairs.update({f"model.strides[{i}]": s for i, s in enumerate(model.strides)})
    for key, value in pairs.items():
        if len(value) != 2 or min(value) < 1:
            raise ConfigError(f"{where}: '{key}' must be [height, width] of positive ints, got {value}")
    if model.shortcut_kernel % 2 == 0:
        raise ConfigError(f"{where}: 'model.shortcut_kernel' must be odd, got {model.shortcut_kernel}")


def validate(cfg: Config, where: str = "config") -> None:
    """Ranges and cross-field checks that the type system cannot express."""
    _check_ranges(cfg, where)
    _check_model_shape(cfg.model, where)
    data, model = cfg.data, cfg.model
    if model.frames and data.resize == "keep_aspect":
        raise ConfigError(f"{where}: 'model.frames={model.frames}' (a fixed number of frames) needs "
                          f"fixed-width lines: set data.resize=squash or fit with data.width")
    if data.resize != "keep_aspect" and data.width <= 0:
        raise ConfigError(f"{where}: 'data.resize={data.resize}' needs 'data.width' > 0")


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
