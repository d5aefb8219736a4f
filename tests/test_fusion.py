"""Conv2d + BatchNorm2d folding: exact in float, conservative detection, the input model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.graph.folding import conv_bn_pairs


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as after training."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.2, 3)
                if module.weight is not None:
                    module.weight.uniform_(0.5, 2)
                    module.bias.uniform_(-1, 1)
    return model.eval()


class Block(nn.Module):
    """Attributes wired in ``forward`` (the torch.fx path), with a residual add."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block()
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


class Untraceable(Net):
    """Data-dependent control flow: torch.fx cannot trace it, so only Sequential order is used."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if h.sum() > 0:
            h = self.block(h)
        return self.head(h.mean((2, 3)))


@pytest.fixture(scope="module")
def images(digits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return digits[2][:64].reshape(-1, 1, 8, 8)


def _snapshot(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    return {name: (t.detach().clone(), t.data_ptr()) for name, t in model.state_dict(keep_vars=True).items()}


def _assert_unchanged(model: nn.Module, snapshot: dict[str, tuple[torch.Tensor, int]]) -> None:
    state = model.state_dict(keep_vars=True)
    assert list(state) == list(snapshot)
    for name, (value, ptr) in snapshot.items():
        assert state[name].data_ptr() == ptr, name
        assert torch.equal(state[name], value), name


def test_folding_is_exact_on_real_images_and_leaves_the_input_alone(images: torch.Tensor) -> None:
    model = _randomize_bn(Net())
    before = _snapshot(model)
    folded, pairs = mq.fold_batchnorm(model)
    assert pairs == [("stem.0", "stem.1"), ("block.conv1", "block.bn1"), ("block.conv2", "block.bn2")]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert folded.block.conv1.bias is not None  # a bias-free conv gains one
    with torch.no_grad():
        assert (folded(images) - model(images)).abs().max().item() < 1e-5
    _assert_unchanged(model, before)
    assert not model.training and isinstance(model.block.bn1, nn.BatchNorm2d)


def test_untraceable_model_folds_sequential_pairs_only(images: torch.Tensor) -> None:
    model = _randomize_bn(Untraceable())
    folded, pairs = mq.fold_batchnorm(model)
    assert pairs == [("stem.0", "stem.1")]
    assert isinstance(folded.block.bn1, nn.BatchNorm2d)
    with torch.no_grad():
        assert (folded(images) - model(images)).abs().max().item() < 1e-5


def test_train_mode_is_not_folded() -> None:
    model = _randomize_bn(Net()).train()
    folded, pairs = mq.fold_batchnorm(model)
    assert pairs == []
    assert isinstance(folded.stem[1], nn.BatchNorm2d) and folded.training


class SharedOutput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + y  # the conv's output has a second consumer


class SharedBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv1(x)) + self.bn(self.conv2(x))  # one BN after two convs


def test_unprovable_pairs_are_not_folded() -> None:
    assert conv_bn_pairs(SharedOutput().eval()) == []
    assert conv_bn_pairs(SharedBatchNorm().eval()) == []
    not_adjacent = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))
    no_stats = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    wrong_width = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(8))
    hooked = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    hooked[0].register_forward_hook(lambda module, args, out: out * 2)
    conv = nn.Conv2d(1, 4, 3)
    registered_twice = nn.Sequential(conv, nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(conv))
    for model in (not_adjacent, no_stats, wrong_width, hooked, registered_twice):
        assert conv_bn_pairs(model.eval()) == [], model


def test_quantize_folds_eval_models_and_reports_it(images: torch.Tensor) -> None:
    model = _randomize_bn(Net())
    before = _snapshot(model)
    result = mq.quantize(model, mode="static", calibration_data=[images])
    assert result.report.skipped["stem.1"] == "folded into stem.0"
    assert result.report.skipped["block.bn2"] == "folded into block.conv2"
    assert "block.bn1" in result.skipped
    conv1 = result.model.block.conv1
    assert type(conv1.weight.layer).__name__ == "Int8Conv2d" and conv1.bias is not None
    _assert_unchanged(model, before)
    with torch.no_grad():
        reference, out = model(images), result.model(images)
    assert torch.nn.functional.cosine_similarity(reference, out).min() > 0.99


def test_quantize_folds_a_train_mode_model_on_an_eval_copy_and_says_so(images: torch.Tensor) -> None:
    """Quantization is for inference: a train-mode model (mid-training, fresh from ``load_from_checkpoint``)
    is quantized as an eval-mode copy, folded exactly as the eval model is; the model keeps its own mode."""
    model = _randomize_bn(Net())
    before = _snapshot(model)
    from_eval = mq.quantize(model.eval(), mode="static", calibration_data=[images])
    result = mq.quantize(model.train(), mode="static", calibration_data=[images])
    assert result.report.skipped["stem.1"] == (
        "folded into stem.0 (its BatchNorm2d was in train mode: quantization makes an eval-mode copy for inference, "
        "so the running statistics were folded)"
    )
    assert result.report.skipped["block.bn2"].startswith("folded into block.conv2 (its BatchNorm2d was in train mode")
    assert result.report.layers == from_eval.report.layers
    assert not result.model.training and model.training and all(m.training for m in model.modules())
    _assert_unchanged(model, before)
    torch.testing.assert_close(result.model(images), from_eval.model(images), rtol=0, atol=0)
    off = mq.quantize(model.eval(), mode="dynamic", fold_batchnorm=False)
    assert isinstance(off.model.stem[1], nn.BatchNorm2d)
    assert off.report.skipped["stem.1"] == "BatchNorm2d is not a supported layer type"
    with pytest.raises(mq.ConfigError, match="fold_batchnorm"):
        mq.QuantizationConfig(fold_batchnorm="yes")
