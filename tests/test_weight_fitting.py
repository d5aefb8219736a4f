"""algorithm='gptq'/'awq' through mq.quantize: real digits data, layer-by-layer fitting, files and errors."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

import mono_quant as mq
from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.modules import Int4Embedding, Int4Linear


@pytest.fixture(scope="module")
def digits() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 64-256-128-10 MLP trained on digits; calibration and held-out images."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:1200]), y[:1200]).backward()
        optimizer.step()
    return model.eval(), x[:1200], x[1200:]


def _output_error(model: nn.Module, quantized: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return torch.linalg.norm(model(x) - quantized(x)).item()


@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_fitted_int4_beats_round_to_nearest_on_held_out_digits(digits, algorithm: str) -> None:
    model, calibration, held_out = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = list(calibration.split(100))
    rtn = mq.quantize(model, dtype="int4", group_size=32).model
    fitted = mq.quantize(model, dtype="int4", group_size=32, algorithm=algorithm, calibration_data=batches)
    assert all(isinstance(fitted.model[i], Int4Linear) for i in (0, 2, 4))
    assert _output_error(model, fitted.model, held_out) < 0.9 * _output_error(model, rtn, held_out)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    if algorithm == "awq":  # 0 -> ReLU -> 2 and 2 -> ReLU -> 4 take a scale exactly
        assert any(note.startswith("AWQ scaling: 2 of 3 layer(s) over 2 proven") for note in fitted.report.notes)


def test_a_fitted_model_is_an_ordinary_file(digits, tmp_path) -> None:
    model, calibration, held_out = digits
    fitted = mq.quantize(model, dtype="int4", algorithm="gptq", group_size=32, calibration_data=[calibration]).model
    mq.save(fitted, tmp_path / "m.safetensors")
    loaded = mq.load(tmp_path / "m.safetensors", model=model)
    with torch.no_grad():
        assert torch.equal(loaded(held_out), fitted(held_out))


def test_layers_are_fitted_after_their_predecessors_are_quantized(digits) -> None:
    model, calibration, _ = digits
    seen: dict[str, InputStatistics] = {}
    result = mq.quantize(model, dtype="int4", algorithm="gptq", group_size=32, calibration_data=[calibration])
    # statistics on the float model's inputs give a different fit for layer 2 than the sequential one
    for name in ("0", "2"):
        stats = InputStatistics(model.get_submodule(name).in_features)
        stats.update(calibration if name == "0" else torch.relu(model[0](calibration)))
        seen[name] = stats
    seen["4"] = InputStatistics(128)
    seen["4"].update(torch.relu(model[2](torch.relu(model[0](calibration)))))
    on_float = mq.quantize(model, dtype="int4", algorithm="gptq", group_size=32, input_statistics=seen).model
    assert torch.equal(on_float[0].weight_packed, result.model[0].weight_packed)  # same inputs: same fit
    assert not torch.equal(on_float[2].weight_packed, result.model[2].weight_packed)


def test_embeddings_take_the_least_squares_ranges() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 8))
    model[0].weight.data[:, 3] *= 6  # an outlier feature stretches every group's min/max
    data = [torch.randint(0, 100, (16, 5)) for _ in range(2)]
    fitted = mq.quantize(model, dtype="int4", algorithm="gptq", group_size=32, calibration_data=data).model
    rtn = mq.quantize(model, dtype="int4", group_size=32).model
    assert isinstance(fitted[0], Int4Embedding)
    error = lambda q: (q[0].dequantized_weight() - model[0].weight).norm().item()  # noqa: E731
    assert error(fitted) < error(rtn)  # measured 9.04 vs 9.29: clipping trades the outlier for finer steps


def test_fitting_needs_data_and_names_what_is_missing(digits) -> None:
    model = digits[0]
    with pytest.raises(mq.CalibrationError, match="algorithm='gptq' fits weights to data: pass calibration_data"):
        mq.quantize(model, dtype="int4", algorithm="gptq")
    with pytest.raises(mq.CalibrationError, match="input_statistics has no entry for layer '0'"):
        mq.quantize(model, dtype="int4", algorithm="gptq", input_statistics={})
    with pytest.raises(mq.ConfigError, match="algorithm='awq' fits int4 weights; use it with dtype='int4'"):
        mq.QuantizationConfig(algorithm="awq")
    with pytest.raises(mq.ConfigError, match="algorithm='best' is not supported"):
        mq.QuantizationConfig(dtype="int4", algorithm="best")


def test_a_fitted_model_runs_in_onnx_runtime(digits, tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, calibration, held_out = digits
    fitted = mq.quantize(model, dtype="int4", algorithm="gptq", group_size=32, calibration_data=[calibration]).model
    with pytest.warns(UserWarning, match="no ONNX integer form"):  # int4 goes out as its dequantized weights
        path = mq.export_onnx(fitted, held_out[:4], tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: held_out.numpy()})[0]
    with torch.no_grad():
        want = fitted(held_out)
    assert torch.allclose(torch.from_numpy(got), want, atol=1e-2 * want.abs().max().item())
