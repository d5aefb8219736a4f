"""Static/dynamic int8 CNN latency against float and torch.ao FX static, one interleaved run (issue 13).

    python benchmarks/cnn_speed.py            # digits ResNet + 32x32 RGB ResNet, batch 1 and 32
    python benchmarks/cnn_speed.py --lite     # + EfficientNet-Lite0 (real weights), batch 1 and 8

Every variant of a workload is timed round-robin in the same process (medians over rounds), so the
ratios to float and to torch.ao are comparable; absolute milliseconds depend on the machine's load.
The digits ResNet has random weights with BatchNorm statistics from real digits (latency does not
depend on training); ``benchmarks/cnn.py`` measures the trained one's fidelity.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).parent.parent))  # this checkout's mono_quant

from cnn import ResNetDigits, digits_images, torch_ao_static
from cnn_zoo import efficientnet_lite0, photo_crops, rgb_resnet
from run import cpu_flags
from timing import round_robin_ms

import mono_quant as mq


def digits_resnet() -> tuple[nn.Module, torch.Tensor]:
    """``(model, images)``: ``ResNetDigits`` with BatchNorm statistics from real digits, and 512 digits."""
    torch.manual_seed(0)
    images = digits_images()[0][:512]
    model = ResNetDigits().train()
    with torch.no_grad():
        for chunk in images.split(64):
            model(chunk)
    return model.eval(), images


def workloads(lite: bool) -> list[tuple[str, nn.Module, torch.Tensor, tuple[int, ...], int]]:
    """``(name, model, data, batches, rounds)``; ``data`` holds calibration rows then test rows."""
    model, images = digits_resnet()
    out = [("digits ResNet 16x16", model, images, (1, 32), 60)]
    out.append(("RGB ResNet 32x32", rgb_resnet(), photo_crops(32, 96, seed=1), (1, 32), 60))
    if lite:
        out.append(("EfficientNet-Lite0 224", efficientnet_lite0(), photo_crops(224, 40, seed=1), (1, 8), 12))
    return out


def measure(name: str, model: nn.Module, data: torch.Tensor, batches: tuple[int, ...], rounds: int) -> list[str]:
    """Markdown rows for one workload: median ms, x float, x torch.ao, logit cosine to float."""
    calib, test = list(data[:32].split(8)), data[-32:]
    variants = {"float": model}
    for mode in ("static", "dynamic"):
        variants[f"mono-quant {mode}"] = mq.quantize(model, mode=mode, calibration_data=calib).model
    variants["torch.ao static"] = torch_ao_static(model, calib)
    with torch.inference_mode():
        reference = model(test[:8])
        cosine = {k: F.cosine_similarity(v(test[:8]), reference, dim=1).mean().item() for k, v in variants.items()}
    lines = []
    for batch in batches:
        x = test[:batch].contiguous()
        with torch.inference_mode():
            times = round_robin_ms({k: (lambda m=v, x=x: m(x)) for k, v in variants.items()}, rounds)
        for k, ms in times.items():
            lines.append(
                f"| {name} | {batch} | {k} | {ms:.3f} | {ms / times['float']:.2f}x | "
                f"{ms / times['torch.ao static']:.2f}x | {cosine[k]:.4f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lite", action="store_true", help="add EfficientNet-Lite0 (batch 1 and 8)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(cpu_flags(), f"| torch {torch.__version__} | 2 threads")
    print("| workload | batch | variant | median ms | x float | x torch.ao | cosine |\n|---|---|---|---|---|---|---|")
    for work in workloads(args.lite):
        print("\n".join(measure(*work)), flush=True)


if __name__ == "__main__":
    main()
