"""Speed measurements behind `tools/benchmark.py` (its modes: docs/performance.md), built from the
trainer's own builders: `speed_row`, `loop_row`, `decoding_rows`, `startup_table`."""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont, features
from torch.utils.flop_counter import FlopCounterMode

from crnn.config import Config, load_config
from crnn.data import Vocab, build_dataset, build_loader, load_records
from crnn.data.collate import Batch, collate
from crnn.data.direction import visual
from crnn.data.samplers import WidthBatchSampler
from crnn.data.samples import Preprocess, make_sample
from crnn.data.synthetic import render_line, render_line_words, sample_text
from crnn.decoding import DECODER_NAMES, build_decoders
from crnn.device import AMP_NAMES, autocast, memory_format, resolve_amp, resolve_device
from crnn.distributed import DistInfo, unwrap
from crnn.engine import ctc_line_losses, submit_decoding
from crnn.errors import CrnnError
from crnn.inference import collect_emissions, load_trained_model
from crnn.metrics import ErrorCounts
from crnn.models import build_model
from crnn.optim import build_optimizer, build_scheduler
from crnn.outputs import atomic_write, atomic_write_text
from crnn.runlog import log, process_memory
from crnn.trainer import build_run, configure_torch, fit, shut_down_at_exit, train

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "tools" / "train.py"  # run by --startup


@dataclass
class TrainStep:
    """One optimizer step as `crnn.trainer.train` takes it."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    amp_dtype: torch.dtype | None
    cfg: Config

    def __call__(self, batch: Batch) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(batch.images.device, self.amp_dtype):
            output = self.model(batch.images, batch.widths)
            loss = ctc_line_losses(output.log_probs, output.lengths, batch.targets, batch.target_lengths).sum()
            if output.shortcut_log_probs is not None:
                loss = loss + self.cfg.model.shortcut_weight * ctc_line_losses(
                    output.shortcut_log_probs, output.lengths, batch.targets, batch.target_lengths).sum()
        self.scaler.scale(loss / len(batch)).backward()
        self.scaler.unscale_(self.optimizer)
        nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or math.inf)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()


def prepare(batch: Batch, device: torch.device, model: nn.Module, augmenter=None) -> Batch:
    """A loader's batch as the training loop steps it: on the device, augmented, without the lines
    too long for CTC to align."""
    batch = batch.to(device)
    if augmenter is not None and any(seed is not None for seed in batch.seeds):
        images, widths = augmenter(batch.images, batch.widths, batch.seeds)
        batch = dataclasses.replace(batch, images=images, widths=widths)
    feasible = unwrap(model).output_lengths(batch.widths) >= batch.min_frames
    return batch if bool(feasible.all()) else batch.select(feasible)


def median_seconds(work, repeats: int, warmup: int, device: torch.device) -> float:
    """Median wall time of `work()` over `repeats` passes after `warmup` untimed ones."""
    synchronize = torch.get_device_module(device).synchronize  # torch.cpu's does nothing
    times = []
    for _ in range(warmup + repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[warmup:])


def make_lines(count: int, seed: int = 0, height: int = 128) -> list[tuple]:
    """(grayscale PIL line, text) pairs of synthetic handwriting, 5 to 12 words: 1,000 to 3,500 px
    wide at height 128, like IAM's lines."""
    texts = [sample_text(random.Random(f"{seed}:{index}"), 5, 12) for index in range(count)]
    return [(render_line(text, random.Random(f"{seed}:{index}:image"), height), text) for index, text in enumerate(texts)]


def batches_for(cfg: Config, lines: list[tuple], vocab: Vocab, batch_size: int) -> list[Batch]:
    """`lines` preprocessed as `cfg` says, grouped by width (narrowest first) into padded batches."""
    preprocess = Preprocess.from_config(cfg.data)
    samples = [make_sample(index, image, text, vocab, preprocess, "train") for index, (image, text) in enumerate(lines)]
    sampler = WidthBatchSampler([sample.image.shape[-1] for sample in samples], batch_size, shuffle=False)
    return [collate([samples[index] for index, _ in keys], cfg.data.width_multiple) for keys in sampler]


def training_memory_mb(step: TrainStep, batch: Batch) -> float:
    """MiB of one training step: on CUDA the allocator's peak above what it held before, plus the
    weights and optimizer state; on a CPU weights, gradients, AdamW's two moments, saved activations."""
    device = batch.images.device
    if device.type == "cuda":
        step.optimizer.zero_grad(set_to_none=True)
        held = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(batch)
        state = [*step.model.parameters(), *(value for values in step.optimizer.state.values()
                                             for value in values.values() if torch.is_tensor(value))]
        kept = sum(tensor.numel() * tensor.element_size() for tensor in state)
        return (torch.cuda.max_memory_allocated(device) - held + kept) / 2**20
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(batch)
    weights = sum(p.numel() * p.element_size() for p in step.model.parameters())
    return (4 * weights + sum(saved.values())) / 2**20


@torch.no_grad()
def infer(model: nn.Module, batches: list[Batch], decoder, amp_dtype: torch.dtype | None) -> None:
    model.eval()
    for batch in batches:
        with autocast(batch.images.device, amp_dtype):
            output = model(batch.images, batch.widths)
        decoder(output.log_probs, output.lengths)


def speed_row(cfg_path: str, lines: list[tuple], device: torch.device, batch_size: int, repeats: int,
              warmup: int, amp: str, beam: bool = False) -> dict:
    """One config's speed on `lines`, in float32 and in `amp` (a `train.amp` value) unless that is
    float32 on `device`: lines/s of training steps and of inference (greedy; beam too with `beam`),
    each the median of `repeats` passes over all lines after `warmup` passes."""
    cfg = load_config(cfg_path)
    vocab = Vocab.from_texts([text for _, text in lines])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(vocab)).to(device, memory_format=memory_format(device))
    batches = [prepare(batch, device, model) for batch in batches_for(cfg, lines, vocab, batch_size)]
    batches = [batch for batch in batches if len(batch)]
    count, middle = sum(len(batch) for batch in batches), batches[len(batches) // 2]
    with FlopCounterMode(display=False) as flops, torch.no_grad():
        model.eval()(middle.images, middle.widths)
    row = {"config": Path(cfg_path).stem, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
           "gflops_per_line": flops.get_total_flops() / 1e9 / len(middle),
           "mean_width": sum(int(batch.widths.sum()) for batch in batches) / count}
    names = ["greedy", "beam"] if beam else ["greedy"]
    decoders = build_decoders(names, vocab, dataclasses.replace(cfg.decode, workers=1))
    for dtype in dict.fromkeys([None, resolve_amp(amp, device, key="--amp")]):
        precision, optimizer = AMP_NAMES[dtype], build_optimizer(cfg.train, model, device)
        step = TrainStep(model, optimizer, build_scheduler(cfg.train, optimizer, 10**6),
                         torch.amp.GradScaler(device.type, enabled=dtype == torch.float16), dtype, cfg)
        model.train()
        seconds = median_seconds(lambda s=step: [s(batch) for batch in batches], repeats, warmup, device)
        row[f"train_{precision}_lines_per_s"] = count / seconds
        if dtype is None:
            row["train_memory_mb"] = training_memory_mb(step, batches[-1])  # the widest batch
        for name, decoder in decoders.items():
            seconds = median_seconds(lambda d=decoder, t=dtype: infer(model, batches, d, t), repeats, warmup, device)
            row[f"infer_{precision}_{name}_lines_per_s"] = count / seconds
    return row


def loop_row(cfg_path: str, overrides: list[str], steps: int, warmup: int) -> dict:
    """`crnn.trainer.train` for `steps` steps in a temporary run directory, after `warmup` untimed
    steps (which start the loader's workers): lines/s as the loop logs them (validation not counted),
    then `TrainStep` alone on the same batches, prepared beforehand."""
    with tempfile.TemporaryDirectory(prefix="crnn-loop-") as output_dir:
        cfg = load_config(cfg_path, [*overrides, f"train.output_dir={output_dir}", f"train.max_steps={steps}",
                                     f"train.epochs={steps}", "train.resume=", "train.checkpoint_every_steps=0",
                                     "train.patience=0", "train.max_minutes=0", "train.stop_after_minutes=0"])
        configure_torch(cfg)
        run = build_run(cfg, DistInfo(0, 0, 1, resolve_device(cfg.train.device)))
        device = run.dist.device
        step = TrainStep(run.model, run.optimizer, run.scheduler, run.scaler, run.amp_dtype, cfg)
        with shut_down_at_exit(run.train_loader, run.val_loader):
            run.model.train()
            for batch in itertools.islice(run.train_loader, warmup):
                step(prepare(batch, device, run.model, run.augmenter))
            cached = getattr(run.train_loader.dataset.cache, "lines_filled", 0)  # 0 without a cache (None)
            train(run)
            epochs = [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
            kept, epoch = [], 1
            while len(kept) < steps:  # the batches train() took: epoch 1 onwards
                run.train_loader.batch_sampler.set_epoch(epoch)
                kept += itertools.islice(run.train_loader, steps - len(kept))
                epoch += 1
    kept = [batch for batch in (prepare(b, device, run.model, run.augmenter) for b in kept) if len(batch)]
    run.model.train()
    model_seconds = median_seconds(lambda: [step(batch) for batch in kept], 1, 0, device)
    loop_seconds = sum(epoch["epoch_seconds"] for epoch in epochs)
    loop_lines = sum(epoch["lines_per_s"] * epoch["epoch_seconds"] for epoch in epochs)
    padded = sum(len(batch) * batch.images.shape[-1] for batch in kept)
    return {"config": Path(cfg_path).stem, "precision": AMP_NAMES[run.amp_dtype], "steps": epochs[-1]["step"],
            "lines": round(loop_lines), "batch_size": cfg.data.batch_size, "workers": cfg.data.num_workers,
            "loop_lines_per_s": loop_lines / max(loop_seconds, 1e-9),
            "model_lines_per_s": sum(len(batch) for batch in kept) / max(model_seconds, 1e-9),
            "padding_fraction": 1 - sum(int(batch.widths.sum()) for batch in kept) / padded,
            "cached_lines_at_start": cached}


def decoding_rows(checkpoint: str, overrides: list[str], split: str, worker_counts: list[int]) -> list[dict]:
    """Each decoder's lines/s and CER on a checkpoint's log-probs for `split`, per number of worker
    processes, after one forward pass (timed too, as "forward + greedy")."""
    trained = load_trained_model(checkpoint, overrides)
    cfg, start = trained.config, time.perf_counter()
    dataset = build_dataset(cfg.data, load_records(cfg.data, split), trained.vocab, False)
    emissions = collect_emissions(trained, build_loader(cfg.data, dataset, False))
    lines = len(emissions.references)
    rows = [{"decoder": "forward + greedy", "workers": 1, "lines": lines,
             "lines_per_s": lines / (time.perf_counter() - start)}]
    for name in DECODER_NAMES:
        lm_texts = trained.lm_texts() if name == "beam_lm" else None
        for workers in [1] if name == "greedy" else worker_counts:
            decode = dataclasses.replace(cfg.decode, workers=workers)
            decoder = build_decoders([name], trained.vocab, decode, lm_texts)[name]
            decoder(*emissions.batches[0])  # the worker processes started before the clock
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


def word_rows(checkpoint: str, overrides: list[str], lines: int, seed: int = 0) -> list[dict]:
    """How well each decoder's word boxes (`crnn.inference.reading`) find the words of `lines`
    synthetic lines, where the renderer knows each word's ink: per decoder, CER, the share of the
    true words whose predicted word overlaps them with an IoU of 0.5 or more along the line (all
    words, and the words read exactly) and the median IoU; true and read words are paired by
    aligning the two texts' words (difflib), a true word left unpaired counting as IoU 0; and the
    lines/s of `TrainedModel.read` (batches of 16, words included)."""
    trained = load_trained_model(checkpoint, overrides)
    height = trained.config.data.height
    texts = [sample_text(random.Random(f"{seed}:{index}:text")) for index in range(lines)]
    drawn = [render_line_words(text, random.Random(f"{seed}:{index}:words"), height)
             for index, text in enumerate(texts)]
    rows = []
    for name in ("greedy", "beam"):
        decoder = trained.decoders([name])[name]
        start = time.perf_counter()
        readings = [reading for begin in range(0, lines, 16)
                    for reading in trained.read([image for image, _ in drawn[begin: begin + 16]], decoder)]
        seconds = time.perf_counter() - start
        counts, ious, exact = ErrorCounts(), [], []
        counts.update(texts, [reading.text for reading in readings])
        for text, (_, boxes), reading in zip(texts, drawn, readings, strict=True):
            truth, read = text.split(), [word["text"] for word in reading.words]
            paired = dict.fromkeys(range(len(truth)), None)
            for tag, i0, i1, j0, j1 in difflib.SequenceMatcher(None, truth, read, autojunk=False).get_opcodes():
                if tag in ("equal", "replace"):
                    paired.update(zip(range(i0, i1), range(j0, j1), strict=False))
            for i, j in paired.items():
                word = reading.words[j] if j is not None else None
                iou = 0.0 if word is None else overlap(boxes[i], (word["x0"], word["x1"]))
                ious.append(iou)
                if word is not None and word["text"] == truth[i]:
                    exact.append(iou)
        rows.append({"decoder": name, "lines": lines, "words": len(ious), "cer": counts.cer,
                     "iou_0.5_all": sum(iou >= 0.5 for iou in ious) / len(ious),
                     "iou_0.5_exact": sum(iou >= 0.5 for iou in exact) / max(len(exact), 1),
                     "words_read_exactly": len(exact), "median_iou": statistics.median(ious),
                     "read_lines_per_s": lines / seconds})
    return rows


HEBREW = "אבגדהוזחטיכלמנסעפצקרשת"
SMALL_MODEL = ["model.stem_channels=16", "model.stem_stride=[2,2]", "model.channels=[32,64]",
               "model.blocks=[1,1]", "model.strides=[[2,2],[2,1]]", "model.lstm_layers=1",
               "model.lstm_hidden=128", "data.height=32",
               "data.augment.prob=0", "data.num_workers=0", "train.amp=off", "train.val_images=0"]


def draw_text(text: str, font_path: str, direction: str, size: int = 20) -> Image.Image:
    """`text` (in logical order) drawn on a line 32 px high as a typesetter lays it out: `rtl`
    through libraqm's bidirectional layout (Pillow's RAQM engine; where Pillow lacks it, our own
    `visual` order drawn as it is), `ltr` character after character from the left, as given.
    Pillow's default engine would reorder a right-to-left string itself: a string put in visual
    order first would come out reversed again."""
    raqm = direction == "rtl" and features.check("raqm")
    engine = ImageFont.Layout.RAQM if raqm else ImageFont.Layout.BASIC
    font = ImageFont.truetype(font_path, size, layout_engine=engine)
    shown = text if raqm or direction == "ltr" else visual(text, direction)
    image = Image.new("L", (int(font.getlength(shown)) + 16, 32), 255)
    ImageDraw.Draw(image).text((8, 4), shown, font=font, fill=0, **({"direction": "rtl"} if raqm else {}))
    return image


def direction_rows(font_path: str, lines: int, epochs: int, out: Path) -> list[dict]:
    """The same small network trained for `epochs` on `lines` rendered right-to-left lines (Hebrew
    words, some with a number or a Latin word inside; `draw_text`) and on the same texts drawn
    left to right (the same glyphs, only the direction differs); each then reads `lines` // 4
    held-out lines: CER against the text in logical order (`TrainedModel.read`), and its best
    validation CER."""
    rng = random.Random(0)

    def text() -> str:
        words = ["".join(rng.choice(HEBREW) for _ in range(rng.randint(2, 6)))
                 for _ in range(rng.randint(2, 5))]
        if rng.random() < 0.4:
            words.insert(rng.randint(1, len(words)), rng.choice([str(rng.randint(1, 999)), "abc", "xyz"]))
        return " ".join(words)

    shown = [text() for _ in range(lines + lines // 4)]
    rows = []
    for direction in ("rtl", "ltr"):
        folders = {split: out / direction / split for split in ("train", "validation")}
        for split, chosen in (("train", range(lines)), ("validation", range(lines, len(shown)))):
            folders[split].mkdir(parents=True, exist_ok=True)
            rows_tsv = []
            for i in chosen:
                draw_text(shown[i], font_path, direction).save(folders[split] / f"{i}.png")
                rows_tsv.append(f"{i}.png\t{shown[i]}\n")
            (folders[split] / "gt.tsv").write_text("".join(rows_tsv), encoding="utf-8")
        run = out / direction / "run"
        cfg = load_config(None, [*SMALL_MODEL, "data.source=folder", f"data.train={folders['train']}",
                                 f"data.validation={folders['validation']}", f"data.direction={direction}",
                                 f"train.epochs={epochs}", f"train.output_dir={run}", "train.resume=auto"])
        fit(cfg)
        trained = load_trained_model(run / "checkpoints" / "best.pt", device="cpu")
        held_out = list(range(lines, len(shown)))
        images = [Image.open(folders["validation"] / f"{i}.png").convert("L") for i in held_out]
        decoder = trained.decoders(["greedy"])["greedy"]
        read = [line.text for start in range(0, len(images), 16)
                for line in trained.read(images[start: start + 16], decoder)]
        counts = ErrorCounts()
        counts.update([shown[i] for i in held_out], read)
        best = min(json.loads(row)["val_cer"] for row in (run / "metrics.jsonl").read_text().splitlines())
        rows.append({"direction": direction, "train_lines": lines, "held_out": len(held_out),
                     "epochs": epochs, "cer_logical": counts.cer, "best_val_cer": best})
    return rows


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    """The intersection over union of two spans (x0, x1) along a line."""
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def repeated_parquet(source: Path, lines: int, out: Path) -> Path:
    """The parquet split `source` repeated to `lines` rows at `out`, one row group per repetition
    (reused if it has that many rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not (out.is_file() and pq.ParquetFile(out).metadata.num_rows == lines):
        table = pq.read_table(source, columns=["image", "text"])
        repeated = pa.concat_tables([table] * math.ceil(lines / len(table))).slice(0, lines)
        atomic_write(out, lambda stream: pq.write_table(repeated, stream, row_group_size=len(table)))
    return out


def training_processes(root: int) -> dict[int, str]:
    """pid -> "rank" or "worker" of the tools/train.py processes under `root` (Linux /proc): a
    worker is forked from a rank (the same command line); torchrun itself is neither."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        try:
            parents[int(entry.name)] = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            commands[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = set(), [root]
    while frontier:
        tree.add(pid := frontier.pop())
        frontier += [child for child, parent in parents.items() if parent == pid]

    def trainer(pid: int) -> bool:
        return pid in tree and TRAIN_SCRIPT.name in commands[pid] and "torch.distributed.run" not in commands[pid]

    return {pid: "worker" if trainer(parents[pid]) else "rank" for pid in tree if trainer(pid)}


def startup_row(cfg_path: str, overrides: list[str], steps: int, ranks: int, run_dir: Path) -> dict:
    """`tools/train.py` (under torchrun with `ranks` > 1) for `steps` steps in a fresh `run_dir`:
    seconds from its start to its first step's checkpoint, whether the data's index was built, and
    the peak memory of a rank and of a DataLoader worker by kind (`crnn.runlog.process_memory`)."""
    command = [str(TRAIN_SCRIPT), "--cfg", cfg_path, *overrides, f"train.max_steps={steps}", "train.epochs=1",
               "train.patience=0", "train.checkpoint_every_steps=1", f"train.output_dir={run_dir}"]
    if ranks > 1:
        command = ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", *command]
    shutil.rmtree(run_dir, ignore_errors=True)
    started, first_step, peaks = time.monotonic(), None, {}
    with tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen([sys.executable, *command], stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        while process.poll() is None:
            for pid, role in training_processes(process.pid).items():
                for kind, size in process_memory(pid).items():
                    peaks[f"{role}_{kind}_mb"] = max(peaks.get(f"{role}_{kind}_mb", 0), round(size / 2**20))
            if first_step is None and (run_dir / "checkpoints" / "last.pt").exists():
                first_step = round(time.monotonic() - started, 1)
            time.sleep(0.25)
        stderr.seek(0)
        output = stderr.read()
    atomic_write_text(run_dir / "startup.log", output)
    if process.returncode != 0:
        raise CrnnError(f"{run_dir.name}: training exited with code {process.returncode}:\n{output[-3000:]}")
    built = output.count("index built in")  # under torchrun, a rank that waited for another says so
    return {"ranks": ranks, "index": "built" if built or "built by another process" in output else "reused",
            "indexes_built": built, "first_step_s": first_step, **dict(sorted(peaks.items()))}


def startup_table(cfg_path: str, scales: list[int], overrides: list[str], steps: int, ranks: int,
                  output: Path) -> list[dict]:
    """`startup_row` twice (the index built, then reused) for the config's parquet training split
    repeated to each line count of `scales`, everything under `output`."""
    cfg = load_config(cfg_path, overrides)
    if cfg.data.source != "parquet" or not isinstance(cfg.data.train, str):
        raise CrnnError(f"--startup repeats a parquet training split given by its path; {cfg_path} has "
                        f"data.source={cfg.data.source}, data.train={cfg.to_dict()['data']['train']}")
    rows = []
    for lines in scales:
        repeated = repeated_parquet(Path(cfg.data.train), lines, output / f"train-{lines}.parquet")
        run_overrides = [*overrides, f"data.train={repeated}", f"data.index_dir={output / 'index'}"]
        for attempt in ("first", "again"):
            row = startup_row(cfg_path, run_overrides, steps, ranks, output / f"run-{lines}-{attempt}")
            rows.append({"lines": lines, "run": attempt, **row})
            log.info("%s", json.dumps(rows[-1]))
    return rows
