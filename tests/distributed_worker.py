"""Launched by torchrun from test_distributed.py: train, then dump what each rank ended with.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT_DIR CFG [key=value ...]

Writes OUT_DIR/rank<R>.pt with the rank's final weights and buffers and the dataset indices of its
epoch-1 shard.
"""

import sys
from pathlib import Path

import torch

from crnn import distributed
from crnn.config import load_config
from crnn.distributed import unwrap
from crnn.trainer import build_run, train


def main() -> None:
    out_dir, cfg = Path(sys.argv[1]), load_config(sys.argv[2], sys.argv[3:])
    info, finished = distributed.setup(cfg.train.device), False
    try:
        run = build_run(cfg, info)
        sampler = run.train_loader.batch_sampler
        sampler.set_epoch(1)
        shard = [index for batch in sampler for index, _ in batch]
        train(run)
        torch.save({"state": unwrap(run.model).state_dict(), "shard": shard, "world": info.world_size},
                   out_dir / f"rank{info.rank}.pt")
        finished = True
    finally:
        distributed.cleanup(wait_for_all=finished)


if __name__ == "__main__":
    main()
