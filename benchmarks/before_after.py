"""Before/after in one run: the same workloads timed with an older mono-quant revision and with this checkout.

    python benchmarks/before_after.py --before 6366ae8             # digits, rgb, lite0, minilm, mlp
    python benchmarks/before_after.py --before 6366ae8 --workloads digits,minilm --repeats 3

The driver extracts ``mono_quant/`` of ``--before`` (``git archive``) into a temporary folder, trains the
digits ResNet once (both sides time the same weights), then starts worker processes that alternate
before, after, before, after, ... (``--repeats`` each). A worker imports mono-quant from its side's folder,
builds every workload with this checkout's benchmark helpers (``cnn.py``, ``cnn_zoo.py``, ``minilm.py``),
quantizes it through the public API only, and times float, mono-quant and the torch.ao peer round-robin
(median of the rounds). Ratios are taken inside each worker (latency over that worker's float, over that
worker's torch.ao) and the table shows the median over the workers of each side, so load that comes and
goes between workers cancels out. The CPU flags head the table; writes ``benchmarks/before_after.md``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import warnings
from pathlib import Path

import torch
from timing import round_robin_ms  # benchmarks/ is on sys.path when this file runs
from torch import nn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
THREADS = 2
WORKLOADS = ("digits", "rgb", "lite0", "minilm", "mlp")


def _cnn(name: str, model: nn.Module, calib: list[torch.Tensor], test: torch.Tensor, batches, rounds) -> list[dict]:
    from cnn import torch_ao_static

    import mono_quant as mq

    variants: dict[str, nn.Module] = {"float": model}
    for mode in ("static", "dynamic"):
        variants[f"int8 {mode}"] = mq.quantize(model, mode=mode, calibration_data=calib).model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        variants["torch.ao int8 static"] = torch_ao_static(model, calib)
    rows = []
    for batch in batches:
        x = test[:batch].contiguous()
        ms = round_robin_ms({k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}, rounds)
        rows += [{"workload": f"{name} b{batch}", "variant": k, "ms": v} for k, v in ms.items()]
    return rows


def _minilm(rounds: int) -> list[dict]:
    import minilm

    import mono_quant as mq

    model, tokenizer = minilm.load_minilm()
    batches, order = minilm.tokenize(tokenizer, minilm.sentences(64))
    variants = {
        "float": model,
        "int8 dynamic": minilm.quantize_int8(model),
        "int4 weight-only": minilm.quantize_int4_all(model),
        "int4 weight-only g128 sym": mq.quantize(model, dtype="int4", group_size=128).model,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        variants["torch.ao int8 dynamic"] = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    reference = minilm.encode(model, batches, order)
    ms = round_robin_ms({k: (lambda m=m: minilm.encode(m, batches, order)) for k, m in variants.items()}, rounds)
    rows = []
    for key, value in ms.items():
        cosine = minilm.fidelity(reference, minilm.encode(variants[key], batches, order))["cos_mean"]
        rows.append({"workload": "MiniLM encode 64 sentences b8", "variant": key, "ms": value, "cosine": cosine})
    return rows


def _mlp(rounds: int) -> list[dict]:
    import mono_quant as mq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
    variants = {
        "float": model,
        "int8 dynamic": mq.quantize(model, mode="dynamic").model,
        "int4 weight-only g128 sym": mq.quantize(model, dtype="int4", group_size=128).model,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        variants["torch.ao int8 dynamic"] = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    rows = []
    for batch in (1, 8, 64):
        x = torch.randn(batch, 1024)
        ms = round_robin_ms({k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}, rounds * 4)
        rows += [{"workload": f"MLP 1024-4096-1024 b{batch}", "variant": k, "ms": v} for k, v in ms.items()]
    return rows


def worker(mq_root: str, spec: dict) -> list[dict]:
    """Every requested workload timed with the mono-quant found under ``mq_root``."""
    sys.path[:0] = [mq_root, str(HERE)]
    import mono_quant  # noqa: F401  (imported first: this side's package, whatever the helpers import later)

    torch.set_num_threads(THREADS)
    rows: list[dict] = []
    if "digits" in spec["workloads"]:
        from cnn import ResNetDigits

        data = torch.load(spec["digits"], weights_only=True)
        model = ResNetDigits(tuple(data["widths"]))
        model.load_state_dict(data["state"])
        rows += _cnn("digits ResNet", model.eval(), list(data["calib"]), data["test"], (1, 32), 40)
    if "rgb" in spec["workloads"]:
        from cnn_zoo import photo_crops, rgb_resnet

        calib = list(photo_crops(32, 32, seed=1).split(8))
        rows += _cnn("32x32 RGB ResNet", rgb_resnet(), calib, photo_crops(32, 32, seed=2), (1, 32), 30)
    if "lite0" in spec["workloads"]:
        from cnn_zoo import efficientnet_lite0, photo_crops

        calib = list(photo_crops(224, 16, seed=1).split(8))
        rows += _cnn("EfficientNet-Lite0", efficientnet_lite0(), calib, photo_crops(224, 8, seed=2), (1, 8), 8)
    if "minilm" in spec["workloads"]:
        rows += _minilm(8)
    if "mlp" in spec["workloads"]:
        rows += _mlp(10)
    return rows


def cpu_line() -> str:
    """The CPU's model name and the SIMD/matrix extensions that decide which kernel wins."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU flags: unknown (no /proc/cpuinfo)"
    flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    wanted = ("avx2", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")
    return f"{name}; " + ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in wanted)


def _summarize(results: dict[str, list[list[dict]]]) -> list[dict]:
    """Per (workload, variant): median ms and ratios over the workers of each side."""
    table = []
    keys = [(r["workload"], r["variant"]) for r in results["after"][0]]
    for workload, variant in keys:
        entry: dict = {"workload": workload, "variant": variant}
        for side, runs in results.items():
            ms, to_float, to_ao = [], [], []
            for rows in runs:
                by = {r["variant"]: r for r in rows if r["workload"] == workload}
                if variant not in by:
                    continue
                peer = next((v for k, v in by.items() if k.startswith("torch.ao")), None)
                ms.append(by[variant]["ms"])
                to_float.append(by[variant]["ms"] / by["float"]["ms"])
                if peer is not None:
                    to_ao.append(by[variant]["ms"] / peer["ms"])
                if "cosine" in by[variant]:
                    entry["cosine"] = by[variant]["cosine"]
            if ms:
                entry[side] = (statistics.median(ms), statistics.median(to_float), statistics.median(to_ao or [0.0]))
        table.append(entry)
    return table


def _markdown(table: list[dict], before: str, elapsed: float) -> str:
    lines = [
        "# mono-quant before/after (one run)",
        "",
        cpu_line(),
        f"{THREADS} threads; torch {torch.__version__}; before = `{before}`, after = this checkout; "
        f"{elapsed:.0f} s. Ratios are medians over the workers of each side (each worker's latency over its own "
        "float / torch.ao); below 1.0 is faster.",
        "",
        "| workload | variant | before ms | after ms | before / float | after / float | before / torch.ao "
        "| after / torch.ao | cosine |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in table:
        b, a = e.get("before", (0.0, 0.0, 0.0)), e.get("after", (0.0, 0.0, 0.0))
        cos = f"{e['cosine']:.4f}" if "cosine" in e else ""
        lines.append(
            f"| {e['workload']} | {e['variant']} | {b[0]:.3f} | {a[0]:.3f} | {b[1]:.2f} | {a[1]:.2f} "
            f"| {b[2]:.2f} | {a[2]:.2f} | {cos} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="git revision to compare against")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--repeats", type=int, default=2, help="workers per side, alternating")
    parser.add_argument("--out", default=str(HERE / "before_after.md"))
    parser.add_argument("--worker", nargs=3, metavar=("MQ_ROOT", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mq_root, spec, out = args.worker
        Path(out).write_text(json.dumps(worker(mq_root, json.loads(Path(spec).read_text()))))
        return
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        before_root = Path(tmp, "before")
        before_root.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.before, "mono_quant"], cwd=ROOT, capture_output=True, check=True
        )
        with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
            tar.extractall(before_root, filter="data")
        spec = {"workloads": args.workloads.split(",")}
        if "digits" in spec["workloads"]:
            sys.path.insert(0, str(HERE))
            from cnn import train_cnn

            torch.set_num_threads(THREADS)
            widths = (32, 64, 128)
            model, test_x, _, calib = train_cnn(widths=widths)
            spec["digits"] = str(Path(tmp, "digits.pt"))
            torch.save({"widths": widths, "state": model.state_dict(), "calib": calib, "test": test_x}, spec["digits"])
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        results: dict[str, list[list[dict]]] = {"before": [], "after": []}
        for i in range(args.repeats):
            for side, root in (("before", before_root), ("after", ROOT)):
                out = Path(tmp, f"{side}{i}.json")
                cmd = [
                    sys.executable,
                    __file__,
                    "--before",
                    args.before,
                    "--worker",
                    str(root),
                    str(Path(tmp, "spec.json")),
                    str(out),
                ]
                subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
                results[side].append(json.loads(out.read_text()))
                print(f"{side} {i + 1}/{args.repeats} done", flush=True)
    text = _markdown(_summarize(results), args.before, time.perf_counter() - start)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
