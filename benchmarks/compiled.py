"""Eager vs ``torch.compile``: mono-quant against float and the peers, one process, round-robin timing.

Rows (ratio = latency / float eager of the same workload in this run; lower is faster):
- MLP 1024-4096-1024 int8 dynamic at batch 1, 8 and 64 (random inputs); peer: torch.ao dynamic (eager); at
  batch 64 also int4 weight-only (group 128) eager and compiled.
- MiniLM (all-MiniLM-L6-v2, 8 real sentences) int8 dynamic and int4 weight-only; peer: torch.ao dynamic.
- ResNet-style CNN (3-channel, BatchNorm statistics from real photo crops) static int8 at batch 32 and 1;
  peer: torchao's PT2E recipe (``prepare_pt2e``/``convert_pt2e`` with the X86 inductor quantizer, then
  ``torch.compile`` with inductor freezing) where it imports.
Each compiled variant is compiled (and run twice) before timing; compile seconds are printed.

    python benchmarks/compiled.py [--rounds 15] [--workloads mlp,minilm,cnn]

``benchmarks/run.py --workloads compile`` puts the same rows into the main table.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from collections.abc import Callable

import torch
from run import cpu_flags  # benchmarks/ is on sys.path when this file runs
from timing import round_robin_ms
from torch import nn

import mono_quant as mq


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


Measured = list[tuple[str, str, dict[str, float]]]  # (workload, int8 mode, variant -> median ms)


def _table(workload: str, mode: str, fns: dict[str, Callable[[], object]], rounds: int) -> tuple[str, str, dict]:
    ms = round_robin_ms(fns, rounds)
    base = ms["float eager"]
    for name, value in ms.items():
        print(f"| {workload} | {name} | {value:.3f} | {value / base:.2f} |", flush=True)
    return f"{workload} {mode}", mode, ms


def mlp(rounds: int) -> Measured:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 1024)).eval()
    q = mq.quantize(model, dtype="int8").model
    q4 = mq.quantize(model, dtype="int4").model
    ao = _torch_ao_dynamic(model)
    out = []
    for batch in (1, 8, 64):
        x = torch.randn(batch, 1024)
        fns = {
            "float eager": lambda x=x: model(x),
            "mono-quant eager": lambda x=x: q(x),
            "mono-quant compiled": _compiled(q, x, f"mlp b{batch}"),
            "torch.ao eager": lambda x=x: ao(x),
        }
        if batch == 64:  # int4 weight-only (g128), eager and compiled
            fns["mono-quant int4 eager"] = lambda x=x: q4(x)
            fns["mono-quant int4 compiled"] = _compiled(q4, x, "mlp int4 b64")
        out.append(_table(f"MLP b{batch}", "int8 dynamic", fns, rounds))
    return out


def minilm(rounds: int) -> Measured:
    from minilm import load_minilm, sentences, tokenize

    model, tokenizer = load_minilm()
    batch = tokenize(tokenizer, sentences(8))[0][0]
    q = mq.quantize(model, dtype="int8", layer_types=(nn.Linear,)).model
    q4 = mq.quantize(model, dtype="int4", layer_types=(nn.Linear,)).model
    ao = _torch_ao_dynamic(model)

    def run(m: nn.Module) -> Callable[[], object]:
        return lambda: m(**batch)

    def compiled(m: nn.Module, name: str) -> Callable[[], object]:
        start = time.perf_counter()
        fn = torch.compile(m)
        fn(**batch)
        fn(**batch)
        print(f"  compile {name}: {time.perf_counter() - start:.1f} s", flush=True)
        return run(fn)

    fns = {"float eager": run(model), "mono-quant eager": run(q), "mono-quant compiled": compiled(q, "minilm"),
           "torch.ao eager": run(ao), "mono-quant int4 eager": run(q4),
           "mono-quant int4 compiled": compiled(q4, "minilm int4")}  # fmt: skip
    return [_table("MiniLM 8 sentences", "int8 dynamic", fns, rounds)]


def cnn(rounds: int) -> Measured:
    from cnn_zoo import photo_crops, rgb_resnet

    model = rgb_resnet()
    out = []
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
        out.append(_table(f"ResNet b{batch}", "int8 static", fns, rounds))
    return out


WORKLOADS: dict[str, Callable[[int], Measured]] = {"mlp": mlp, "minilm": minilm, "cnn": cnn}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--workloads", default="mlp,minilm,cnn")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    print(f"{cpu_flags()}; torch {torch.__version__}, 2 threads\n")
    print("| workload | variant | median ms | ratio to float eager |\n|---|---|---|---|")
    with torch.inference_mode():
        for name in args.workloads.split(","):
            WORKLOADS[name](args.rounds)


if __name__ == "__main__":
    main()
