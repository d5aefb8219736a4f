"""The fused CNN graph's newer paths against the unfused int8 path on real digits: uint8 residual adds,
ReLU6/Hardtanh/Hardswish/SiLU post-ops, ``nn.Conv2d`` subclasses that pad in their own ``forward``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
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


class SamePad(nn.Conv2d):
    """TensorFlow "same" padding computed from the input's size in ``forward`` (asymmetric for stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.size()[-2:], self.kernel_size, self.stride, self.dilation, strict=True):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads = [total // 2, total - total // 2, *pads]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Halved(nn.Conv2d):
    """A subclass that works on its convolution's result: a fused epilogue would be wrong for it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 0.5


class MBNet(nn.Module):
    """Inverted residual blocks of same-padding subclass convs with ReLU6, other activations, identity skips."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = SamePad(1, 8, 3, stride=2)
        self.expand, self.depthwise = SamePad(8, 16, 1), SamePad(16, 16, 3, groups=16)
        self.project, self.hard = SamePad(16, 8, 1), nn.Conv2d(8, 8, 3, padding=1)
        self.swish, self.halved = nn.Conv2d(8, 8, 1), Halved(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self.stem(x))
        x = self.project(nn.functional.hardtanh(self.depthwise(F.relu6(self.expand(x))), 0.0, 6.0)) + x
        x = F.hardswish(self.hard(x))
        x = F.hardtanh(self.halved(F.silu(self.swish(x))), -1.0, 1.0)
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def mbnet() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    data = _digits()
    model = MBNet().eval()
    q = mq.quantize(model, mode="static", calibration_data=list(data[:64].split(16))).model
    return model, q, data[64:]


def _fused(q: nn.Module) -> dict[str, cnn_fusion.FusedConv]:
    names = {id(m): n for n, m in q.named_modules()}
    return {names[id(m.conv[0])]: m for m in q.forward.graph.modules() if isinstance(m, cnn_fusion.FusedConv)}


def test_subclass_convs_and_activations_are_fused(mbnet: tuple) -> None:
    model, q, x = mbnet
    fused = _fused(q)
    assert set(fused) == {"stem", "expand", "depthwise", "project", "hard", "swish", "halved"}
    assert fused["stem"].routed and fused["stem"].unary == ("hardtanh", [0.0, 6.0])
    assert fused["swish"].unary == ("swish", []) and fused["hard"].unary == ("hardswish", [])
    if FULL_UINT8:
        assert fused["project"].accum_qparams is not None  # identity skip: uint8 accumulator and output
        assert fused["project"].out_qparams is not None and fused["stem"].out_qparams is not None
    else:
        assert fused["project"].accum_qparams is None and fused["project"].out_qparams is None
    assert fused["halved"].unary == ("hardtanh", [-1.0, 1.0])
    with torch.inference_mode():
        out, eager, reference = q(x), type(q).forward(q, x), model(x)
    assert sqnr_db(eager, out) > 30
    assert sqnr_db(reference, out) > 20
    assert all(m.routed_ok for name, m in fused.items() if name != "halved")
    assert not fused["halved"].routed_ok  # its forward scales the result: it took the float path instead


def test_the_subclass_float_path_matches_the_module(mbnet: tuple) -> None:
    q = mbnet[1]
    halved = _fused(q)["halved"]
    u8 = torch.randint(0, 255, (2, 8, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    scale, zero_point = halved.in_qparams
    with torch.inference_mode():
        expected = F.hardtanh(q.halved((u8.float() - zero_point) * scale), -1.0, 1.0)
        assert torch.allclose(halved(u8), expected, atol=1e-6)


def test_uint8_residual_on_real_digits_matches_unfused() -> None:
    from kit.helpers import Net

    torch.manual_seed(0)
    data = _digits()
    q = mq.quantize(Net().eval(), mode="static", calibration_data=list(data[:64].split(16))).model
    fused = [m for m in q.forward.graph.modules() if isinstance(m, cnn_fusion.FusedConv)]
    uint8_adds = [m for m in fused if m.accum_qparams is not None]
    assert len(uint8_adds) == (3 if FULL_UINT8 else 0)  # identity shortcuts, and the projection's calibrated output
    with torch.inference_mode():
        out, eager = q(data[64:]), type(q).forward(q, data[64:])
    assert sqnr_db(eager, out) > 30
    assert (out.argmax(1) == eager.argmax(1)).float().mean() >= 0.95


def test_save_load_round_trip_is_bit_identical_and_fused(mbnet: tuple, tmp_path) -> None:
    _, q, x = mbnet
    mq.save(q, tmp_path / "mb.safetensors")
    torch.manual_seed(1)
    loaded = mq.load(tmp_path / "mb.safetensors", MBNet())
    assert "forward" in vars(loaded)
    with torch.inference_mode():
        assert torch.equal(loaded(x), q(x))


def test_dynamic_fused_graph_matches_eager_at_every_batch(mbnet: tuple) -> None:
    model, _, x = mbnet
    q = mq.quantize(model, mode="dynamic", exclude=("head",)).model
    assert len(_fused(q)) == 7  # subclass convs too
    with torch.inference_mode():
        single = torch.cat([q(row[None]) for row in x[:4]])
        eager_single = torch.cat([type(q).forward(q, row[None]) for row in x[:4]])
        batched, eager = q(x), type(q).forward(q, x)
    assert sqnr_db(eager_single, single) > 30 and sqnr_db(eager, batched) > 30  # int8 activations at batch 1 too
    assert sqnr_db(model(x[:4]), single) > 20


def test_a_subclass_that_reads_its_input_sees_floats() -> None:
    class Catted(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # a list argument holding the input
            return super().forward(torch.cat([x, x.new_zeros(0, *x.shape[1:])]))

    torch.manual_seed(0)
    data = _digits()
    model = nn.Sequential(Catted(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
    q = mq.quantize(model, mode="static", calibration_data=[data[:32]]).model
    fused = _fused(q)["0"]
    with torch.inference_mode():
        out, eager = q(data[64:]), type(q).forward(q, data[64:])
    assert not fused.routed_ok  # the conv did not read the uint8 input itself: the float path ran
    assert sqnr_db(eager, out) > 35


def test_the_report_says_when_dynamic_convolutions_cost_speed_at_batch_one(mbnet: tuple) -> None:
    model, _, x = mbnet
    dynamic = mq.quantize(model, mode="dynamic").report
    static = mq.quantize(model, mode="static", calibration_data=[x[:16]]).report
    convs = sum(r.kind.startswith("Conv") for r in dynamic.layers)
    assert dynamic.notes and dynamic.notes[0].startswith(f"{convs} convolutions run int8 dynamic")
    assert f"note: {dynamic.notes[0]}" in str(dynamic) and dynamic.to_dict()["notes"] == dynamic.notes
    assert static.notes == []
