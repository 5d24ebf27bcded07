"""DDP on CPU (gloo) through torchrun, and the single-process DataParallel wrapper."""

import pytest
import torch

from crnn.checkpoint import load_checkpoint
from crnn.config import load_config
from crnn.data.samplers import WidthBatchSampler
from crnn.distributed import DataParallelCRNN
from crnn.models import build_model
from tests.helpers import TINY, read_metrics, run_tool, torchrun

pytestmark = pytest.mark.slow  # every test here trains a model or starts processes

COMMON = ["data.synthetic.train=40", "data.synthetic.validation=20", "data.batch_size=4", "train.epochs=1"]


@pytest.fixture(scope="module", params=[[], ["train.optimizer=muon", "train.checkpoint_every_steps=2"]],
                ids=["adamw", "muon"])
def ddp_run(tmp_path_factory, request):
    """One 2-process run of the tiny config (AdamW; Muon with checkpoints mid-epoch); every rank
    dumps its weights and its shard."""
    out = tmp_path_factory.mktemp("ddp")
    torchrun("tests/distributed_worker.py", out, TINY, *COMMON, *request.param, f"train.output_dir={out / 'run'}")
    return out


def test_two_processes_write_one_complete_run_directory(ddp_run):
    run_dir = ddp_run / "run"
    assert {"config.yaml", "metrics.jsonl", "train_texts.txt"} <= {p.name for p in run_dir.iterdir()}
    assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["epoch"] == 1
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    (record,) = read_metrics(run_dir)
    assert record["lines_per_s"] > 0 and 0.0 <= record["val_cer"]


def test_ranks_end_with_identical_weights_and_statistics(ddp_run):
    rank0, rank1 = (torch.load(ddp_run / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == 2
    for name, tensor in rank0["state"].items():
        assert torch.equal(tensor, rank1["state"][name]), name
    saved = load_checkpoint(ddp_run / "run" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(saved[name], tensor) for name, tensor in rank0["state"].items())


def test_shards_cover_the_epoch_exactly_once(ddp_run):
    shards = [torch.load(ddp_run / f"rank{r}.pt")["shard"] for r in (0, 1)]
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(40))


@pytest.mark.parametrize("count,batch,world", [(41, 4, 2), (40, 8, 3), (7, 2, 4), (100, 16, 2)])
def test_sampler_shards_are_disjoint_equal_in_steps_and_complete(count, batch, world):
    widths = torch.randint(10, 500, (count,)).tolist()
    samplers = [WidthBatchSampler(widths, batch, shuffle=True, seed=3, rank=r, world_size=world)
                for r in range(world)]
    for epoch in (1, 2):
        shards = []
        for sampler in samplers:
            sampler.set_epoch(epoch)
            shards.append([i for b in sampler for i, _ in b])
        assert len({len(s) for s in samplers}) == 1  # every rank takes the same number of steps
        assert sorted(sum(shards, [])) == list(range(count))
    samplers[0].set_epoch(1)
    first = [i for b in samplers[0] for i, _ in b]
    samplers[0].set_epoch(2)
    assert first != [i for b in samplers[0] for i, _ in b]  # a new order each epoch


def test_ddp_checkpoint_resumes_in_one_process_and_back(tmp_path):
    run_dir = tmp_path / "run"
    torchrun("tools/train.py", "--cfg", TINY, *COMMON, f"train.output_dir={run_dir}")
    run_tool("tools/train.py", "--cfg", TINY, *COMMON, "train.epochs=2", "train.resume=auto",
             f"train.output_dir={run_dir}").check_returncode()
    torchrun("tools/train.py", "--cfg", TINY, *COMMON, "train.epochs=3", "train.resume=auto",
             f"train.output_dir={run_dir}")
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2, 3]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 3
    steps = [m["step"] for m in read_metrics(run_dir)]
    assert steps == [5, 15, 20]  # 40 lines / (2 x 4) = 5 steps; one process: 10 steps


def test_resuming_on_two_ranks_at_once_loses_no_metrics_line(tmp_path):
    run_dir = tmp_path / "run"
    run_tool("tools/train.py", "--cfg", TINY, *COMMON, "train.epochs=2",
             f"train.output_dir={run_dir}").check_returncode()
    before = (run_dir / "metrics.jsonl").read_text()
    torchrun("tests/resume_worker.py", 20, TINY, *COMMON, "train.epochs=3", "train.resume=auto",
             f"train.output_dir={run_dir}")
    assert (run_dir / "metrics.jsonl").read_text() == before  # 20 stale lines dropped, none of the rest
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]
    assert not list(run_dir.glob(".*.tmp"))


def test_data_parallel_wrapper_matches_the_bare_model():
    model = build_model(load_config(TINY).model, num_classes=9).eval()
    wrapped = DataParallelCRNN(model)  # without GPUs DataParallel runs the module itself
    images, widths = torch.rand(3, 1, 32, 80), torch.tensor([80, 50, 20])
    bare, parallel = model(images, widths), wrapped(images, widths)
    assert torch.equal(bare.log_probs, parallel.log_probs)
    assert torch.equal(bare.lengths, parallel.lengths)
