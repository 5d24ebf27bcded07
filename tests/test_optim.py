"""The optimizers: AdamW as torch has it, and Muon on the hidden weight matrices (`train.optimizer=muon`)."""

import pytest
import torch

from crnn.config import load_config
from crnn.errors import CheckpointError
from crnn.models import build_model
from crnn.optim import NEWTON_SCHULZ, MuonAdamW, build_optimizer, orthogonalised
from crnn.trainer import fit
from tests.helpers import REPO, TINY, overfit_config, read_metrics, synthetic_folder

COPISTE = REPO / "experiments" / "copiste.yaml"


@pytest.mark.parametrize("shape", [(48, 432), (768, 192), (192, 384)])
def test_orthogonalised_brings_every_singular_value_near_one(shape):
    generator = torch.Generator().manual_seed(0)
    rows, columns = shape
    # singular values spread over two orders of magnitude
    left, _ = torch.linalg.qr(torch.randn(rows, min(shape), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(columns, min(shape), generator=generator))
    matrix = left @ torch.diag(torch.logspace(-1, 1, min(shape))) @ right.T
    result = orthogonalised(matrix)
    singular = torch.linalg.svdvals(result)
    assert result.shape == shape
    # the quintic iteration trades exactness for speed: every value lands in about [0.7, 1.2]
    assert 0.65 < singular.min() and singular.max() < 1.25
    assert torch.allclose(result @ result.T if rows < columns else result.T @ result,
                          torch.eye(min(shape)), atol=0.6)  # near orthogonal, far from the input
    assert not torch.allclose(matrix / matrix.norm(), result / result.norm(), atol=1e-2)


def direct_iteration(update: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The quintic Newton-Schulz iteration as written, in float64: x <- a x + (b G + c G^2) x."""
    a, b, c = NEWTON_SCHULZ
    x = update.double() / update.double().norm(dim=(-2, -1), keepdim=True)
    tall = x.shape[-2] > x.shape[-1]
    x = x.mT if tall else x
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


@pytest.mark.parametrize("shape", [(192, 1728), (3, 48, 432), (864, 96), (4, 192, 384)])
def test_orthogonalised_is_the_direct_iteration_on_wide_and_near_square_matrices(shape):
    generator = torch.Generator().manual_seed(1)
    update = torch.randn(shape, generator=generator)
    update[..., 0, :] *= 30  # one direction dominates, as in a gradient
    expected = direct_iteration(update)
    result = orthogonalised(update)
    assert result.shape == update.shape and result.dtype == torch.float32
    assert (result.double() - expected).norm() / expected.norm() < 1e-5
    assert (result.double() - update.double() / update.double().norm()).norm() > 0.1  # it did change


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = load_config(COPISTE, ["train.optimizer=muon"])
    model = build_model(cfg.model, 50)
    optimizer = build_optimizer(cfg.train, model, torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for group in optimizer.param_groups if group["muon"] for p in group["params"]}
    others = {names[id(p)] for group in optimizer.param_groups if not group["muon"] for p in group["params"]}
    assert isinstance(optimizer, MuonAdamW) and len(muon) + len(others) == len(names)
    assert {"encoder.layers.4.conv1.weight", "encoder.layers.9.conv2.weight", "head.lstm.forward_layers.0.weight_ih_l0",
            "head.lstm.backward_layers.1.weight_hh_l0", "encoder.layers.4.downsample.0.weight"} <= muon
    # the stem reads pixels, the CTC heads give class scores, 1-D parameters are no matrices
    assert {"encoder.layers.0.weight", "head.classifier.weight", "shortcut.conv.weight", "head.classifier.bias",
            "encoder.layers.4.bn1.weight"} <= others
    assert all(p.ndim > 1 for group in optimizer.param_groups if group["muon"] for p in group["params"])
    blocks = {names[id(p)]: group["row_blocks"] for group in optimizer.param_groups if group["muon"] for p in group["params"]}
    assert {name for name, count in blocks.items() if count == 4} == {name for name in muon if ".lstm." in name}
    assert {count for name, count in blocks.items() if ".lstm." not in name} == {1}  # an LSTM's gates apart
    assert type(build_optimizer(load_config(COPISTE, ["train.optimizer=adamw"]).train, model, torch.device("cpu"))) is torch.optim.AdamW


def steps(optimizer, parameters, count=3):
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        for p in parameters:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def test_the_adamw_part_is_torch_adamw_and_a_muon_step_has_an_adamw_steps_size():
    torch.manual_seed(0)
    start = [torch.randn(64, 32, 3, 3), torch.randn(64)]
    ours = [p.clone().requires_grad_() for p in start]
    theirs = [p.clone().requires_grad_() for p in start]
    steps(MuonAdamW([{"params": ours, "weight_decay": 0.01}], lr=1e-2), ours)
    steps(torch.optim.AdamW([{"params": theirs, "weight_decay": 0.01}], lr=1e-2), theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    weight = start[0].clone().requires_grad_()
    steps(MuonAdamW([{"params": [weight], "weight_decay": 0.0, "muon": True}], lr=1e-2), [weight], count=1)
    change = weight.detach() - start[0]
    # an orthogonal 64 x 288 update has an RMS of 1/sqrt(288); scaled by 0.2 sqrt(288): 0.2 x lr
    assert 0.15e-2 < float(change.pow(2).mean().sqrt()) < 0.25e-2
    assert torch.linalg.matrix_rank(change.reshape(64, -1)) == 64  # not a scaled gradient of rank 1 or so


@pytest.mark.slow
def test_a_muon_run_learns_a_few_lines(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    fit(overfit_config(lines, tmp_path / "run", "train.optimizer=muon", "train.epochs=40"))
    metrics = read_metrics(tmp_path / "run")
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 5


@pytest.mark.slow
def test_a_run_resumes_only_with_the_optimizer_it_was_trained_with(tmp_path):
    common = ["train.epochs=2", "data.synthetic.train=8", "data.synthetic.validation=4",
              f"train.output_dir={tmp_path / 'run'}"]
    fit(load_config(TINY, [*common, "train.epochs=1"]))
    with pytest.raises(CheckpointError, match="trained with train.optimizer=adamw, this run asks for train.optimizer=muon"):
        fit(load_config(TINY, [*common, "train.resume=auto", "train.optimizer=muon"]))
