"""mono-quant benchmark: latency, fidelity and file size of each mode against float and the peers, in one run.

    python benchmarks/run.py                      # full table (under ten minutes on 2 cores)
    python benchmarks/run.py --quick              # smoke run, under a minute (small subsets, torch.ao peer only)
    python benchmarks/run.py --workloads minilm   # one workload (mlp, minilm, cnn, compile, recurrent)

Workloads: MLPs 1024-4096-1024 (and 4096-4096-4096 in the full run) at batch 1 and 64 on random
inputs; the real all-MiniLM-L6-v2 sentence encoder on real sentences (``benchmarks/minilm.py``); a
ResNet-style CNN trained on real digits (``benchmarks/cnn.py``); eager against ``torch.compile``
(``benchmarks/compiled.py``: the MLP, MiniLM and a ResNet with torchao's PT2E + compile recipe as the peer);
LSTM/GRU layers at batch 1 and 32 (``benchmarks/recurrent.py``, peer torch.ao dynamic).

One table: workload, mode, library, median ms, ratio to float (mode ms / float ms of the same
workload in this run: below 1.0 is faster), fidelity (output SQNR for the MLPs; cosine mean/min and
nearest-neighbour agreement for MiniLM; top-1 agreement and accuracy drop for the CNN), file-size
ratio (our ``.safetensors`` file, or a peer's ``torch.save(state_dict)``, over the float model's
``.safetensors``) and quantize seconds. Peers, measured on the same inputs in the same process:
torch.ao dynamic int8 (always; imported here only, the library never uses it), optimum-quanto and
torchao when installed (the ``[bench]`` extra). A peer that is missing, or fails on this torch,
gets a row that says why instead of a number. Latencies of one workload are measured round-robin
(every variant once per round, median over rounds) so that load from other processes spreads evenly.

Writes ``benchmarks/results.md``, ``benchmarks/results.json`` and ``benchmarks/results.png``
(latency ratio vs fidelity per library; needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's mono_quant

from timing import median_ms, round_robin_ms  # benchmarks/ is on sys.path when this file runs

import mono_quant as mq
from mono_quant.kernels import choice
from mono_quant.modules import tensor_bytes
from mono_quant.qparams import sqnr_db

THREADS = 2
HERE = Path(__file__).resolve().parent
MODES = ("int8 dynamic", "int8 static", "int8 weight-only", "int4 weight-only")


# --------------------------------------------------------------------------------------------- helpers


def mlp(*sizes: int) -> nn.Module:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def state_bytes(model: nn.Module) -> int:
    return tensor_bytes(*model.state_dict().values())


def float_file_bytes(model: nn.Module, folder: str) -> int:
    path = os.path.join(folder, "float.safetensors")
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, path)
    return os.path.getsize(path)


def our_file_bytes(model: nn.Module, folder: str) -> int:
    path = os.path.join(folder, "ours.safetensors")
    mq.save(model, path)
    return os.path.getsize(path)


def peer_file_bytes(model: nn.Module) -> int | None:
    """``torch.save(state_dict)`` size of a peer model (``None`` when its state cannot be saved)."""
    try:
        buffer = io.BytesIO()
        torch.save(model.state_dict(), buffer)
        return buffer.tell()
    except Exception:
        return None


@dataclasses.dataclass
class Variant:
    """One model to measure: who made it, how, in how long; ``model`` is ``None`` when the peer failed."""

    mode: str
    library: str
    model: nn.Module | None
    quantize_s: float = 0.0
    file_bytes: int | None = None
    note: str = ""


def timed(build: Callable[[], nn.Module]) -> tuple[nn.Module, float]:
    start = time.perf_counter()
    model = build()
    return model, time.perf_counter() - start


# ----------------------------------------------------------------------------------------------- peers


def torch_ao_dynamic(model: nn.Module, calibrate: Callable[[nn.Module], None]) -> nn.Module:
    """torch.ao's deprecated dynamic int8 (fbgemm, per-tensor weights): the peer, imported here only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def _quanto(weights: str, activations: str | None) -> Callable[[nn.Module, Callable[[nn.Module], None]], nn.Module]:
    def build(model: nn.Module, calibrate: Callable[[nn.Module], None]) -> nn.Module:
        from optimum import quanto

        q = copy.deepcopy(model)
        acts = None if activations is None else getattr(quanto, activations)
        quanto.quantize(q, weights=getattr(quanto, weights), activations=acts)
        if acts is not None:
            with quanto.Calibration():
                calibrate(q)
        quanto.freeze(q)
        return q

    return build


def _torchao(config_name: str, **options: Any) -> Callable[[nn.Module, Callable[[nn.Module], None]], nn.Module]:
    def build(model: nn.Module, calibrate: Callable[[nn.Module], None]) -> nn.Module:
        import torchao.quantization as tq

        q = copy.deepcopy(model)
        tq.quantize_(q, getattr(tq, config_name)(**options))
        return q

    return build


# (mode, library, builder, what it is)
PEERS: list[tuple[str, str, Callable, str]] = [
    ("int8 dynamic", "torch.ao", torch_ao_dynamic, "quantize_dynamic, per-tensor weights"),
    ("int8 dynamic", "torchao", _torchao("Int8DynamicActivationInt8WeightConfig"), "Int8DynamicActivationInt8Weight"),
    ("int8 static", "optimum-quanto", _quanto("qint8", "qint8"), "W8A8, calibrated activations"),
    ("int8 weight-only", "optimum-quanto", _quanto("qint8", None), "qint8 weights"),
    ("int8 weight-only", "torchao", _torchao("Int8WeightOnlyConfig"), "Int8WeightOnlyConfig"),
    ("int4 weight-only", "optimum-quanto", _quanto("qint4", None), "qint4 weights, group 128"),
    ("int4 weight-only", "torchao", _torchao("Int4WeightOnlyConfig", group_size=128), "Int4WeightOnlyConfig g128"),
]


def peer_status() -> dict[str, str]:
    """Installed version (or why not) of each optional peer."""
    out = {"torch.ao": f"torch {torch.__version__} (deprecated torch.ao.quantization)"}
    for library, module in (("optimum-quanto", "optimum.quanto"), ("torchao", "torchao")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                imported = __import__(module, fromlist=["__version__"])
            out[library] = f"{library} {getattr(imported, '__version__', '?')}"
        except Exception as err:
            out[library] = f"not available ({type(err).__name__}: {err})"[:160]
    return out


def peer_variants(
    model: nn.Module,
    calibrate: Callable[[nn.Module], None],
    check: Callable[[nn.Module], None],
    libraries: tuple[str, ...],
    modes: tuple[str, ...] = MODES,
) -> list[Variant]:
    """Every peer row for ``modes``; a peer that does not install, build or run gets a note instead."""
    status = peer_status()
    out = []
    for mode, library, build, what in PEERS:
        if mode not in modes or library not in libraries:
            continue
        if status[library].startswith("not available"):
            out.append(Variant(mode, library, None, note=status[library]))
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                q, seconds = timed(lambda b=build: b(model, calibrate))
                with torch.no_grad():
                    check(q)  # one forward: a peer that builds but cannot run on this CPU fails here
            out.append(Variant(mode, library, q, seconds, peer_file_bytes(q), what))
        except Exception as err:
            message = " ".join(str(err).split())
            out.append(Variant(mode, library, None, note=f"fails here: {type(err).__name__}: {message}"[:140]))
    return out


def compiled_variant(variants: list[Variant], mode: str) -> Variant:
    """``torch.compile`` of mono-quant's ``mode`` variant (compiled on its first timed call: the warm-up)."""
    ours = next(v for v in variants if v.mode == mode and v.library == "mono-quant")
    return Variant(mode, "mono-quant + compile", torch.compile(ours.model), ours.quantize_s, ours.file_bytes,
                   "torch.compile (inductor); docs/kernels.md")  # fmt: skip


# ------------------------------------------------------------------------------------------------ MLPs


def mlp_rows(
    name: str, sizes: tuple[int, ...], batches: tuple[int, ...], rounds: int, calls: int, peers: tuple[str, ...]
) -> list[dict]:
    torch.manual_seed(0)
    model = mlp(*sizes)
    calibration = [torch.randn(64, sizes[0]) for _ in range(32)]
    specs = [
        ("int8 dynamic", {"dtype": "int8", "mode": "dynamic"}),
        ("int8 static", {"dtype": "int8", "mode": "static", "calibration_data": calibration}),
        ("int8 weight-only", {"dtype": "int8", "mode": "weight_only"}),
        ("int4 weight-only", {"dtype": "int4", "group_size": 128}),
        ("bf16", {"dtype": "bf16"}),
    ]
    with tempfile.TemporaryDirectory() as folder:
        float_bytes = float_file_bytes(model, folder)
        variants = [Variant("float", "float", model, 0.0, float_bytes)]
        for mode, options in specs:
            q, seconds = timed(lambda o=options: mq.quantize(model, **o).model)
            variants.append(
                Variant(
                    mode,
                    "mono-quant",
                    q,
                    seconds,
                    our_file_bytes(q, folder),
                    "int4 g128 asym" if mode.startswith("int4") else "",
                )
            )
        variants.append(compiled_variant(variants, "int8 dynamic"))

    def calibrate(q: nn.Module) -> None:
        for x in calibration[:8]:
            q(x)

    variants += peer_variants(model, calibrate, lambda q: q(calibration[0]), peers)
    rows = []
    for batch in batches:
        x = torch.randn(batch, sizes[0])
        with torch.inference_mode():
            reference = model(x)
        live = {f"{v.mode}|{v.library}": v for v in variants if v.model is not None}
        ms = round_robin_ms({key: (lambda m=v.model, x=x: m(x)) for key, v in live.items()}, rounds, calls)
        for v in variants:
            row = base_row(f"{name} b{batch}", v, float_bytes)
            if v.model is not None:
                with torch.no_grad():
                    fidelity = sqnr_db(reference, v.model(x).float())
                fidelity = fidelity if math.isfinite(fidelity) else None  # the float row: identical output
                key = f"{v.mode}|{v.library}"
                row.update(
                    median_ms=ms[key],
                    ratio_to_float=ms[key] / ms["float|float"],
                    fidelity=f"SQNR {fidelity:.1f} dB" if fidelity is not None else "",
                    metric=fidelity,
                    metric_name="output SQNR dB",
                )
            rows.append(row)
    return rows


def base_row(workload: str, v: Variant, float_bytes: int | None) -> dict:
    file_ratio = None if v.file_bytes is None or not float_bytes else v.file_bytes / float_bytes
    return {
        "workload": workload,
        "mode": v.mode,
        "library": v.library,
        "median_ms": None,
        "ratio_to_float": None,
        "fidelity": "",
        "metric": None,
        "metric_name": "",
        "file_ratio": file_ratio,
        "quantize_s": v.quantize_s,
        "note": v.note,
    }


# ---------------------------------------------------------------------------------------------- MiniLM


def minilm_rows(quick: bool, peers: tuple[str, ...]) -> list[dict]:
    """MiniLM encode: fidelity over all sentences, latency per 32-sentence batch on a subset (round-robin)."""
    import minilm

    reason = minilm.available()
    if reason:
        return [{**base_row("MiniLM encode", Variant("all", "-", None, note=reason), None)}]
    model, tokenizer = minilm.load_minilm()
    texts = minilm.sentences(64 if quick else 512)
    batches, order = minilm.tokenize(tokenizer, texts)
    timing_batches, timing_order = minilm.tokenize(tokenizer, texts[:: 2 if quick else 4])
    with tempfile.TemporaryDirectory() as folder:
        float_bytes = float_file_bytes(model, folder)
        variants = [Variant("float", "float", model, 0.0, float_bytes)]
        for mode, library, build, note in minilm.OUR_CONFIGS:
            if quick and mode in ("int8 static", "int8 weight-only", "int4 weight-only"):
                continue
            q, seconds = timed(lambda b=build: b(model, batches[:8]))
            variants.append(Variant(mode, library, q, seconds, our_file_bytes(q, folder), note))
        if not quick:
            variants.append(compiled_variant(variants, "int8 dynamic"))

    def calibrate(q: nn.Module) -> None:
        for batch in batches[:8]:
            q(**batch)

    def check(q: nn.Module) -> None:
        q(**batches[0])

    variants += peer_variants(model, calibrate, check, peers)
    reference = minilm.encode(model, batches, order)
    live = {f"{v.mode}|{v.library}": v for v in variants if v.model is not None}
    fidelity = {key: minilm.fidelity(reference, minilm.encode(v.model, batches, order)) for key, v in live.items()}
    ms = round_robin_ms(
        {key: (lambda m=v.model: minilm.encode(m, timing_batches, timing_order)) for key, v in live.items()},
        rounds=2 if quick else 3,
    )
    per_batch = len(timing_batches)
    rows = []
    workload = f"MiniLM encode ({len(texts)} sentences, batch {minilm.BATCH_SIZE})"
    for v in variants:
        row = base_row(workload, v, float_bytes)
        key = f"{v.mode}|{v.library}"
        if key in live:
            f = fidelity[key]
            row.update(
                median_ms=ms[key] / per_batch,
                ratio_to_float=ms[key] / ms["float|float"],
                metric=f["cos_mean"],
                metric_name="mean cosine",
                **{k: f[k] for k in ("cos_mean", "cos_min", "nn_agree")},
                fidelity=f"cos {f['cos_mean']:.4f} (min {f['cos_min']:.4f}), NN {100 * f['nn_agree']:.1f}%",
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------------- CNN


def cnn_rows(quick: bool) -> list[dict]:
    """The CNN workload from ``benchmarks/cnn.py`` (its own peers: torch.ao static FX), in this table's columns."""
    try:
        import cnn
    except ImportError as err:  # the CNN workload lands separately; the table says so instead of failing
        return [base_row("CNN", Variant("all", "-", None, note=f"benchmarks/cnn.py not available ({err})"), None)]
    widths = (16, 32, 64) if quick else (32, 64, 128)
    model, test_x, test_y, calib = cnn.train_cnn(seconds_budget=8.0 if quick else 40.0, widths=widths)
    with tempfile.TemporaryDirectory() as folder:
        float_bytes = float_file_bytes(model, folder)
        sizes = {"float": float_bytes}
        for mode, options in (
            ("int8 static", {"mode": "static", "calibration_data": calib}),
            ("int8 dynamic", {"mode": "dynamic"}),
        ):
            sizes[mode] = our_file_bytes(mq.quantize(model, **options).model, folder)
    out = []
    for r in cnn.measure_cnn(model, test_x, test_y, calib, iters=8 if quick else 30):
        library = {"torch": "float", "torch.ao (peer)": "torch.ao"}.get(r["library"], r["library"])
        mode = r["mode"]
        nbytes = sizes.get(mode) if library in ("float", "mono-quant") else None
        v = Variant(mode, library, None, r["quantize_s"], nbytes, r["note"])
        row = base_row(f"CNN digits ResNet{'-small' if quick else ''} b{r['batch']}", v, float_bytes)
        extra = {"agreement": r["agreement"], "accuracy_drop": r["accuracy_drop"]}
        detail = "" if r["accuracy_drop"] is None else f"acc drop {r['accuracy_drop']:+.2f} pt"
        out.append(_with_timing(row, r, detail, extra))
    return out


def _with_timing(row: dict, r: dict, detail: str, extra: dict | None = None) -> dict:
    """``row`` with a CNN measurement's latency, ratio and top-1 agreement (nothing when it did not run)."""
    if r["median_ms"] is not None:
        row.update(
            median_ms=r["median_ms"],
            ratio_to_float=r["ratio_to_float"],
            metric=r["agreement"],
            metric_name="top-1 agreement",
            fidelity=f"top-1 agree {100 * r['agreement']:.1f}%, {detail}",
            **(extra or {}),
        )
    return row


def cnn_zoo_table_rows(quick: bool) -> list[dict]:
    """EfficientNet-Lite0 (full runs) and the 32x32 RGB ResNet of ``benchmarks/cnn_zoo.py``, as table rows."""
    import cnn_zoo

    out = []
    for r in cnn_zoo.cnn_zoo_rows(quick, lambda fns, rounds: round_robin_ms(fns, rounds)):
        row = base_row(r["workload"], Variant(r["mode"], r["library"], None, r["quantize_s"], None, r["note"]), None)
        out.append(_with_timing(row, r, f"logit cos {r['cosine']:.4f}"))
    return out


_COMPILE_VARIANTS = {  # benchmarks/compiled.py's variant -> (library, int4?)
    "float eager": ("float", False),
    "float compiled": ("float + compile", False),
    "mono-quant eager": ("mono-quant", False),
    "mono-quant compiled": ("mono-quant + compile", False),
    "torch.ao eager": ("torch.ao", False),
    "torchao PT2E + compile": ("torchao PT2E + compile", False),
    "mono-quant int4 eager": ("mono-quant", True),
    "mono-quant int4 compiled": ("mono-quant + compile", True),
}


def compile_rows(quick: bool) -> list[dict]:
    """Eager against ``torch.compile`` (``benchmarks/compiled.py``: MLP, MiniLM, ResNet static with torchao's PT2E
    recipe), latency only, as table rows."""
    import compiled

    out = []
    for name, workload in compiled.WORKLOADS.items():
        if quick and name == "minilm":
            continue
        for title, mode, ms in workload(5 if quick else 15):
            for variant, value in ms.items():
                library, int4 = _COMPILE_VARIANTS[variant]
                row_mode = "int4 weight-only" if int4 else ("float" if library.startswith("float") else mode)
                row = base_row(f"compile: {title}", Variant(row_mode, library, None), None)
                row.update(median_ms=value, ratio_to_float=value / ms["float eager"])
                out.append(row)
    return out


def recurrent_rows(quick: bool) -> list[dict]:
    """LSTM/GRU 40->256 x2, sequence 100, batch 1 and 32 (``benchmarks/recurrent.py``), as table rows."""
    import recurrent

    libraries = {"float": ("float", "float"), "torch.ao dynamic": ("int8 dynamic", "torch.ao"),
                 "mono-quant dynamic": ("int8 dynamic", "mono-quant"),
                 "mono-quant weight_only": ("int8 weight-only", "mono-quant")}  # fmt: skip
    out = []
    for r in recurrent.measure(5 if quick else 15):
        mode, library = libraries[r["variant"]]
        row = base_row(f"{r['layer']} 2x256 seq 100 b{r['batch']}", Variant(mode, library, None), 1)
        finite = math.isfinite(r["sqnr"])
        row.update(median_ms=r["ms"], ratio_to_float=r["ratio"], file_ratio=r["file_ratio"],
                   fidelity=f"SQNR {r['sqnr']:.1f} dB" if finite else "", metric=r["sqnr"] if finite else None,
                   metric_name="output SQNR dB")  # fmt: skip
        out.append(row)
    return out


def add_ratio_to_torch_ao(rows: list[dict]) -> None:
    """``ratio_to_ao``: latency over torch.ao's for the same workload and mode, measured in the same run."""
    ao = {(r["workload"], r["mode"]): r["median_ms"] for r in rows if r["library"] == "torch.ao" and r["median_ms"]}
    for r in rows:
        peer = ao.get((r["workload"], r["mode"]))
        r["ratio_to_ao"] = None if peer is None or r["median_ms"] is None else r["median_ms"] / peer


def cpu_flags() -> str:
    """The instruction sets that decide which int8/bf16 kernels are fast here (from /proc/cpuinfo).

    Example:
        >>> cpu_flags().startswith("CPU flags:")
        True
    """
    flags: set[str] = set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        flags = next((set(line.split(":", 1)[1].split()) for line in handle if line.startswith("flags")), set())
    names = {"AVX2": "avx2", "AVX-512 VNNI": "avx512_vnni", "AVX-VNNI": "avx_vnni", "AVX-512 BF16": "avx512_bf16",
             "AMX (int8)": "amx_int8", "AMX (bf16)": "amx_bf16"}  # fmt: skip
    return "CPU flags: " + ", ".join(f"{name} {'yes' if flag in flags else 'no'}" for name, flag in names.items())


# --------------------------------------------------------------------------------- checkpoints, memory


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
    seconds, peak, kept = out.stdout.split()[-3:]
    model = mlp(*sizes)
    largest = max(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))
    return {
        "seconds": float(seconds),
        "peak_growth": int(peak),
        "kept": int(kept),
        "model_bytes": state_bytes(model),
        "largest_layer": largest,
    }


def checkpoint_rows(sizes: tuple[int, ...], repeats: int) -> list[str]:
    """File size and load time of quantized safetensors files against the float model's file."""
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
            mq.save(mq.quantize(model, dtype=dtype), path)
            ms = median_ms(lambda p=path: mq.load(p, model=skeleton), repeats, warmup=1)
            size = os.path.getsize(path)
            lines.append(f"| {dtype} | {size:,} | {size / float_size:.3f} | {ms:.1f} | {ms / float_ms:.2f} |")
    return lines


# ---------------------------------------------------------------------------------------------- output


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(rows: list[dict]) -> str:
    """The markdown table: one line per (workload, mode, library); peers that could not run say why.

    Example:
        >>> row = {"workload": "w", "mode": "float", "library": "float", "median_ms": 2.0, "ratio_to_float": 1.0,
        ...        "fidelity": "", "file_ratio": 1.0, "quantize_s": 0.0, "note": ""}
        >>> format_table([row]).splitlines()[2]
        '| w | float | float | 2.000 | 1.00 | - |  | 1.000 | 0.00 |  |'
    """
    header = (
        "| workload | mode | library | median ms | ratio to float | ratio to torch.ao | fidelity | file ratio "
        "| quantize s | note |"
    )
    lines = [header, "|---|---|---|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['mode']} | {r['library']} | {_num(r['median_ms'], '.3f')} | "
            f"{_num(r['ratio_to_float'], '.2f')} | {_num(r.get('ratio_to_ao'), '.2f')} | {r['fidelity']} | "
            f"{_num(r['file_ratio'], '.3f')} | "
            f"{_num(r['quantize_s'], '.2f')} | {r['note']} |"
        )
    return "\n".join(lines)


def write_chart(rows: list[dict], path: Path) -> str:
    """Latency ratio vs fidelity, one panel per workload, one colour per library; returns a status line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "chart skipped: matplotlib is not installed (pip install -e '.[bench]')"
    workloads = list(dict.fromkeys(r["workload"] for r in rows if r["metric"] is not None))
    if not workloads:
        return "chart skipped: no measured rows"
    colours = {
        "float": "black",
        "mono-quant": "tab:blue",
        "torch.ao": "tab:red",
        "optimum-quanto": "tab:green",
        "torchao": "tab:orange",
    }
    markers = {"float": "o", "int8 dynamic": "s", "int8 static": "D", "int8 weight-only": "^", "bf16": "P"}
    cols = min(3, len(workloads))
    fig_rows = (len(workloads) + cols - 1) // cols
    fig, axes = plt.subplots(fig_rows, cols, figsize=(5.2 * cols, 4.2 * fig_rows), squeeze=False)
    for ax, workload in zip(axes.flat, workloads, strict=False):
        subset = [r for r in rows if r["workload"] == workload and r["metric"] is not None]
        for r in subset:
            marker = "v" if r["mode"].startswith("int4") else markers.get(r["mode"].split(" (")[0], "x")
            ax.scatter(r["ratio_to_float"], r["metric"], color=colours.get(r["library"], "grey"), marker=marker, s=48)
            ax.annotate(
                r["mode"].replace("weight-only", "w/o"),
                (r["ratio_to_float"], r["metric"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
        ax.axvline(1.0, color="grey", lw=0.6, ls=":")
        ax.set_title(workload, fontsize=9)
        ax.set_xlabel("latency / float (lower is faster)", fontsize=8)
        ax.set_ylabel(subset[0]["metric_name"], fontsize=8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%.2g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(workloads) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=lib) for lib, c in colours.items()]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart written to {path}"


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": THREADS,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "mono_quant": mq.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small smoke run (under a minute; torch.ao peer only)")
    parser.add_argument(
        "--workloads",
        default="mlp,minilm,cnn,compile,recurrent",
        help="comma-separated subset of mlp,minilm,cnn,compile,recurrent",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip optimum-quanto and torchao")
    parser.add_argument("--all-peers", action="store_true", help="measure optimum-quanto and torchao with --quick too")
    parser.add_argument("--out", default=str(HERE / "results"), help="path prefix of the .md/.json/.png outputs")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    chosen = {w.strip() for w in args.workloads.split(",")}
    skip_peers = args.no_peers or (args.quick and not args.all_peers)
    peers = ("torch.ao",) if skip_peers else ("torch.ao", "optimum-quanto", "torchao")
    started = time.perf_counter()
    rows: list[dict] = []
    if "mlp" in chosen:
        rows += mlp_rows(
            "MLP 1024-4096-1024", (1024, 4096, 1024), (1, 64), rounds=15 if args.quick else 40, calls=3, peers=peers
        )
        if not args.quick:
            rows += mlp_rows("MLP 4096-4096-4096", (4096, 4096, 4096), (1, 64), rounds=15, calls=2, peers=peers)
    if "minilm" in chosen:
        rows += minilm_rows(args.quick, peers)
    if "cnn" in chosen:
        rows += cnn_rows(args.quick)
        rows += cnn_zoo_table_rows(args.quick)
    if "compile" in chosen:
        rows += compile_rows(args.quick)
    if "recurrent" in chosen:
        rows += recurrent_rows(args.quick)
    add_ratio_to_torch_ao(rows)
    for r in rows:
        if r["library"] == "float" and r["median_ms"] is not None:
            r["fidelity"] = "reference"
    info = machine()
    status = peer_status()
    lines = [
        cpu_flags(),
        f"{info['cpu']}, {info['cores']} cores, {THREADS} threads; torch {info['torch']}, Python {info['python']}, "
        f"mono-quant {info['mono_quant']}{' (--quick)' if args.quick else ''}",
        "peers: " + "; ".join(status[p] for p in peers),
        "",
        format_table(rows),
    ]
    extra: dict[str, Any] = {}
    if "mlp" in chosen:
        sizes = (1024, 4096, 1024) if args.quick else (4096, 4096, 4096)
        lines += ["", f"checkpoints of MLP {'-'.join(map(str, sizes))} (load = read file + rebuild modules):"]
        extra["checkpoints"] = checkpoint_rows(sizes, 5 if args.quick else 20)
        lines += extra["checkpoints"]
        mem = extra["quantize_memory"] = quantize_memory(sizes)
        mib = 2**20
        lines.append(
            f"\nquantize MLP {'-'.join(map(str, sizes))} ({mem['model_bytes'] / mib:.0f} MiB float) to int8: "
            f"{mem['seconds']:.3f} s; peak RSS growth {mem['peak_growth'] / mib:.0f} MiB (quantized copy kept: "
            f"{mem['kept'] / mib:.0f} MiB; largest float layer: {mem['largest_layer'] / mib:.0f} MiB)"
        )
    picked = choice.chosen()
    extra["kernels_chosen"] = picked
    lines.append(f"\nkernels chosen by measurement in this run ({choice.kernel_choice()} mode; key -> kernel):")
    lines += [f"- {key}: {name}" for key, name in sorted(picked.items())]
    lines.append(f"\ntotal benchmark time {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.with_suffix(".md").write_text("# mono-quant benchmark results\n\n" + text + "\n")
    document = {"machine": info, "quick": args.quick, "peers": {p: status[p] for p in peers}, "rows": rows, **extra}
    out.with_suffix(".json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    print(write_chart(rows, out.with_suffix(".png")))


if __name__ == "__main__":
    main()
