"""One typed, frozen, hashable Config: dataclass defaults <- YAML file <- `key=value` overrides.

    cfg = load_config("experiments/base.yaml", ["train.epochs=5", "data.batch_size=8"])

Every key is checked on load, before any data is read (docs/training.md). Each field declares its
own choices or range next to its default (`_choice`, `_range`): one list per choice, shared by the
checks, the tools' argument parsers and the modules that act on it. A `train.init_from` run loads
through `crnn.finetune.load_run_config`, which lays the starting model's keys under the YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
import unicodedata
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from crnn.errors import ConfigError

SPLITS = ("train", "validation", "test")
AMP_MODES = ("auto", "bf16", "fp16", "off")
DEVICES = "auto, cpu, cuda or cuda:N"
NORMALIZATIONS = ("NFC", "NFD", "NFKC", "NFKD", "none")
SOURCES = ("hf", "parquet", "folder", "synthetic", "xml")


def _choice(*choices: str) -> Any:
    """One of `choices`; the first is the default."""
    return field(default=choices[0], metadata={"choices": choices})


def _range(default: float, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Any:
    """A number within [low, high] (or (low, high] with `low_open`)."""
    return field(default=default, metadata={"range": (low, high, low_open)})


def _pattern(default: str, pattern: str, description: str) -> Any:
    """A string matching the regular expression `pattern`, described to the user as `description`."""
    return field(default=default, metadata={"pattern": (re.compile(pattern), description)})


_positive = partial(_range, low=0, low_open=True)
_non_negative = partial(_range, low=0)
_fraction = partial(_range, low=0, high=1)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the rendered splits of `data.source=synthetic` (lines are rendered on the fly)."""

    train: int = _non_negative(20000)
    validation: int = _non_negative(500)
    test: int = _non_negative(500)
    seed: int = 1234
    max_words: int = _range(7, 2)  # words per line: 2 to this


@dataclass(frozen=True)
class AugmentConfig:
    """Train-only augmentation; each op fires with probability `prob` (0 turns augmentation off)."""

    prob: float = _fraction(0.5)
    shear: float = _non_negative(0.3)  # max |tan(shear angle)|, horizontal
    rotation: float = _non_negative(1.0)  # max degrees
    scale: float = _fraction(0.15)  # max relative change of size (height is restored afterwards)
    distortion: float = _non_negative(3.0)  # grid distortion: max displacement in pixels at height 64
    morphology: float = _non_negative(1.0)  # erosion/dilation kernel up to 1 + 2*round(value) px at height 64
    brightness: float = _non_negative(0.3)
    contrast: float = _fraction(0.3)


@dataclass(frozen=True)
class XmlConfig:
    """`data.source=xml`: ALTO / PAGE pages, their lines cropped once (crnn/data/xml_pages.py)."""

    cache_dir: str = ""  # "": crops kept in memory; a folder: crops kept there, keyed by file content
    baseline_above: float = _positive(60.0)  # a line given only by its baseline: band, in page pixels,
    baseline_below: float = _non_negative(20.0)  # above and below the baseline
    # the folder page images must lie in ("": each XML file's own folder); paths leading out are refused
    image_root: str = ""


@dataclass(frozen=True)
class SourceConfig:
    """One of the sources a split lists (`data.train: [{name: .., source: .., path: .., weight: ..}, ..]`)."""

    name: str = ""  # its name in the metrics and for --source ("": from its path)
    source: str = _choice("", *SOURCES)  # its kind ("": data.source)
    path: str = ""  # its file, folder or glob; for hf, the hub id ("": data.name); unused for synthetic
    weight: float = _positive(1.0)  # times each of its lines is drawn per training epoch, on average

    def label(self, kind: str) -> str:
        """`name`, else the path's file stem, or its folder's name when the stem names a split or is
        a glob (copiste-h64/train.parquet: copiste-h64); `kind` (the source's) when there is no path."""
        if self.name:
            return self.name
        if not self.path or kind in ("hf", "synthetic"):
            return self.path.rsplit("/", 1)[-1] if kind == "hf" and self.path else kind
        path = Path(self.path.rstrip("/"))
        generic = path.stem in (*SPLITS, "val", "valid", "dev") or any(char in path.stem for char in "*?[")
        return path.parent.name if generic and path.parent.name else path.stem


@dataclass(frozen=True)
class DataConfig:
    source: str = _choice(*SOURCES)
    name: str = "Teklia/IAM-line"  # hub id for source=hf
    # a split: a file or folder path (parquet, folder), a folder, file or glob (xml), or a list of
    # sources, each its own kind, path and training weight (SourceConfig; docs/data.md)
    train: str | tuple[SourceConfig, ...] | None = None
    validation: str | tuple[SourceConfig, ...] | None = None
    test: str | tuple[SourceConfig, ...] | None = None
    # Unicode form of every text (sources, references, the language model's), stored with the model;
    # in every form, runs of white space become one space and a text's ends lose theirs
    normalization: str = _choice(*NORMALIZATIONS)
    # the order of a line's characters in its image: ltr, rtl (with digits and Latin inside), or
    # auto (each line's own); stored with the model (docs/data.md)
    direction: str = _choice("ltr", "rtl", "auto")
    height: int = _positive(128)  # lines are scaled to this height, the aspect ratio kept
    max_width: int = _positive(4000)  # lines wider than this (after resizing) are scaled down to it
    batch_size: int = _positive(16)  # per process
    # each batch is padded to a multiple of this many pixels: few shapes for cuDNN autotuning (1: none)
    width_multiple: int = _positive(64)
    num_workers: int = _non_negative(2)  # DataLoader workers; also the processes cropping source=xml pages
    # decoded, resized lines kept in shared memory for later epochs, up to this many MB (0: off)
    cache_mb: float = _non_negative(2048.0)
    # where the data's indexes are kept ("": $CRNN_INDEX_DIR, else ~/.cache/crnn/index)
    index_dir: str = ""
    check: bool = False  # before training, decode every image and log every problem found
    synthetic: SyntheticConfig = SyntheticConfig()
    xml: XmlConfig = XmlConfig()
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class ModelConfig:
    """ResNet encoder -> BiLSTM -> linear, with the CTC shortcut head in training (docs/training.md)."""

    stem_channels: int = _positive(32)
    stem_stride: tuple[int, ...] = (2, 2)  # (height, width)
    channels: tuple[int, ...] = (64, 128, 256)
    blocks: tuple[int, ...] = (2, 2, 2)
    strides: tuple[tuple[int, ...], ...] = ((1, 1), (2, 2), (2, 1))
    lstm_layers: int = _non_negative(2)
    lstm_hidden: int = _positive(256)
    lstm_dropout: float = _fraction(0.2)
    head_dropout: float = _fraction(0.2)
    shortcut: bool = True
    shortcut_weight: float = _non_negative(0.1)
    shortcut_dropout: float = _fraction(0.2)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _positive(100)
    max_steps: int = _non_negative(0)  # optimizer steps, then stop; the LR schedule ends there (0: no limit)
    max_minutes: float = _non_negative(0.0)  # stop (validate, checkpoint) after this many training minutes
    # wall-clock minutes of this process, then a checkpoint and exit code 142, as SIGALRM (0: no limit)
    stop_after_minutes: float = _non_negative(0.0)
    lr: float = _positive(1e-3)  # peak LR; with lr_scaling, the LR of one process (see docs/multi_gpu.md)
    # LR under N processes: none keeps train.lr, linear multiplies it by N, sqrt by sqrt(N)
    lr_scaling: str = _choice("none", "linear", "sqrt")
    weight_decay: float = _non_negative(5e-5)
    # adamw, or muon: Muon on the hidden weight matrices, AdamW on the rest (crnn.optim.MuonAdamW)
    optimizer: str = _choice("adamw", "muon")
    warmup_steps: int = _non_negative(500)
    min_lr_ratio: float = _fraction(0.02)  # the cosine's floor, as a share of the peak LR
    grad_clip: float = _non_negative(5.0)  # max gradient norm (0: off)
    amp: str = _choice(*AMP_MODES)  # precision: crnn.device.resolve_amp
    output_dir: str = ""  # "" -> runs/<config file stem>
    resume: str = ""  # "" (new run), "auto" (continue from last.pt if present) or a path
    # fine-tuning: a new run from this checkpoint or export bundle, and its alphabet (docs/finetune.md)
    init_from: str = ""
    init_vocab: str = _choice("union", "new", "keep")
    freeze_encoder_steps: int = _non_negative(0)  # the encoder (and its BatchNorm statistics) frozen so long
    seed: int = 0
    patience: int = _non_negative(0)  # early stopping: epochs without a better validation CER (0: off)
    # the validation CER best.pt and early stopping go by, with several validation sources: mean
    # (of the sources' CERs) or a source's name
    best: str = "mean"
    val_images: int = _non_negative(4)  # validation images logged to TensorBoard each epoch
    # steps between training logs, and between the checks of stop requests (signals, the minutes)
    log_every: int = _positive(20)
    device: str = _pattern("auto", r"auto|cpu|cuda(:\d+)?", DEVICES)
    max_bad_steps: int = _non_negative(5)  # stop after this many non-finite steps in a row
    checkpoint_every_steps: int = _non_negative(0)  # also write last.pt every N steps (0: at epoch ends only)
    data_parallel: bool = False
    sync_bn: bool = False
    cudnn_benchmark: bool = False  # cuDNN autotuning: one search per batch shape (see data.width_multiple)
    deterministic: bool = False


@dataclass(frozen=True)
class DecodeConfig:
    """Beam search (torchaudio's flashlight `ctc_decoder`, lexicon-free) and its language model."""

    beam_size: int = _range(10, 1)
    beam_threshold: float = _positive(25.0)  # prune hypotheses this far (log-prob) below the best
    nbest: int = _range(1, 1)
    lm_path: str = ""  # character LM file (tools/build_lm.py, or a KenLM ARPA/binary); "" = built
    lm_order: int = _range(6, 1, 6)  # n-gram order of the character LM built from the training transcriptions
    lm_weight: float = 0.5
    word_score: float = 0.0  # added at each word boundary (space)
    workers: int = _non_negative(0)  # processes for beam search (0: one per CPU core; 1: in this process)


def _plain(value: Any) -> Any:
    """Tuples back to lists (for YAML and checkpoints), recursively."""
    if isinstance(value, (tuple, list)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class Config:
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    decode: DecodeConfig = DecodeConfig()

    def to_dict(self) -> dict:
        """Plain nested dicts and lists: what config.yaml and checkpoints hold."""
        return _plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------------------------------
# Building a Config from plain data, with errors that name the key and the file line.


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {_describe(typing.get_args(tp)[0])}"
    return tp.__name__


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently convert) one value against a field type; ConfigError otherwise. A list
    field (`tuple[T, ...]`) takes a YAML list, a tuple, or a string holding a YAML list."""
    if type(None) in typing.get_args(tp):  # `T | None`
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(inner) == 2:  # `str | tuple[...]`: a path, or a list (a YAML list in a string: "[...]")
            listed = isinstance(value, (list, tuple)) or (isinstance(value, str) and value.lstrip().startswith("["))
            return _coerce(value, inner[1] if listed else inner[0], key, where)
        return _coerce(value, inner[0], key, where)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            with suppress(yaml.YAMLError):
                value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list ({_describe(tp)}), got {value!r}")
        item_type = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item_type):
            return tuple(item if isinstance(item, item_type) else _build(item_type, item, f"{key}[{i}].", lambda _: where)
                         for i, item in enumerate(value))
        return tuple(_coerce(item, item_type, f"{key}[{i}]", where) for i, item in enumerate(value))
    if tp is bool:
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        if isinstance(value, bool):
            return value
    elif tp in (int, float):
        if isinstance(value, str):
            with suppress(ValueError):
                return tp(value)
        # an int is a valid float, but neither a float nor a bool is a valid int
        elif isinstance(value, tp if tp is int else (int, float)) and not isinstance(value, bool):
            return tp(value)
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{where}: '{key}' must be {_describe(tp)}, got {value!r}")


def _check_field(value: Any, spec: dataclasses.Field, key: str, where: str) -> None:
    """The field's own choices, pattern or range (declared with `_choice`, `_pattern`, `_range`)."""
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        shown = ", ".join(choice or '""' for choice in choices)
        raise ConfigError(f"{where}: '{key}' must be one of {shown}, got {value!r}")
    if "pattern" in spec.metadata:
        pattern, description = spec.metadata["pattern"]
        if not pattern.fullmatch(value):
            raise ConfigError(f"{where}: '{key}' must be {description}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
    if "range" in spec.metadata:
        low, high, low_open = spec.metadata["range"]
        if value < low or (low_open and value == low) or value > high:
            bound = {(True, True): f"> {low:g}", (False, True): f">= {low:g}"}.get(
                (low_open, math.isinf(high)), f"in [{low:g}, {high:g}]")
            raise ConfigError(f"{where}: '{key}' must be {bound}, got {value!r}")


def _unknown_key(key: str, prefix: str, valid: list[str], where: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
    odd = [f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}" for char in key if not char.isascii()]
    if odd:  # a look-alike (a Cyrillic letter, a zero-width space) reads like a valid key
        hint = f" It holds {', '.join(odd)}.{hint}"
    section = f"'{prefix[:-1]}'" if prefix else "the top level"
    return ConfigError(f"{where}: unknown config key {prefix + key!r}.{hint} Valid keys in {section}: "
                       f"{', '.join(valid)}")


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
        _check_field(kwargs[key], fields[key], full, where(full))
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
                line = key_node.start_mark.line + 1
                if key in lines:  # YAML keeps the last silently: a second `data:` would drop the first
                    raise ConfigError(f"{path} line {line}: '{key}' is set twice "
                                      f"(lines {lines[key]} and {line}); keep one of them")
                lines[key] = line
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
    return _merge(data, parse_overrides(overrides))


def _check_model_shape(model: ModelConfig, where: str) -> None:
    if not (len(model.channels) == len(model.blocks) == len(model.strides)) or not model.channels:
        raise ConfigError(
            f"{where}: 'model.channels', 'model.blocks' and 'model.strides' must be non-empty lists "
            f"of the same length (one entry per stage), got {list(model.channels)}, "
            f"{list(model.blocks)}, {_plain(model.strides)}"
        )
    if min(model.blocks) < 1 or min(model.channels) < 1:
        raise ConfigError(f"{where}: 'model.blocks' and 'model.channels' must be >= 1")
    pairs = {"model.stem_stride": model.stem_stride}
    pairs.update({f"model.strides[{i}]": s for i, s in enumerate(model.strides)})
    for key, value in pairs.items():
        if len(value) != 2 or min(value) < 1:
            raise ConfigError(f"{where}: '{key}' must be [height, width] of positive ints, got {list(value)}")


def split_sources(data: DataConfig, split: str) -> list[tuple[str, SourceConfig]]:
    """The sources of a split as (config key, SourceConfig), each with its kind filled in: a list's
    entries, or one source from `data.source` and the split's path (none for an unset path)."""
    value = getattr(data, split)
    if isinstance(value, tuple):
        return [(f"data.{split}[{i}]", dataclasses.replace(entry, source=entry.source or data.source))
                for i, entry in enumerate(value)]
    if value or data.source in ("hf", "synthetic"):
        return [(f"data.{split}", SourceConfig(source=data.source, path=value or ""))]
    return []


def _check_sources(data: DataConfig, where: str) -> None:
    """Each listed source has what its kind needs and a name of its own in its split."""
    for split in SPLITS:
        value, names = getattr(data, split), {}
        if value == ():
            raise ConfigError(f"{where}: 'data.{split}' is an empty list: list at least one source, or leave it unset")
        for key, entry in split_sources(data, split) if isinstance(value, tuple) else []:
            if entry.source in ("parquet", "folder", "xml") and not entry.path:
                raise ConfigError(f"{where}: '{key}.path' is not set: a {entry.source} source needs its file, "
                                  f"folder or glob")
            name = entry.label(entry.source)
            if name in names:
                raise ConfigError(f"{where}: '{key}' and '{names[name]}' are both named {name!r}: give each "
                                  f"source of data.{split} its own 'name'")
            names[name] = key


def check_best(cfg: Config, where: str = "config") -> None:
    """ConfigError unless `train.best` is mean or names one of the validation sources (checked when
    a run starts: evaluating a model on other data leaves its training rule aside)."""
    names = [entry.label(entry.source) for _, entry in split_sources(cfg.data, "validation")]
    if cfg.train.best != "mean" and (cfg.train.best not in names or not isinstance(cfg.data.validation, tuple)):
        listed = f"the data.validation sources: {', '.join(names)}" if isinstance(cfg.data.validation, tuple) else \
            "a data.validation that lists sources"
        raise ConfigError(f"{where}: 'train.best' must be mean or the name of one of {listed}; got {cfg.train.best!r}")


def config_from_dict(data: dict, source: str = "config") -> Config:
    """Build and check a Config from a plain dict (e.g. the one stored in a checkpoint; keys of
    earlier versions are dropped by `drop_retired`): every value, then what the fields say together."""
    cfg = _build(Config, drop_retired(data, source), "", lambda key: source)
    _check_model_shape(cfg.model, source)
    _check_sources(cfg.data, source)
    if cfg.train.resume and cfg.train.init_from:
        raise ConfigError(f"{source}: 'train.resume' and 'train.init_from' together: resume continues this "
                          f"run (its weights, optimizer, schedule and epochs); init_from starts a new run "
                          f"from another run's weights. Set one of them (to continue a fine-tuning run: "
                          f"--cfg <its train.output_dir>/config.yaml train.resume=auto train.init_from=)")
    return cfg


def validate(cfg: Config, where: str = "config") -> None:
    """A Config built in code, checked as a loaded one is."""
    config_from_dict(cfg.to_dict(), where)


def raw_value(path: str | Path | None, overrides: list[str], key: str) -> Any:
    """The value the YAML file and the overrides give `key` (dotted), unchecked; None if neither
    sets it. For what must be known before the config can be built (train.init_from)."""
    node: Any = merge_overrides({} if path is None else _yaml_with_lines(Path(path))[0], overrides)
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- `base` (e.g. a starting checkpoint's model) <- YAML file (optional) <- overrides.
    `train.output_dir` defaults to runs/<stem>."""
    data, lines = ({}, {}) if path is None else _yaml_with_lines(Path(path))
    # errors in the file point at the file
    _build(Config, data, "", lambda key: f"{path} line {lines[key]}" if key in lines else f"{path}")
    override_data = parse_overrides(overrides)
    _build(Config, override_data, "", lambda key: "command-line override")
    merged = _merge(_merge(base or {}, data), override_data)
    train = merged.setdefault("train", {})
    if not train.get("output_dir"):
        train["output_dir"] = str(Path("runs") / (Path(path).stem if path else "default"))
    return config_from_dict(merged, f"{path}" if path else "config")


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what the run directory's config.yaml holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# model keys that decide the network's structure or its weights' shapes: a resumed run or a
# fine-tuning run must have the same (dropout and loss weights may change)
ARCHITECTURE_KEYS = ("stem_channels", "stem_stride", "channels", "blocks", "strides", "lstm_layers",
                     "lstm_hidden", "shortcut")


def architecture_changes(mine: ModelConfig, theirs: ModelConfig) -> list[str]:
    """The architecture keys whose values differ, as `model.<key>`."""
    return [f"model.{key}" for key in ARCHITECTURE_KEYS if getattr(mine, key) != getattr(theirs, key)]


# keys of models saved by earlier versions, by section, with the one value the code now has built
# in: a saved config holding that value loads (the key is dropped); any other value is refused
RETIRED = {
    "model": {"name": "crnn", "stem_kernel": [7, 7], "stem_pool": False, "downsample": "maxpool",
              "column_pool": "max", "frames": 0, "upsample": 1, "shortcut_kernel": 3, "span_mask": 0.0,
              "span_length": None, "attention_layers": 0, "attention_dim": None, "attention_heads": None,
              "attention_weight": None},
    "data": {"resize": "keep_aspect", "width": None, "shuffle_window": None},
    "train": {"muon_precision": None, "ema": 0.0, "sam_rho": None, "compile": False, "memory_format": None,
              "oom_retry": None, "schedule": "cosine", "init_sha256": None},
    "decode": {"cuda": False, "lm_backend": None, "lm_smoothing": None, "beam_size_token": None},
    "data.augment": {"enabled": True, "start_epoch": 1},
    "data.synthetic": {"min_words": None},
}


def drop_retired(data: dict, source: str) -> dict:
    """A saved config (checkpoint, bundle, config.yaml) without the `RETIRED` keys; ConfigError naming
    the key where the saved value is not the one the code builds (None there: any value loads)."""
    data = copy.deepcopy(data)
    for section, keys in RETIRED.items():
        node = data
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        for key, built_in in keys.items():
            if isinstance(node, dict) and key in node:
                value = node.pop(key)
                if built_in is not None and value != built_in:
                    raise ConfigError(f"{source}: '{section}.{key}={value!r}' is no longer supported "
                                      f"(this version builds {built_in!r} only)")
    return data
