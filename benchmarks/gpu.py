"""GPU Linear benchmark (issue 13, item 5): one 4096x4096 layer at M = 1, 16, 512, 4096 against bf16 ``nn.Linear``.

    python benchmarks/gpu.py                 # on a machine with a CUDA GPU; writes benchmarks/gpu.md
    python benchmarks/gpu.py --device cpu    # smoke run of the same script here (small M, few iterations)

Variants: bf16 ``nn.Linear`` (the reference), fp16 and bf16 from ``mq.quantize``, int8 dynamic and static
(calibrated on the same random activations), int4 weight-only (group 128, symmetric). Each latency is the
median of CUDA-event timed calls after a warm-up; the table gives ms, the ratio to bf16 (below 1.0 is
faster) and the output SQNR against float32. Targets from the issue: int4 ahead of bf16 at M = 1, int8 not
behind bf16 at M = 4096. The script is meant to be run once, as it is, when a GPU is lent.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's mono_quant

import mono_quant as mq
from mono_quant.qparams import sqnr_db

FEATURES = 4096
ROWS = (1, 16, 512, 4096)


def timed_ms(fn: Callable[[], torch.Tensor], device: torch.device, iters: int) -> float:
    """Median ms of ``fn()`` (CUDA events on a GPU, ``perf_counter`` elsewhere) after 5 warm-up calls."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn()
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def variants(layer: nn.Linear, calib: torch.Tensor) -> dict[str, nn.Module]:
    """Every variant of ``layer`` (float32, on the CPU) to be moved to the device."""
    model = nn.Sequential(layer)
    out: dict[str, nn.Module] = {"bf16 nn.Linear": copy.deepcopy(model).to(torch.bfloat16)}
    out["fp16 (mono-quant)"] = mq.quantize(model, dtype="fp16").model
    out["bf16 (mono-quant)"] = mq.quantize(model, dtype="bf16").model
    out["int8 dynamic"] = mq.quantize(model, mode="dynamic").model
    out["int8 static"] = mq.quantize(model, mode="static", calibration_data=[calib]).model
    out["int4 weight-only g128"] = mq.quantize(model, dtype="int4", group_size=128).model
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=str(Path(__file__).with_name("gpu.md")))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for a smoke run")
    smoke = device.type != "cuda"
    rows, iters = ((1, 16) if smoke else ROWS), (5 if smoke else 50)
    torch.manual_seed(0)
    layer = nn.Linear(FEATURES, FEATURES)
    calib = torch.randn(256, FEATURES)
    models = {name: m.to(device).eval() for name, m in variants(layer, calib).items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke run)"
    lines = [
        f"# GPU Linear {FEATURES}x{FEATURES}: {name}, torch {torch.__version__}",
        "",
        "| M | variant | median ms | ratio to bf16 | SQNR dB vs float32 |",
        "|---:|---|---:|---:|---:|",
    ]
    for m in rows:
        x = torch.randn(m, FEATURES)
        reference = layer(x)
        results = {}
        with torch.inference_mode():
            for key, model in models.items():
                dtype = torch.bfloat16 if key.startswith("bf16 nn") else torch.float32
                xd = x.to(device, dtype)
                ms = timed_ms(lambda model=model, xd=xd: model(xd), device, iters)
                results[key] = (ms, sqnr_db(reference, model(xd).float().cpu()))
        base = results["bf16 nn.Linear"][0]
        for key, (ms, sqnr) in results.items():
            lines.append(f"| {m} | {key} | {ms:.4f} | {ms / base:.2f} | {sqnr:.1f} |")
    text = "\n".join(lines) + "\n"
    if not smoke:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
