"""Speed and accuracy-per-compute measurements behind `tools/benchmark.py`.

Speed: every config is timed in one process on the same lines (synthetic handwriting rendered at
a height of 128 with realistic widths), each config's own preprocessing applied, batches grouped by
width, the model in the layout training gives it (`train.memory_format`). Reported: parameters,
forward GFLOPs per line, training lines/s (forward + backward + optimizer step) in float32 and in
the AMP mode, inference lines/s (greedy, and beam search), and
the memory a training step needs. Each figure is the median of several timed passes after warm-up.

Decoding: each decoder's throughput on a trained checkpoint's log-probs, per number of worker
processes.

Budget: every config trains for the same wall-clock time on the same data, with an LR schedule
fitted to the steps it can do in that time, and reports its validation CER/WER.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from crnn.config import Config, load_config, load_run_config
from crnn.data import (
    Batch,
    Preprocess,
    Vocab,
    build_dataset,
    build_loader,
    load_records,
    make_sample,
    shut_down,
    synthetic,
)
from crnn.data.collate import collate
from crnn.data.samplers import WidthBatchSampler
from crnn.decoding import DECODER_NAMES, GreedyDecoder, build_decoders
from crnn.device import AMP_NAMES, autocast, resolve_device, resolve_memory_format
from crnn.distributed import DistInfo
from crnn.engine import TrainSetup, drop_infeasible, prepare_batch, submit_decoding, train_step
from crnn.errors import CrnnError
from crnn.inference import collect_emissions, load_trained_model
from crnn.metrics import ErrorCounts
from crnn.models import build_model
from crnn.outputs import atomic_write_text
from crnn.runlog import RunLogger, process_memory, setup_console_logging
from crnn.trainer import build_loaders, build_training, configure_torch, fit, load_data


@dataclass
class Lines:
    """Source lines shared by every config: grayscale images and their texts."""

    images: list
    texts: list[str]


def make_lines(count: int, seed: int = 0, height: int = 128) -> Lines:
    """Synthetic handwriting of 5 to 12 words: 1,000 to 3,500 px wide at height 128, like IAM lines."""
    images, texts = [], []
    for index in range(count):
        text = synthetic.sample_text(random.Random(f"{seed}:{index}"), 5, 12)
        images.append(synthetic.render_line(text, random.Random(f"{seed}:{index}:image"), height))
        texts.append(text)
    return Lines(images, texts)


def batches_for(cfg: Config, lines: Lines, vocab: Vocab, batch_size: int) -> list[Batch]:
    """The lines preprocessed as `cfg` says, grouped by width into padded batches."""
    preprocess = Preprocess.from_config(cfg.data)
    samples = [make_sample(index, image, text, vocab, preprocess, "train")
               for index, (image, text) in enumerate(zip(lines.images, lines.texts, strict=True))]
    sampler = WidthBatchSampler([s.image.shape[-1] for s in samples], batch_size, shuffle=False)
    return [collate([samples[i] for i, _ in keys], cfg.data.width_multiple) for keys in sampler]


def median_seconds(run, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `run()` over `repeats` passes after `warmup` untimed ones."""
    times = []
    for repetition in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if repetition >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_gflops(model: torch.nn.Module, batch: Batch, device: torch.device) -> float:
    """Forward GFLOPs per line (multiply-adds count as two), from torch's FLOP counter."""
    model.eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        batch = batch.to(device)
        model(batch.images, batch.widths)
    return counter.get_total_flops() / 1e9 / len(batch)


def training_memory_mb(model: torch.nn.Module, batch: Batch, setup: TrainSetup) -> float:
    """Memory of one training step: weights, gradients, AdamW's two moments, and the activations
    autograd saves for the backward pass (on CUDA: the allocator's peak instead)."""
    model.train()
    device = setup.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, batch, setup)
        return torch.cuda.max_memory_allocated(device) / 2**20
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        train_step(model, batch, setup)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return (4 * weights + sum(saved.values())) / 2**20


def with_amp(cfg: Config, amp: str) -> Config:
    """`cfg` with `train.amp` set (a precision to time)."""
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, amp=amp))


def speed_row(cfg_path: str, lines: Lines, device: torch.device, batch_size: int, repeats: int,
              warmup: int, amp: str) -> dict:
    """All speed figures of one config (see the module docstring): in float32 and, unless `amp`
    (a `train.amp` value) resolves to float32 on `device`, in that precision too."""
    cfg = load_config(cfg_path)
    vocab = Vocab.from_texts(lines.texts)
    batches = batches_for(cfg, lines, vocab, batch_size)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab)).to(device, memory_format=resolve_memory_format(cfg.train.memory_format, device))
    count = len(lines.texts)
    row = {"config": Path(cfg_path).stem, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "gflops_per_line": forward_gflops(model, batches[len(batches) // 2], device),
           "mean_width": sum(int(b.widths.sum()) for b in batches) / count}
    decoders = {"greedy": GreedyDecoder(vocab), **build_decoders(["beam"], vocab, cfg.decode)}
    for train_amp in dict.fromkeys(["off", amp]):  # "off" first, then `amp` unless it is the same
        setup = TrainSetup.from_config(with_amp(cfg, train_amp), model=model, device=device,
                                       total_steps=(warmup + repeats) * len(batches))
        dtype, precision = setup.amp_dtype, AMP_NAMES[setup.amp_dtype]
        if dtype is None and train_amp != "off":
            continue  # `amp` means float32 here: already timed
        feasible = [drop_infeasible(model, batch)[0] for batch in batches]
        seconds = median_seconds(lambda s=setup, f=feasible: train_pass(model, f, s), repeats, warmup, device)
        row[f"train_{precision}_lines_per_s"] = count / seconds
        if dtype is None:
            row["train_memory_mb"] = training_memory_mb(model, batches[-1], setup)
        for name, decoder in decoders.items():
            seconds = median_seconds(lambda d=decoder, t=dtype: infer_pass(model, batches, d, device, t),
                                     repeats, warmup, device)
            row[f"infer_{precision}_{name}_lines_per_s"] = count / seconds
    return row


def train_pass(model: torch.nn.Module, batches: list[Batch], setup: TrainSetup) -> None:
    model.train()
    for batch in batches:
        train_step(model, batch, setup)


@torch.no_grad()
def infer_pass(model: torch.nn.Module, batches: list[Batch], decoder, device: torch.device,
               dtype: torch.dtype | None) -> None:
    model.eval()
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, dtype):
            output = model(batch.images, batch.widths)
        decoder(output.log_probs, output.lengths)


@dataclass
class LoopTiming:
    """What `time_loop` saw over its timed steps."""

    steps: int = 0
    lines: int = 0
    seconds: float = 0.0  # wall time of the timed steps, loader included
    wait_seconds: float = 0.0  # of which: waiting for the loader's next batch
    model_seconds: float = 0.0  # the same steps again on the same (prepared) batches, without the loader
    padded_pixels: int = 0  # columns x lines of the batches as stepped (after augmentation)
    line_pixels: int = 0  # columns the lines themselves fill
    shapes: set = dataclasses.field(default_factory=set)
    cached_lines: int = 0  # lines the decode cache held when timing began
    precision: str = ""  # what the config's train.amp resolved to: fp32, bf16 or fp16


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def training_parts(cfg: Config):
    """Model, setup and training loader, built by the trainer's own builders (one process). The
    validation loader is built too (the trainer builds both: the decode cache is shared between
    them) and shut down at once."""
    dist = DistInfo(rank=0, local_rank=0, world_size=1, device=resolve_device(cfg.train.device))
    configure_torch(cfg)
    logger = RunLogger(Path(cfg.train.output_dir), enabled=False)
    data = load_data(cfg, dist, logger)
    loader, val_loader = build_loaders(cfg, dist, logger, data)
    shut_down(val_loader)
    model, setup = build_training(cfg, dist, data.vocab, len(loader.batch_sampler))
    return model, setup, loader


def loop_batches(loader, warm_epoch: bool):
    """The loader's batches, epoch after epoch (a whole first epoch first, if `warm_epoch`)."""
    epoch = 1
    while True:
        loader.batch_sampler.set_epoch(epoch)
        yield from ((epoch == 1 and warm_epoch, batch) for batch in loader)
        epoch += 1


def time_loop(cfg: Config, steps: int, warmup: int, warm_epoch: bool = False, model_only: bool = True) -> LoopTiming:
    """The real training loop on `cfg`'s data: the DataLoader (workers decoding, the cache), the
    batch augmentation on the device and the training step, timed over `steps` steps after `warmup`
    steps (and after a whole epoch, with `warm_epoch`, so that the decode cache is full). Then, if
    `model_only`, the same steps again on the same prepared batches, without the loader."""
    model, setup, loader = training_parts(cfg)
    timing, kept, done = LoopTiming(precision=AMP_NAMES[setup.amp_dtype]), [], 0
    model.train()

    def step(batch: Batch) -> Batch:
        batch, _ = drop_infeasible(model, prepare_batch(batch, setup))
        if len(batch):
            train_step(model, batch, setup, step=done)
        return batch

    try:
        batches = loop_batches(loader, warm_epoch)
        while warm_epoch or done < warmup:
            warming, batch = next(batches)
            done += bool(len(step(batch)))
            warm_epoch = warming
        synchronize(setup.device)
        start, timing.cached_lines = time.perf_counter(), cached_lines(loader)
        while timing.steps < steps:
            before = time.perf_counter()
            _, batch = next(batches)
            timing.wait_seconds += time.perf_counter() - before
            batch = step(batch)
            if len(batch):
                count_batch(timing, batch)
                if model_only:
                    kept.append(batch)
        synchronize(setup.device)
        timing.seconds = time.perf_counter() - start
    finally:
        shut_down(loader)
    if model_only:
        timing.model_seconds = median_seconds(lambda: [train_step(model, b, setup) for b in kept],
                                              1, 0, setup.device)
    return timing


def cached_lines(loader) -> int:
    cache = loader.dataset.cache
    return cache.lines_filled if cache is not None else 0


def count_batch(timing: LoopTiming, batch: Batch) -> None:
    timing.steps += 1
    timing.lines += len(batch)
    timing.padded_pixels += len(batch) * batch.images.shape[-1]
    timing.line_pixels += int(batch.widths.sum())
    timing.shapes.add(tuple(batch.images.shape))


def loop_row(cfg_path: str, overrides: list[str], steps: int, warmup: int, warm_epoch: bool) -> dict:
    """`tools/benchmark.py --loop`: the real loop's figures for one config."""
    cfg = load_config(cfg_path, overrides)
    timing = time_loop(cfg, steps, warmup, warm_epoch)
    return {"config": Path(cfg_path).stem, "precision": timing.precision, "steps": timing.steps, "lines": timing.lines,
            "batch_size": cfg.data.batch_size, "workers": cfg.data.num_workers,
            "augment": cfg.data.augment.enabled, "width_multiple": cfg.data.width_multiple,
            "loop_lines_per_s": timing.lines / max(timing.seconds, 1e-9),
            "model_lines_per_s": timing.lines / max(timing.model_seconds, 1e-9),
            "data_wait_fraction": timing.wait_seconds / max(timing.seconds, 1e-9),
            "padding_fraction": 1 - timing.line_pixels / max(timing.padded_pixels, 1),
            "distinct_shapes": len(timing.shapes), "cached_lines_at_start": timing.cached_lines}


def calibrate_steps_per_second(cfg: Config, steps: int = 8) -> float:
    """Training steps per second of `cfg` on its own data: the real loop after two warm-up steps."""
    timing = time_loop(cfg, steps, 2, model_only=False)
    return timing.steps / max(timing.seconds, 1e-9)


def budget_row(cfg_path: str, overrides: list[str], minutes: float, output_root: Path,
               deadline: float | None = None) -> dict:
    """Train `cfg_path` (with `overrides`, e.g. the data) for `minutes` of training-step time.

    The LR schedule is fitted to the budget: the config's speed on this data is measured first,
    and the cosine decay (and a warmup of at most 10% of it) spans the steps it can do in time.
    Each config trains in a fresh process, so none starts with the memory (allocator caches,
    DataLoader workers) that the one before it left behind.

    `deadline` (time.time()) bounds this call's wall-clock time: a run that reaches it writes a
    checkpoint and pauses (status "paused"); calling again with the same `output_root` continues it
    with the same planned steps, and a finished config's row is read back instead of trained again.
    The plan and the result live in `<output_root>/<config>/budget.json`.
    """
    run_dir = output_root / Path(cfg_path).stem
    plan = read_budget_plan(run_dir, minutes, overrides)
    if "row" in plan:
        logging.getLogger(__name__).info("%s: finished earlier, its row read from %s", cfg_path, run_dir / BUDGET_PLAN)
        return plan["row"]
    if deadline is not None and time.time() >= deadline:
        return {"config": Path(cfg_path).stem, "minutes": minutes, "status": "not started"}
    status, (steps, planned, train_seconds, best_cer) = _in_fresh_process(
        _budget_child, cfg_path, (cfg_path, overrides, minutes, run_dir, deadline))
    row = {"config": Path(cfg_path).stem, "minutes": minutes, "status": status, "steps": steps,
           "planned_steps": planned, "train_seconds": round(train_seconds, 1)}
    if status == "paused":
        return row
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    row.update({"epochs": len(epochs), "best_val_cer": best_cer, "final_val_cer": epochs[-1]["val_cer"],
                "final_val_wer": epochs[-1]["val_wer"], "best_val_wer": min(e["val_wer"] for e in epochs)})
    atomic_write_text(run_dir / BUDGET_PLAN, json.dumps({**read_budget_plan(run_dir, minutes, overrides), "row": row}))
    return row


BUDGET_PLAN = "budget.json"


def read_budget_plan(run_dir: Path, minutes: float, overrides: list[str]) -> dict:
    """The plan of an earlier call on `run_dir` ({} if none), refused if made for another budget."""
    path = run_dir / BUDGET_PLAN
    if not path.exists():
        return {}
    plan = json.loads(path.read_text(encoding="utf-8"))
    if (plan["minutes"], plan["overrides"]) != (minutes, list(overrides)):
        raise CrnnError(f"{run_dir} holds a budget run of {plan['minutes']:g} minutes with overrides "
                        f"{plan['overrides']}, not {minutes:g} minutes with {list(overrides)}: run the "
                        "same command to continue it, or give another --output")
    return plan


def _in_fresh_process(target, what: str, args: tuple):
    """Run `target(*args, send, log_level)` in a spawned process and return what it sends,
    (status, value); raise its error, naming `what`."""
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    log_level = logging.getLogger().getEffectiveLevel()  # a spawned process starts unconfigured
    child = context.Process(target=target, args=(*args, send, log_level))
    child.start()
    send.close()
    try:
        outcome = receive.recv()
    except EOFError:  # the child died without a word: killed, e.g. by the out-of-memory killer
        outcome = None
    child.join()
    if outcome is None:
        outcome = ("error", f"the training process died (exit code {child.exitcode}); if it ran out of "
                            "memory, lower data.batch_size or data.max_width")
    if outcome[0] == "error":
        raise CrnnError(f"{what}: {outcome[1]}")
    return outcome


def _budget_child(cfg_path: str, overrides: list[str], minutes: float, run_dir: Path, deadline: float | None,
                  send, log_level: int) -> None:
    """The body of budget_row, run in its own process: sends (status, numbers) or ("error", text)."""
    setup_console_logging(log_level)
    try:
        base = [*overrides, f"train.output_dir={run_dir}", "train.epochs=100000", "train.patience=0",
                "train.resume=", "train.checkpoint_every_steps=0"]
        plan = read_budget_plan(run_dir, minutes, overrides)
        if not plan:
            cfg, _ = load_run_config(cfg_path, base)
            steps = max(10, int(calibrate_steps_per_second(cfg) * 60 * minutes))
            plan = {"minutes": minutes, "overrides": list(overrides), "steps": steps,
                    "warmup": min(cfg.train.warmup_steps, steps // 10)}
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / BUDGET_PLAN, json.dumps(plan))
        stop_after = minutes_left(deadline)
        if stop_after is not None and stop_after <= 0:  # used up by the calibration: train next time
            send.send(("paused", (0, plan["steps"], 0.0, float("inf"))))
            return
        cfg, start = load_run_config(cfg_path, [*base, f"train.max_steps={plan['steps']}",
                                                f"train.max_minutes={minutes}", f"train.warmup_steps={plan['warmup']}",
                                                "train.resume=auto", f"train.stop_after_minutes={stop_after or 0}"])
        state = fit(cfg, start)
        seconds = state.train_seconds + state.epoch_stats.get("seconds", 0.0)  # and the paused epoch's
        send.send(("paused" if state.stopped_by else "done", (state.step, plan["steps"], seconds, state.best_cer)))
    except CrnnError as err:
        send.send(("error", str(err)))
    finally:
        send.close()


def minutes_left(deadline: float | None) -> float | None:
    """Wall-clock minutes until `deadline` (time.time()), None for no deadline."""
    return None if deadline is None else (deadline - time.time()) / 60


def decoding_rows(checkpoint: str, overrides: list[str], split: str, worker_counts: list[int]) -> list[dict]:
    """`tools/benchmark.py --decoding`: each decoder's lines/s (and CER) on a trained checkpoint's
    log-probs for `split`, per number of worker processes, decoding alone (the forward pass is run
    once first and timed too, with greedy decoding, as `greedy inference`)."""
    trained = load_trained_model(checkpoint, overrides)
    cfg = trained.config
    records = load_records(cfg.data, split)
    loader = build_loader(cfg.data, build_dataset(cfg.data, records, trained.vocab, train=False), train=False)
    start = time.perf_counter()
    emissions = collect_emissions(trained, loader)
    forward_seconds = time.perf_counter() - start
    lines = len(emissions.references)
    rows = [{"decoder": "greedy inference", "workers": 1, "lines": lines, "lines_per_s": lines / forward_seconds}]
    lm_texts = trained.lm_texts()
    for name in DECODER_NAMES:
        for workers in [1] if name == "greedy" else worker_counts:
            decode = dataclasses.replace(cfg.decode, workers=workers)
            decoder = build_decoders([name], trained.vocab, decode, lm_texts)[name]
            decoder(*emissions.batches[0])  # start the worker processes before the clock
            start = time.perf_counter()
            pending = [submit_decoding(decoder, log_probs, lengths) for log_probs, lengths in emissions.batches]
            texts = [text for result in pending for text in result()]
            seconds = time.perf_counter() - start
            counts = ErrorCounts()
            counts.update(emissions.references, texts)
            rows.append({"decoder": name, "workers": workers, "lines": lines, "lines_per_s": lines / seconds,
                         "cer": counts.cer})
            if hasattr(decoder, "close"):
                decoder.close()
    return rows


# --- start-up time and memory at scale (tools/benchmark.py --startup) -------------------------

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "train.py"
FIRST_STEP = "first training step"


def repeated_parquet(source: Path, lines: int, out: Path) -> Path:
    """The parquet split `source` repeated to `lines` rows in one file at `out` (written once, a
    row group per repetition; an existing file of that many rows is reused)."""
    import pyarrow.parquet as pq

    if out.is_file() and pq.ParquetFile(out).metadata.num_rows == lines:
        return out
    table = pq.read_table(source, columns=["image", "text"])
    temporary = out.with_name(out.name + ".tmp")
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(temporary, table.schema) as writer:
        for start in range(0, lines, len(table)):
            writer.write_table(table.slice(0, min(len(table), lines - start)))
    temporary.replace(out)
    return out


def _process_tree(root: int) -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of `root` and all its descendants (Linux /proc)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                table[int(entry.name)] = (parent, (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = {}, [root]
    while frontier:
        pid = frontier.pop()
        if pid in table:
            tree[pid] = table[pid]
            frontier += [child for child, (parent, _) in table.items() if parent == pid]
    return tree


def _sample_memory(root: int, peaks: dict[str, float]) -> None:
    """Fold the memory of the training processes under `root` into `peaks` (MB): per rank (a
    tools/train.py process, not a DataLoader worker forked from one) and per worker."""
    tree = _process_tree(root)

    def trainer(command: str) -> bool:  # a rank or a worker forked from one, not torchrun itself
        return TRAIN_SCRIPT.name in command and "torch.distributed.run" not in command

    ranks = {pid for pid, (parent, command) in tree.items() if trainer(command) and not trainer(tree.get(parent, (0, ""))[1])}
    for pid, (parent, _) in tree.items():
        role = "rank" if pid in ranks else "worker" if parent in ranks else None
        if role is None:
            continue
        for kind, size in process_memory(pid).items():
            key = f"{role}_{kind}_mb"
            peaks[key] = max(peaks.get(key, 0.0), size / 2**20)


def startup_row(cfg_path: str, overrides: list[str], steps: int, ranks: int, run_dir: Path, label: str) -> dict:
    """Start `tools/train.py` (under torchrun with `ranks` > 1) for `steps` steps and measure the
    seconds from its start to its first training step, whether the data's index was built or
    reused, and the peak memory of its processes by kind (`crnn.runlog.process_memory`)."""
    import shutil
    import subprocess
    import sys
    import threading

    shutil.rmtree(run_dir, ignore_errors=True)
    command = [str(TRAIN_SCRIPT), "--cfg", cfg_path, *overrides, f"train.max_steps={steps}", "train.epochs=1",
               "train.patience=0", f"train.output_dir={run_dir}"]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", *command]
    started = time.monotonic()
    process = subprocess.Popen([sys.executable, *command], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.monotonic() - started, line) for line in process.stderr))
    reader.start()
    peaks: dict[str, float] = {}
    while process.poll() is None:
        _sample_memory(process.pid, peaks)
        time.sleep(0.25)
    reader.join()
    log = "".join(line for _, line in lines)
    atomic_write_text(run_dir / "startup.log", log)
    if process.returncode != 0:
        raise CrnnError(f"{label}: training exited with code {process.returncode}:\n{log[-3000:]}")
    first = [seconds for seconds, line in lines if FIRST_STEP in line]
    # under torchrun the rank that builds an index may log below the level shown; the others say
    # they waited for it
    built = "index built in" in log or "built by another process" in log
    return {"run": label, "ranks": ranks, "index": "built" if built else "reused",
            "indexes_built": log.count("index built in"), "first_step_s": round(first[0], 1) if first else None,
            **{key: round(value) for key, value in sorted(peaks.items())}}


def startup_table(cfg_path: str, data: str, scales: list[int], overrides: list[str], steps: int, ranks: int,
                  output: Path) -> list[dict]:
    """`startup_row` twice (index built, then reused) for the training parquet of `data`
    ("TRAIN,VALIDATION") repeated to each line count of `scales`, everything under `output`."""
    train, _, validation = data.partition(",")
    rows = []
    for lines in scales:
        repeated = repeated_parquet(Path(train), lines, output / f"train-{lines}.parquet")
        run_overrides = ["data.source=parquet", f"data.train={repeated}", f"data.validation={validation}",
                         f"data.index_dir={output / 'index'}", *overrides]
        for attempt in ("first", "again"):
            label = f"{lines} lines, {attempt}"
            rows.append({"lines": lines, **startup_row(cfg_path, run_overrides, steps, ranks,
                                                       output / f"run-{lines}-{attempt}", label)})
            logging.getLogger(__name__).info("%s", json.dumps(rows[-1]))
    return rows
