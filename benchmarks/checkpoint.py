"""Checkpoint benchmark: ``quantize_checkpoint`` on a generated ~2 GB sharded checkpoint, in a child process.

The checkpoint is Llama-shaped: per layer ``gate``/``up`` projections ``[4096, 1024]``, ``down``
``[1024, 4096]`` and a norm ``[1024]``, in ~500 MB shards plus ``model.safetensors.index.json``, written
to a temporary folder (``--dir``, default the system temp dir) and deleted afterwards. The source files
are evicted from the page cache (``posix_fadvise(DONTNEED)``) before each run, so the read rate includes
the disk (as far as the machine's storage lets a process see it).

For each dtype the quantizing child reports: its peak RSS (``VmHWM``) and the part above its resting
memory after the imports, their ratios to the checkpoint size and to the largest tensor, the source read
rate in MB/s (source tensor bytes / wall time of ``quantize_checkpoint``), the output/source size ratio,
and the weight SQNR from the report; the parent checks the SQNR of a sample of tensors independently
(dequantized from the written shards against the source). CPU model and flags are printed first.

    python benchmarks/checkpoint.py [--size-gb 2] [--dtypes int8,int4] [--source-dtype float32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mono_quant as mq
from mono_quant.qparams import sqnr_db

HIDDEN, INTER, SHARD_BYTES = 1024, 4096, 500_000_000
_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "avx_vnni", "fma")

_CHILD = """
import json, sys, time
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
import mono_quant as mq
src, dst, dtype = sys.argv[1:4]
mq.quantize_checkpoint(src, dst + ".warm", dtype=dtype, include=("none",), progress=False)  # imports, kernels
base = status("VmRSS:")
start = time.perf_counter()
result = mq.quantize_checkpoint(src, dst, dtype=dtype, progress=False)
seconds = time.perf_counter() - start
sqnr = sorted(row.sqnr_db for row in result.report.layers)
print(json.dumps({"base": base, "peak": status("VmHWM:"), "seconds": seconds, "layers": len(sqnr),
                  "sqnr_min": sqnr[0], "sqnr_median": sqnr[len(sqnr) // 2],
                  "source_bytes": result.report.model_bytes_before, "output_bytes": result.report.model_bytes_after}))
"""


def cpu() -> str:
    """CPU model, core count and the SIMD/matrix flags that decide the int8/int4 kernels."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    present = [flag for flag in _FLAGS if flag in flags]
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(present) or 'none of ' + ' '.join(_FLAGS)}"


def generate(folder: Path, size_bytes: int, dtype: torch.dtype) -> tuple[int, int]:
    """Write the sharded checkpoint; returns (tensor bytes, largest tensor bytes)."""
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    layer_bytes = (3 * HIDDEN * INTER + HIDDEN) * dtype.itemsize
    layers = max(1, size_bytes // layer_bytes)
    shards: list[list[int]] = [[]]
    for layer in range(layers):
        if shards[-1] and (len(shards[-1]) + 1) * layer_bytes > SHARD_BYTES:
            shards.append([])
        shards[-1].append(layer)
    weight_map, total = {}, 0
    for number, members in enumerate(shards, 1):
        tensors = {}
        for layer in members:
            p = f"model.layers.{layer}"
            for name, shape in (
                ("gate_proj", (INTER, HIDDEN)),
                ("up_proj", (INTER, HIDDEN)),
                ("down_proj", (HIDDEN, INTER)),
            ):
                weight = torch.randn(shape, generator=generator) / shape[1] ** 0.5
                tensors[f"{p}.mlp.{name}.weight"] = weight.to(dtype)
            tensors[f"{p}.post_attention_layernorm.weight"] = (1 + torch.rand(HIDDEN, generator=generator)).to(dtype)
        file = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, folder / file)
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    return total, HIDDEN * INTER * dtype.itemsize


def evict(folder: Path) -> None:
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def sample_sqnr(src: Path, dst: Path, count: int = 4) -> list[tuple[str, float]]:
    """Independent check: dequantize a few layers from the written shards and compare with the source."""
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    source_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    layers = sorted({name.rpartition(".")[0] for name in index["weight_map"] if name.endswith(".weight_scale")})
    out = []
    for layer in random.Random(0).sample(layers, min(count, len(layers))):
        tensors, _ = mq.load(dst / index["weight_map"][f"{layer}.weight_scale"], dequantize=True)
        with safe_open(str(src / source_map[f"{layer}.weight"]), framework="pt") as handle:
            reference = handle.get_tensor(f"{layer}.weight").float()
        out.append((layer, sqnr_db(reference, tensors[f"{layer}.weight"])))
    return out


def run(src: Path, work: Path, dtype: str, total: int, largest: int) -> None:
    dst = work / f"q-{dtype}"
    evict(src)
    env = {**os.environ, "PYTHONPATH": str(Path(mq.__file__).parents[1])}
    code = textwrap.dedent(_CHILD)
    child = subprocess.run(
        [sys.executable, "-c", code, str(src), str(dst), dtype], env=env, capture_output=True, text=True
    )
    if child.returncode:
        raise SystemExit(f"quantizing child failed:\n{child.stderr}")
    r = json.loads(child.stdout)
    mib = 1 << 20
    above = r["peak"] - r["base"]
    print(f"\n{dtype}: {r['layers']} layers quantized in {r['seconds']:.1f} s, "
          f"{r['source_bytes'] / 1e6 / r['seconds']:.0f} MB/s of source read")  # fmt: skip
    print(f"  peak RSS {r['peak'] / mib:.0f} MiB = {r['peak'] / total:.3f} x checkpoint, "
          f"{r['peak'] / largest:.1f} x largest tensor; above resting ({r['base'] / mib:.0f} MiB): "
          f"{above / mib:.0f} MiB = {above / largest:.2f} x largest tensor ({largest / mib:.0f} MiB)")  # fmt: skip
    print(f"  output tensors {r['output_bytes'] / r['source_bytes']:.3f} x source; "
          f"report SQNR min {r['sqnr_min']:.1f} dB, median {r['sqnr_median']:.1f} dB")  # fmt: skip
    sample = ", ".join(f"{name.split('.', 2)[2]} {value:.1f}" for name, value in sample_sqnr(src, dst))
    print(f"  sampled SQNR (dequantized from the shards vs source, dB): {sample}")
    shutil.rmtree(dst)
    shutil.rmtree(work / f"q-{dtype}.warm", ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=2.0, help="checkpoint size in GB (default 2)")
    parser.add_argument("--dtypes", default="int8,int4", help="comma-separated target dtypes")
    parser.add_argument("--source-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--dir", default=None, help="where to write the temporary files")
    args = parser.parse_args()
    print(cpu())
    print(f"torch {torch.__version__}, mono-quant {mq.__version__}, {torch.get_num_threads()} threads")
    work = Path(tempfile.mkdtemp(prefix="mq-checkpoint-", dir=args.dir))
    try:
        src = work / "src"
        total, largest = generate(src, int(args.size_gb * 1e9), getattr(torch, args.source_dtype))
        shards = len(list(src.glob("*.safetensors")))
        print(f"checkpoint: {total / 1e9:.2f} GB of {args.source_dtype} tensors in {shards} shards")
        for dtype in args.dtypes.split(","):
            run(src, work, dtype, total, largest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
