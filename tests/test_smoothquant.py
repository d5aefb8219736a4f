"""Channel scaling proven by data flow, and SmoothQuant for static int8 on top of it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.algorithms.smoothquant import smooth, smoothing_scales
from mono_quant.errors import ConfigError, QuantizationError
from mono_quant.graph.channel_scaling import ScaleSite, find_scale_sites, scale_site
from mono_quant.qparams import sqnr_db


class PreLNBlock(nn.Module):
    """x + o(softmax(q k^T) v) over LayerNorm(x), then x + fc2(relu(fc1(LayerNorm(x)))): pre-LN transformer."""

    def __init__(self, width: int = 32, outliers: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)
        with torch.no_grad():
            for ln in (self.ln1, self.ln2):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.normal_(0, 0.1)
                ln.weight[list(outliers)] *= 50.0  # outlier channels, as in LLM activations
            for layer in (self.q, self.k, self.v, self.o, self.fc1, self.fc2):
                layer.weight.normal_(0, width**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        x = x + self.o(attention @ v)
        return x + self.fc2(torch.relu(self.fc1(self.ln2(x))))


class ResidualSource(nn.Module):
    """``a``'s output feeds ``b`` and the residual add: scaling ``a`` cannot be undone by ``b`` alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) + h


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def _bit_exact(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == snapshot.keys() and all(torch.equal(state[k], v) for k, v in snapshot.items())


def test_sites_of_a_pre_ln_block_keep_the_float_output() -> None:
    torch.manual_seed(0)
    model = PreLNBlock().eval()
    x = torch.randn(2, 10, 32)
    before, snapshot = model(x), _snapshot(model)
    sites = find_scale_sites(model, ["q", "k", "v", "o", "fc1", "fc2"], x)
    assert _bit_exact(model, snapshot)  # finding sites leaves the model as it was
    assert sites == [
        ScaleSite("ln1", ("q", "k", "v"), 32),
        ScaleSite("v", ("o",), 32),  # through the softmax-weighted sum over tokens
        ScaleSite("ln2", ("fc1",), 32),
        ScaleSite("fc1", ("fc2",), 64),  # through ReLU (positively homogeneous)
    ]
    for site in sites:
        scale_site(model, site, torch.rand(site.channels) * 20 + 0.05)
    after = model(x)
    assert not _bit_exact(model, snapshot)
    assert (after - before).norm() / before.norm() < 1e-5


def test_a_source_that_also_feeds_a_residual_is_refused_and_restored_bit_exactly() -> None:
    torch.manual_seed(0)
    model = ResidualSource()
    snapshot = _snapshot(model)
    assert find_scale_sites(model, ["b"], torch.randn(8, 16)) == []
    assert _bit_exact(model, snapshot)


def test_a_source_behind_gelu_is_refused_and_restored_bit_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    snapshot = _snapshot(model)
    assert find_scale_sites(model, ["2"], torch.randn(8, 16)) == []
    assert _bit_exact(model, snapshot)
    relu = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))  # the same with ReLU is proven
    assert find_scale_sites(relu, ["2"], torch.randn(8, 16)) == [ScaleSite("0", ("2",), 16)]


def test_rms_norm_source_is_proven() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.RMSNorm(16), nn.Linear(16, 8))
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 2.0)
    assert find_scale_sites(model, ["1"], torch.randn(4, 16)) == [ScaleSite("0", ("1",), 16)]


def test_bad_arguments_are_named() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    site = ScaleSite("0", ("2",), 3)
    with pytest.raises(QuantizationError, match="s must be a 1-D tensor of 3"):
        scale_site(model, site, torch.ones(4))
    with pytest.raises(QuantizationError, match="finite and positive"):
        scale_site(model, site, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(QuantizationError, match=r"site\.consumers names 'nope'"):
        scale_site(model, ScaleSite("0", ("nope",), 3), torch.ones(3))
    with pytest.raises(QuantizationError, match="consumers entry '1' is a ReLU"):
        find_scale_sites(model, ["1"], torch.randn(2, 4))
    with pytest.raises(ConfigError, match=r"alpha=1\.5"):
        smoothing_scales(torch.ones(3), [torch.ones(2, 3)], 1.5)


def test_smoothing_scales_follow_the_paper() -> None:
    x_max = torch.tensor([100.0, 1.0, 4.0])
    w = torch.tensor([[0.5, 2.0, 1.0], [-1.0, 0.5, 0.25]])
    s = smoothing_scales(x_max, [w, 2 * w], 0.75)
    expected = x_max.double() ** 0.75 / torch.tensor([2.0, 4.0, 2.0], dtype=torch.float64) ** 0.25
    assert torch.allclose(s, expected)


def _outlier_model() -> tuple[nn.Module, list[torch.Tensor], list[torch.Tensor]]:
    torch.manual_seed(0)
    model = PreLNBlock(64, outliers=(3, 17, 40)).eval()
    calibration = [torch.randn(4, 16, 64) for _ in range(4)]
    held_out = [torch.randn(4, 16, 64) for _ in range(4)]
    return model, calibration, held_out


def _sqnr(model: nn.Module, quantized: nn.Module, data: list[torch.Tensor]) -> float:
    with torch.no_grad():
        reference = torch.cat([model(x).reshape(-1) for x in data])
        approximation = torch.cat([quantized(x).reshape(-1) for x in data])
    return sqnr_db(reference, approximation)


@pytest.mark.slow
def test_smoothquant_improves_static_int8_on_outlier_channels() -> None:
    model, calibration, held_out = _outlier_model()
    options = {"dtype": "int8", "mode": "static", "calibration_data": calibration, "min_output_sqnr_db": 0.0}
    plain = mq.quantize(model, **options)
    smoothed = mq.quantize(model, smoothquant=0.5, **options)
    assert [row.kind for row in smoothed.report.layers] == [row.kind for row in plain.report.layers]
    assert all(row.mode == "static" for row in smoothed.report.layers)
    note = next(n for n in smoothed.report.notes if n.startswith("SmoothQuant"))
    assert "6 of 6 layer(s) smoothed over 4 proven source(s)" in note
    plain_db, smoothed_db = _sqnr(model, plain.model, held_out), _sqnr(model, smoothed.model, held_out)
    assert smoothed_db > plain_db + 6.0, (plain_db, smoothed_db)


def test_layers_without_a_provable_source_are_counted() -> None:
    torch.manual_seed(0)
    model = ResidualSource()
    result = mq.quantize(model, dtype="int8", mode="static", calibration_data=[torch.randn(8, 16)], smoothquant=0.5)
    note = next(n for n in result.report.notes if n.startswith("SmoothQuant"))
    assert note.endswith("0 of 2 layer(s) smoothed over 0 proven source(s); 2 not smoothed (no provable source): a, b")
    done = smooth(copy.deepcopy(model), ["a", "b"], 0.5, [torch.randn(8, 16)])
    assert done.sites == [] and done.unproven == ("a", "b")


@pytest.mark.slow
def test_the_users_model_is_never_mutated_and_files_round_trip(tmp_path) -> None:
    model, calibration, held_out = _outlier_model()
    snapshot = _snapshot(model)
    result = mq.quantize(model, dtype="int8", mode="static", calibration_data=calibration, smoothquant=0.75)
    assert _bit_exact(model, snapshot)
    assert model.ln1.weight[3] > 10  # still the user's outlier weights
    path = tmp_path / "smoothed.safetensors"
    mq.save(result.model, path)
    skeleton = PreLNBlock(64)
    loaded = mq.load(path, skeleton)
    with torch.no_grad():
        for x in held_out:
            assert torch.equal(loaded(x), result.model(x))


def test_smoothquant_refuses_precomputed_activation_qparams() -> None:
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    calibrator = mq.Calibrator({"1": model[1]}, mq.QuantizationConfig(mode="static"))
    calibrator.run(model, [torch.randn(4, 8)])
    with pytest.raises(ConfigError, match="activation_qparams"):
        mq.quantize(model, mode="static", smoothquant=0.5, activation_qparams=calibrator.qparams())
