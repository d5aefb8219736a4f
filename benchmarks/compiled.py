"""Eager vs ``torch.compile``: mono-quant against float and the peers, one process, round-robin timing.

Rows (ratio = latency / float eager of the same workload in this run; lower is faster):
- MLP 1024-4096-1024 int8 dynamic at batch 1, 8 and 64 (random inputs); peer: torch.ao dynamic (eager).
- MiniLM (all-MiniLM-L6-v2, 8 real sentences) int8 dynamic; peer: torch.ao dynamic.
- ResNet-style CNN (3-channel, BatchNorm statistics from real photo crops) static int8 at batch 32 and 1;
  peer: torchao's PT2E recipe (``prepare_pt2e``/``convert_pt2e`` with the X86 inductor quantizer, then
  ``torch.compile`` with inductor freezing) where it imports.
Each compiled variant is compiled (and run twice) before timing; compile seconds are printed.

    python benchmarks/compiled.py [--rounds 15] [--workloads mlp,minilm,cnn]
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import time
import warnings
from collections.abc import Callable

import torch
from timing import round_robin_ms
from torch import nn

import mono_quant as mq


def cpu_flags() -> str:
    out = subprocess.run(
        "grep -o 'amx\\|avx512_vnni\\|avx2' /proc/cpuinfo | sort -u", shell=True, capture_output=True, text=True
    )
    return " ".join(out.stdout.split()) or "(none of amx, avx512_vnni, avx2)"


def _torch_ao_dynamic(model: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic  # the deprecated peer, imported here only

        return quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)


def _pt2e(model: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    """torchao's PT2E static int8 recipe for x86 + ``torch.compile``."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    exported = torch.export.export(copy.deepcopy(model), (example,)).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(exported, quantizer)
    for batch in calibration:
        for part in batch.split(example.shape[0]):  # the exported graph has the example's batch size
            prepared(part)
    compiled = torch.compile(convert_pt2e(prepared))
    torch._inductor.config.freezing = True  # the recipe: weights folded and prepacked as constants
    try:
        compiled(example)
    finally:
        torch._inductor.config.freezing = False
    return compiled


def _compiled(fn: nn.Module, x: torch.Tensor, name: str) -> Callable[[], object]:
    start = time.perf_counter()
    compiled = torch.compile(fn)
    compiled(x)
    compiled(x)
    print(f"  compile {name}: {time.perf_counter() - start:.1f} s", flush=True)
    return lambda: compiled(x)


def _table(workload: str, fns: dict[str, Callable[[], object]], rounds: int) -> None:
    ms = round_robin_ms(fns, rounds)
    base = ms["float eager"]
    for name, value in ms.items():
        print(f"| {workload} | {name} | {value:.3f} | {value / base:.2f} |", flush=True)


def mlp(rounds: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
    q = mq.quantize(model, dtype="int8").model
    ao = _torch_ao_dynamic(model)
    for batch in (1, 8, 64):
        x = torch.randn(batch, 1024)
        fns = {
            "float eager": lambda x=x: model(x),
            "mono-quant eager": lambda x=x: q(x),
            "mono-quant compiled": _compiled(q, x, f"mlp b{batch}"),
            "torch.ao eager": lambda x=x: ao(x),
        }
        _table(f"MLP b{batch}", fns, rounds)


def minilm(rounds: int) -> None:
    from minilm import load_minilm, sentences, tokenize

    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer, sentences(8))[0][0]
    q = mq.quantize(model, dtype="int8", layer_types=(nn.Linear,)).model
    ao = _torch_ao_dynamic(model)

    def run(m: nn.Module) -> Callable[[], object]:
        return lambda: m(**batch)

    start = time.perf_counter()
    compiled = torch.compile(q)
    compiled(**batch)
    print(f"  compile minilm: {time.perf_counter() - start:.1f} s", flush=True)
    fns = {"float eager": run(model), "mono-quant eager": run(q), "mono-quant compiled": run(compiled),
           "torch.ao eager": run(ao)}  # fmt: skip
    _table("MiniLM 8 sentences", fns, rounds)


def cnn(rounds: int) -> None:
    from cnn_zoo import photo_crops, rgb_resnet

    model = rgb_resnet()
    calibration = [photo_crops(32, 32, seed=s) for s in range(2)]
    q = mq.quantize(model, mode="static", calibration_data=calibration).model
    for batch in (32, 1):
        x = photo_crops(32, batch, seed=9)
        fns = {
            "float eager": lambda x=x: model(x),
            "float compiled": _compiled(model, x, f"float cnn b{batch}"),
            "mono-quant eager": lambda x=x: q(x),
            "mono-quant compiled": _compiled(q, x, f"cnn b{batch}"),
        }
        try:
            pt2e = _pt2e(model, x, calibration)
            pt2e(x)
            fns["torchao PT2E + compile"] = lambda x=x, m=pt2e: m(x)
        except Exception as err:
            print(f"  torchao PT2E: {type(err).__name__}: {str(err)[:120]}")
        _table(f"ResNet static b{batch}", fns, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workloads", default="mlp,minilm,cnn")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, 2 threads\n")
    print("| workload | variant | median ms | ratio to float eager |\n|---|---|---|---|")
    with torch.inference_mode():
        for name in args.workloads.split(","):
            {"mlp": mlp, "minilm": minilm, "cnn": cnn}[name](args.rounds)


if __name__ == "__main__":
    main()
