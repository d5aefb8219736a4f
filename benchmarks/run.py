"""mono-quant benchmark: latency, fidelity and size of each mode against float and torch.ao, one run.

    python benchmarks/run.py            # full table (a few minutes on 2 cores)
    python benchmarks/run.py --quick    # smoke run, under a minute

Every ratio compares numbers measured in this same run. ``x-vs-float`` and ``x-vs-torch.ao`` are
speedups (float ms / mode ms; torch.ao ms / mode ms): above 1.0 means faster. torch.ao's deprecated
dynamic int8 is imported here only, as the peer; the library never uses it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from itertools import pairwise

import torch
from torch import nn

import mono_quant as mq
from mono_quant.modules import tensor_bytes
from mono_quant.qparams import sqnr_db

THREADS = 2


def mlp(*sizes: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 5) -> float:
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def state_bytes(model: nn.Module) -> int:
    return tensor_bytes(*model.state_dict().values())


def torch_ao_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def build_variants(model: nn.Module, width: int, calib_batch: int) -> list[tuple[str, nn.Module, float, int]]:
    """(mode, model, quantize seconds, state bytes) for every mode, plus the peer."""
    out = [("float", model, 0.0, state_bytes(model))]
    calibration = [torch.randn(calib_batch, width) for _ in range(32)]
    specs = [
        ("int8 dynamic", {"dtype": "int8", "mode": "dynamic"}),
        ("int8 static", {"dtype": "int8", "mode": "static", "calibration_data": calibration}),
        ("int8 weight-only", {"dtype": "int8", "mode": "weight_only"}),
        ("int4 weight-only", {"dtype": "int4", "group_size": 128}),
        ("bf16", {"dtype": "bf16"}),
    ]
    for name, options in specs:
        start = time.perf_counter()
        result = mq.quantize(model, **options)
        seconds = time.perf_counter() - start
        out.append((name, result.model, seconds, state_bytes(result.model)))
    start = time.perf_counter()
    ao = torch_ao_dynamic(model)
    seconds = time.perf_counter() - start
    ao_bytes = sum(p.numel() for p in model.parameters()) * 1  # int8 weights; packed size is not exposed
    out.append(("torch.ao dynamic (peer)", ao, seconds, ao_bytes))
    return out


def run_workload(name: str, sizes: tuple[int, ...], batches: tuple[int, ...], iters: int) -> list[dict]:
    torch.manual_seed(0)
    model = mlp(*sizes)
    variants = build_variants(model, sizes[0], 64)
    float_bytes = variants[0][3]
    rows = []
    for batch in batches:
        x = torch.randn(batch, sizes[0])
        with torch.inference_mode():
            reference = model(x)
        timings = {mode: median_ms(lambda m=m, x=x: m(x), iters) for mode, m, _, _ in variants}
        for mode, variant, seconds, nbytes in variants:
            with torch.inference_mode():
                fidelity = sqnr_db(reference, variant(x))
            rows.append({
                "workload": f"{name} b{batch}",
                "mode": mode,
                "ms": timings[mode],
                "x_float": timings["float"] / timings[mode],
                "x_ao": timings["torch.ao dynamic (peer)"] / timings[mode],
                "sqnr_db": fidelity,
                "bytes_ratio": nbytes / float_bytes,
                "quantize_s": seconds,
            })
    return rows


def quantize_memory(sizes: tuple[int, ...]) -> dict:
    """Peak RSS growth while quantizing, in a fresh process (Linux: peak reset via /proc/self/clear_refs)."""
    code = f"""
import time, torch, mono_quant as mq, sys
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
from run import mlp

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
model = mlp(*{sizes!r})
mq.quantize(mlp(16, 16), dtype="int8")  # warm up imports and allocator paths
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = rss("VmRSS")
start = time.perf_counter()
result = mq.quantize(model, dtype="int8")
seconds = time.perf_counter() - start
print(seconds, rss("VmHWM") - before, rss("VmRSS") - before)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, peak, kept = out.stdout.split()
    model = mlp(*sizes)
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    return {"seconds": float(seconds), "peak_growth": int(peak), "kept": int(kept), "model_bytes": state_bytes(model),
            "largest_layer": largest}


def checkpoint_rows(sizes: tuple[int, ...], repeats: int) -> list[str]:
    """File size and load time of quantized safetensors files against the float model's file."""
    import tempfile

    import safetensors.torch

    torch.manual_seed(0)
    model = mlp(*sizes)
    lines = ["| file | bytes | ratio to float | load ms (median) | load vs float |", "|---|---:|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as folder:
        float_path = os.path.join(folder, "float.safetensors")
        safetensors.torch.save_file(model.state_dict(), float_path)
        skeleton = mlp(*sizes)

        def load_float() -> None:
            skeleton.load_state_dict(safetensors.torch.load_file(float_path))

        float_ms = median_ms(load_float, repeats, warmup=1)
        float_size = os.path.getsize(float_path)
        lines.append(f"| float32 | {float_size:,} | 1.000 | {float_ms:.1f} | 1.00 |")
        for dtype in ("int8", "int4"):
            path = os.path.join(folder, f"{dtype}.safetensors")
            mq.quantize(model, dtype=dtype).save(path)
            ms = median_ms(lambda p=path: mq.load(p, model=skeleton), repeats, warmup=1)
            size = os.path.getsize(path)
            lines.append(f"| {dtype} | {size:,} | {size / float_size:.3f} | {ms:.1f} | {ms / float_ms:.2f} |")
    return lines


def format_table(rows: list[dict]) -> str:
    header = "| workload | mode | median ms | x-vs-float | x-vs-torch.ao | output SQNR dB | bytes ratio | quantize s |"
    lines = [header, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['ms']:.3f} | {r['x_float']:.2f} | {r['x_ao']:.2f} | "
            f"{r['sqnr_db']:.1f} | {r['bytes_ratio']:.3f} | {r['quantize_s']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (under a minute)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    iters = 20 if args.quick else 100
    workloads = [("MLP 1024-4096-1024", (1024, 4096, 1024))]
    if not args.quick:
        workloads.append(("MLP 4096-4096-4096", (4096, 4096, 4096)))
    rows = []
    for name, sizes in workloads:
        rows += run_workload(name, sizes, (1, 64), iters)
    print(f"torch {torch.__version__}, {THREADS} threads, {os.cpu_count()} cores; medians of {iters} calls")
    print(format_table(rows))
    sizes = (1024, 4096, 1024) if args.quick else (4096, 4096, 4096)
    print(f"\ncheckpoints of MLP {'-'.join(map(str, sizes))} (load = read file + rebuild modules):")
    print("\n".join(checkpoint_rows(sizes, 5 if args.quick else 20)))
    mem = quantize_memory(sizes)
    mib = 2**20
    print(
        f"\nquantize MLP {'-'.join(map(str, sizes))} ({mem['model_bytes'] / mib:.0f} MiB float) to int8: "
        f"{mem['seconds']:.3f} s; peak RSS growth {mem['peak_growth'] / mib:.0f} MiB "
        f"(quantized copy kept: {mem['kept'] / mib:.0f} MiB; largest float layer: {mem['largest_layer'] / mib:.0f} MiB)"
    )

if __name__ == "__main__":
    main()
