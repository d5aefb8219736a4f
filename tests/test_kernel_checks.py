"""The cases that were wrong on some CPU, checked against float on this one (and under each ISA cap by
``test_isa_caps.py``): an inner dimension of 1, grouped convolutions with 16 input channels per group (AMX),
every int8 layer kind on CPUs whose u8 x s8 products saturate (AVX2, AVX-512 without VNNI), and the checks'
own behaviour (a wrong kernel is caught, recorded, warned about and replaced)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant import kernels
from mono_quant.errors import KernelCheckWarning, OutputCheckWarning
from mono_quant.kernels import check, choice, numerics
from mono_quant.qparams import sqnr_db

pytestmark = pytest.mark.numerics

INT8_FLOOR_DB = 30.0  # measured 34-45 dB for these layers on VNNI/AMX and with 7-bit codes (AVX2 caps)


def first(value):
    return value[0] if isinstance(value, tuple) else value


CASES = {
    "Linear(1, 64)": (lambda: nn.Linear(1, 64), (200, 1)),
    "Linear(64, 256) x200": (lambda: nn.Linear(64, 256), (200, 64)),
    "Conv2d(16, 32, 3)": (lambda: nn.Conv2d(16, 32, 3, padding=1), (4, 16, 16, 16)),
    "Conv1d(64, 64, 16, groups=4)": (lambda: nn.Conv1d(64, 64, 16, groups=4, padding=8), (2, 64, 50)),
    "Conv2d(32, 64, (1, 16), groups=2)": (lambda: nn.Conv2d(32, 64, (1, 16), groups=2), (2, 32, 1, 40)),
    "depthwise Conv2d(32)": (lambda: nn.Conv2d(32, 32, 3, groups=32, padding=1), (4, 32, 16, 16)),
    "LSTM(1, 32)": (lambda: nn.LSTM(1, 32), (20, 2, 1)),
    "GRUCell(1, 16)": (lambda: nn.GRUCell(1, 16), (8, 1)),
}


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("case", list(CASES))
def test_int8_layers_agree_with_float_on_this_cpu(case: str, mode: str) -> None:
    build, shape = CASES[case]
    model = nn.Sequential(build()).eval()
    x, unseen = torch.randn(shape), torch.randn(shape)
    q = mq.quantize(model, dtype="int8", mode=mode, calibration_data=[x]).model
    with torch.no_grad():
        first_call, second_call = first(q(unseen)), first(q(unseen))
        assert sqnr_db(first(model(unseen)), first_call) > INT8_FLOOR_DB
    assert torch.equal(first_call, second_call)  # no uninitialised memory: the same answer every call


def test_the_activation_codes_match_what_the_kernels_multiply_exactly() -> None:
    fmt = kernels.input_format("cpu")
    assert fmt.high == numerics.uint8_high() and fmt.dtype == torch.uint8
    weight = torch.randint(-127, 128, (64, 96), dtype=torch.int8)
    codes = torch.randint(0, fmt.high + 1, (32, 96), dtype=torch.uint8)
    exact = codes.long() @ weight.long().t()
    assert torch.equal(torch._int_mm(codes, weight.t()).long(), exact)
    one_column = codes[:, :1].long() @ weight[:, :1].long().t()  # torch._int_mm returns garbage for this shape
    assert torch.equal(kernels.int_mm(codes[:, :1], weight[:, :1]).long(), one_column)
    assert kernels.SIGNED.static_qparams(0.5, -3) == (0.5, -3)
    assert f"uint8 activations 0..{fmt.high}" in numerics.describe()


def test_a_wrong_kernel_is_caught_recorded_warned_and_replaced() -> None:
    choice.set_kernel_choice("fixed")
    x = torch.randn(5, 8)
    good = torch.randn(5, 3)

    def run(name: str) -> torch.Tensor:
        return good + (1.0 if name == "broken" else 0.0)

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        return good.double(), torch.full((5, 3), 1e-3)

    with pytest.warns(KernelCheckWarning, match="kernel 'broken' for test_wrong"):
        assert choice.pick("test_wrong", (3, 8), x, ("broken", "fine"), "broken", run, reference) == "fine"
    failure = check.failures()[-1]
    assert failure.kernel == "broken" and failure.fallback == "fine" and failure.max_error == pytest.approx(1.0)
    with warnings.catch_warnings(record=True):
        everything_broken = choice.pick("test_wrong_all", (3, 8), x, ("broken",), "broken", run, reference)
    assert everything_broken == choice.FALLBACK
    choice.set_kernel_choice("measure")


def test_a_layer_whose_kernels_all_fail_computes_in_float(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = nn.Linear(48, 24).eval()
    q = mq.quantize(nn.Sequential(layer), dtype="int8").model
    choice.set_kernel_choice("measure")  # clears the cache: the next call is checked again
    monkeypatch.setattr(kernels.check, "STEP_FRACTION", -1.0)  # no kernel can pass a negative bound
    x = torch.randn(6, 48)
    with pytest.warns(KernelCheckWarning):
        out = q(x)
    torch.testing.assert_close(out, nn.functional.linear(x, q[0].dequantized_weight(), q[0].bias))
    assert choice.chosen()["int8_linear_dynamic (24, 48) 2-8 cpu torch.float32"] == choice.FALLBACK


def test_a_compiled_layer_whose_kernels_all_fail_computes_in_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled path's codes op checks its kernels too: none passing, it multiplies the dequantized codes."""
    layer = nn.Linear(48, 24).eval()
    q = mq.quantize(nn.Sequential(layer), dtype="int8").model
    x = torch.randn(6, 48)
    choice.set_kernel_choice("measure")  # clears what earlier calls chose (a fallback for this shape included)
    with torch.no_grad():
        exact = q(x)  # before breaking the check: the integer kernels
    choice.set_kernel_choice("measure")
    monkeypatch.setattr(kernels.check, "STEP_FRACTION", -1.0)
    with torch.no_grad(), pytest.warns(KernelCheckWarning):
        out = torch.compile(q, fullgraph=True)(x)
    assert choice.chosen()["int8_linear_dynamic_codes (24, 48) 2-8 cpu torch.uint8"] == choice.FALLBACK
    torch.testing.assert_close(out, exact, rtol=1e-4, atol=1e-4)  # the same codes, multiplied in float


def test_the_report_gives_output_sqnr_and_why_a_layer_moved() -> None:
    torch.manual_seed(0)
    lstm = nn.LSTM(4, 16)
    x = torch.randn(10, 2, 4)
    x[..., 0] *= 1e-3
    with torch.no_grad():
        lstm.weight_ih_l0[:, 0] *= 1e3  # a raw feature in other units: drowned in each row's int8 scale
    with pytest.warns(OutputCheckWarning, match="moved to a higher precision"):
        result = mq.quantize(nn.Sequential(lstm, nn.Identity()), calibration_data=[x])
    row = result.report.layers[0]
    assert row.output_sqnr_db > 25 and "int8 " in row.note and "dB < 25 dB floor" in row.note
    assert "output dB" in str(result.report) and row.note in str(result.report)
    assert result.model[0].precisions["weight_ih_l0"] == "float32"


def test_a_floor_nothing_can_meet_keeps_the_layer_float_with_the_reason() -> None:
    model = nn.Sequential(nn.Linear(32, 8))
    with pytest.warns(OutputCheckWarning):
        result = mq.quantize(model, dtype="int4", group_size=32, min_output_sqnr_db=200.0)
    assert type(result.model[0]) is nn.Linear
    reason = result.report.skipped["0"]
    assert reason.startswith("kept float") and "int4 group 32" in reason and "int8 dynamic" in reason


def test_min_output_sqnr_db_is_validated() -> None:
    with pytest.raises(mq.ConfigError, match="min_output_sqnr_db"):
        mq.QuantizationConfig(min_output_sqnr_db="high")


def test_vanishing_activations_are_not_judged_against_the_floor() -> None:
    # random-weight CNNs can shrink activations to 1e-10: static scales stop at float32's eps, so the layer's
    # own SQNR means nothing; it stays quantized and the report says why it was not judged
    model = nn.Sequential(nn.Linear(16, 8, bias=False))
    result = mq.quantize(model, mode="static", calibration_data=[torch.randn(32, 16) * 1e-9])
    row = result.report.layers[0]
    assert row.mode == "static" and "not judged" in row.note
