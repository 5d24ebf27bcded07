"""One typed, frozen, hashable Config: dataclass defaults <- YAML file <- `key=value` overrides.

    cfg = load_config("experiments/base.yaml", ["train.epochs=5", "data.batch_size=8"])

Every key is checked when the config is loaded, before any data is read: an unknown key, a value of
the wrong type, a choice outside its list or a number outside its range is a ConfigError naming the
key (and the YAML line), the valid keys or values and, where it helps, the closest match. Each
field declares its own choices or range next to its default (`_choice`, `_range`), so there is one
list per choice, used by the checks, the tools' argument parsers and the modules that act on it.
List values are stored as tuples: the Config is deeply frozen and can be hashed.

`load_run_config` is how a training run's config is loaded (tools/train.py): with
`train.init_from`, the starting model's own keys (model.*, data.height) lie under the YAML and the
command line, and the starting model is read here, once.

Modules take plain arguments; the `build_*` functions and the `from_config` constructors are where
a Config is read.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crnn.checkpoint import ModelFile, read_model_file
from crnn.errors import ConfigError

DATA_SOURCES = ("hf", "parquet", "folder", "synthetic", "xml")
SPLITS = ("train", "validation", "test")
RESIZE_MODES = ("keep_aspect", "squash", "fit")
DOWNSAMPLE_MODES = ("conv", "maxpool")
COLUMN_POOLS = ("max", "avg")
LR_SCALINGS = ("none", "linear", "sqrt")
SCHEDULES = ("cosine", "constant")
AMP_MODES = ("auto", "bf16", "fp16", "off")
LM_SMOOTHINGS = ("kneser_ney", "witten_bell", "add_k")
LM_BACKENDS = ("kenlm", "python")
INIT_VOCABS = ("union", "new", "keep")
OPTIMIZERS = ("adamw", "muon")
MUON_PRECISIONS = ("auto", "float32", "bf16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
DEVICES = "auto, cpu, cuda or cuda:N"


def _choice(default: str, choices: tuple[str, ...]) -> Any:
    return field(default=default, metadata={"choices": choices})


def _range(default: float, low: float = -math.inf, high: float = math.inf, low_open: bool = False) -> Any:
    """A number within [low, high] (or (low, high] with `low_open`)."""
    return field(default=default, metadata={"range": (low, high, low_open)})


def _pattern(default: str, pattern: str, description: str) -> Any:
    """A string matching the regular expression `pattern`, described to the user as `description`."""
    return field(default=default, metadata={"pattern": (re.compile(pattern), description)})


def _positive(default: float) -> Any:
    return _range(default, 0, low_open=True)


def _non_negative(default: float) -> Any:
    return _range(default, 0)


def _fraction(default: float) -> Any:
    return _range(default, 0, 1)


@dataclass(frozen=True)
class SyntheticConfig:
    """Sizes of the rendered splits of `data.source=synthetic` (lines are rendered on the fly)."""

    train: int = _non_negative(20000)
    validation: int = _non_negative(500)
    test: int = _non_negative(500)
    seed: int = 1234
    min_words: int = _range(2, 1)
    max_words: int = _range(7, 1)


@dataclass(frozen=True)
class AugmentConfig:
    """Train-only augmentation; each op fires with probability `prob` (0 turns it off)."""

    enabled: bool = True
    prob: float = _fraction(0.5)
    start_epoch: int = _range(1, 1)  # the first epoch (counted from 1) whose lines are augmented
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
    # the folder page images must lie in ("": each XML file's own folder); a path in the XML that
    # leads outside it is refused
    image_root: str = ""


@dataclass(frozen=True)
class DataConfig:
    source: str = _choice("hf", DATA_SOURCES)
    name: str = "Teklia/IAM-line"  # hub id for source=hf
    train: str | None = None  # file or folder path for source=parquet|folder; folder, file or glob for xml
    validation: str | None = None
    test: str | None = None
    height: int = _positive(128)
    # keep_aspect: height fixed, width follows; squash: resized to height x width (aspect lost);
    # fit: scaled into a height x width canvas keeping the aspect ratio, then padded.
    resize: str = _choice("keep_aspect", RESIZE_MODES)
    width: int = _non_negative(0)  # target width for resize=squash|fit
    max_width: int = _positive(4000)  # lines wider than this (after resizing) are scaled down to it
    batch_size: int = _positive(16)  # per process
    # each batch is padded on the right to a multiple of this many pixels, so that the GPU kernels
    # (cuDNN autotuning) see a bounded set of shapes; 1 pads to the widest line only
    width_multiple: int = _positive(64)
    num_workers: int = _non_negative(2)  # DataLoader workers; also the processes cropping source=xml pages
    # decoded, resized lines are kept (uint8, in memory shared by all DataLoader workers) up to this
    # many MB for both splits together, validation first, so that later epochs do not decode images
    # again (0: off)
    cache_mb: float = _non_negative(2048.0)
    # where the data's indexes are kept (line sizes; a memory-mapped Arrow copy of each parquet file),
    # built once and reused by later runs and all ranks ("": $CRNN_INDEX_DIR, else ~/.cache/crnn/index)
    index_dir: str = ""
    shuffle_window: int = _positive(50)  # batches drawn from windows of this many batches, sorted by width
    check: bool = False  # before training, decode every image and log every problem found
    synthetic: SyntheticConfig = SyntheticConfig()
    xml: XmlConfig = XmlConfig()
    augment: AugmentConfig = AugmentConfig()


@dataclass(frozen=True)
class ModelConfig:
    name: str = "crnn"  # key in crnn.models.MODELS
    stem_channels: int = _positive(32)
    stem_kernel: tuple[int, ...] = (7, 7)
    stem_stride: tuple[int, ...] = (2, 2)  # (height, width)
    stem_pool: bool = False  # 3x3 stride-2 max-pool after the stem, as in ImageNet ResNets
    channels: tuple[int, ...] = (64, 128, 256)
    blocks: tuple[int, ...] = (2, 2, 2)
    strides: tuple[tuple[int, ...], ...] = ((1, 1), (2, 2), (2, 1))
    # conv: a stage's stride is applied by its first block; maxpool: by a max-pool before it
    downsample: str = _choice("conv", DOWNSAMPLE_MODES)
    column_pool: str = _choice("max", COLUMN_POOLS)
    frames: int = _non_negative(0)  # 0: frames follow each line's width; N > 0: adaptive-pool to N frames
    # each encoder column becomes this many CTC frames (a learned transposed convolution over the
    # width) before the sequence heads: more frames per character at the BiLSTM's cost only (1: off)
    upsample: int = _range(1, 1, 8)
    lstm_layers: int = _non_negative(2)
    lstm_hidden: int = _positive(256)
    lstm_dropout: float = _fraction(0.2)
    head_dropout: float = _fraction(0.2)
    shortcut: bool = True
    shortcut_weight: float = _non_negative(0.1)
    shortcut_kernel: int = _positive(3)
    shortcut_dropout: float = _fraction(0.2)
    # training only: about this share of each line's frames, in spans of span_length frames, zeroed
    # at the input of the BiLSTM (span masking; 0: off)
    span_mask: float = _range(0.0, 0.0, 0.9)
    span_length: int = _positive(4)
    # training only: a Transformer decoder of this many layers reads the sequence head's features (the
    # BiLSTM's output) and is taught the text with cross-entropy (teacher forcing), its loss weighted
    # attention_weight, so that the shared features serve two readers (joint CTC-attention
    # training; 0: off). Evaluation, prediction and export never run it.
    attention_layers: int = _non_negative(0)
    attention_dim: int = _positive(128)
    attention_heads: int = _positive(4)
    attention_weight: float = _non_negative(0.5)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = _positive(100)
    max_steps: int = _non_negative(0)  # stop after this many optimizer steps (0: no limit)
    max_minutes: float = _non_negative(0.0)  # stop when the training steps have taken this long (0: no limit)
    # wall-clock minutes of this process, then a checkpoint and a stop as on a signal (exit code 142,
    # as for SIGALRM); train.resume=auto continues: for job time limits (0: no limit)
    stop_after_minutes: float = _non_negative(0.0)
    lr: float = _positive(1e-3)  # peak LR; with lr_scaling it is the LR of one process (see docs/multi_gpu.md)
    # LR under N processes (effective batch = N x data.batch_size): none keeps train.lr,
    # linear multiplies it by N, sqrt by sqrt(N)
    lr_scaling: str = _choice("none", LR_SCALINGS)
    weight_decay: float = _non_negative(5e-5)
    # adamw, or muon: Muon on the hidden weight matrices (the encoder's convolutions after the stem,
    # the BiLSTM's), AdamW on the rest, at the same LR and weight decay (crnn.optim.MuonAdamW)
    optimizer: str = _choice("adamw", OPTIMIZERS)
    # the dtype of Muon's Newton-Schulz products (crnn.optim.orthogonalised): float32, bf16 (as in
    # Jordan et al.'s Muon), or auto: bf16 when train.amp resolves to bf16, else float32
    muon_precision: str = _choice("float32", MUON_PRECISIONS)
    warmup_steps: int = _non_negative(500)
    schedule: str = _choice("cosine", SCHEDULES)
    min_lr_ratio: float = _fraction(0.02)
    # decay of an exponential moving average of the weights, which the run validates and saves as its
    # model (e.g. 0.999; 0: off)
    ema: float = _range(0.0, 0.0, 0.9999)
    # sharpness-aware steps (SAM, Foret et al. 2021; HTR-VT): each step's gradient is taken again at
    # the weights moved this far along the normalised gradient (e.g. 0.05; 0: off). Twice the compute
    sam_rho: float = _non_negative(0.0)
    grad_clip: float = _non_negative(5.0)  # max gradient norm (0: off)
    amp: str = _choice("auto", AMP_MODES)
    # the convolutions' layout in training (crnn.device.resolve_memory_format): auto is channels_last
    # on a CPU (oneDNN's own: a 9-11% faster training step) and contiguous on CUDA (not measured there)
    memory_format: str = _choice("auto", MEMORY_FORMATS)
    output_dir: str = ""  # "" -> runs/<config file stem>
    resume: str = ""  # "" (new run), "auto" (continue from last.pt if present) or a path
    # a new run whose weights start from this checkpoint or export bundle (fine-tuning), and what
    # becomes of its alphabet: union (keep its characters, add the data's), new (the data's), keep
    init_from: str = ""
    init_vocab: str = _choice("union", INIT_VOCABS)
    init_sha256: str = ""  # of init_from's weights: recorded in config.yaml (and checked if set by hand)
    freeze_encoder_steps: int = _non_negative(0)  # the encoder (and its BatchNorm statistics) frozen so long
    seed: int = 0
    patience: int = _non_negative(0)  # early stopping: epochs without a better validation CER (0: off)
    val_images: int = _non_negative(4)  # validation images logged to TensorBoard each epoch
    log_every: int = _positive(20)  # steps between TensorBoard training scalars
    device: str = _pattern("auto", r"auto|cpu|cuda(:\d+)?", DEVICES)
    max_bad_steps: int = _non_negative(5)  # stop after this many non-finite steps in a row
    checkpoint_every_steps: int = _non_negative(0)  # also write checkpoints/last.pt every N steps (0: epoch ends only)
    oom_retry: bool = True  # on out-of-memory, retry the batch in two halves (single process only)
    data_parallel: bool = False
    sync_bn: bool = False
    compile: bool = False  # refused (see validate): torch.compile is not yet shown to pay here
    cudnn_benchmark: bool = False  # cuDNN autotuning: one search per batch shape (see data.width_multiple)
    deterministic: bool = False


@dataclass(frozen=True)
class DecodeConfig:
    """Beam search (torchaudio's flashlight `ctc_decoder`, lexicon-free) and its language model."""

    beam_size: int = _range(10, 1)
    beam_threshold: float = _positive(25.0)  # prune hypotheses this far (log-prob) below the best
    beam_size_token: int = _non_negative(16)  # tokens considered per frame (0: all); 16 loses nothing measurable
    nbest: int = _range(1, 1)
    cuda: bool = False  # refused (see validate): torchaudio's CUDA beam search aborts the process
    lm_path: str = ""  # character LM file (tools/build_lm.py, or a KenLM ARPA/binary); "" = built
    lm_order: int = _range(6, 1)  # n-gram order of the character LM built from the training transcriptions
    lm_smoothing: str = _choice("kneser_ney", LM_SMOOTHINGS)
    # the LM built from the training texts runs in C++ (written as ARPA, read by flashlight's KenLM;
    # orders up to 6) or in Python (slower, the same probabilities, any order)
    lm_backend: str = _choice("kenlm", LM_BACKENDS)
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
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


def _coerce(value: Any, tp: Any, key: str, where: str) -> Any:
    """Check (and gently convert) one value against a field type; raise ConfigError otherwise.

    A list field (`tuple[T, ...]`) takes a YAML list, a tuple, or a string holding a YAML list."""
    if _is_optional(tp):
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none")):
            return None
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)][0]
        return _coerce(value, inner, key, where)
    if typing.get_origin(tp) is tuple:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: '{key}' must be a list ({_describe(tp)}), got {value!r}")
        item_type = typing.get_args(tp)[0]
        return tuple(_coerce(item, item_type, f"{key}[{i}]", where) for i, item in enumerate(value))
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


def _check_field(value: Any, spec: dataclasses.Field, key: str, where: str) -> None:
    """The field's own choices, pattern or range (declared with `_choice`, `_pattern`, `_range`)."""
    choices = spec.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(choices)}, got {value!r}")
    if "pattern" in spec.metadata:
        pattern, description = spec.metadata["pattern"]
        if not pattern.fullmatch(value):
            raise ConfigError(f"{where}: '{key}' must be {description}, got {value!r}")
    if "range" in spec.metadata:
        low, high, low_open = spec.metadata["range"]
        if value < low or (low_open and value == low) or value > high:
            bound = {(True, True): f"> {low:g}", (False, True): f">= {low:g}"}.get(
                (low_open, math.isinf(high)), f"in [{low:g}, {high:g}]")
            raise ConfigError(f"{where}: '{key}' must be {bound}, got {value!r}")


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


def raw_value(path: str | Path | None, overrides: list[str], key: str) -> Any:
    """The value the YAML file and the overrides give `key` (dotted), unchecked; None if neither
    sets it. For what must be known before the config can be built (train.init_from)."""
    data = {} if path is None else _yaml_with_lines(Path(path))[0]
    node: Any = _merge(data, parse_overrides(list(overrides)))
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    """Defaults <- `base` (e.g. a starting checkpoint's model) <- YAML file (optional) <- overrides.
    `train.output_dir` defaults to runs/<stem>."""
    data, lines = ({}, {}) if path is None else _yaml_with_lines(Path(path))

    def where_in_file(key: str) -> str:
        line = lines.get(key)
        return f"{path} line {line}" if line else f"{path}"

    _build(Config, data, "", where_in_file)  # errors in the file point at the file
    override_data = parse_overrides(list(overrides))
    _build(Config, override_data, "", lambda key: "command-line override")
    merged = _merge(_merge(base or {}, data), override_data)
    train = merged.setdefault("train", {})
    if not train.get("output_dir"):
        train["output_dir"] = str(Path("runs") / (Path(path).stem if path else "default"))
    return config_from_dict(merged, f"{path}" if path else "config")


def _check_all_fields(section: Any, prefix: str, where: str) -> None:
    """Every field's declared choices and range, also for a Config built in code."""
    for spec in dataclasses.fields(section):
        value = getattr(section, spec.name)
        if dataclasses.is_dataclass(value):
            _check_all_fields(value, f"{prefix}{spec.name}.", where)
        else:
            _check_field(value, spec, f"{prefix}{spec.name}", where)


def _check_model_shape(model: ModelConfig, where: str) -> None:
    if not (len(model.channels) == len(model.blocks) == len(model.strides)) or not model.channels:
        raise ConfigError(
            f"{where}: 'model.channels', 'model.blocks' and 'model.strides' must be non-empty lists "
            f"of the same length (one entry per stage), got {list(model.channels)}, "
            f"{list(model.blocks)}, {_plain(model.strides)}"
        )
    if min(model.blocks) < 1 or min(model.channels) < 1:
        raise ConfigError(f"{where}: 'model.blocks' and 'model.channels' must be >= 1")
    pairs = {"model.stem_kernel": model.stem_kernel, "model.stem_stride": model.stem_stride}
    pairs.update({f"model.strides[{i}]": s for i, s in enumerate(model.strides)})
    for key, value in pairs.items():
        if len(value) != 2 or min(value) < 1:
            raise ConfigError(f"{where}: '{key}' must be [height, width] of positive ints, got {list(value)}")
    if model.shortcut_kernel % 2 == 0:
        raise ConfigError(f"{where}: 'model.shortcut_kernel' must be odd, got {model.shortcut_kernel}")
    if model.attention_layers and model.attention_dim % model.attention_heads:
        raise ConfigError(f"{where}: 'model.attention_dim' ({model.attention_dim}) must be a multiple of "
                          f"'model.attention_heads' ({model.attention_heads})")


def _check_refused(cfg: Config, where: str) -> None:
    """Options kept so that older configs and checkpoints load, but refused when switched on."""
    if cfg.train.compile:
        raise ConfigError(
            f"{where}: 'train.compile=true' is not supported: with lines of varying width torch.compile "
            f"recompiled for each new shape and did not finish 25 steps of synthetic.yaml in 80 s on an "
            f"H100, and on the CPU (PyTorch 2.11) it crashed the process when the batch shape changed. "
            f"Set train.compile=false")
    if cfg.decode.cuda:
        raise ConfigError(
            f"{where}: 'decode.cuda=true' is no longer supported: torchaudio's CUDA CTC beam search aborts "
            f"the process on H100 GPUs (cudaErrorIllegalAddress, pytorch/audio#3754) and torchaudio is no "
            f"longer developed. Set decode.cuda=false: the beam search runs on the CPU")


def validate(cfg: Config, where: str = "config") -> None:
    """Every value: declared choices and ranges, then what the fields say together."""
    _check_all_fields(cfg, "", where)
    _check_model_shape(cfg.model, where)
    data, model = cfg.data, cfg.model
    if model.frames and data.resize == "keep_aspect":
        raise ConfigError(f"{where}: 'model.frames={model.frames}' (a fixed number of frames) needs "
                          f"fixed-width lines: set data.resize=squash or fit with data.width")
    if data.resize != "keep_aspect" and data.width <= 0:
        raise ConfigError(f"{where}: 'data.resize={data.resize}' needs 'data.width' > 0")
    _check_refused(cfg, where)
    if cfg.train.resume and cfg.train.init_from:
        raise ConfigError(f"{where}: 'train.resume' and 'train.init_from' together: resume continues this run "
                          f"(its weights, optimizer, schedule and epochs); init_from starts a new run from "
                          f"another run's weights. Set one of them (to continue a fine-tuning run: "
                          f"train.resume=auto train.init_from=)")
    if data.synthetic.min_words > data.synthetic.max_words:
        raise ConfigError(f"{where}: 'data.synthetic.min_words' ({data.synthetic.min_words}) must not "
                          f"exceed 'data.synthetic.max_words' ({data.synthetic.max_words})")


def config_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what the run directory's config.yaml holds)."""
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


# model keys that decide the network's structure or its weights' shapes (not dropout or loss weights)
ARCHITECTURE_KEYS = ("name", "stem_channels", "stem_kernel", "stem_stride", "stem_pool", "channels", "blocks",
                     "strides", "downsample", "column_pool", "frames", "upsample", "lstm_layers", "lstm_hidden",
                     "shortcut", "shortcut_kernel")


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> tuple[Config, ModelFile | None]:
    """A training run's config, and the model it starts from (read once, here) when
    `train.init_from` is set (None otherwise).

    The starting model's model.* keys and data.height lie under the YAML and the overrides, and
    `train.init_sha256` records its weights' SHA-256; ConfigError (`check_starting_point`) for an
    architecture key or a height that the YAML or the command line sets differently, or an
    init_sha256 set by hand that does not match the file."""
    init_from = raw_value(path, overrides, "train.init_from")
    if not init_from:
        return load_config(path, overrides), None
    start = read_model_file(Path(str(init_from)), "train.init_from")
    start_cfg = config_from_dict(start.config, f"train.init_from {start.path}")
    digest = start.sha256()
    base = {"model": start_cfg.to_dict()["model"], "data": {"height": start_cfg.data.height},
            "train": {"init_sha256": digest}}
    cfg = load_config(path, overrides, base=base)
    check_starting_point(cfg, start, digest)
    return cfg, start


def check_starting_point(cfg: Config, start: ModelFile, digest: str) -> None:
    """ConfigError unless `cfg` can start from `start` (whose weights' SHA-256 is `digest`)."""
    if cfg.train.init_sha256 and cfg.train.init_sha256 != digest:
        raise ConfigError(f"train.init_sha256: {start.path} is not the file this run started from (its weights' "
                          f"SHA-256 is {digest[:16]}..., the config expects {cfg.train.init_sha256[:16]}...)")
    theirs = config_from_dict(start.config, f"train.init_from {start.path}")
    for key in ARCHITECTURE_KEYS:
        mine, their_value = getattr(cfg.model, key), getattr(theirs.model, key)
        if mine != their_value:
            raise ConfigError(f"'model.{key}' is {mine!r} in the YAML or on the command line, but the model of "
                              f"train.init_from ({start.path}) has {their_value!r}: it cannot start from those "
                              f"weights. Remove model.{key} (its value then comes from the starting model)")
    if cfg.data.height != theirs.data.height:
        raise ConfigError(f"'data.height' is {cfg.data.height} in the YAML or on the command line, but the model of "
                          f"train.init_from ({start.path}) was trained at {theirs.data.height}; remove it")
