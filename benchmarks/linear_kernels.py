"""Linear kernels, one by one: the evidence for ``kernels.choice``'s defaults and what it picks on this CPU.

    python benchmarks/linear_kernels.py                 # per-shape table, then MiniLM encode
    python benchmarks/linear_kernels.py --part shapes   # or --part minilm; --threads N (default 2)

Per shape (MiniLM's 384->384, 384->1536 and 1536->384 layers, the MLP's 1024->4096 and 4096->1024) and
batch M = 1, 8, 64, 256: median microseconds of float ``nn.Linear``, every mono-quant candidate kernel
(int8 dynamic and static on ``_int_mm`` and oneDNN, int4 group-wise on the packed int4 kernel in bf16)
and torch.ao's dynamic ``quantized.linear_dynamic`` (the peer, imported here only), measured
round-robin (one call of each per round) so background load spreads evenly. Then the winner that
``kernels.choice`` measured for each (layer kind, shape, batch bucket).

MiniLM part: the real all-MiniLM-L6-v2 encoder (``benchmarks/minilm.py``) on real sentences, float vs
mono-quant int8 dynamic (kernels measured, and fixed) vs torch.ao dynamic, and int4 weight-only, at 8
and 1 sentences per batch: median ms per batch and mean cosine of the embeddings to float.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from run import cpu_flags  # benchmarks/ is on sys.path when this file runs
from timing import round_robin_ms
from torch import nn

import mono_quant as mq
from mono_quant.kernels import choice

SHAPES = {"MiniLM qkv/out": (384, 384), "MiniLM ffn in": (384, 1536), "MiniLM ffn out": (1536, 384)}
SHAPES |= {"MLP up": (1024, 4096), "MLP down": (4096, 1024)}
BATCHES = (1, 8, 64, 256)


def torch_ao(model: nn.Module) -> nn.Module:
    """torch.ao's deprecated dynamic int8 (fbgemm, per-tensor weights): the peer, used in benchmarks only."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)


def layer_of(model: nn.Module) -> nn.Module:
    """The one quantized layer of a ``Sequential(Linear)``."""
    return model[0]


def shape_candidates(k: int, n: int, m: int) -> dict[str, Callable[[], object]]:
    """Every way to compute one ``[m, k] @ [k, n]`` layer call, by name."""
    torch.manual_seed(0)
    float_model = nn.Sequential(nn.Linear(k, n)).eval()
    x = torch.randn(m, k)
    calibration = [torch.randn(64, k) for _ in range(4)]
    dynamic = layer_of(mq.quantize(float_model, dtype="int8", mode="dynamic").model)
    static = layer_of(mq.quantize(float_model, dtype="int8", mode="static", calibration_data=calibration).model)
    int4 = layer_of(mq.quantize(float_model, dtype="int4", scheme="asymmetric", group_size=32).model)
    peer = torch_ao(float_model)
    fns: dict[str, Callable[[], object]] = {"float": lambda: float_model(x), "torch.ao dyn": lambda: peer(x)}
    for name in ("int_mm", "onednn"):
        fns[f"dyn {name}"] = lambda name=name: dynamic._run(name, x)
        fns[f"static {name}"] = lambda name=name: static._run(name, x)
    fns["int4 packed bf16"] = lambda: int4(x)
    fns["dyn (chosen)"] = lambda: dynamic(x)  # the first call measures, the next ones use the winner
    return fns


def shapes_part() -> list[str]:
    lines = ["per-layer median us (round-robin, 15 rounds x 5 calls); ratio = dyn (chosen) / torch.ao dyn"]
    header = None
    for label, (k, n) in SHAPES.items():
        for m in BATCHES:
            fns = shape_candidates(k, n, m)
            ms = round_robin_ms(fns, rounds=15, calls=5)
            if header is None:
                header = f"{'layer':16} {'K->N':>10} {'M':>4} " + " ".join(f"{name:>16}" for name in ms) + "  ratio"
                lines.append(header)
                print(header, flush=True)
            cells = " ".join(f"{1e3 * v:16.1f}" for v in ms.values())
            ratio = ms["dyn (chosen)"] / ms["torch.ao dyn"]
            lines.append(f"{label:16} {f'{k}->{n}':>10} {m:>4} {cells}  {ratio:.2f}")
            print(lines[-1], flush=True)
    return lines + chosen_lines()


def chosen_lines() -> list[str]:
    """What ``kernels.choice`` measured and picked so far, one line per key."""
    out = ["kernel chosen by measurement (kind, weight shape [N, K], batch bucket, device, dtype):"]
    out += [f"  {key}: {name}" for key, name in sorted(choice.chosen().items())]
    print("\n".join(out), flush=True)
    return out


def minilm_part() -> list[str]:
    import minilm

    reason = minilm.available()
    if reason:
        return [reason]
    model, tokenizer = minilm.load_minilm()
    texts = minilm.sentences(512)
    lines = []
    for batch_size in (8, 1):
        batches, order = minilm.tokenize(tokenizer, texts, batch_size)
        timing_batches, timing_order = minilm.tokenize(tokenizer, texts[:: 4 * batch_size], batch_size)
        reference = minilm.encode(model, batches, order)
        models: dict[str, nn.Module] = {"float": model, "torch.ao int8 dyn": torch_ao(model)}
        choice.set_kernel_choice("fixed")
        models["ours int8 dyn"] = minilm.quantize_int8(model)
        models["ours int4 g32"] = minilm.quantize_int4_all(model)
        cosine = {
            name: minilm.fidelity(reference, minilm.encode(m, batches, order))["cos_mean"] for name, m in models.items()
        }
        timed = {"b": timing_batches, "o": timing_order}
        fns = {name: (lambda m=m, t=timed: minilm.encode(m, t["b"], t["o"])) for name, m in models.items()}
        fixed = round_robin_ms(fns, rounds=5)
        choice.set_kernel_choice("measure")
        minilm.encode(models["ours int8 dyn"], timing_batches, timing_order)  # measure every key once
        minilm.encode(models["ours int4 g32"], timing_batches, timing_order)
        measured = round_robin_ms(fns, rounds=5)
        per_batch = len(timing_batches)
        tokens = statistics.mean(b["input_ids"].numel() for b in timing_batches)
        lines.append(f"\nMiniLM encode, {batch_size} sentences/batch (~{tokens:.0f} tokens), median ms per batch")
        lines.append(f"{'variant':20} {'fixed':>8} {'measured':>9} {'/ float':>8} {'/ torch.ao':>10} {'cosine':>8}")
        for name in models:
            f, m = fixed[name] / per_batch, measured[name] / per_batch
            to_float, to_ao = measured[name] / measured["float"], measured[name] / measured["torch.ao int8 dyn"]
            lines.append(f"{name:20} {f:8.2f} {m:9.2f} {to_float:8.2f} {to_ao:10.2f} {cosine[name]:8.4f}")
        print("\n".join(lines[-len(models) - 2 :]), flush=True)
        lines += chosen_lines()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "shapes", "minilm"), default="all")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(cpu_flags(), f"; {args.threads} threads; torch {torch.__version__}", flush=True)
    start = time.perf_counter()
    lines = []
    if args.part in ("all", "shapes"):
        lines += shapes_part()
    if args.part in ("all", "minilm"):
        lines += minilm_part()
    print(f"({time.perf_counter() - start:.0f} s, {len(lines)} lines)")


if __name__ == "__main__":
    main()
