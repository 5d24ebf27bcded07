"""The run directory's logs (TensorBoard scalars and images, metrics.jsonl, console lines) and
the progress of long loops (`progress`). Only rank 0 writes; on other ranks every method is a no-op."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sized
from pathlib import Path

import torch
from tqdm import tqdm

from crnn.outputs import atomic_write_text, json_text

log = logging.getLogger("crnn")


def process_memory(pid: int) -> dict[str, int]:
    """A process's resident memory in bytes, by kind (Linux; {} elsewhere): `private` (pages it
    alone has written: what it costs the machine), `anonymous` (heap, including pages still shared
    with the process it was forked from), `mapped_files` (memory-mapped files: page cache, shared
    and reclaimable) and `shared_memory` (e.g. the decode cache)."""
    kinds = {"Private_Dirty": "private", "RssAnon": "anonymous", "RssFile": "mapped_files",
             "RssShmem": "shared_memory"}
    memory = {}
    for name in ("smaps_rollup", "status"):
        with contextlib.suppress(OSError):  # not Linux, or the process has ended
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in kinds:
                    memory[kinds[key]] = int(value.split()[0]) * 1024
    return {kind: memory[kind] for kind in kinds.values() if kind in memory}


def setup_console_logging(level: int = logging.INFO) -> None:
    """Console log lines as the tools print them: `HH:MM:SS LEVEL message`."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


class LogProgress:
    """Progress as a log line every `interval` seconds, `desc: done/total (percent) key=value ...`, for
    output that is not a terminal (a job's log, a pipe), where a bar redrawn with carriage returns garbles."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None = None, interval: float = 30.0):
        self.iterable, self.desc, self.interval = iterable, desc, interval
        self.total = total if total is not None or not isinstance(iterable, Sized) else len(iterable)
        self.done, self.postfix = 0, {}
        self._started = self._last = time.monotonic()

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.done += 1
            now = time.monotonic()
            if now - self._last >= self.interval:
                self._last = now
                log.info("%s", self.line(now - self._started))

    def line(self, seconds: float) -> str:
        position = f"{self.done}/{self.total} ({self.done / self.total:.0%})" if self.total else f"{self.done}"
        extra = "".join(f" {key}={value}" for key, value in self.postfix.items())
        return f"{self.desc}: {position} in {seconds:.0f}s{extra}"

    def set_postfix(self, **values: object) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def progress(iterable: Iterable, desc: str, enabled: bool = True, total: int | None = None):
    """`iterable`, showing its progress: a live tqdm bar on a terminal, a `LogProgress` line every
    30 s when stderr goes to a file or a pipe, nothing when not `enabled` (other ranks). The result
    has tqdm's `set_postfix` and `close`."""
    if enabled and not sys.stderr.isatty():
        return LogProgress(iterable, desc, total)
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, dynamic_ncols=True, leave=False)


class RunLogger:
    """A run directory's logs: TensorBoard events, metrics.jsonl and console lines."""

    def __init__(self, output_dir: Path, enabled: bool):
        self.enabled, self.output_dir = enabled, output_dir
        self.metrics_path = output_dir / "metrics.jsonl"
        self._writer = None

    @property
    def writer(self):
        """The TensorBoard writer, opened on first use (so a run that fails early writes nothing)."""
        if self._writer is None and self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.output_dir))
        return self._writer

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def samples(self, step: int, samples: list[tuple[torch.Tensor, str, str]]) -> None:
        """Validation images `(1, H, W)` of ink, shown as dark ink on white, with ref and hyp."""
        if self.writer is None:
            return
        for i, (image, reference, hypothesis) in enumerate(samples):
            self.writer.add_image(f"val_samples/{i}", 1.0 - image.float().clamp(0, 1), step)
            self.writer.add_text(f"val_samples/{i}", f"ref: `{reference}`  \nhyp: `{hypothesis}`", step)

    def epoch(self, record: dict, step: int) -> None:
        """One line of metrics.jsonl, the matching TensorBoard scalars and a console line."""
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as stream:
            stream.write(json_text(record) + "\n")
        self.scalars(step, {f"val/{key[4:]}": value for key, value in record.items()
                            if key.startswith("val_") and isinstance(value, (int, float))})
        self.scalars(step, {"epoch/train_loss": record["train_loss"], "epoch/lines_per_s": record["lines_per_s"]})
        sources = record.get("val_sources", {})
        for name, values in sources.items():
            self.scalars(step, {f"val_sources/{name}/cer": values["cer"], f"val_sources/{name}/wer": values["wer"]})
        if self.writer is not None:
            self.writer.flush()
        by = f" ({record['best_by']})" if sources else ""
        log.info("epoch %d  train_loss %.4f  val_loss %.4f  val_cer%s %.4f  val_wer %.4f  lr %.2e  "
                 "%.1f lines/s", record["epoch"], record["train_loss"], record["val_loss"], by,
                 record["val_cer"], record["val_wer"], record["lr"], record["lines_per_s"])
        for name, values in sources.items():
            log.info("  validation %s: cer %.4f  wer %.4f  (%d lines)", name, values["cer"], values["wer"],
                     values["lines"])

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop metrics.jsonl lines of epochs after `last_epoch`: a resumed run redoes them (the
        previous process may have logged an epoch whose checkpoint it did not live to write)."""
        if not self.enabled or not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if line.strip() and json.loads(line)["epoch"] <= last_epoch]
        if len(kept) != len(lines):
            atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept))

    def info(self, message: str, *args: object) -> None:
        if self.enabled:
            log.info(message, *args)

    def warning(self, message: str, *args: object) -> None:
        if self.enabled:
            log.warning(message, *args)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
