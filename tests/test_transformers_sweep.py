"""Reach on real modelling code: architectures built by ``transformers`` from small configs.

Each quantizes in int8 dynamic, int8 static (calibrated on a few random batches) and int4, runs, saves,
and reloads into a freshly built skeleton (other random weights) with identical outputs. At least 80%
of each model's matmul weights (linear, conv, embedding, attention projections) must be integer.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers_zoo

import mono_quant as mq
from mono_quant.engine.selection import matmul_weight_numel
from mono_quant.errors import KernelCheckWarning, OutputCheckWarning
from mono_quant.modules import quantized_layers
from mono_quant.qparams import sqnr_db

pytestmark = pytest.mark.slow

MODES = {
    "int8-dynamic": {"mode": "dynamic"},
    "int8-static": {"mode": "static"},
    "int4": {"dtype": "int4", "group_size": 32},
}


def quantized_share(model: torch.nn.Module, q_model: torch.nn.Module) -> float:
    total = sum(matmul_weight_numel(m) for m in model.modules())
    done = sum(matmul_weight_numel(model.get_submodule(name)) for name in quantized_layers(q_model))
    return done / total


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("arch", transformers_zoo.names())
def test_architecture_quantizes_runs_and_round_trips(arch: str, mode: str, tmp_path) -> None:
    model, make_inputs = transformers_zoo.build(arch)
    inputs = make_inputs()
    calibration = [make_inputs() for _ in range(2)]
    with torch.inference_mode():
        reference = transformers_zoo.output(model(**inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "under half quantized" would fail the test
        warnings.simplefilter("ignore", OutputCheckWarning)  # a layer moved up a precision: in the report
        warnings.simplefilter("ignore", KernelCheckWarning)  # AMX's grouped conv (wav2vec2): im2col serves
        result = mq.quantize(model, calibration_data=calibration if mode == "int8-static" else None, **MODES[mode])
    assert quantized_share(model, result.model) >= 0.8, result.report.skipped
    with torch.inference_mode():
        out = transformers_zoo.output(result.model(**inputs))
    assert out.shape == reference.shape and torch.isfinite(out).all()
    if mode != "int4" and reference.norm() > 1e-3:
        assert sqnr_db(reference, out) > 25
    path = tmp_path / "model.safetensors"
    mq.save(result.model, path)
    skeleton, _ = transformers_zoo.build(arch, seed=1)
    loaded = mq.load(path, skeleton)
    with torch.inference_mode():
        assert torch.equal(transformers_zoo.output(loaded(**inputs)), out)
    assert not loaded.training and math.isfinite(result.report.min_sqnr_db)
