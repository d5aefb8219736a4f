"""Int8 static convolution on a real CNN: the ResNet of ``benchmarks/cnn.py`` trained on digits."""

from __future__ import annotations

import copy
import math
import os
import tempfile

import cnn  # benchmarks/cnn.py: pytest's pythonpath (pyproject) holds benchmarks/
import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.modules import Int8Conv2d, quantized_layers
from mono_quant.qparams import sqnr_db


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The benchmark's ResNet at widths 16-32-64, 4 epochs (~4 s on 2 idle cores; 99.7% test accuracy).

    No early stop (a large budget): the model, and so the assertions, must not depend on machine load.
    """
    return cnn.train_cnn(seconds_budget=600.0, epochs=4, widths=(16, 32, 64))


@pytest.fixture(scope="module")
def static(trained: tuple) -> nn.Module:
    model, _, _, calib = trained
    return mq.quantize(model, mode="static", calibration_data=calib).model


def test_static_int8_agrees_with_float_on_digits(trained: tuple, static: nn.Module) -> None:
    model, test_x, test_y, _ = trained
    float_pred, int8_pred = cnn.predictions(model, test_x), cnn.predictions(static, test_x)
    float_acc = (float_pred == test_y).float().mean().item()
    assert float_acc > 0.95
    assert (int8_pred == float_pred).float().mean().item() >= 0.99
    assert 100 * (float_acc - (int8_pred == test_y).float().mean().item()) <= 0.5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in static.modules())  # folded
    assert sum(isinstance(m, Int8Conv2d) for m in quantized_layers(static).values()) == 9


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    inputs: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_pre_hook(lambda mod, args, name=name: inputs.setdefault(name, args[0]))
        for name, module in quantized_layers(model).items()
        if isinstance(module, Int8Conv2d)
    ]
    with torch.no_grad():
        type(model).forward(model, x)  # the eager path (the fused graph calls oneDNN directly)
    for hook in hooks:
        hook.remove()
    return inputs


def test_onednn_convolution_matches_im2col(trained: tuple, static: nn.Module) -> None:
    _, test_x, _, _ = trained
    inputs = _layer_inputs(static, test_x[:32])
    assert len(inputs) == 9
    with torch.no_grad():
        for name, x in inputs.items():
            layer = quantized_layers(static)[name]
            fast, reference = layer(x), layer._im2col_forward(x)
            assert layer._onednn_conv.packed is not None, name  # the oneDNN path served it
            assert fast.shape == reference.shape
            assert sqnr_db(reference, fast) > 40, name
            single = layer(x[0])  # unbatched input
            assert single.shape == reference.shape[1:] and sqnr_db(reference[0], single) > 40


def test_fallbacks_match(trained: tuple) -> None:
    model, test_x, _, calib = trained
    x = test_x[:8]
    with torch.no_grad():
        reference = model(x)
        for options in ({"mode": "dynamic"}, {"mode": "static", "scheme": "asymmetric"}):
            q = mq.quantize(model, calibration_data=calib, **options).model
            assert sqnr_db(reference, q(x)) > 20, options
        conv = nn.Conv2d(16, 8, 3, stride=2, padding=2, dilation=2, bias=False)
        data = torch.randn(4, 16, 11, 9)
        layer = mq.quantize(nn.Sequential(conv), mode="static", calibration_data=[data]).model[0].weight.layer
        assert sqnr_db(layer._im2col_forward(data), layer(data)) > 40
        assert sqnr_db(conv(data), layer(data)) > 30


def test_save_load_and_deepcopy_keep_the_fast_path(trained: tuple, static: nn.Module) -> None:
    model, test_x, _, _ = trained
    x = test_x[:32]
    with torch.no_grad():
        expected = static(x)
        copied = copy.deepcopy(static)
        assert copied.stem[0].weight.layer._onednn_conv.packed is None  # a cache, not state
        assert torch.equal(copied(x), expected)
        path = os.path.join(tempfile.mkdtemp(), "cnn.safetensors")
        mq.save(static, path)
        fresh = copy.deepcopy(model).train()  # an unfolded skeleton in train mode: load folds it like the file
        loaded = mq.load(path, model=fresh)
        assert torch.equal(loaded(x), expected)
        assert torch.equal(mq.load(path, model=mq.fold_batchnorm(model)[0])(x), expected)  # pre-folded works too
        assert isinstance(fresh.stem[1], nn.BatchNorm2d)  # the skeleton itself is untouched
        assert torch.allclose(loaded(x[:1]), expected[:1], atol=1e-4)  # batch 1: the head takes _int_mm
        assert math.isfinite(loaded(x).sum().item())
