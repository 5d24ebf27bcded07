import pytest
import torch

from crnn.config import load_config
from crnn.models import build_model
from crnn.models.heads import BiLSTMHead
from tests.helpers import REPO


def small(*overrides: str):
    return load_config(None, ["model.stem_channels=8", "model.channels=[8,16]", "model.blocks=[1,1]",
                              "model.strides=[[2,2],[2,1]]", "model.lstm_hidden=16", *overrides]).model


@pytest.mark.parametrize("widths", [[40], [64, 33, 17], [300, 301, 7, 129]])
def test_shapes_and_lengths_follow_each_width(widths):
    model = build_model(small(), num_classes=11).eval()
    images = torch.rand(len(widths), 1, 32, max(widths))
    output = model(images, torch.tensor(widths))
    # stem stride 2 (7x7, pad 3): ceil(w/2), then a stage's 2x2 max-pool: floor of half that
    expected = [(w + 1) // 2 // 2 for w in widths]
    assert output.lengths.tolist() == expected
    assert output.log_probs.shape == (max(expected), len(widths), 11)
    assert output.shortcut_log_probs is None  # eval mode: shortcut head off unless asked for
    assert torch.allclose(output.log_probs.exp().sum(-1), torch.ones(max(expected), len(widths)), atol=1e-5)


def test_shortcut_head_in_training_and_on_request():
    model = build_model(small("model.shortcut=true"), num_classes=5)
    images, widths = torch.rand(2, 1, 32, 50), torch.tensor([50, 30])
    train_out = model.train()(images, widths)
    assert train_out.shortcut_log_probs.shape == train_out.log_probs.shape
    assert model.eval()(images, widths, with_shortcut=True).shortcut_log_probs is not None
    assert build_model(small("model.shortcut=false"), 5).train()(images, widths).shortcut_log_probs is None


def test_lstm_head_ignores_padded_columns():
    head = BiLSTMHead(in_channels=6, hidden=8, layers=2, num_classes=5).eval()
    line = torch.rand(9, 1, 6)  # (T, N, C)
    alone = head(line, torch.tensor([9]))
    garbage = torch.cat([line, 100 * torch.rand(7, 1, 6)])  # padding columns full of noise
    batched = head(torch.cat([garbage, torch.rand(16, 1, 6)], dim=1), torch.tensor([9, 16]))
    assert batched.shape == (16, 2, 5)
    assert torch.allclose(alone[:, 0], batched[:9, 0], atol=1e-6)


def test_weights_of_earlier_versions_load():
    """Earlier versions named an encoder block's projection `shortcut`; torchvision's BasicBlock
    names it `downsample`."""
    model = build_model(small(), num_classes=5)
    renamed = {name.replace(".downsample.", ".shortcut."): value for name, value in model.state_dict().items()}
    assert renamed.keys() != model.state_dict().keys()
    fresh = build_model(small(), num_classes=5)
    fresh.load_state_dict(renamed)
    line, width = torch.rand(1, 1, 32, 64), torch.tensor([64])
    assert torch.equal(fresh.eval()(line, width).log_probs, model.eval()(line, width).log_probs)


# every recipe that defines its own network (finetune.yaml takes it from train.init_from)
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if p.name != "finetune.yaml")


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_shipped_recipe_loads_builds_and_reads_a_line(path):
    cfg = load_config(path)
    model = build_model(cfg.model, num_classes=20).eval()
    line = torch.rand(1, 1, cfg.data.height, 640)
    with torch.no_grad():
        output = model(line, torch.tensor([640]))
    assert output.log_probs.shape[1:] == (1, 20) and output.lengths.tolist() == [output.log_probs.shape[0]]


@pytest.mark.slow
@pytest.mark.parametrize("name, pixels_per_frame", [("base", 16), ("copiste", 4), ("copiste_2h", 4)])
def test_the_recipes_have_the_frame_width_they_state(name, pixels_per_frame):
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    model = build_model(cfg.model, num_classes=20).eval()
    with torch.no_grad():
        output = model(torch.rand(1, 1, cfg.data.height, 1920), torch.tensor([1920]))
    assert output.lengths.tolist() == [1920 // pixels_per_frame]
