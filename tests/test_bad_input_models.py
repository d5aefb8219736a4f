"""Bad models, configs, weights and calibration data: each a ``mono_quant`` error naming the argument,
the layer or the batch (or, for calibration limits, the correct result)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
import torch
from kit.bad_input import digits_inputs, expect, model
from torch import nn

import mono_quant as mq

QE, CE, CfgE, SE = mq.QuantizationError, mq.CalibrationError, mq.ConfigError, mq.SerializationError


def with_weight(value: float, size: int = 64) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(size, 8))
    with torch.no_grad():
        net[0].weight.uniform_(-0.1, 0.1)
        net[0].weight[0, 0], net[0].weight[0, 1] = value, -value
    return net


OVERFLOW_CASES = [
    ("int8 asym per-tensor 3.4e38", 3.4e38, {"dtype": "int8", "scheme": "asymmetric", "granularity": "per_tensor"}),
    ("int8 asym per-channel 3.4e38", 3.4e38, {"dtype": "int8", "scheme": "asymmetric"}),
    ("int8 asym weight-only 3.4e38", 3.4e38, {"dtype": "int8", "scheme": "asymmetric", "mode": "weight_only"}),
    ("int4 asym 3.4e38", 3.4e38, {"dtype": "int4", "scheme": "asymmetric", "group_size": 32}),
    ("fp16 1e30", 1e30, {"dtype": "fp16"}),
    ("fp16 7e4", 7e4, {"dtype": "fp16"}),
    ("fp16 65520", 65520.0, {"dtype": "fp16"}),
    ("bf16 3.4e38", 3.4e38, {"dtype": "bf16"}),
]


@pytest.mark.parametrize(("case", "value", "options"), OVERFLOW_CASES, ids=[c[0] for c in OVERFLOW_CASES])
def test_finite_weights_that_quantize_to_non_finite_values(case: str, value: float, options: dict) -> None:
    with expect(QE, "layer '0'"):
        mq.quantize(with_weight(value), **options)
    with expect(QE, "non-finite"):  # the state_dict path too
        mq.quantize(with_weight(value).state_dict(), **options)


@pytest.mark.parametrize(
    ("value", "options"),
    [
        (3.4e38, {"dtype": "int8"}),
        (1e30, {"dtype": "bf16"}),
        (1e30, {"dtype": "int4", "group_size": 32}),
    ],
)
def test_extreme_but_representable_weights_still_quantize(value: float, options: dict) -> None:
    result = mq.quantize(with_weight(value), **options)
    assert result.report.layers[0].name == "0" and torch.isfinite(result.model[0].dequantized_weight()).all()


def test_a_half_layer_whose_outputs_overflow_stays_float_with_the_reason() -> None:
    # 6e4 fits fp16, but the layer's outputs (about 6e4 x the inputs) do not: the output check keeps it float
    with pytest.warns(mq.errors.OutputCheckWarning):
        result = mq.quantize(with_weight(6e4), dtype="fp16")
    assert type(result.model[0]) is nn.Linear
    assert result.report.skipped["0"].startswith("kept float") and "fp16 -inf dB" in result.report.skipped["0"]


@pytest.mark.parametrize(
    ("value", "word"), [(float("nan"), "NaN or Inf"), (float("inf"), "NaN or Inf"), (-float("inf"), "'weight'")]
)
def test_non_finite_weights(value: float, word: str) -> None:
    with expect(QE, word):
        mq.quantize(with_weight(value))


MODEL_CASES = [
    ("string", "model.pt", "model of type str"),
    ("list", [1, 2], "model of type list"),
    ("int", 5, "model of type int"),
    ("state_dict entry", {"fc.weight": [1.0]}, "entry 'fc.weight'"),
]


@pytest.mark.parametrize(("case", "value", "word"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_not_a_model(case: str, value: Any, word: str) -> None:
    with expect(QE, word):
        mq.quantize(value)


CONFIG_CASES = [
    ({"dtype": "int3"}, "dtype"),
    ({"mode": "fast"}, "mode"),
    ({"group_size": 3}, "group_size=3"),
    ({"group_size": "128"}, "group_size='128'"),
    ({"percentile": 10}, "percentile=10"),
    ({"min_numel": -1}, "min_numel=-1"),
    ({"fold_batchnorm": "yes"}, "fold_batchnorm='yes'"),
    ({"calibration_batches": 0}, "calibration_batches=0"),
    ({"calibration_batches": -5}, "calibration_batches=-5"),
    ({"calibration_batches": 2.5}, "calibration_batches=2.5"),
    ({"calibration_batches": "10"}, "calibration_batches='10'"),
    ({"calibration_batches": True}, "calibration_batches=True"),
    ({"include": 5}, "include=5"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"dtype": "int4", "mode": "static"}, "mode='static'"),
]


@pytest.mark.parametrize(("options", "word"), CONFIG_CASES)
def test_bad_config_values(options: dict, word: str) -> None:
    with expect(CfgE, word):
        mq.quantize(model(), **options)


# -------------------------------------------------------------------------------------- calibration


def endless() -> Any:
    x = digits_inputs(256)
    for i in itertools.count():
        yield x[(i * 8) % 248 : (i * 8) % 248 + 8]


def test_endless_calibration_stops_at_the_default_limit() -> None:
    from mono_quant.engine.calibration import DEFAULT_BATCH_LIMIT, Calibrator

    net = model()
    calibrator = Calibrator({"0": net[0]}, mq.QuantizationConfig(mode="static"))
    assert DEFAULT_BATCH_LIMIT == 256 and calibrator.run(net, endless()) == DEFAULT_BATCH_LIMIT
    result = mq.quantize(model(), mode="static", calibration_data=endless())
    assert result.model[0].input_scale.item() > 0


@pytest.mark.parametrize("limit", [1, 3, 17])
def test_calibration_limit_is_overridable(limit: int) -> None:
    from mono_quant.engine.calibration import Calibrator

    net, seen = model(), []
    calibrator = Calibrator({"0": net[0]}, mq.QuantizationConfig(mode="static", calibration_batches=limit))
    assert calibrator.run(net, endless(), forward_fn=lambda m, b: seen.append(b) or m(b)) == limit == len(seen)
    assert calibrator.run(net, endless(), max_batches=2) == 2


def test_no_limit_reads_every_batch() -> None:
    from mono_quant.engine.calibration import Calibrator

    net = model()
    calibrator = Calibrator({"0": net[0]}, mq.QuantizationConfig(mode="static", calibration_batches=None))
    assert calibrator.run(net, list(digits_inputs(300).split(1))) == 300


CALIBRATION_CASES = [
    ("wrong width", [digits_inputs(8)[:, :32]], {}, "calibration batch 0 (a tensor of shape [8, 32])"),
    ("wrong width later", [digits_inputs(8), digits_inputs(8)[:, :7]], {}, "calibration batch 1"),
    ("unknown dict key", [{"pixels": digits_inputs(8)}], {}, "keys ['pixels']"),
    ("extra dict key", [{"input": digits_inputs(8), "mask": torch.ones(8)}], {}, "forward_fn"),
    ("tuple of wrong shape", [(digits_inputs(8).reshape(8, 8, 8), torch.zeros(8))], {}, "a tuple of 2"),
    ("strings", [["a", "b"]], {}, "calibration batch 0"),
    ("string batch", ["abc"], {}, "calibration batch 0"),
    ("int batch", [5], {}, "forward_fn"),
    ("empty list", [], {}, "is empty"),
    ("None", None, {}, "calibration_data"),
    ("not iterable", 5, {}, "not iterable"),
    (
        "forward_fn raises",
        [digits_inputs(8)],
        {"forward_fn": lambda m, b: m(b, b)},
        "forward_fn failed on calibration batch 0",
    ),
    ("NaN activations", [torch.full((8, 64), float("nan"))], {}, "NaN"),
    ("overflowing activations", [torch.full((8, 64), 3e38), torch.full((8, 64), -3e38)], {}, "layer '0'"),
]


@pytest.mark.parametrize(("case", "data", "options", "word"), CALIBRATION_CASES, ids=[c[0] for c in CALIBRATION_CASES])
def test_bad_calibration_data(case: str, data: Any, options: dict, word: str) -> None:
    with expect(CE, word):
        mq.quantize(model(), mode="static", calibration_data=data, **options)


def test_activation_range_that_overflows_the_scale() -> None:
    data = [torch.full((8, 64), 3e38), torch.full((8, 64), -3e38)]
    with expect(CE, "layer '0': the calibrated input scale inf is not a finite positive number"):
        mq.quantize(nn.Sequential(nn.Linear(64, 8)), mode="static", calibration_data=data)


def _saved_statistics(observer: str = "minmax") -> tuple[Any, dict]:
    net = model()
    calibrator = mq.Calibrator({"0": net[0]}, mq.QuantizationConfig(mode="static", observer=observer))
    calibrator.run(net, [digits_inputs(8)])
    return calibrator, {name: dict(state) for name, state in calibrator.state_dict().items()}


STATE_CASES = [
    ("not a mapping", lambda s: "garbage", "observer state is a str"),
    ("layer not a mapping", lambda s: {"0": "garbage"}, "observer state ['0'] has a str"),
    ("missing layer", lambda s: {}, "no entry for layer(s) ['0']"),
    ("string value", lambda s: s["0"].update(min_val="x") or s, "['0']['min_val'] is a str; expected a float tensor"),
    ("unknown key", lambda s: s["0"].update(extra=torch.ones(())) or s, "expected the keys ['batches', 'max_val'"),
    ("wrong shape", lambda s: s["0"].update(max_val=torch.ones(3)) or s, "['0']['max_val'] is torch.float32 [3]"),
    ("float count", lambda s: s["0"].update(batches=torch.tensor(1.5)) or s, "['0']['batches'] is torch.float32 []"),
    ("negative count", lambda s: s["0"].update(batches=torch.tensor(-2)) or s, "['0']['batches'] is -2"),
]


@pytest.mark.parametrize(("case", "corrupt", "word"), STATE_CASES, ids=[c[0] for c in STATE_CASES])
def test_bad_observer_state(case: str, corrupt: Any, word: str) -> None:
    calibrator, state = _saved_statistics()
    before = calibrator.qparams()["0"].scale.item()
    with expect(CE, word):
        calibrator.load_state_dict(corrupt(state))
    assert calibrator.qparams()["0"].scale.item() == before  # nothing was assigned


def test_histogram_state_into_a_minmax_calibrator() -> None:
    calibrator, _ = _saved_statistics()
    _, histogram = _saved_statistics("histogram")
    with expect(CE, "observer state ['0'] has ['batches', 'counts', 'max_val', 'min_val', 'range_exp']"):
        calibrator.load_state_dict(histogram)


UINT8_CASES = [
    ("linear dynamic", lambda: nn.Sequential(nn.Linear(16, 8)), (4, 16), {}),
    ("linear weight_only", lambda: nn.Sequential(nn.Linear(16, 8)), (4, 16), {"mode": "weight_only"}),
    ("linear static", lambda: nn.Sequential(nn.Linear(16, 8)), (4, 16), {"mode": "static"}),
    ("conv dynamic", lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), (2, 3, 8, 8), {}),
    ("conv static", lambda: nn.Sequential(nn.Conv2d(3, 4, 3)), (2, 3, 8, 8), {"mode": "static"}),
]


@pytest.mark.parametrize(("case", "make", "shape", "options"), UINT8_CASES, ids=[c[0] for c in UINT8_CASES])
def test_a_uint8_input_is_refused_like_the_float_layer_refuses_it(
    case: str, make: Any, shape: tuple, options: dict
) -> None:
    """The float layer refuses uint8 (a RuntimeError from torch); so does the quantized one (it used to cast its
    output back to uint8, negative values wrapping, or answer in float32 through the fused CNN graph)."""
    torch.manual_seed(0)
    float_model = make().eval()
    x = torch.randint(0, 256, shape, dtype=torch.uint8)
    with pytest.raises(Exception) as float_error:
        float_model(x)
    q = mq.quantize(float_model, calibration_data=[x.float()], **options).model
    with pytest.raises(type(float_error.value)):
        q(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_floating_input_keeps_its_dtype_through_int8_linear(dtype: torch.dtype) -> None:
    q = mq.quantize(nn.Sequential(nn.Linear(16, 8))).model
    x = torch.randn(4, 16)
    out = q(x.to(dtype))
    assert out.dtype == dtype and torch.allclose(out.float(), q(x), atol=0.05 * q(x).abs().max().item())


def test_forward_fn_fixes_a_dict_batch() -> None:
    data = [{"pixels": x} for x in digits_inputs(64).split(16)]
    result = mq.quantize(model(), mode="static", calibration_data=data, forward_fn=lambda m, b: m(b["pixels"]))
    assert result.model[0].input_scale.item() > 0


# ------------------------------------------------------------------------------------- load into model


LOAD_CASES = [
    ("wider layer", lambda: nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)), "weight shape"),
    ("missing layer", lambda: nn.Sequential(nn.Linear(64, 64)), "not in the given model"),
    ("other type", lambda: nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Conv1d(64, 10, 1)), "Conv1d"),
    ("not a module", lambda: {"0.weight": torch.zeros(1)}, "expected a torch.nn.Module"),
]


@pytest.mark.parametrize(("case", "make", "word"), LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_into_the_wrong_model(case: str, make: Any, word: str, tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    mq.save(mq.quantize(model()), str(path))
    with expect(SE, word):
        mq.load(path, make())


# ---------------------------------------------------------------------- left to the lead (issue 9)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(16, 64), nn.Linear(64, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(0, 4), nn.Embedding(0, 8), nn.Conv2d(3, 0, 3)],
    ids=["Linear(0,4)", "Embedding(0,8)", "Conv2d(3,0,3)"],
)
def test_zero_size_layers_are_skipped(layer: nn.Module) -> None:
    result = mq.quantize(nn.Sequential(layer))
    assert result.skipped == ["0"]


def test_meta_device_model() -> None:
    with expect(QE, "meta"):
        mq.quantize(nn.Sequential(nn.Linear(4, 4, device="meta")))


def test_string_config() -> None:
    result = mq.quantize(model(), "int8")
    assert type(result.model[0]).__name__ == "Int8Linear"


def test_tied_weights_stay_one_tensor() -> None:
    q = mq.quantize(Tied()).model
    assert q.emb.weight.data_ptr() == q.head.weight.data_ptr()


def test_load_returns_eval_mode(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    mq.save(mq.quantize(model()), str(path))
    assert not mq.load(path, model().train()).training


class Gain(nn.Module):
    """A user layer for the plugin case: y = x * w."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def test_plugin_without_dequantize_is_named(tmp_path: Path) -> None:
    from mono_quant.modules import QUANTIZED_CLASSES, REGISTRY

    @mq.register(Gain)
    class Int8GainNoDequantize(nn.Module, mq.QuantizedLayer):  # implements everything but dequantize()
        dtypes, bits, weight_ranks = (mq.QuantDtype.INT8,), 8, (1,)

        def __init__(self, n: int) -> None:
            super().__init__()
            self.register_buffer("weight", torch.zeros(n, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(()))

        @classmethod
        def from_float(cls, module: nn.Module, config: Any, activation: Any = None) -> nn.Module:
            layer = cls(module.weight.numel())
            layer.weight_scale = module.weight.detach().abs().max() / 127
            layer.weight = torch.round(module.weight.detach() / layer.weight_scale).to(torch.int8)
            return layer

        @classmethod
        def from_metadata(cls, module: nn.Module, metadata: dict) -> nn.Module:
            return cls(metadata["shape"][0])

        def metadata(self) -> dict:
            return {"kind": "Gain", "mode": "weight_only", "bits": 8, "scheme": "symmetric"}

        def dequantized_weight(self) -> torch.Tensor:
            return self.weight.float() * self.weight_scale

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.dequantized_weight()

    try:
        q, _ = mq.dynamic_quantize(nn.Sequential(Gain(8)))
        mq.save(q, tmp_path / "gain.safetensors")
        assert type(mq.load(tmp_path / "gain.safetensors", nn.Sequential(Gain(8)))[0]) is Int8GainNoDequantize
        with expect(CfgE, "Int8GainNoDequantize does not implement dequantize()"):
            mq.load(tmp_path / "gain.safetensors", nn.Sequential(Gain(8)), dequantize=True)
        with expect(CfgE, "layer '0': Int8GainNoDequantize does not implement dequantize()"):
            mq.dequantize(q)
        state, _ = mq.load(tmp_path / "gain.safetensors", dequantize=True)  # tensors only: dequantized_weight()
        assert torch.equal(state["0.weight"], q[0].dequantized_weight())
    finally:
        REGISTRY.pop(Gain, None)
        QUANTIZED_CLASSES.pop("Int8GainNoDequantize", None)


class WithBuffer(nn.Module):
    """A model with a non-persistent buffer (rotary frequencies, transformers' position_ids)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 32)
        self.register_buffer("freq", torch.arange(32.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * self.freq


def test_state_dict_buffers_load_and_a_meta_skeleton_missing_one_is_named(tmp_path: Path) -> None:
    float_model = WithBuffer().eval()
    carried = mq.quantize({**float_model.state_dict(), "freq": float_model.freq * 2})  # a checkpoint keeping it
    mq.save(carried, tmp_path / "carried.safetensors")
    loaded = mq.load(tmp_path / "carried.safetensors", WithBuffer())
    assert torch.equal(loaded.freq, float_model.freq * 2) and type(loaded.fc).__name__ == "Int8Linear"
    with torch.device("meta"):
        skeleton = WithBuffer()
    assert torch.equal(mq.load(tmp_path / "carried.safetensors", skeleton).freq, float_model.freq * 2)
    wrong = mq.quantize({**float_model.state_dict(), "freq": torch.zeros(3)})
    mq.save(wrong, tmp_path / "wrong.safetensors")
    with expect(SE, "tensor 'freq' is float32 [3] in the file but the given model expects float32 [32]"):
        mq.load(tmp_path / "wrong.safetensors", WithBuffer())
    plain = mq.quantize(float_model.state_dict())  # no buffer in the file
    mq.save(plain, tmp_path / "plain.safetensors")
    with torch.device("meta"):
        skeleton = WithBuffer()
    with expect(SE, "tensor 'freq' of the given model is on the meta device and the file does not hold it"):
        mq.load(tmp_path / "plain.safetensors", skeleton)


def test_activation_qparams_that_are_plain_tuples_are_named() -> None:
    with expect(CfgE, "activation_qparams['0'] is a tuple; expected mq.ActivationQParams"):
        mq.quantize(nn.Sequential(nn.Linear(8, 4)), mode="static", activation_qparams={"0": (0.1, 0)})
