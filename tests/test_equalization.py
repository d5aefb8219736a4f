"""Cross-layer equalization (``equalize=True``): pairs proven by data flow, float output unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.errors import ConfigError
from mono_quant.graph.equalization import equalize_pairs


class Net(nn.Module):
    """conv->ReLU->conv (equalizable), conv->ReLU6->conv and a residual add (not), then a Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)  # a -> ReLU -> b
        self.c = nn.Conv2d(8, 8, 1)  # b -> ReLU6 -> c
        self.d = nn.Conv2d(8, 8, 3, padding=1)  # c -> d, but c's output also goes to the residual add
        self.head = nn.Linear(8, 5)  # d -> pool -> head: d's output is also in the add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.a(x))
        x = nn.functional.relu6(self.b(x))
        x = self.c(x)
        x = x + self.d(x)
        return self.head(x.mean((2, 3)))


def _net() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        for conv in (net.a, net.b, net.c, net.d):
            conv.weight.mul_(3.0)  # activations well past 6 so ReLU6 clips
    return net


def test_equalizes_relu_pair_refuses_relu6_and_residual_and_keeps_output() -> None:
    net = _net()
    x = torch.randn(4, 3, 12, 12)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        expected = net(x)
        pairs = equalize_pairs(net, x)
        got = net(x)
    assert pairs == [("a", "b")]  # b -> c (ReLU6) and c -> d (residual) match by channel count: refused by data flow
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    state = net.state_dict()
    assert not torch.equal(state["a.weight"], before["a.weight"])
    assert not torch.equal(state["b.weight"], before["b.weight"])
    for key in ("c.weight", "c.bias", "d.weight", "d.bias", "head.weight", "head.bias"):
        assert torch.equal(state[key], before[key]), key  # refused pairs untouched, bit for bit
    assert torch.equal(state["b.bias"], before["b.bias"])  # b is only the second of its pair


def test_channel_ranges_differing_100x_are_equalized() -> None:
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 1))
    with torch.no_grad():
        net[0].weight[1].mul_(100.0)
        net[0].bias[1].mul_(100.0)
    x = torch.randn(2, 3, 10, 10)
    r1 = net[0].weight.detach().abs().flatten(1).amax(1)
    assert r1.max() / r1.min() > 30
    expected = net(x).detach()
    assert equalize_pairs(net, x) == [("0", "2")]
    r1 = net[0].weight.detach().abs().flatten(1).amax(1)
    r2 = net[2].weight.detach().abs().transpose(0, 1).flatten(1).amax(1)
    assert torch.allclose(r1, r2, rtol=1e-4)  # both sides of every channel share one range
    assert r1.max() / r1.min() < 15  # sqrt of the former spread or better
    assert torch.allclose(net(x), expected, rtol=1e-4, atol=1e-5)


def test_quantize_equalizes_a_copy_and_reports_the_pairs() -> None:
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    data = [torch.randn(8, 3, 12, 12) for _ in range(2)]
    result = mq.quantize(net, mode="static", calibration_data=data, equalize=True)
    assert any(note.startswith("equalize: 1 conv/linear pair") for note in result.report.notes)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key  # the user's model is never changed
    with torch.inference_mode():
        assert mq.qparams.sqnr_db(net(data[0]), result.model(data[0])) > 25


def test_equalize_without_data_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="equalize=True"):
        mq.quantize(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), equalize=True)
