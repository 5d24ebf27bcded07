r"""Every GPU check in one command, every figure in one folder: the CUDA tests, the configs' speed,
the real training loop's speed, and a short real training run.

    python tools/gpu_check.py --out gpu_check \
        --data ../shared/data/copiste-h64/train.parquet,../shared/data/copiste-h64/validation.parquet
    python tools/gpu_check.py --out gpu_check --data TRAIN,VALIDATION --train-minutes 2 \
        --configs experiments/base.yaml,experiments/copiste.yaml
    python tools/gpu_check.py --out gpu_check --data TRAIN,VALIDATION --dry-run   # the commands only
    PYTHONPATH=. python tools/gpu_check.py ...      # where the package is not installed (pip install -e .)

Steps, each in a fresh process, in this order (`--skip tests,speed,loop,loop_muon,train` leaves
some out); --data is two parquet files or two gt.tsv folders, read at height 128:
- tests:     python -m pytest tests/test_cuda.py (every CUDA path) -> cuda_tests.log, cuda_tests.xml
- speed:     tools/benchmark.py on fixed batches, each config, fp32 and bf16 -> speed.json, speed.log
- loop:      tools/benchmark.py --loop, the first config -> loop.json, loop.log (loop and model lines/s,
             data wait, padding, shapes)
- loop_muon: the same loop with train.optimizer=muon -> loop_muon.json, loop_muon.log (what Muon's
             orthogonalisation costs a GPU step, against loop.json)
- train:     tools/train.py, the first config, for --train-minutes -> train.log, train_run/ (its
             metrics.jsonl: validation CER and lines/s per epoch)
Also environment.txt (GPU, driver, versions) and summary.json (each step's command, exit code and
seconds). The defaults are meant to fit a 10-minute slot on one H100 or H200; the script has not
yet run on a GPU, so that is a plan, not a measurement. `--wheels DIR` first installs the wheels
in DIR (for a machine that cannot download them) into a folder of its own.
Exit code: 0 when every step passed, 1 when one failed (the others still run), 2 without CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from crnn.errors import CrnnError, tool_main
from crnn.outputs import check_output_dir

REPO = Path(__file__).resolve().parents[1]
STEPS = ("tests", "speed", "loop", "loop_muon", "train")
CONFIGS = "experiments/base.yaml"


def step_commands(args: argparse.Namespace) -> dict[str, list[str]]:
    """The command of each step that runs, by name (see the module docstring)."""
    out, python = args.out, sys.executable
    configs = [cfg.strip() for cfg in args.configs.split(",") if cfg.strip()]
    train, validation = args.data.split(",")
    source = "parquet" if train.endswith(".parquet") else "folder"
    data = [f"data.source={source}", f"data.train={train}", f"data.validation={validation}", "data.height=128",
            "data.num_workers=12"]
    loop = ["tools/benchmark.py", "--loop", "--cfg", configs[0], "--device", "cuda", "--steps", "100", "--warmup", "10"]
    commands = {
        "tests": [python, "-m", "pytest", "-q", "tests/test_cuda.py", f"--junitxml={out / 'cuda_tests.xml'}"],
        "speed": [python, "tools/benchmark.py", *[part for cfg in configs for part in ("--cfg", cfg)], "--device",
                  "cuda", "--amp", "bf16", "--lines", "512", "--batch-size", "32", "--json", str(out / "speed.json")],
        "loop": [python, *loop, "--json", str(out / "loop.json"), *data],
        "loop_muon": [python, *loop, "--json", str(out / "loop_muon.json"), *data, "train.optimizer=muon"],
        "train": [python, "tools/train.py", "--cfg", configs[0], *data, f"train.max_minutes={args.train_minutes:g}",
                  "train.device=cuda", f"train.output_dir={out / 'train_run'}"],
    }
    return {name: command for name, command in commands.items() if name not in args.skip}


def environment(python: str, env: dict[str, str]) -> str:
    """What ran the checks: the GPU and its driver, Python and the libraries' versions."""
    probe = ("import torch, torchaudio, torchvision, sys; print('python', sys.version.split()[0]); "
             "print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version()); "
             "print('torchvision', torchvision.__version__, 'torchaudio', torchaudio.__version__); "
             "print('gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')")
    lines = [subprocess.run([python, "-c", probe], capture_output=True, text=True, env=env).stdout]
    try:
        lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout)
    except (OSError, subprocess.TimeoutExpired) as err:
        lines.append(f"nvidia-smi: {err}\n")
    return "".join(lines)


def install_wheels(wheels: Path) -> dict[str, str]:
    """The environment with `wheels`' packages installed into a temporary folder on PYTHONPATH."""
    site = Path(tempfile.mkdtemp(prefix="crnn-site-"))
    files = sorted(str(path) for path in wheels.glob("*.whl"))
    if not files:
        raise CrnnError(f"--wheels {wheels}: no .whl files there")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *files], check=True)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}


def run_steps(commands: dict[str, list[str]], out: Path, env: dict[str, str]) -> dict[str, dict]:
    """Run each step with its output in <out>/<step>.log; what each did, for summary.json."""
    summary = {}
    for name, command in commands.items():
        log = out / ("cuda_tests.log" if name == "tests" else f"{name}.log")
        print(f"{name}: {' '.join(command)}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with open(log, "w", encoding="utf-8") as stream:
            code = subprocess.run(command, cwd=REPO, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode
        summary[name] = {"command": command, "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
                         "log": log.name}
        print(f"{name}: exit code {code} after {summary[name]['seconds']:.0f} s -> {log}", file=sys.stderr, flush=True)
    return summary


@tool_main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path, help="the folder for every log and figure")
    parser.add_argument("--data", required=True, help="TRAIN,VALIDATION (parquet files or gt.tsv folders)")
    parser.add_argument("--configs", default=CONFIGS, help=f"comma-separated configs (default {CONFIGS})")
    parser.add_argument("--train-minutes", type=float, default=2.0, help="the train step's minutes (default 2)")
    parser.add_argument("--skip", default="", help=f"comma-separated steps to leave out, of {', '.join(STEPS)}")
    parser.add_argument("--wheels", type=Path, help="install these wheels first (no network needed)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = parser.parse_args(argv)
    args.skip = [name.strip() for name in args.skip.split(",") if name.strip()]
    unknown = [name for name in args.skip if name not in STEPS]
    if unknown:
        parser.error(f"--skip {','.join(unknown)}: the steps are {', '.join(STEPS)}")
    if len(args.data.split(",")) != 2:
        parser.error(f"--data {args.data}: give TRAIN,VALIDATION")
    commands = step_commands(args)
    if args.dry_run:
        for name, command in commands.items():
            print(f"{name}\t{' '.join(command)}")
        return 0
    check_output_dir(args.out, "--out")
    if not torch.cuda.is_available():
        raise CrnnError("no CUDA device here: tools/gpu_check.py checks a machine with a GPU (--dry-run "
                        "prints its commands anywhere)")
    env = install_wheels(args.wheels) if args.wheels else dict(os.environ)
    # the steps import crnn from this checkout, installed or not
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "environment.txt").write_text(environment(sys.executable, env), encoding="utf-8")
    summary = run_steps(commands, args.out, env)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0 if all(step["exit_code"] == 0 for step in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
