"""Each quantized module against a float reference, on the inputs and under the modes users run."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mono_quant import QuantizationConfig
from mono_quant.config import Scheme
from mono_quant.modules import (
    ActivationQParams,
    HalfConv2d,
    HalfEmbedding,
    HalfLinear,
    Int4Linear,
    Int8Conv2d,
    Int8Embedding,
    Int8Linear,
)
from mono_quant.qparams import scale_zero_point, sqnr_db


def _activation(x):
    return ActivationQParams(*scale_zero_point(x.min(), x.max(), 8, Scheme.ASYMMETRIC))


LINEAR_CASES = [
    ("dynamic", "symmetric", 1),
    ("dynamic", "symmetric", 16),
    ("dynamic", "asymmetric", 16),
    ("static", "symmetric", 1),
    ("static", "symmetric", 16),
    ("static", "asymmetric", 16),
    ("weight_only", "symmetric", 16),
    ("weight_only", "asymmetric", 3),
]


@pytest.mark.parametrize(("mode", "scheme", "rows"), LINEAR_CASES)
def test_int8_linear_matches_its_dequantized_reference(mode, scheme, rows):
    layer = nn.Linear(256, 96)
    x = torch.randn(rows, 256).relu()  # post-ReLU inputs: the common, asymmetric case
    q = Int8Linear.from_float(layer, QuantizationConfig(mode=mode, scheme=scheme), _activation(x))
    with torch.inference_mode():
        out = q(x)
        reference = F.linear(x, q.dequantized_weight(), layer.bias)
    # the dequantized reference isolates activation rounding: int8 (or bf16) inputs stay above 35 dB
    assert out.shape == (rows, 96) and out.dtype == torch.float32
    assert sqnr_db(reference, out) > 35
    assert sqnr_db(layer(x).detach(), out) > 33


def test_int8_linear_keeps_leading_dims_and_input_dtype():
    q = Int8Linear.from_float(nn.Linear(32, 8), QuantizationConfig())
    x = torch.randn(2, 5, 32)
    assert q(x).shape == (2, 5, 8)
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_static_mode_really_uses_the_calibrated_scale():
    layer = nn.Linear(64, 8)
    x = torch.rand(4, 64)  # in [0, 1]
    narrow = ActivationQParams(*scale_zero_point(torch.tensor(0.0), torch.tensor(0.5), 8, Scheme.ASYMMETRIC))
    q = Int8Linear.from_float(layer, QuantizationConfig(mode="static"), narrow)
    clipped = F.linear(x.clamp(max=0.5), q.dequantized_weight(), layer.bias)
    with torch.inference_mode():
        out = q(x)
    assert sqnr_db(clipped, out) > 35  # inputs above the calibrated range were clipped to it
    assert sqnr_db(layer(x).detach(), out) < 25


def test_int8_linear_single_row_and_batch_paths_agree():
    q = Int8Linear.from_float(nn.Linear(128, 64), QuantizationConfig())
    x = torch.randn(8, 128)
    with torch.inference_mode():
        batched = q(x)
        rows = torch.cat([q(row[None]) for row in x])
    assert sqnr_db(rows, batched) > 35


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("rows", [1, 7])
def test_int4_linear_matches_dequantized_reference(scheme, rows):
    layer = nn.Linear(256, 40)  # 40 rows: the kernel pads to a multiple of 16 internally
    q = Int4Linear.from_float(layer, QuantizationConfig(dtype="int4", scheme=scheme, group_size=64))
    x = torch.randn(rows, 256)
    with torch.inference_mode():
        out = q(x)
        reference = F.linear(x, q.dequantized_weight(), layer.bias)
    assert out.shape == (rows, 40) and out.dtype == torch.float32
    assert sqnr_db(reference, out) > 35  # bf16 activations inside the kernel
    assert q.weight_packed.dtype == torch.int32 and q.weight_packed.shape == (40, 32)


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight_only"])
def test_int8_conv2d_matches_float(mode):
    conv = nn.Conv2d(4, 16, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 13, 11)
    q = Int8Conv2d.from_float(conv, QuantizationConfig(mode=mode), _activation(x))
    with torch.inference_mode():
        out = q(x)
        reference = conv(x)
    assert out.shape == reference.shape
    assert sqnr_db(reference, out) > 33
    assert q(x[0]).shape == reference[0].shape  # unbatched input
    assert torch.allclose(q.dequantize()(x), F.conv2d(x, q.dequantized_weight(), conv.bias, 2, 1), atol=1e-5)


def test_int8_embedding_gathers_rows_exactly_as_dequantized():
    emb = nn.Embedding(50, 24, padding_idx=0)
    q = Int8Embedding.from_float(emb, QuantizationConfig())
    idx = torch.tensor([[0, 3, 49], [7, 7, 1]])
    assert torch.equal(q(idx), F.embedding(idx, q.dequantized_weight()))
    assert sqnr_db(emb(idx).detach(), q(idx)) > 38
    assert q.weight.dtype == torch.int8 and q.weight_scale.shape == (50,)


@pytest.mark.parametrize("cls", [HalfLinear, HalfConv2d, HalfEmbedding])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_layers_cast_at_the_boundary(cls, dtype):
    float_module = {HalfLinear: nn.Linear(16, 8), HalfConv2d: nn.Conv2d(3, 4, 3), HalfEmbedding: nn.Embedding(10, 8)}[
        cls
    ]
    x = {HalfLinear: torch.randn(2, 16), HalfConv2d: torch.randn(1, 3, 8, 8), HalfEmbedding: torch.tensor([1, 2])}[cls]
    q = cls.from_float(float_module, QuantizationConfig(dtype=dtype))
    assert q.weight.dtype == (torch.float16 if dtype == "fp16" else torch.bfloat16)
    with torch.inference_mode():
        out = q(x)
        assert out.dtype == torch.float32
        assert sqnr_db(float_module(x), out) > 30
    assert type(q.dequantize()) is type(float_module)


def test_modules_work_under_no_grad_inference_mode_and_to():
    q = Int8Linear.from_float(nn.Linear(32, 16), QuantizationConfig())
    x = torch.randn(4, 32)
    with torch.no_grad():
        a = q(x)
    with torch.inference_mode():
        b = q(x)
    assert torch.equal(a, b)
    moved = copy.deepcopy(q).to("cpu", torch.float64)  # buffers keep their integer dtypes
    assert moved.weight.dtype == torch.int8


def test_torch_compile_runs_on_a_quantized_model():
    import mono_quant as mq

    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    mixed = mq.quantize(model, dtype="int8", include=["0"]).model
    mixed = mq.quantize(mixed, dtype="int4", group_size=64, include=["2"]).model  # int8 then int4 layers
    assert isinstance(mixed[0], Int8Linear) and isinstance(mixed[2], Int4Linear)
    x = torch.randn(4, 256)
    compiled = torch.compile(mixed)  # inductor, the default backend
    with torch.no_grad():
        assert sqnr_db(mixed(x), compiled(x)) > 35  # eager batches use oneDNN, compiled ones _int_mm


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["int8", "int4", "bf16"])
def test_cuda_modules_match_cpu(dtype):
    import mono_quant as mq

    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64)).eval()
    q, _ = mq.dynamic_quantize(model, dtype=dtype)
    x = torch.randn(32, 256)
    with torch.inference_mode():
        cpu = q(x)
        gpu = q.to("cuda")(x.cuda()).cpu()
    assert sqnr_db(cpu, gpu) > 30
