"""Fused static CNN inference (``mono_quant/cnn_fusion.py``) agrees with the unfused int8 path on real digits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from kit.helpers import Net
from sklearn.datasets import load_digits
from torch import nn

import mono_quant as mq
from mono_quant.graph import fused_graph as cnn_fusion
from mono_quant.kernels.numerics import uint8_high
from mono_quant.qparams import sqnr_db

pytestmark = pytest.mark.skipif(not cnn_fusion.kernels.use_onednn_conv(torch.empty(0)), reason="needs oneDNN")

FULL_UINT8 = uint8_high() == 255  # 7-bit CPUs (no VNNI) hand floats between convs: no uint8 chaining


def _digits() -> torch.Tensor:
    images = torch.tensor(load_digits().images[:96], dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)


@pytest.fixture(scope="module")
def setup() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, data = Net().eval(), _digits()
    with torch.no_grad():  # BatchNorm statistics from real images, so folding has something to fold
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    q = mq.quantize(model, mode="static", calibration_data=list(data[:64].split(16))).model
    return model, q, data[64:]


def test_every_conv_is_fused_with_uint8_between_chained_convs(setup: tuple) -> None:
    _, q, _ = setup
    graph = q.forward.graph
    fused = [m for m in graph.modules() if isinstance(m, cnn_fusion.FusedConv)]
    assert len(fused) == 9  # stem, 3 x 2 block convs, one projection, depthwise
    uint8_outputs = sum(m.out_qparams is not None for m in fused)
    assert sum(m.unary[0] == "relu" for m in fused) >= 6 and (uint8_outputs >= 3 if FULL_UINT8 else uint8_outputs == 0)
    code = graph.code
    assert "torch.add" not in code and "relu" not in code  # every add and ReLU went into oneDNN


def test_fused_matches_the_unfused_int8_path(setup: tuple) -> None:
    model, q, x = setup
    with torch.inference_mode():
        fused, eager, reference = q(x), type(q).forward(q, x), model(x)
    assert sqnr_db(eager, fused) > 35
    assert sqnr_db(reference, fused) > 20
    assert (fused.argmax(1) == eager.argmax(1)).float().mean() >= 0.95
    single = q(x[:1])
    assert sqnr_db(eager[:1], single) > 35


def test_copies_reloads_and_opt_out(setup: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    model, q, x = setup
    with torch.inference_mode():
        expected = q(x)
        twin = copy.deepcopy(q)
        assert torch.equal(twin(x), expected)
        assert twin.forward.graph is not q.forward.graph  # rebuilt on the copy's own modules
        state = q.state_dict()
        assert not any("_mq_" in key for key in state)  # the graph is never state
        twin.load_state_dict(state)  # fresh tensors: the graph is rebuilt against them
        assert torch.equal(twin(x), expected)
        monkeypatch.setenv("MONO_QUANT_FUSE", "0")
        plain = mq.quantize(model, mode="static", calibration_data=[x]).model
        assert "forward" not in vars(plain)


def test_untraceable_models_keep_the_eager_path() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).relu() if x.sum() > 0 else self.conv(x)

    data = _digits()[:16]
    q = mq.quantize(Branchy().eval(), mode="static", calibration_data=[data]).model
    assert "forward" not in vars(q)
    assert q(data).shape == (16, 4, 14, 14)


class _Residual(nn.Module):
    """``stem -> relu(conv2(relu(conv1(stem))) + stem)``; ``reads`` says what else reads ``stem``: nothing,
    the output tuple after the add (``"after"``), or a view taken before the add and returned (``"view"``)."""

    def __init__(self, reads: str) -> None:
        super().__init__()
        self.reads = reads
        self.stem, self.conv1, self.conv2 = (
            nn.Conv2d(1, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.Conv2d(8, 8, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        stem = F.relu(self.stem(x))
        flat = torch.flatten(stem, 1)  # a view of the shortcut, taken before the add
        out = F.relu(self.conv2(F.relu(self.conv1(stem))) + stem)
        return {"nothing": out, "after": (out, stem), "view": (out, flat)}[self.reads]


@pytest.mark.parametrize("reads", ["nothing", "after", "view"])
def test_a_residual_is_overwritten_only_when_nothing_reads_it_later(reads: str) -> None:
    """oneDNN's sum post-op writes into the residual: in place when every other reader ran before the add and
    keeps no view of it (an identity shortcut), on a copy otherwise; either way the outputs are unfused int8's."""
    torch.manual_seed(0)
    data = _digits()
    model = _Residual(reads).eval()
    q = mq.quantize(model, mode="static", calibration_data=list(data[:64].split(16))).model
    fused = next(m for m in q.forward.graph.modules() if isinstance(m, cnn_fusion.FusedConv) and m.conv[0] is q.conv2)
    assert fused.copy_accum == (reads != "nothing")
    with torch.inference_mode():
        got, expected = q(data[64:]), type(q).forward(q, data[64:])
    if reads == "nothing":
        got, expected = (got,), (expected,)
    for a, b in zip(got, expected, strict=True):
        assert sqnr_db(b.float(), a.float()) > 35


def test_print_shows_what_runs(setup: tuple) -> None:
    _, q, x = setup
    text = str(q)
    assert "mono-quant fused CPU graph" in text and "int8 convolutions as single oneDNN calls" in text
    fused = [m for m in q.forward.graph.modules() if type(m).__name__ == "FusedConv"]
    assert f"graph: {len(fused)} int8 convolutions" in text
    with torch.inference_mode():
        twin = copy.deepcopy(q)
        twin(x)
    assert "mono-quant fused CPU graph" in str(twin)  # copies describe their own graph
