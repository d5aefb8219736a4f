"""Static int8 CNN accuracy with ``equalize`` and ``bias_correction`` (Nagel et al. 2019): plain vs each vs both.

- EfficientNet-Lite0 (real ImageNet weights, ``cnn_zoo.efficientnet_lite0``) on 7 real photos (scikit-learn's
  two, scikit-image's astronaut, chelsea, coffee, rocket, motorcycle; whole photo resized to 224) and on
  112 random crops of them (seed 2; run 7 at a time: the first call per input shape checks each kernel).
  Calibration: 32 other random crops (seed 1, batches of 8), so the figures are on held-out inputs.
  Inputs scaled as Lite0 was trained, ``(x - 0.5) / 0.5``.
- The digits ResNet (``cnn.train_cnn``, widths 16/32/64) on its 360 held-out test digits.

Figures: top-1 agreement with float, logit SQNR against float (dB), accuracy where there are labels, the
number of equalized pairs and the quantize time. Run: ``PYTHONPATH=. python benchmarks/cnn_accuracy.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import mono_quant as mq
from mono_quant.qparams import sqnr_db

VARIANTS = {"plain": {}, "equalize": {"equalize": True}, "bias_correction": {"bias_correction": True},
            "both": {"equalize": True, "bias_correction": True}}  # fmt: skip


def photos() -> list[torch.Tensor]:
    """The 7 photos as float ``[3, H, W]`` in [0, 1]."""
    import skimage.data
    from sklearn.datasets import load_sample_images

    images = [*load_sample_images().images, skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(),
              skimage.data.rocket(), skimage.data.stereo_motorcycle()[0]]  # fmt: skip
    return [torch.tensor(image).permute(2, 0, 1).float() / 255 for image in images]


def lite_inputs(images: list[torch.Tensor], count: int, seed: int) -> torch.Tensor:
    """``count`` random square crops (a third of the short side or more) resized to 224; ``count=0``: the photos."""
    if not count:
        return torch.cat([F.interpolate(p[None], size=(224, 224), mode="bilinear") for p in images]) * 2 - 1
    generator, out = torch.Generator().manual_seed(seed), []
    for i in range(count):
        p = images[i % len(images)]
        short = min(p.shape[1:])
        side = int(torch.randint(short // 3, short + 1, (1,), generator=generator))
        top = int(torch.randint(0, p.shape[1] - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, p.shape[2] - side + 1, (1,), generator=generator))
        crop = p[None, :, top : top + side, left : left + side]
        out.append(F.interpolate(crop, size=(224, 224), mode="bilinear"))
    return torch.cat(out) * 2 - 1


def run(model: torch.nn.Module, calib: list[torch.Tensor], tests: dict[str, torch.Tensor], labels=None) -> list[dict]:
    with torch.inference_mode():
        reference = {name: model(x) for name, x in tests.items()}
    rows = []
    for variant, flags in VARIANTS.items():
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = mq.quantize(model, mode="static", calibration_data=calib, **flags)
        seconds = time.perf_counter() - start
        pairs = next((n.split()[1] for n in result.report.notes if n.startswith("equalize:")), "-")
        row = {"variant": variant, "pairs": pairs if pairs != "no" else "0", "quantize_s": seconds}
        with torch.inference_mode():
            for name, x in tests.items():
                out = torch.cat([result.model(chunk) for chunk in x.split(7)])  # one input shape per model
                row[f"{name} top1"] = f"{int((out.argmax(1) == reference[name].argmax(1)).sum())}/{len(x)}"
                row[f"{name} SQNR"] = float(sqnr_db(reference[name], out))
                if labels is not None and name in labels:
                    row[f"{name} acc"] = float((out.argmax(1) == labels[name]).float().mean())
        rows.append(row)
    return rows


def table(title: str, rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"### {title}", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    flags = subprocess.run("grep -o 'amx\\|avx512_vnni\\|avx2' /proc/cpuinfo | sort -u", shell=True,
                           capture_output=True, text=True).stdout.split()  # fmt: skip
    print(f"CPU flags: {' '.join(flags) or 'none of amx/avx512_vnni/avx2'}; torch {torch.__version__}", flush=True)
    torch.manual_seed(0)
    if "--no-lite" not in sys.argv:
        from cnn_zoo import efficientnet_lite0

        images = photos()
        tests = {"7 photos": lite_inputs(images, 0, 0), "112 crops": lite_inputs(images, 112, 2)}
        calib = list(lite_inputs(images, 32, 1).split(8))
        print(table("EfficientNet-Lite0 static int8 (held-out photos and crops)",
                    run(efficientnet_lite0(), calib, tests)), flush=True)  # fmt: skip
    from cnn import train_cnn

    model, test_x, test_y, calib = train_cnn(seconds_budget=60.0, epochs=6, widths=(16, 32, 64))
    with torch.inference_mode():
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    rows = run(model, calib, {"digits": test_x}, {"digits": test_y})
    print(table(f"Digits ResNet (16/32/64) static int8, 360 test digits; float accuracy {accuracy:.3f}", rows))


if __name__ == "__main__":
    main()
