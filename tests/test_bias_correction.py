"""Bias correction (``bias_correction=True``, the static default): each layer's mean output error leaves its bias."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.errors import ConfigError
from mono_quant.qparams import sqnr_db


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Real inputs: scikit-learn's 8x8 digits as 64 features in [0, 1] (non-zero mean: a real mean shift)."""
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16.0
    return x[:1000], x[1000:]


def _channel_error(q: nn.Module, f: nn.Module, x: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((q(x) - f(x)).mean(0).abs().mean())


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_bias_correction_reduces_a_layers_mean_error_on_held_out_data(mode: str) -> None:
    train, held_out = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48)).eval()
    calib = list(train.split(250))
    plain = mq.quantize(model, mode=mode, calibration_data=calib, bias_correction=False).model
    corrected = mq.quantize(model, mode=mode, calibration_data=calib, bias_correction=True).model
    before, after = _channel_error(plain, model, held_out), _channel_error(corrected, model, held_out)
    assert after < 0.5 * before, (before, after)
    assert not torch.equal(corrected[0].bias, plain[0].bias)


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # no bias: left alone, with a note
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def _images() -> list[torch.Tensor]:
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:96], dtype=torch.float32).unsqueeze(1) / 16.0
    return list(x.split(32))


def test_corrected_model_is_a_copy_saves_loads_and_runs_fused_with_the_new_bias(tmp_path) -> None:
    torch.manual_seed(0)
    model = SmallCNN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = _images()
    result = mq.quantize(model, mode="static", calibration_data=data[:2], bias_correction=True)
    plain = mq.quantize(model, mode="static", calibration_data=data[:2], bias_correction=False).model
    q = result.model
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the user's model is never changed
    notes = {row.name: row.note for row in result.report.layers}
    assert notes["conv1"].startswith("bias corrected") and notes["fc"].startswith("bias corrected")
    assert "no bias" in notes["conv2"] and q.conv2.bias is None
    assert not torch.equal(q.conv1.bias, plain.conv1.bias) and not torch.equal(q.fc.bias, plain.fc.bias)
    x = data[2]
    with torch.inference_mode():
        out, eager = q(x), type(q).forward(q, x)  # the fused graph (where it runs) and the eager layers agree
    assert sqnr_db(eager, out) > 30
    path = tmp_path / "corrected.safetensors"
    mq.save(q, path)
    loaded = mq.load(path, SmallCNN())
    assert torch.equal(loaded.conv1.bias, q.conv1.bias) and torch.equal(loaded.fc.bias, q.fc.bias)
    with torch.inference_mode():
        assert torch.equal(loaded(x), out)
    assert set(loaded.state_dict()) == set(plain.state_dict())  # same file format: only bias values differ


def test_bias_correction_without_data_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="bias_correction=True"):
        mq.quantize(nn.Sequential(nn.Linear(4, 4)), bias_correction=True)


@pytest.mark.slow
def test_trained_digits_cnn_output_closer_to_float_with_bias_correction() -> None:
    from cnn import train_cnn

    model, test_x, test_y, calib = train_cnn(seconds_budget=10.0, epochs=6, widths=(16, 32, 64))
    with torch.inference_mode():
        reference = model(test_x)
        plain = mq.quantize(model, mode="static", calibration_data=calib, bias_correction=False).model(test_x)
        corrected = mq.quantize(model, mode="static", calibration_data=calib, bias_correction=True).model(test_x)
    assert sqnr_db(reference, corrected) > sqnr_db(reference, plain) + 1.0
    accuracy = (corrected.argmax(1) == test_y).float().mean()
    assert accuracy >= (reference.argmax(1) == test_y).float().mean() - 0.01


def test_static_mode_corrects_by_default_and_dynamic_does_not() -> None:
    train, _ = _digits()
    model = nn.Sequential(nn.Linear(64, 48)).eval()
    calib = list(train.split(250))
    static = mq.quantize(model, mode="static", calibration_data=calib)
    dynamic = mq.quantize(model, mode="dynamic", calibration_data=calib)
    assert static.report.layers[0].note.startswith("bias corrected")
    assert "bias" not in dynamic.report.layers[0].note
