import pytest
import torch

from crnn.config import load_config
from crnn.engine import ctc_line_losses
from crnn.errors import ConfigError
from crnn.models import MODELS, build_model
from crnn.models.heads import AttentionDecoder, BiLSTMHead
from tests.helpers import REPO


def small(*overrides: str):
    return load_config(None, ["model.stem_channels=8", "model.channels=[8,16]", "model.blocks=[1,1]",
                              "model.strides=[[2,2],[2,1]]", "model.lstm_hidden=16", *overrides]).model


@pytest.mark.parametrize("widths", [[40], [64, 33, 17], [300, 301, 7, 129]])
def test_shapes_and_lengths_follow_each_width(widths):
    model = build_model(small(), num_classes=11).eval()
    images = torch.rand(len(widths), 1, 32, max(widths))
    output = model(images, torch.tensor(widths))
    # stem stride 2 (7x7, pad 3), then a stride-2 stage (3x3, pad 1): ceil(w/2) twice
    expected = [((w + 1) // 2 + 1) // 2 for w in widths]
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


def test_column_pool_avg_maxpool_downsample_and_fixed_frames():
    model = build_model(small("model.column_pool=avg", "model.downsample=maxpool"), 5).eval()
    assert model(torch.rand(1, 1, 32, 64), torch.tensor([64])).lengths.tolist() == [16]
    fixed = build_model(small("model.frames=24", "data.resize=squash", "data.width=100"), 5).eval()
    output = fixed(torch.rand(2, 1, 32, 100), torch.tensor([100, 100]))
    assert output.log_probs.shape[0] == 24 and output.lengths.tolist() == [24, 24]


def test_upsample_gives_each_column_its_own_frames():
    torch.manual_seed(0)
    plain = build_model(small("model.shortcut=true"), num_classes=7)
    doubled = build_model(small("model.shortcut=true", "model.upsample=2"), num_classes=7)
    images, widths = torch.rand(2, 1, 32, 120), torch.tensor([120, 77])
    once, twice = plain.eval()(images, widths), doubled.eval()(images, widths)
    assert twice.lengths.tolist() == [2 * length for length in once.lengths.tolist()] == [60, 40]
    assert twice.log_probs.shape == (60, 2, 7)
    columns = doubled.columns(doubled.encoder(images))  # (T, N, C): the two frames of a column differ
    assert columns.shape[0] == 60 and not torch.allclose(columns[0], columns[1])
    output = doubled.train()(images, widths)
    assert output.shortcut_log_probs.shape == output.log_probs.shape
    targets, target_lengths = torch.tensor([1, 2, 3, 4, 5, 6, 1]), torch.tensor([4, 3])
    ctc_line_losses(output.log_probs, output.lengths, targets, target_lengths).sum().backward()
    assert doubled.upsample.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="model.upsample"):
        small("model.upsample=0")


def test_registry_names_the_choices():
    assert "crnn" in MODELS
    with pytest.raises(ConfigError, match="registered models: crnn"):
        build_model(small("model.name=transformer"), 5)


# every recipe that defines its own network (finetune.yaml takes it from train.init_from)
EXPERIMENTS = sorted(p for p in (REPO / "experiments").rglob("*.yaml") if p.name != "finetune.yaml")


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_every_shipped_recipe_loads_builds_and_reads_a_line(path):
    cfg = load_config(path)
    model = build_model(cfg.model, num_classes=20).eval()
    line = torch.rand(1, 1, cfg.data.height, 640)
    with torch.no_grad():
        output = model(line, torch.tensor([640]))
    assert output.log_probs.shape[1:] == (1, 20) and output.lengths.tolist() == [output.log_probs.shape[0]]


@pytest.mark.parametrize("name, pixels_per_frame", [("base", 16), ("candidates/strided", 16),
                                                    ("candidates/frames8", 8), ("candidates/frames8_lite", 8)])
def test_the_gpu_recipes_have_the_frame_width_they_state(name, pixels_per_frame):
    cfg = load_config(REPO / "experiments" / f"{name}.yaml")
    model = build_model(cfg.model, num_classes=20).eval()
    with torch.no_grad():
        output = model(torch.rand(1, 1, 128, 1920), torch.tensor([1920]))
    assert output.lengths.tolist() == [1920 // pixels_per_frame]


def test_span_masking_zeroes_spans_inside_each_line_only():
    from crnn.models.crnn import mask_spans

    columns, lengths = torch.arange(1.0, 61.0)[:, None, None].repeat(1, 3, 2), torch.tensor([60, 24, 8])
    assert mask_spans(columns, lengths, 0.0, 4) is columns
    torch.manual_seed(0)
    zeroed = (mask_spans(columns, lengths, 0.25, 4) == 0).all(-1)  # (T, N)
    for line, length in enumerate(lengths.tolist()):
        count = round(length * 0.25 / 4)  # spans of 4 frames: 4, 2 and 0 of them
        assert not zeroed[length:, line].any()  # never the padding
        assert 0 < zeroed[:, line].sum() <= 4 * count if count else not zeroed[:, line].any()
        edges = torch.diff(torch.cat([torch.tensor([0]), zeroed[:, line].int(), torch.tensor([0])])).nonzero().flatten()
        assert all(end - start >= 4 for start, end in zip(edges[::2], edges[1::2], strict=True))  # whole spans
    rates = torch.stack([(mask_spans(columns, lengths, 0.25, 4) == 0).all(-1)[:, 0] for _ in range(200)]).float()
    assert 0.15 < rates.mean() < 0.25  # 4 spans of 4 over 60 frames, overlaps counted once


def test_span_masking_runs_in_training_only():
    torch.manual_seed(0)
    no_dropout = ("model.lstm_dropout=0", "model.head_dropout=0", "model.shortcut=false")
    plain = build_model(small(*no_dropout), num_classes=7)
    masked = build_model(small(*no_dropout, "model.span_mask=0.5", "model.span_length=2"), num_classes=7)
    masked.load_state_dict(plain.state_dict())  # no parameters of its own
    images, widths = torch.rand(2, 1, 32, 120), torch.tensor([120, 80])
    assert torch.equal(plain.eval()(images, widths).log_probs, masked.eval()(images, widths).log_probs)
    plain.train(), masked.train()
    for module in (plain, masked):  # BatchNorm in eval: training mode differs only by the masking
        for layer in module.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.eval()
    assert torch.equal(plain(images, widths).log_probs, plain(images, widths).log_probs)
    assert not torch.allclose(plain(images, widths).log_probs, masked(images, widths).log_probs)


def test_the_attention_decoder_runs_in_training_when_given_the_text():
    model = build_model(small("model.attention_layers=1", "model.attention_dim=16", "model.attention_heads=2"), 7)
    images, widths = torch.rand(2, 1, 32, 120), torch.tensor([120, 80])
    targets = torch.tensor([[3, 4, 5], [6, 2, 0]])  # "right-padded with the blank"
    output = model.train()(images, widths, targets=targets)
    assert output.attention_logits.shape == (4, 2, 7)  # the text and the end token, per line
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(model(images, widths, targets=targets).attention_logits).all()
    assert model(images, widths).attention_logits is None  # no text, nothing to teach
    assert model.eval()(images, widths, targets=targets).attention_logits is None  # never in inference
    plain = build_model(small(), 7).train()
    assert plain(images, widths, targets=targets).attention_logits is None


def test_the_attention_decoder_is_taught_the_text_then_the_end_and_ignores_what_follows():
    targets = torch.tensor([[3, 4, 5], [6, 2, 0], [0, 0, 0]])
    assert AttentionDecoder.labels(targets).tolist() == [[3, 4, 5, 0], [6, 2, 0, -100], [0, -100, -100, -100]]
    torch.manual_seed(0)
    decoder = AttentionDecoder(in_channels=6, num_classes=7, dim=16, layers=2, heads=4).eval()  # no dropout
    features = torch.rand(20, 1, 6)
    alone = decoder(features[:9], torch.tensor([9]), torch.tensor([[6, 2]]))
    # in a batch: its frames padded with noise, its text padded by a longer line's
    noisy = torch.cat([features[:9], 100 * torch.rand(11, 1, 6)])
    batched = decoder(torch.cat([noisy, features], dim=1), torch.tensor([9, 20]), torch.tensor([[6, 2, 0, 0], [1, 2, 3, 4]]))
    assert batched.shape == (5, 2, 7)
    assert torch.allclose(alone[:, 0], batched[:3, 0], atol=1e-5)  # its text and its end token


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("size", [(16, 194), (15, 97)])
def test_a_strided_pointwise_conv_computes_what_a_strided_1x1_conv_does(size, layout):
    """The residual shortcut's 1x1 convolution subsamples before it convolves (oneDNN's own strided
    1x1 kernel crashed in its channels_last backward pass at 8 input channels, the tiny recipe's)."""
    from crnn.models.encoder import PointwiseConv

    torch.manual_seed(0)
    ours, plain = PointwiseConv(8, 16, (2, 2)), torch.nn.Conv2d(8, 16, 1, (2, 2), bias=False)
    plain.weight.data.copy_(ours.weight.data)
    ours, plain = ours.to(memory_format=layout), plain.double()
    images = torch.rand(4, 8, *size).contiguous(memory_format=layout)
    out, expected = ours(images), plain(images.double())
    assert out.shape == expected.shape == (4, 16, (size[0] + 1) // 2, (size[1] + 1) // 2)
    assert torch.allclose(out.double(), expected, atol=1e-5)
    weights = torch.rand(out.shape)
    (out * weights).sum().backward()
    (expected * weights.double()).sum().backward()
    assert torch.allclose(ours.weight.grad.double(), plain.weight.grad, rtol=1e-4, atol=1e-5)
    assert list(ours.state_dict()) == ["weight"]  # the parameters of nn.Conv2d(8, 16, 1, bias=False)
