"""Kernel choice: every candidate kernel agrees with the reference; the one-time measurement, its cache and
the fixed mode; nothing of it reaches saved files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant import kernels
from mono_quant.errors import ConfigError
from mono_quant.kernels import choice
from mono_quant.modules import Int4Linear, Int8Linear

pytestmark = pytest.mark.numerics


@pytest.fixture(autouse=True)
def measure_mode() -> Iterator[None]:
    choice.set_kernel_choice("measure")
    yield
    choice.set_kernel_choice("measure")


def digits_linear(digits: tuple, out_features: int = 48) -> tuple[nn.Linear, torch.Tensor]:
    """A Linear fitted to nothing in particular, fed real digits images (64 pixels, 0-16)."""
    x_train = digits[0]
    torch.manual_seed(0)
    return nn.Linear(x_train.shape[1], out_features).eval(), x_train[:300]


@pytest.mark.parametrize("rows", [1, 5, 40, 300])
def test_dynamic_kernels_agree_with_the_dequantized_reference(digits: tuple, rows: int) -> None:
    float_layer, x = digits_linear(digits)
    layer = Int8Linear.from_float(float_layer, mq.QuantizationConfig(dtype="int8", mode="dynamic"))
    x = x[:rows]
    fmt = layer._fmt  # this CPU's codes: 0..255 with VNNI/AMX, 0..127 without (kernels.numerics)
    q, row_max = kernels.quantize_per_row(x, fmt)
    # the reference: float matmul of the dequantized activations and weights
    reference = ((q.float() - fmt.zero) * row_max / fmt.half) @ layer.dequantized_weight().T + layer.bias
    outputs = {name: layer._run(name, x) for name in ("int_mm", "onednn")}
    for name, out in outputs.items():
        torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-4, msg=name)
    assert (outputs["int_mm"] - float_layer(x)).abs().max() < 0.05 * float_layer(x).abs().max()


def test_static_kernels_agree(digits: tuple) -> None:
    float_layer, x = digits_linear(digits)
    model = nn.Sequential(float_layer)
    layer = mq.quantize(model, dtype="int8", mode="static", calibration_data=[x[:100], x[100:200]]).model[0]
    int_mm, onednn = layer._run("int_mm", x), layer._run("onednn", x)
    # the same integer sum; float32 epilogues may round differently by CPU (AMX: up to 2.4e-7 measured)
    reference, bound = layer._reference(x)
    for out in (int_mm, onednn):
        assert kernels.check.within(out[: len(reference)], reference, bound)[0]
    torch.testing.assert_close(int_mm, onednn, rtol=1e-5, atol=1e-5)
    assert (int_mm - float_layer(x)).abs().max() < 0.05 * float_layer(x).abs().max()


def test_quantize_per_row_is_exact_round_half_even() -> None:
    torch.manual_seed(0)
    for shape in ((3, 7), (300, 384), (100, 1024)):  # the last two take the amax + amin branch
        x = torch.randn(shape) * 5
        x[0] = 0.0  # an all-zero row stays finite: q of zeros with row_max clamped to 1e-12
        x[1, :4] = torch.tensor([127.0, 63.5, -0.5, 1.5])  # ties: 63.5 -> 64 (even), -0.5 -> -0, 1.5 -> 2
        row_max = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        expected = torch.round(x * (127.0 / row_max)).to(torch.int32)
        signed, got_max = kernels.quantize_per_row(x, kernels.SIGNED)
        unsigned, _ = kernels.quantize_per_row(x, kernels.Int8Input(torch.uint8, 0, 255))
        seven_bit, _ = kernels.quantize_per_row(x, kernels.Int8Input(torch.uint8, 0, 127))
        assert torch.equal(signed.to(torch.int32), expected) and torch.equal(got_max, row_max)
        assert torch.equal(unsigned.to(torch.int32) - 128, expected)
        expected_7 = torch.round(x * (63.0 / row_max)).to(torch.int32)
        assert torch.equal(seven_bit.to(torch.int32) - 64, expected_7) and int(seven_bit.max()) <= 127
        assert signed[0].abs().sum() == 0


@pytest.mark.parametrize("asymmetric", [False, True])
def test_int4_kernels_agree(asymmetric: bool) -> None:
    torch.manual_seed(0)
    float_layer = nn.Linear(256, 96).eval()
    config = mq.QuantizationConfig(dtype="int4", group_size=32, scheme="asymmetric" if asymmetric else "symmetric")
    layer = Int4Linear.from_float(float_layer, config)
    x = torch.randn(80, 256)
    reference = x @ layer.dequantized_weight().T + layer.bias
    packed, dequantized = layer._run("int4pack", x), layer._run("dequantize", x)
    torch.testing.assert_close(dequantized, reference, rtol=1e-5, atol=1e-4)
    # the packed kernel runs in bfloat16: agreement up to bf16 rounding of activations and scales
    assert (packed - reference).abs().max() < 0.02 * reference.abs().max()


def test_measure_mode_caches_one_winner_per_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def run(name: str) -> None:
        calls.append(name)

    x = torch.zeros(30, 16)
    name = choice.pick("test_kind", (8, 16), x, ("a", "b"), "b", run)
    assert name in ("a", "b")
    assert calls.count("a") == calls.count("b") == 1 + choice.MEASURE_REPEATS
    calls.clear()
    assert choice.pick("test_kind", (8, 16), torch.zeros(64, 16), ("a", "b"), "b", run) == name  # same bucket
    assert calls == []
    assert choice.chosen()["test_kind (8, 16) 9-64 cpu torch.float32"] == name
    choice.pick("test_kind", (8, 16), torch.zeros(65, 16), ("a", "b"), "b", run)  # a new bucket measures again
    assert len(calls) == 2 * (1 + choice.MEASURE_REPEATS)
    assert len([k for k in choice.chosen() if k.startswith("test_kind")]) == 2


def test_the_faster_candidate_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]  # a fake clock: no timing in unit tests
    monkeypatch.setattr(choice.time, "perf_counter", lambda: clock[0])

    jittery_calls = [0]

    def run(name: str) -> None:
        if name == "jittery":
            jittery_calls[0] += 1
        disturbed = name == "jittery" and jittery_calls[0] == 2  # its first timed call (after the warm-up)
        clock[0] += {"slow": 5.0, "fast": 1.0, "jittery": 10.0 if disturbed else 0.5}[name]

    assert choice.pick("race", (1, 1), torch.zeros(3, 1), ("slow", "fast"), "slow", run) == "fast"
    # best of the rounds: one disturbed call does not decide
    assert choice.pick("race2", (1, 1), torch.zeros(3, 1), ("fast", "jittery"), "fast", run) == "jittery"


def test_fixed_mode_uses_defaults_and_measures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    choice.set_kernel_choice("fixed")
    assert choice.kernel_choice() == "fixed"

    def run(name: str) -> None:
        raise AssertionError("fixed mode must not time candidates (only a reference check runs them)")

    assert choice.pick("test_kind", (8, 16), torch.zeros(30, 16), ("a", "b"), "b", run) == "b"
    assert choice.chosen() == {"test_kind (8, 16) 9-64 cpu torch.float32": "b"}
    # a small layer in fixed mode: _int_mm up to 64 rows, then oneDNN (when available)
    layer = Int8Linear.from_float(nn.Linear(32, 8), mq.QuantizationConfig(dtype="int8"))
    assert layer._kernel(torch.zeros(1, 32)) == layer._kernel(torch.zeros(64, 32)) == "int_mm"
    assert layer._kernel(torch.zeros(65, 32)) == ("onednn" if kernels.use_onednn(torch.zeros(6, 32)) else "int_mm")


def test_environment_variable_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MONO_QUANT_KERNELS", "fixed")
    monkeypatch.setattr(choice, "_mode", [None])
    assert choice.kernel_choice() == "fixed"
    monkeypatch.setenv("MONO_QUANT_KERNELS", "fastest")
    monkeypatch.setattr(choice, "_mode", [None])
    with pytest.raises(ConfigError, match="MONO_QUANT_KERNELS"):
        choice.kernel_choice()
    with pytest.raises(ConfigError, match="mode must be one of"):
        mq.set_kernel_choice("sometimes")


def test_nothing_is_measured_while_tracing() -> None:
    layer = Int8Linear.from_float(nn.Linear(32, 8), mq.QuantizationConfig(dtype="int8"))
    traced = torch.jit.trace(layer, torch.randn(5, 32), check_trace=False)
    assert choice.chosen() == {}
    torch.testing.assert_close(traced(torch.ones(5, 32)), layer(torch.ones(5, 32)))


def test_results_are_the_same_whichever_mode(digits: tuple) -> None:
    float_layer, x = digits_linear(digits)
    q = mq.quantize(nn.Sequential(float_layer), dtype="int8").model
    measured = q(x)
    choice.set_kernel_choice("fixed")
    # the same integer sums; the float32 epilogues may round differently on some CPUs (AMX)
    torch.testing.assert_close(q(x), measured, rtol=1e-5, atol=1e-5)


def test_save_load_is_unchanged_by_the_choice(tmp_path: Path, digits: tuple) -> None:
    float_layer, x = digits_linear(digits)
    q = mq.quantize(nn.Sequential(float_layer, nn.ReLU(), nn.Linear(48, 10)), dtype="int8").model
    expected = q(x)  # measures and packs oneDNN weights: caches, not state
    assert choice.chosen()
    state = q.state_dict()
    assert not any("onednn" in key or "choice" in key for key in state)
    mq.save(q, tmp_path / "m.safetensors")
    loaded = mq.load(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)))
    torch.testing.assert_close(loaded(x), expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_output_dtype_and_bias(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    float_layer = nn.Linear(128, 40).eval()  # 40 rows: padded to 48 inside the kernel, sliced back
    layer = Int4Linear.from_float(float_layer, mq.QuantizationConfig(dtype="int4", group_size=32))
    x = torch.randn(3, 128)
    out = layer(x.to(dtype))
    assert out.dtype == dtype and out.shape == (3, 40)
    reference = x @ layer.dequantized_weight().T + float_layer.bias.detach()
    assert (out.float() - reference).abs().max() < 0.03 * reference.abs().max()


def test_a_cached_choice_outside_this_calls_candidates_is_not_used() -> None:
    # eager calls cache "onednn"; inside torch.compile only "int_mm" is a candidate: the cache must not leak in
    choice.set_kernel_choice("fixed")
    choice.pick("test_leak", (8, 16), torch.zeros(30, 16), ("int_mm", "onednn"), "onednn", lambda name: None)
    assert choice.pick("test_leak", (8, 16), torch.zeros(30, 16), ("int_mm",), "int_mm", lambda name: None) == "int_mm"
    choice.set_kernel_choice("measure")


def test_torch_compile_after_eager_calls_runs_the_compile_path() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 16)).eval()
    q = mq.quantize(model, dtype="int8").model
    x = torch.randn(4, 256)
    with torch.no_grad():
        for _ in range(3):
            eager = q(x)  # caches a kernel per key (possibly oneDNN, which inductor cannot take)
        compiled = torch.compile(q)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-3, atol=1e-3)
