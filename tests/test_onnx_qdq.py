"""Static int8 CNNs through ``export_onnx`` run as ONNX Runtime's fast kernels: every convolution whose output
mono-quant's fused graph requantizes becomes one ``QLinearConv`` in ORT's optimized graph, the others a float
``Conv`` on a folded float weight (never a ``DequantizeLinear`` weight, which ORT convolves 3x slower), and the
outputs still match the mono-quant model on real digits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kit.helpers import SEVEN_BIT_CPU, int8_atol
from torch import nn

import mono_quant as mq
from mono_quant.io.onnx import export_onnx
from mono_quant.qparams import sqnr_db

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class Residual(nn.Module):
    """conv-relu-conv-relu, a residual block (conv-relu-conv + identity, relu), then a strided conv and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.conv1, self.conv2 = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))) + x)
        return self.head(torch.flatten(torch.relu(self.down(x)), 1))


def optimized_ops(path: Path, tmp_path: Path) -> tuple[Counter, onnx.GraphProto]:
    """Node types of ONNX Runtime's optimized graph of ``path`` (what it runs)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    return Counter(node.op_type for node in graph.node), graph


def test_requantized_convs_fuse_into_qlinearconv_and_outputs_match(digits, tmp_path: Path) -> None:
    x_train, _, x_test, _ = digits
    images = x_train.reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = Residual().eval()
    q = mq.quantize(model, mode="static", calibration_data=[images[i : i + 64] for i in range(0, 512, 64)]).model
    assert "forward" in q.__dict__, "the static CNN runs mono-quant's fused CPU graph"
    path = export_onnx(q, images[:4], tmp_path / "residual.onnx")
    ops, graph = optimized_ops(path, tmp_path)
    # stem conv 1 -> stem conv 2 -> conv1: requantized at the next conv's input scale as in the fused graph;
    # conv2 (the residual add's operand) at its own calibrated output scale; ``down`` (head next) as ONNX Runtime
    # decides: a float convolution on a folded float weight where it does not fuse
    assert ops["QLinearConv"] >= 4, ops
    produced = {out: node.op_type for node in graph.node for out in node.output}
    float_convs = [node for node in graph.node if node.op_type in ("Conv", "FusedConv")]
    assert len(float_convs) + ops["QLinearConv"] == 5, ops
    assert all(produced.get(node.input[1]) != "DequantizeLinear" for node in float_convs), ops
    assert "ConvInteger" not in ops
    test = x_test.reshape(-1, 1, 8, 8)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_0": test.numpy()})[0])
    with torch.no_grad():
        want = q(test)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= (0.97 if SEVEN_BIT_CPU else 0.99)
    # QLinearConv requantizes its int32 sums in one step where oneDNN goes through float: a few activations land
    # one step apart (measured: median difference 0, largest 0.5% of the largest output, 59 dB)
    assert torch.allclose(got, want, atol=int8_atol(1e-2) * want.abs().max().item())
    assert sqnr_db(want, got) >= (25.0 if SEVEN_BIT_CPU else 40.0)
    stored = [np.asarray(onnx.numpy_helper.to_array(i)) for i in onnx.load(str(path)).graph.initializer]
    assert all(a.dtype in (np.int8, np.uint8) for a in stored if a.size > 128)  # int8 weights in the file


def test_unfused_model_exports_the_same_fast_graph(digits, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MONO_QUANT_FUSE", "0")  # torch requantizes at each next conv's input: the same rounding
    images = digits[0].reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    q = mq.quantize(Residual().eval(), mode="static", calibration_data=[images[:256]]).model
    assert "forward" not in q.__dict__
    path = export_onnx(q, images[:4], tmp_path / "unfused.onnx")
    ops, _ = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] >= 4 and ops["QLinearConv"] + ops["Conv"] + ops["FusedConv"] == 5, ops
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input_0": images[:64].numpy()})[0])
    with torch.no_grad():
        want = q(images[:64])
    assert torch.allclose(got, want, atol=int8_atol(1e-2) * want.abs().max().item())


class SamePadConv(nn.Conv2d):
    """TF "same" padding in ``forward`` (as EfficientNet-Lite's ``Conv2dStaticSamePadding``): asymmetric at stride 2."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.static_padding = nn.ZeroPad2d((0, 1, 0, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def test_padding_in_forward_folds_into_the_quantized_conv(digits, tmp_path: Path) -> None:
    images = digits[0].reshape(-1, 1, 8, 8)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU6(), SamePadConv(16, 16, 2, stride=2, groups=16),
                          nn.ReLU6(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8 * 4 * 4, 10)).eval()  # fmt: skip
    q = mq.quantize(model, mode="static", calibration_data=[images[i : i + 64] for i in range(0, 512, 64)]).model
    path = export_onnx(q, images[:4], tmp_path / "same.onnx")
    assert "Pad" not in {node.op_type for node in onnx.load(str(path)).graph.node}
    ops, _ = optimized_ops(path, tmp_path)
    assert ops["QLinearConv"] == 2 and "Pad" not in ops, ops  # the 1x1 conv feeds the head: float output
    got = torch.from_numpy(ort.InferenceSession(str(path)).run(None, {"input_0": images[:128].numpy()})[0])
    with torch.no_grad():
        want = q(images[:128])
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= (0.97 if SEVEN_BIT_CPU else 0.99)
    assert sqnr_db(want, got) >= (25.0 if SEVEN_BIT_CPU else 40.0)
