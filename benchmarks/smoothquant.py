"""SmoothQuant on the real all-MiniLM-L6-v2: int8 static plain vs ``smoothquant=alpha``.

Calibrates on sentences 256-320, evaluates on the first 256 (held out): mean/min cosine of the embeddings
against float, top-1 nearest-neighbour agreement, how many Linear layers were smoothed (the report's note),
and the latency of each variant against plain static (same run, interleaved, median of repeats).

With ``--kinds`` it also measures which layer kinds carry the static error: each kind kept float in turn.

    PYTHONPATH=$PWD python benchmarks/smoothquant.py [--alphas 0.5 0.75 0.85] [--repeats 5] [--kinds]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import torch
from minilm import encode, fidelity, load_minilm, sentences, tokenize
from torch import nn

import mono_quant as mq

KINDS = {
    "q/k/v": "*.attention.self.*",
    "attention output": "*.attention.output.dense",
    "FFN in": "*.intermediate.dense",
    "FFN out": "encoder.layer.?.output.dense",
}


def cpu_flags() -> str:
    out = subprocess.run(
        "grep -o 'amx\\|avx512_vnni\\|avx2' /proc/cpuinfo | sort -u", shell=True, capture_output=True, text=True
    )
    return " ".join(out.stdout.split()) or "(none of amx, avx512_vnni, avx2)"


def quantize(model: nn.Module, calibration: list[dict], alpha: float | None, exclude: tuple[str, ...] = ()) -> tuple:
    result = mq.quantize(
        model,
        dtype="int8",
        mode="static",
        layer_types=(nn.Linear,),
        calibration_data=calibration,
        smoothquant=alpha,
        exclude=exclude,
    )
    note = next((n for n in result.report.notes if n.startswith("SmoothQuant")), "")
    return result.model, note


def latency(models: dict[str, nn.Module], batches: list[dict], order: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per pass over ``batches`` for each model, passes interleaved so load changes hit all alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        encode(model, batches, order)  # warm-up: kernel choice, packing
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            encode(model, batches, order)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.75, 0.85])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kinds", action="store_true", help="also keep each layer kind float in turn")
    args = parser.parse_args()
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    model, tokenizer = load_minilm()
    texts = sentences(320)
    calibration, _ = tokenize(tokenizer, texts[256:320])
    batches, order = tokenize(tokenizer, texts[:256])
    reference = encode(model, batches, order)

    variants: dict[str, nn.Module] = {}
    rows = []
    for alpha in [None, *args.alphas]:
        label = "static plain" if alpha is None else f"static smoothquant alpha={alpha:g}"
        start = time.perf_counter()
        quantized, note = quantize(model, calibration, alpha)
        seconds = time.perf_counter() - start
        variants[label] = quantized
        scores = fidelity(reference, encode(quantized, batches, order))
        rows.append((label, scores, seconds, note))
        print(f"{label}: {scores} in {seconds:.1f}s {note}", flush=True)  # as it comes: the timing below is long
    timing = latency({"float": model, **variants}, batches, order, args.repeats)
    base = timing["static plain"]
    header = f"{'cos mean':>9} {'cos min':>8} {'NN agree':>9} {'latency':>9} {'vs plain':>9} {'quantize':>9}"
    print(f"\n{'variant':34} {header}")
    print(f"{'float':34} {1:9.4f} {1:8.4f} {1:9.3f} {timing['float'] * 1e3:7.0f}ms {timing['float'] / base:8.2f}x")
    for label, s, seconds, _ in rows:
        t = timing[label]
        print(
            f"{label:34} {s['cos_mean']:9.4f} {s['cos_min']:8.4f} {s['nn_agree']:9.3f} {t * 1e3:7.0f}ms "
            f"{t / base:8.2f}x {seconds:8.1f}s"
        )
    for label, _, _, note in rows:
        if note:
            print(f"{label}: {note}")
    if args.kinds:
        print("\nWhere the static error is (plain static, one layer kind kept float):")
        for kind, pattern in KINDS.items():
            quantized = quantize(model, calibration, None, (pattern,))[0]
            s = fidelity(reference, encode(quantized, batches, order))
            print(f"  {kind:18} float: cos mean {s['cos_mean']:.4f}, min {s['cos_min']:.4f}, NN {s['nn_agree']:.3f}")


if __name__ == "__main__":
    main()
