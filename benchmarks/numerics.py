"""Numerics per instruction set: output SQNR against float per layer kind, real models, and the checks' cost.

Runs one worker process per ``ONEDNN_MAX_CPU_ISA`` cap this CPU supports (oneDNN capped to an older ISA
behaves as on an older CPU) plus the CPU's best, and prints one markdown table:

- output SQNR (dB) of one int8 layer of each kind (dynamic / static) against float, on seeded data;
- EfficientNet-Lite0 (real ImageNet weights) static int8 on 32 photo crops: top-1 agreement, logit SQNR;
- all-MiniLM-L6-v2 (real weights) int8 dynamic: mean cosine of sentence embeddings on real text;
- the transformers sweep (small configs, random weights): minimum output SQNR over its architectures;
- quantize time of MiniLM and Lite0 with the output checks against the same with them stubbed out, and the
  first call's extra time (kernel checks and measurement) against a warm call.

    python benchmarks/numerics.py            # every cap this CPU supports (a few minutes)
    python benchmarks/numerics.py --quick    # layer kinds only
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

LAYERS = {
    "Linear 64->256": ("nn.Linear(64, 256)", (200, 64)),
    "Linear 1->64": ("nn.Linear(1, 64)", (64, 1)),
    "Conv2d 16->32 3x3": ("nn.Conv2d(16, 32, 3, padding=1)", (4, 16, 16, 16)),
    "Conv1d 64, k16, groups 4": ("nn.Conv1d(64, 64, 16, groups=4, padding=8)", (2, 64, 50)),
    "depthwise Conv2d 32": ("nn.Conv2d(32, 32, 3, groups=32, padding=1)", (4, 32, 16, 16)),
    "Embedding 1000x64": ("nn.Embedding(1000, 64)", None),
    "LSTM 40->64 x2": ("nn.LSTM(40, 64, 2)", (30, 4, 40)),
    "GRU 1->32": ("nn.GRU(1, 32)", (30, 4, 1)),
}


def cpu_flags() -> list[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile")
    return [flag for flag in wanted if flag in line.split()]


def caps() -> list[str]:
    flags = set(cpu_flags())
    out = ["default"]
    if "avx512_vnni" in flags and "amx_int8" in flags:
        out.append("AVX512_CORE_VNNI")
    if "avx512f" in flags:
        out.append("AVX512_CORE")
    if "avx2" in flags:
        out.append("AVX2")
    return out


def layer_rows() -> dict[str, str]:
    import torch
    from torch import nn

    import mono_quant as mq
    from mono_quant.qparams import sqnr_db

    rows = {}
    for label, (code, shape) in LAYERS.items():
        cells = []
        for mode in ("dynamic", "static"):
            torch.manual_seed(0)
            model = nn.Sequential(eval(code)).eval()  # the table above
            data, unseen = (torch.randint(0, 1000, (64,)) if shape is None else torch.randn(*shape) for _ in range(2))
            result = mq.quantize(model, dtype="int8", mode=mode, calibration_data=[data])
            with torch.no_grad():
                reference, got = model(unseen), result.model(unseen)
            reference, got = (reference[0], got[0]) if isinstance(reference, tuple) else (reference, got)
            moved = " (moved)" if any(r.note.startswith("moved") for r in result.report.layers) else ""
            cells.append(f"{sqnr_db(reference, got):.1f}{moved}")
        rows[label] = " / ".join(cells)
    return rows


def model_rows() -> dict[str, str]:
    import torch

    import mono_quant as mq
    from mono_quant.qparams import sqnr_db

    rows: dict[str, str] = {}
    import cnn_zoo

    lite, crops = cnn_zoo.efficientnet_lite0(), cnn_zoo.photo_crops(224, 40, seed=1)
    calibration, test = list(crops[:8].split(4)), crops[8:]

    def quantize_lite() -> torch.nn.Module:
        return mq.quantize(lite, dtype="int8", mode="static", calibration_data=calibration).model

    checked_s, q = _timed(quantize_lite)
    with torch.no_grad():
        reference, got = lite(test), q(test)
    agree = (reference.argmax(1) == got.argmax(1)).float().mean().item()
    rows["EfficientNet-Lite0 static: top-1 agreement, logit SQNR"] = f"{agree:.0%}, {sqnr_db(reference, got):.1f} dB"
    unchecked_s, _ = _timed(quantize_lite, unchecked=True)
    rows["Lite0 quantize s: with checks / without"] = f"{checked_s:.1f} / {unchecked_s:.1f}"
    first, warm = _first_and_warm(q, test[:8])
    rows["Lite0 b8 forward ms: first call / warm"] = f"{first:.0f} / {warm:.0f}"

    import minilm

    if minilm.available() is None:
        model, tokenizer = minilm.load_minilm()
        batches, order = minilm.tokenize(tokenizer, minilm.sentences(64))
        reference = minilm.encode(model, batches, order)

        def quantize_minilm() -> torch.nn.Module:
            return mq.quantize(model, dtype="int8", calibration_data=batches[:1]).model

        checked_s, q = _timed(quantize_minilm)
        cosine = minilm.fidelity(reference, minilm.encode(q, batches, order))["cos_mean"]
        rows["MiniLM int8 dynamic: mean cosine"] = f"{cosine:.4f}"
        unchecked_s, _ = _timed(quantize_minilm, unchecked=True)
        rows["MiniLM quantize s: with checks / without"] = f"{checked_s:.1f} / {unchecked_s:.1f}"

    import transformers_zoo

    worst = (float("inf"), "")
    for name in transformers_zoo.names():
        model, make_inputs = transformers_zoo.build(name)
        inputs = make_inputs()
        q = mq.quantize(model, dtype="int8", calibration_data=[inputs]).model
        with torch.no_grad():
            outputs = [m(**inputs) if isinstance(inputs, dict) else m(inputs) for m in (model, q)]
            value = sqnr_db(*(transformers_zoo.output(o) for o in outputs))
        worst = min(worst, (value, name))
    rows["transformers sweep int8 dynamic: min output SQNR"] = f"{worst[0]:.1f} dB ({worst[1]})"
    return rows


def _timed(fn, unchecked: bool = False) -> tuple[float, object]:
    """Seconds ``fn()`` takes, and its result; ``unchecked`` stubs the output checks out (the cost they add is
    the difference)."""
    import math

    from mono_quant.engine import output_check
    from mono_quant.engine import quantize as engine

    saved = output_check._output_sqnr, engine.capture_inputs
    if unchecked:
        output_check._output_sqnr, engine.capture_inputs = (lambda *a: (math.inf, math.inf)), (lambda *a, **k: {})
    try:
        start = time.perf_counter()
        out = fn()
        return time.perf_counter() - start, out
    finally:
        output_check._output_sqnr, engine.capture_inputs = saved


def _first_and_warm(model, x) -> tuple[float, float]:
    import torch

    from mono_quant.kernels import choice

    choice.set_kernel_choice("measure")  # clears what was chosen: the next call checks and measures again
    with torch.no_grad():
        start = time.perf_counter()
        model(x)
        first = time.perf_counter() - start
        times = []
        for _ in range(5):
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return first * 1e3, sorted(times)[2] * 1e3


def worker(quick: bool) -> None:
    import warnings

    import torch

    from mono_quant.kernels import numerics

    warnings.simplefilter("ignore")
    torch.set_num_threads(2)
    rows = {"activation codes": numerics.describe(), **layer_rows()}
    if not quick:
        rows.update(model_rows())
    print(json.dumps(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="layer kinds only")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.quick)
        return
    columns = {}
    for cap in caps():
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if cap != "default":
            env["ONEDNN_MAX_CPU_ISA"] = cap
        command = [sys.executable, __file__, "--worker", *(["--quick"] if args.quick else [])]
        proc = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        columns[cap] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"CPU flags: {' '.join(cpu_flags())}; torch threads 2; layer cells: int8 dynamic / static output SQNR dB\n")
    names = list(columns)
    print("| | " + " | ".join(f"`{n}`" if n != "default" else "this CPU" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for row in columns[names[0]]:
        print(f"| {row} | " + " | ".join(str(columns[n].get(row, "-")) for n in names) + " |")


if __name__ == "__main__":
    main()
