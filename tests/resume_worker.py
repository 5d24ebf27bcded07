"""Launched by torchrun from test_distributed.py: all ranks build the same resumed run at once,
round after round, as `torchrun ... tools/train.py train.resume=auto` does at its start.

    torchrun --standalone --nproc_per_node=2 tests/resume_worker.py ROUNDS CFG [key=value ...]

Before each round rank 0 appends a line for an epoch the checkpoint does not have, so every round
has a line of metrics.jsonl to drop (the rewrite that must not race with anything).
"""

import json
import sys
from pathlib import Path

from crnn import distributed
from crnn.config import load_config
from crnn.trainer import build_run


def main() -> None:
    rounds, cfg = int(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
    info, finished = distributed.setup(cfg.train.device), False
    metrics = Path(cfg.train.output_dir) / "metrics.jsonl"
    try:
        for _ in range(rounds):
            if info.is_main:
                with open(metrics, "a", encoding="utf-8") as stream:
                    stream.write(json.dumps({"epoch": 99}) + "\n")
            distributed.barrier()
            build_run(cfg, info).logger.close()
            distributed.barrier()
        finished = True
    finally:
        distributed.cleanup(wait_for_all=finished)


if __name__ == "__main__":
    main()
