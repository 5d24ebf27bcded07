"""The optimizers: AdamW as torch has it, and Muon on the hidden weight matrices (`train.optimizer=muon`)."""

import pytest
import torch

from crnn.config import load_config
from crnn.engine import TrainSetup
from crnn.errors import CheckpointError, ConfigError
from crnn.models import build_model
from crnn.optim import (
    NEWTON_SCHULZ,
    MuonAdamW,
    build_optimizer,
    gram_iterated,
    hidden_matrices,
    muon_dtype,
    orthogonalised,
)
from crnn.trainer import fit
from tests.helpers import TINY, overfit_tiny, synthetic_folder

COPISTE = TINY.parent / "copiste.yaml"


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
    # (192, 1728), (3, 48, 432) and (864, 96) go through the Gram matrix, (4, 192, 384) does not
    generator = torch.Generator().manual_seed(1)
    update = torch.randn(shape, generator=generator)
    update[..., 0, :] *= 30  # one direction dominates, as in a gradient
    expected = direct_iteration(update)
    result = orthogonalised(update)
    assert result.shape == update.shape and result.dtype == torch.float32
    assert (result.double() - expected).norm() / expected.norm() < 1e-5
    assert (result.double() - update.double() / update.double().norm()).norm() > 0.1  # it did change


def test_gram_iteration_multiplies_the_matrix_by_the_same_polynomials():
    x = torch.randn(2, 8, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = x / x.norm(dim=(-2, -1), keepdim=True)
    assert torch.allclose(gram_iterated(x, 3), direct_iteration(x, 3), atol=1e-12)
    assert torch.allclose(gram_iterated(x, 1), direct_iteration(x, 1), atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 256, 512), (256, 256), (4, 192, 384)])
def test_orthogonalised_in_bf16_lands_where_float32_does(shape):
    """The LSTM's gate blocks (square, or twice as wide) under train.muon_precision=bf16: the same
    iteration to bf16's precision, and the same singular values (a random square matrix has some
    near 0, which five iterations leave small in float32 too)."""
    generator = torch.Generator().manual_seed(3)
    update = torch.randn(shape, generator=generator)
    update[..., 0, :] *= 30
    exact = orthogonalised(update)
    result = orthogonalised(update, dtype=torch.bfloat16)
    assert result.dtype == torch.bfloat16 and result.shape == update.shape
    assert 1e-4 < float((result.float() - exact).norm() / exact.norm()) < 0.03  # bf16's rounding, no more
    singular, expected = torch.linalg.svdvals(result.float()), torch.linalg.svdvals(exact)
    assert (singular - expected).abs().max() < 0.05 and expected.max() < 1.25


def test_orthogonalised_takes_any_number_of_batch_dimensions():
    update = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(orthogonalised(update), torch.stack([orthogonalised(u) for u in update]), atol=1e-6)
    assert orthogonalised(update[0, 0].T).shape == (96, 64)  # a tall one, transposed and back


def test_wide_matrices_stay_in_float32_under_bf16():
    # a convolution's 192 x 1,728 matrix goes through its Gram matrix, whose powers bf16 would spoil
    update = torch.randn(192, 1728, generator=torch.Generator().manual_seed(4))
    assert torch.equal(orthogonalised(update, dtype=torch.bfloat16), orthogonalised(update))


def test_muon_precision_auto_follows_the_autocast_dtype():
    cpu = torch.device("cpu")
    assert muon_dtype("auto", torch.bfloat16, cpu) == torch.bfloat16
    assert muon_dtype("auto", None, cpu) == muon_dtype("auto", torch.float16, cpu) == torch.float32
    assert muon_dtype("float32", torch.bfloat16, cpu) == torch.float32
    model = build_model(load_config(COPISTE).model, 50)
    for precision, amp, expected in [("auto", "bf16", torch.bfloat16), ("auto", "off", torch.float32),
                                     ("bf16", "off", torch.bfloat16), ("float32", "bf16", torch.float32)]:
        cfg = load_config(COPISTE, [f"train.muon_precision={precision}", f"train.amp={amp}"])
        assert TrainSetup.from_config(cfg, model=model, device=cpu, total_steps=10).optimizer.ns_dtype == expected
    with pytest.raises(ConfigError, match="train.muon_precision"):
        load_config(COPISTE, ["train.muon_precision=fp16"])


def test_a_checkpoint_does_not_carry_the_newton_schulz_dtype():
    weight = torch.randn(64, 32, requires_grad=True)
    saved = MuonAdamW([{"params": [weight], "weight_decay": 0.0, "muon": True}], lr=1e-2, ns_dtype=torch.bfloat16)
    steps(saved, [weight], count=1)
    resumed = MuonAdamW([{"params": [weight], "weight_decay": 0.0, "muon": True}], lr=1e-2)
    resumed.load_state_dict(saved.state_dict())
    assert resumed.ns_dtype == torch.float32  # the run's own train.muon_precision, not the checkpoint's


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest():
    cfg = load_config(COPISTE, ["train.optimizer=muon"])
    model = build_model(cfg.model, 50)
    optimizer = build_optimizer(cfg.train, model, torch.device("cpu"))
    names = {id(p): name for name, p in model.named_parameters()}
    muon = {names[id(p)] for group in optimizer.param_groups if group["muon"] for p in group["params"]}
    others = {names[id(p)] for group in optimizer.param_groups if not group["muon"] for p in group["params"]}
    assert isinstance(optimizer, MuonAdamW) and len(muon) + len(others) == len(names)
    assert {"encoder.layers.4.conv1.weight", "encoder.layers.9.conv2.weight", "head.lstm.forward_layers.0.weight_ih_l0",
            "head.lstm.backward_layers.1.weight_hh_l0", "encoder.layers.4.shortcut.0.weight"} <= muon
    # the stem reads pixels, the CTC heads give class scores, 1-D parameters are no matrices
    assert {"encoder.layers.0.weight", "head.classifier.weight", "shortcut.conv.weight", "head.classifier.bias",
            "encoder.layers.4.bn1.weight"} <= others
    assert all(p.ndim > 1 for group in optimizer.param_groups if group["muon"] for p in group["params"])
    blocks = {names[id(p)]: group["row_blocks"] for group in optimizer.param_groups if group["muon"] for p in group["params"]}
    assert {name for name, count in blocks.items() if count == 4} == {name for name in muon if ".lstm." in name}
    assert {count for name, count in blocks.items() if ".lstm." not in name} == {1}  # an LSTM's gates apart
    assert type(build_optimizer(load_config(COPISTE, ["train.optimizer=adamw"]).train, model, torch.device("cpu"))) is torch.optim.AdamW


def test_muon_takes_the_attention_decoders_matrices_but_not_its_character_rows():
    model = build_model(load_config(COPISTE, ["model.attention_layers=1"]).model, 50)
    names = {id(p): name for name, p in model.named_parameters()}
    blocks = {names[i]: count for i, count in hidden_matrices(model).items() if names[i].startswith("attention.")}
    layer = "attention.layers.layers.0."
    assert blocks == {"attention.memory.weight": 1, layer + "self_attn.in_proj_weight": 3,  # query, key, value
                      layer + "self_attn.out_proj.weight": 1, layer + "multihead_attn.in_proj_weight": 3,
                      layer + "multihead_attn.out_proj.weight": 1, layer + "linear1.weight": 1, layer + "linear2.weight": 1}


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


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_a_muon_run_learns_a_few_lines(precision, tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    *_, (first, last) = overfit_tiny(lines, 60, 1.0, "train.optimizer=muon", f"train.muon_precision={precision}")
    assert last.loss < first.loss / 10


def test_the_attention_decoder_learns_the_text_alongside_ctc(tmp_path):
    lines = synthetic_folder(tmp_path / "lines", 4)
    *_, (first, last) = overfit_tiny(lines, 12, 0.0, "model.attention_layers=1", "model.attention_dim=32",
                                     "model.attention_weight=1.0")
    assert first.attention_loss > 10  # about ln(classes) per character at the start
    assert last.attention_loss < first.attention_loss / 3 and last.loss < first.loss / 2


def test_a_run_resumes_only_with_the_optimizer_it_was_trained_with(tmp_path):
    common = ["train.epochs=2", "data.synthetic.train=8", "data.synthetic.validation=4",
              f"train.output_dir={tmp_path / 'run'}"]
    fit(load_config(TINY, [*common, "train.epochs=1"]))
    with pytest.raises(CheckpointError, match="trained with train.optimizer=adamw, this run asks for train.optimizer=muon"):
        fit(load_config(TINY, [*common, "train.resume=auto", "train.optimizer=muon"]))
