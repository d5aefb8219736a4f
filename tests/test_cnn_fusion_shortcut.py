"""Projection shortcuts in the fused CPU graph: the downsample convolution's calibrated output keeps the residual
add uint8 (accumulator and output), stored as ``output_scale``/``output_zero_point`` and declared in the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from kit.bad_input import document, expect, layer_edit, rewrite
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from torch import nn

import mono_quant as mq
from mono_quant.engine.calibration import output_key
from mono_quant.graph import fused_graph as cnn_fusion
from mono_quant.io.load import read_header
from mono_quant.kernels.numerics import uint8_high
from mono_quant.qparams import sqnr_db

FULL_UINT8 = uint8_high() == 255  # 7-bit CPUs (no VNNI) hand floats between convs: no uint8 chaining


def _digits() -> torch.Tensor:
    images = torch.tensor(load_digits().images[:160], dtype=torch.float32).unsqueeze(1) / 16.0
    return F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)


class Block(nn.Module):
    """conv-bn-relu, conv-bn, plus a shortcut (identity, or a projection conv-bn when the shape changes), relu."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1, self.layer2, self.layer3 = Block(16, 16, 1), Block(16, 32, 2), Block(32, 64, 2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(x.mean((2, 3)))


def _model() -> ResNet:
    torch.manual_seed(0)
    model = ResNet()
    with torch.no_grad():  # trained-looking BatchNorm statistics: not the identity
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def resnet() -> tuple[nn.Module, nn.Module, torch.Tensor, list[torch.Tensor]]:
    data = _digits()
    model, calibration = _model(), list(data[:96].split(32))
    q = mq.quantize(model, mode="static", calibration_data=calibration).model
    return model, q, data[96:], calibration


def _fused_by_conv(q: nn.Module) -> dict[str, cnn_fusion.FusedConv]:
    names = {id(m): n for n, m in q.named_modules()}
    return {names[id(m.conv[0])]: m for m in q.forward.graph.modules() if isinstance(m, cnn_fusion.FusedConv)}


def test_projection_output_and_its_add_stay_uint8(resnet: tuple) -> None:
    model, q, x, _ = resnet
    fused = _fused_by_conv(q)
    projection, add = fused["layer2.downsample.0"], fused["layer2.conv2"]
    own = q.layer2.downsample[0].weight.layer.fused_conv_params().output_qparams
    assert own is not None  # calibrated, stored on the layer
    if FULL_UINT8:
        assert projection.out_qparams == own and add.accum_qparams == own
        assert add.out_qparams is not None  # read by layer3's convolutions at their input scale
    else:  # 7-bit codes: floats between convolutions, as before
        assert projection.out_qparams is None and add.accum_qparams is None and add.out_qparams is None
    with torch.inference_mode():
        out, eager, reference = q(x), type(q).forward(q, x), model(x)
    assert sqnr_db(eager, out) > 35
    assert sqnr_db(reference, out) > 20
    assert (out.argmax(1) == reference.argmax(1)).float().mean() >= 0.95


def test_output_is_observed_after_batchnorm_folding(resnet: tuple) -> None:
    model, q, _, calibration = resnet
    seen = []
    hook = model.layer2.downsample[1].register_forward_hook(lambda _m, _a, out: seen.append(out))
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    hook.remove()
    low, high = min(0.0, min(float(t.min()) for t in seen)), max(0.0, max(float(t.max()) for t in seen))
    layer = q.layer2.downsample[0].weight.layer
    assert layer.output_scale.dtype == torch.float32 and layer.output_scale.shape == ()
    assert layer.output_zero_point.dtype == torch.int8 and layer.output_zero_point.shape == ()
    assert float(layer.output_scale) == pytest.approx((high - low) / 255, rel=1e-3)  # the BatchNorm's output
    assert layer.metadata()["output_qparams"] is True


def test_save_load_is_identical_and_declares_the_output(resnet: tuple, tmp_path: Path) -> None:
    _, q, x, _ = resnet
    path = tmp_path / "resnet.safetensors"
    mq.save(q, path)
    metadata, specs = read_header(path)
    assert metadata["layers"]["layer2.downsample.0"]["output_qparams"] is True
    assert specs["layer2.downsample.0.output_scale"] == (torch.float32, ())
    assert specs["layer2.downsample.0.output_zero_point"] == (torch.int8, ())
    with torch.inference_mode():
        expected = q(x)
        assert torch.equal(mq.load(path, ResNet())(x), expected)
        stored = mq.load(path)[0]["layer2.downsample.0.output_scale"]
        assert torch.equal(stored, q.layer2.downsample[0].weight.layer.output_scale)
    mq.save(q, tmp_path / "resnet.pt")
    with torch.inference_mode():
        assert torch.equal(mq.load(tmp_path / "resnet.pt", ResNet())(x), expected)


def _old_style(path: Path, dst: Path) -> Path:
    """The file as written before output parameters existed: no such tensors, no ``output_qparams`` entries."""
    doc = document(path)
    for entry in doc["layers"].values():
        entry.pop("output_qparams", None)
    tensors = {k: v for k, v in load_file(path).items() if not k.endswith(("output_scale", "output_zero_point"))}
    save_file(tensors, dst, metadata={"format": "pt", "mono_quant": json.dumps(doc)})
    return dst


def test_old_files_without_output_parameters_still_load(resnet: tuple, tmp_path: Path) -> None:
    _, q, x, _ = resnet
    mq.save(q, tmp_path / "new.safetensors")
    loaded = mq.load(_old_style(tmp_path / "new.safetensors", tmp_path / "old.safetensors"), ResNet())
    assert loaded.layer2.downsample[0].weight.layer.output_scale is None
    assert _fused_by_conv(loaded)["layer2.conv2"].accum_qparams is None  # float32 shortcut, as before
    with torch.inference_mode():
        assert sqnr_db(q(x), loaded(x)) > 35


@pytest.mark.parametrize("value", [float("nan"), -1.0, 0.0, float("inf")])
def test_a_bad_output_scale_is_a_clear_error(resnet: tuple, tmp_path: Path, value: float) -> None:
    _, q, _, _ = resnet
    mq.save(q, tmp_path / "good.safetensors")
    bad = rewrite(tmp_path / "good.safetensors", tmp_path / "bad.safetensors",
                  tensors={"layer2.downsample.0.output_scale": torch.tensor(value)})  # fmt: skip
    with expect(mq.SerializationError, "'layer2.downsample.0.output_scale' holds"):
        mq.load(bad, ResNet())


def test_bad_output_declarations_are_clear_errors(resnet: tuple, tmp_path: Path) -> None:
    _, q, _, _ = resnet
    good = tmp_path / "good.safetensors"
    mq.save(q, good)
    zero_point = {"layer2.downsample.0.output_zero_point": torch.tensor(1.5)}
    with expect(mq.SerializationError, "output_zero_point"):  # a float zero point: not what the entry implies
        mq.load(rewrite(good, tmp_path / "float_zp.safetensors", tensors=zero_point), ResNet())
    with expect(mq.SerializationError, "output_qparams='yes'"):
        mq.load(rewrite(good, tmp_path / "flag.safetensors", edit=layer_edit("stem.0", "output_qparams", "yes")))
    missing = layer_edit("layer1.conv1", "output_qparams", False)  # tensors present but undeclared
    with expect(mq.SerializationError, "layer1.conv1.output_scale"):
        mq.load(rewrite(good, tmp_path / "undeclared.safetensors", edit=missing), ResNet())


def test_outputs_calibrated_elsewhere_are_used_only_without_folding() -> None:
    data = _digits()
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    config = mq.QuantizationConfig(mode="static")
    cal = mq.Calibrator(mq.calibrated_layers(plain, config), config, mq.calibrated_outputs(plain, config))
    cal.run(plain, [data[:32]])
    qparams = cal.qparams()
    assert set(qparams) == {"0", "2", output_key("0"), output_key("2")}
    q = mq.quantize(plain, config, activation_qparams=qparams).model
    assert torch.equal(q[2].weight.layer.output_scale, qparams[output_key("2")].scale)
    with_bn = _model()  # its BatchNorms fold inside quantize: outputs observed on the float model are not those
    cal = mq.Calibrator(mq.calibrated_layers(with_bn, config), config, mq.calibrated_outputs(with_bn, config))
    cal.run(with_bn, [data[:32]])
    q = mq.quantize(with_bn, config, activation_qparams=cal.qparams()).model
    assert q.layer2.downsample[0].weight.layer.output_scale is None


def test_observer_state_without_outputs_still_restores() -> None:
    data = _digits()
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    config = mq.QuantizationConfig(mode="static")
    old = mq.Calibrator(mq.calibrated_layers(plain, config), config)  # a checkpoint from before outputs
    old.run(plain, [data[:32]])
    new = mq.Calibrator(mq.calibrated_layers(plain, config), config, mq.calibrated_outputs(plain, config))
    new.load_state_dict(old.state_dict())
    assert set(new.qparams()) == {"0", "2"}  # outputs simply not calibrated
    new.run(plain, [data[:32]])
    again = mq.Calibrator(mq.calibrated_layers(plain, config), config, mq.calibrated_outputs(plain, config))
    again.load_state_dict(new.state_dict())
    assert set(again.qparams()) == {"0", "2", output_key("0"), output_key("2")}
