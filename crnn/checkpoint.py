"""Checkpoints: full training state, written atomically (`crnn.outputs.atomic_write`), read back
with `weights_only=True`: a checkpoint holds only tensors and plain types (the config as a dict,
the vocab as a list of characters, RNG states as tensors), so loading one cannot run code.
`read_model_file` reads a trained model from a checkpoint or an export bundle (`crnn.export`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import pickle
import random
import signal
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from crnn.errors import CheckpointError
from crnn.outputs import atomic_write, atomic_write_text

FORMAT = "crnn-checkpoint"
VERSION = 1
BUNDLE_FORMAT, BUNDLE_VERSION = "crnn-bundle", 1
MANIFEST = "bundle.json"  # the file that makes a folder a bundle
CALIBRATION_FILE = "calibration.json"  # in a bundle: crnn.calibration.Calibration.to_dict()


def rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from, as tensors and plain types."""
    numpy_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()[1]),  # version 3 state: 625 ints
        "numpy": torch.from_numpy(numpy_state[1].astype(np.int64)),
        "numpy_pos": int(numpy_state[2]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def previous_path(path: Path) -> Path:
    """Where `save_checkpoint(..., keep_previous=True)` keeps the checkpoint it replaces."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


_saves = itertools.count(1)  # this process's saves


def _test_fault_point() -> None:
    """Tests only: CRNN_TEST_KILL_IN_SAVE=K kills the process (SIGKILL) during the K-th save,
    after the new file is written and before it replaces the old one."""
    if os.environ.get("CRNN_TEST_KILL_IN_SAVE") == str(next(_saves)):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(state: dict[str, Any], path: Path, keep_previous: bool = False,
                    what: str = "train.output_dir") -> None:
    """Atomically write `state` (plus the format marker) to `path`; with `keep_previous` the file
    it replaces is kept as `previous_path(path)`, a fallback should the new one be damaged. `what`:
    the setting that chose `path`, which the message of a failed write names."""
    path = Path(path)

    def keep() -> None:
        _test_fault_point()
        if keep_previous and path.exists():
            os.replace(path, previous_path(path))

    try:
        atomic_write(path, lambda stream: torch.save({"format": FORMAT, "version": VERSION, **state}, stream),
                     before_replace=keep)
    except OSError as err:
        raise CheckpointError(
            f"could not write checkpoint {path} ({err.strerror or err}); the previous checkpoint "
            f"there, if any, is intact. Free disk space or give another {what}."
        ) from err


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint safely; CheckpointError if missing, corrupt, unsafe or not ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    with open(path, "rb") as stream:
        if stream.read(4) != b"PK\x03\x04":  # torch.save writes a zip archive
            raise CheckpointError(f"{path}: not a crnn checkpoint (not a file written by torch.save)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain types, which "
            f"could run code ({str(err).splitlines()[0]})"
        ) from None
    except Exception as err:  # a damaged archive fails in many ways (zip, pickle, storage sizes)
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a crnn checkpoint (no '{FORMAT}' marker)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {state.get('version')}, this code reads {VERSION}")
    return state


def load_newest_valid(path: Path, warn: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
    """Load `path`, or, if it is missing or damaged, the previous checkpoint kept beside it. None if
    neither exists; CheckpointError if they exist but none can be read."""
    candidates = [p for p in (path, previous_path(path)) if p.exists()]
    for candidate in candidates:
        try:
            return load_checkpoint(candidate), candidate
        except CheckpointError as err:
            warn(f"{err}; trying the previous checkpoint")
    if candidates:
        raise CheckpointError(f"no readable checkpoint among {', '.join(map(str, candidates))}")
    return None


@dataclass
class RunState:
    """A run's progress. Its saved fields travel in every checkpoint, as top-level keys."""

    epoch: int = 0  # completed epochs
    step: int = 0
    best_cer: float = math.inf
    epochs_without_improvement: int = 0
    epoch_stats: dict = field(default_factory=dict)  # the unfinished epoch so far (summed over ranks)
    train_seconds: float = 0.0  # time spent in finished epochs' training loops (train.max_minutes)
    # the signal that ended this process's run early, if any: not saved, a resumed run starts afresh
    stopped_by: int | None = field(default=None, metadata={"saved": False})

    @staticmethod
    def saved_fields() -> list[str]:
        return [spec.name for spec in dataclasses.fields(RunState) if spec.metadata.get("saved", True)]


@dataclass
class TrainingCheckpoint:
    """Everything a training checkpoint holds: the file's keys are these fields' names, with
    `progress` flattened into `RunState.saved_fields()`."""

    model: dict
    optimizer: dict
    scheduler: dict
    scaler: dict
    config: dict  # Config.to_dict()
    vocab: list[str]
    rng: dict  # rng_state()
    progress: RunState
    metrics: dict = field(default_factory=dict)  # the epoch's metrics.jsonl record ({} mid-epoch)
    # crnn.calibration.Calibration.to_dict(), fitted at the end of the run (or by tools/calibrate.py)
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        state = {spec.name: getattr(self, spec.name) for spec in dataclasses.fields(self) if spec.name != "progress"}
        return {**state, **{name: getattr(self.progress, name) for name in RunState.saved_fields()}}

    @classmethod
    def from_dict(cls, state: dict[str, Any], where: str) -> TrainingCheckpoint:
        """The checkpoint in `state` (from `load_checkpoint`); CheckpointError naming missing keys."""
        specs = [spec for spec in dataclasses.fields(cls) if spec.name != "progress"]
        required = [spec.name for spec in specs if spec.default is spec.default_factory is MISSING]
        missing = [name for name in [*required, "epoch", "step"] if name not in state]
        if missing:
            raise CheckpointError(f"{where}: not a training checkpoint, it lacks {', '.join(missing)}; "
                                  f"resume from checkpoints/last.pt of a run of tools/train.py")
        progress = RunState(**{name: state[name] for name in RunState.saved_fields() if name in state})
        return cls(**{spec.name: state[spec.name] for spec in specs if spec.name in state}, progress=progress)


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / MANIFEST).is_file()


def bundle_files(path: Path) -> set[str]:
    """The files a bundle's manifest lists, the manifest included (empty if it cannot be read)."""
    try:
        files = json.loads((path / MANIFEST).read_text(encoding="utf-8"))["files"]
        return {MANIFEST, *files.values()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


@dataclass(frozen=True)
class ModelFile:
    """A trained model as stored: a checkpoint of tools/train.py or a bundle of tools/export.py."""

    path: Path
    config: dict  # as stored: crnn.config.config_from_dict checks it
    chars: list[str]  # the vocabulary's characters (class i > 0 is chars[i - 1])
    weights: dict[str, torch.Tensor]
    weights_file: Path  # the file that holds the weights
    is_bundle: bool
    calibration: dict = field(default_factory=dict)  # {} if none was fitted

    def sha256(self) -> str:
        """Of the weights' file (logged by a run that starts from it)."""
        return hashlib.sha256(self.weights_file.read_bytes()).hexdigest()


def read_bundle(path: Path) -> ModelFile:
    """The model in a bundle, its LM file's path resolved against the bundle; CheckpointError
    naming the file that is missing or wrong."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("format") != BUNDLE_FORMAT:
            raise CheckpointError(f"{path / MANIFEST}: not a crnn bundle")
        files = manifest["files"]
        chars = json.loads((path / files["vocab"]).read_text(encoding="utf-8"))["chars"]
        weights = load_file(path / files["weights"])
        config = yaml.safe_load((path / files["config"]).read_text(encoding="utf-8"))
        calibration = json.loads((path / files["calibration"]).read_text(encoding="utf-8")) \
            if "calibration" in files else {}
    except (OSError, KeyError, ValueError, TypeError, yaml.YAMLError, SafetensorError) as err:
        raise CheckpointError(f"{path}: incomplete or damaged bundle ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / files['config']}: not a config (a YAML mapping)")
    lm_path = (config.get("decode") or {}).get("lm_path")
    if lm_path:
        config["decode"]["lm_path"] = str(path / lm_path)
    return ModelFile(path, config, list(chars), weights, path / files["weights"], True, calibration)


def read_model_file(path: Path, what: str = "") -> ModelFile:
    """The model in a checkpoint or a bundle; CheckpointError naming the file (after `what`, the
    option that named it, if any) if it is missing, damaged or neither."""
    path = Path(path).expanduser()
    if is_bundle(path):
        return read_bundle(path)
    if path.is_dir():
        raise CheckpointError(f"{what + ': ' if what else ''}{path}: this folder holds no export bundle (no "
                              f"{MANIFEST}); give a checkpoint file (checkpoints/best.pt) or a bundle of tools/export.py")
    state = load_checkpoint(path)
    missing = [key for key in ("model", "config", "vocab") if key not in state]
    if missing:
        raise CheckpointError(f"{what + ': ' if what else ''}{path}: a checkpoint without {', '.join(missing)}; "
                              f"give one written by tools/train.py (checkpoints/best.pt or last.pt) or an "
                              f"export bundle (tools/export.py)")
    return ModelFile(path, state["config"], list(state["vocab"]), state["model"], path, False,
                     state.get("calibration") or {})


def store_calibration(path: Path, calibration: dict, what: str = "train.output_dir") -> None:
    """Put `calibration` into a checkpoint (rewritten atomically, the rest of it unchanged; `what`:
    as for `save_checkpoint`) or a bundle (its calibration.json, listed in bundle.json)."""
    path = Path(path)
    if is_bundle(path):
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        atomic_write_text(path / CALIBRATION_FILE, json.dumps(calibration, indent=2))
        manifest["files"]["calibration"] = CALIBRATION_FILE
        atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return
    state = load_checkpoint(path)
    state["calibration"] = calibration  # its format and version are those save_checkpoint writes
    save_checkpoint(state, path, what=what)
