"""Quantized LSTM, GRU, LSTMCell, GRUCell against their float layers on random sequences, and through the API."""

from __future__ import annotations

import json

import pytest
import torch
from kit.helpers import SEVEN_BIT_CPU
from safetensors import safe_open
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import mono_quant as mq
from mono_quant.qparams import sqnr_db

CONFIGS = {
    "lstm": lambda: nn.LSTM(16, 32),
    "lstm-batch-first": lambda: nn.LSTM(16, 32, batch_first=True),
    "lstm-stacked-bidirectional": lambda: nn.LSTM(16, 32, num_layers=2, bidirectional=True),
    "lstm-proj": lambda: nn.LSTM(16, 32, num_layers=2, proj_size=8, batch_first=True),
    "lstm-no-bias": lambda: nn.LSTM(16, 32, bias=False),
    "gru": lambda: nn.GRU(16, 32),
    "gru-stacked-bidirectional-batch-first": lambda: nn.GRU(16, 32, num_layers=2, bidirectional=True, batch_first=True),
}

FLOOR_DB = 33 if SEVEN_BIT_CPU else 38  # 7-bit codes (no VNNI) cost about 5 dB (benchmarks/numerics.py)


def _outputs(result: object) -> list[torch.Tensor]:
    """Every tensor a recurrent layer returns (output, h, c), flattened."""
    if isinstance(result, torch.Tensor):
        return [result]
    return [t for item in result for t in _outputs(item)]


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_recurrent_layer_tracks_float_on_random_sequences(config, mode):
    layer = CONFIGS[config]().eval()
    x = torch.randn(6, 25, 16)  # [T, B, I] or [B, T, I]: both are valid shapes
    q = mq.quantize(nn.Sequential(layer), mode=mode).model[0]
    assert type(q).__name__ == f"Quantized{type(layer).__name__}"
    with torch.inference_mode():
        for reference, output in zip(_outputs(layer(x)), _outputs(q(x)), strict=True):
            assert reference.shape == output.shape
            assert sqnr_db(reference, output) > FLOOR_DB, f"{config}/{mode}: {sqnr_db(reference, output):.1f} dB"
        # unbatched input with a given initial state
        unbatched = x[0]
        h0 = torch.randn(_outputs(layer(unbatched))[1].shape)
        state = (h0, torch.randn(_outputs(layer(unbatched))[2].shape)) if isinstance(layer, nn.LSTM) else h0
        for reference, output in zip(_outputs(layer(unbatched, state)), _outputs(q(unbatched, state)), strict=True):
            assert sqnr_db(reference, output) > FLOOR_DB


@pytest.mark.parametrize("mode", ["dynamic", "weight_only"])
@pytest.mark.parametrize("float_type", [nn.LSTMCell, nn.GRUCell])
def test_cells_track_float(float_type, mode):
    cell = float_type(16, 32).eval()
    q = mq.quantize(nn.Sequential(cell), mode=mode).model[0]
    assert q.weight_hh.dtype == torch.int8
    x = torch.randn(20, 5, 16)
    h_ref = h_q = None
    with torch.inference_mode():
        for step in x:  # 20 steps fed back through the state: errors must not grow out of hand
            h_ref, h_q = cell(step, h_ref), q(step, h_q)
        reference, output = _outputs(h_ref)[0], _outputs(h_q)[0]
        assert sqnr_db(reference, output) > 35
        assert _outputs(q(x[0, 0]))[0].shape == (32,)  # unbatched


@pytest.mark.parametrize("float_type", [nn.LSTM, nn.GRU])
def test_fixed_scale_step_handles_large_initial_states_and_autograd(float_type):
    """The dynamic step quantizes h with a scale fixed per sequence (|h| <= max(1, |h_0|)): an h_0 far outside
    (-1, 1) must widen that scale, not clip; inputs autograd records take the per-row step and agree."""
    torch.manual_seed(0)
    layer = float_type(16, 32, num_layers=2, bidirectional=True).eval()
    q = mq.quantize(nn.Sequential(layer), mode="dynamic").model[0]
    x, h0 = torch.randn(25, 6, 16), 4 * torch.randn(4, 6, 32)
    state = (h0, 4 * torch.randn(4, 6, 32)) if float_type is nn.LSTM else h0
    with torch.no_grad():
        reference, fixed = _outputs(layer(x, state)), _outputs(q(x, state))
    for expected, output in zip(reference, fixed, strict=True):
        assert sqnr_db(expected, output) > (FLOOR_DB - 8 if float_type is nn.GRU else FLOOR_DB)  # GRU: wider scale
    per_row = _outputs(q(x.requires_grad_(), state))
    assert sqnr_db(reference[0], per_row[0].detach()) > FLOOR_DB


def test_packed_sequences_are_refused_with_a_clear_error():
    q = mq.quantize(nn.Sequential(nn.LSTM(4, 8)), mode="dynamic").model[0]
    packed = pack_padded_sequence(torch.randn(5, 2, 4), torch.tensor([5, 3]))
    with pytest.raises(TypeError, match="QuantizedLSTM does not take a PackedSequence; pass the padded tensor"):
        q(packed)


@pytest.mark.parametrize("config", ["lstm-stacked-bidirectional", "lstm-proj", "gru"])
def test_save_load_is_exact_and_dequantize_gives_the_float_layer(config, tmp_path):
    model = nn.Sequential(CONFIGS[config]()).eval()
    result = mq.quantize(model)
    path = tmp_path / "m.safetensors"
    mq.save(result.model, path, report=result.report)
    loaded = mq.load(path, nn.Sequential(CONFIGS[config]()))
    x = torch.randn(7, 3, 16)
    with torch.inference_mode():
        for a, b in zip(_outputs(result.model(x)), _outputs(loaded(x)), strict=True):
            assert torch.equal(a, b)
        plain = mq.dequantize(loaded)
        assert type(plain[0]) is type(model[0])
        for a, b in zip(_outputs(model(x)), _outputs(plain(x)), strict=True):
            assert sqnr_db(a, b) > 38
    state_dict, _ = mq.load(path, dequantize=True)
    assert set(state_dict) == set(model.state_dict())
    assert result.report.bytes_after < 0.4 * result.report.bytes_before  # int8 matrices, float32 biases


def test_the_file_records_the_precision_of_every_matrix(tmp_path):
    torch.manual_seed(0)
    lstm = nn.LSTM(6, 16, num_layers=2)
    x = torch.randn(12, 3, 6)
    x[..., 0] /= 1000  # one raw feature in other units: small values, weights 1000x larger
    with torch.no_grad():
        lstm.weight_ih_l0[:, 0] *= 1000
    result = mq.quantize(nn.Sequential(lstm), calibration_data=[x])  # the output check moves the input matrix
    row = result.report.layers[0]
    assert row.note.startswith("moved to int8 with a float32 input matrix") and row.output_sqnr_db > 25
    path = tmp_path / "m.safetensors"
    mq.save(result.model, path)
    with safe_open(path, "pt") as handle:
        entry = json.loads(handle.metadata()["mono_quant"])["layers"]["0"]
    assert entry["matrices"] == {
        "weight_ih_l0": "float32",
        "weight_hh_l0": "int8",
        "weight_ih_l1": "int8",
        "weight_hh_l1": "int8",
    }
    assert result.model[0].weight_ih_l0.dtype == torch.float32
    assert result.model[0].weight_ih_l1.dtype == torch.int8


def test_a_file_with_broken_recurrent_arguments_is_refused(tmp_path):
    result = mq.quantize(nn.Sequential(nn.GRU(4, 8)))
    path = tmp_path / "m.pt"
    mq.save(result.model, path)
    payload = torch.load(path, weights_only=True)
    document = json.loads(payload["mono_quant"])
    document["layers"]["0"]["recurrent"]["hidden_size"] = -8
    payload["mono_quant"] = json.dumps(document)
    torch.save(payload, path)
    with pytest.raises(mq.SerializationError, match=r"layer '0': recurrent.hidden_size=-8; expected a non-negative"):
        mq.load(path, nn.Sequential(nn.GRU(4, 8)))


class ConvFrontEnd(nn.Module):
    """An audio-style front end: Conv1d over features, then an LSTMCell stepped by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 16, 3, padding=1)
        self.cell = nn.LSTMCell(16, 32)
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [batch, 8 features, time]
        features = torch.relu(self.conv(x)).transpose(1, 2)
        state = None
        for t in range(features.shape[1]):
            state = self.cell(features[:, t], state)
        return self.head(state[0])


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_conv1d_and_lstm_cell_model_quantizes_end_to_end(mode, tmp_path):
    model = ConvFrontEnd().eval()
    x = torch.randn(4, 8, 30)
    result = mq.quantize(model, mode=mode, calibration_data=[x])
    assert result.skipped == []
    kinds = {row.name: (row.kind, row.mode) for row in result.report.layers}
    assert kinds["cell"] == ("LSTMCell", "dynamic")  # static asks run the recurrent layer dynamic
    with torch.inference_mode():
        assert sqnr_db(model(x), result.model(x)) > 30
        path = tmp_path / "m.safetensors"
        mq.save(result.model, path)
        assert torch.equal(mq.load(path, ConvFrontEnd())(x), result.model(x))


def test_quantize_with_budget_moves_one_recurrent_layer_up_the_ladder():
    model = nn.Sequential(nn.LSTM(16, 32), nn.GRU(32, 32)).eval()

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return m[1](m[0](x)[0])[0]

    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return run(self.inner, x)

    wrapped = Wrapper(model).eval()
    x = torch.randn(10, 4, 16)
    reference = wrapped(x).detach()

    def score(m: nn.Module) -> float:
        with torch.inference_mode():
            return -nn.functional.mse_loss(m(x), reference).item()

    quantized_mse = -score(mq.quantize(wrapped).model)
    result = mq.quantize_with_budget(wrapped, score, max_drop=quantized_mse / 2, sensitivity_data=x)
    assert result.reached
    rungs = {type(m).__name__ for m in result.model.modules()}
    assert len(rungs & {"QuantizedLSTM", "QuantizedGRU"}) == 1  # exactly one recurrent layer went to float
