"""Recurrent layers: float ``nn.LSTM``/``nn.GRU`` (oneDNN) against torch.ao's dynamic int8 and mono-quant, one run.

    python benchmarks/recurrent.py            # batch 1 and 32, sequence 100, 2 threads
    python benchmarks/recurrent.py --quick    # fewer rounds
    python benchmarks/recurrent.py --threads 1

Model: a 2-layer recurrent layer over 40 features (a speech front end's mel bands), hidden 256. Latency
is the median over round-robin rounds (every variant once per round); fidelity is the output SQNR
against float on the same random sequence; the file ratio is our ``.safetensors`` (or torch.ao's
``torch.save(state_dict)``) over the float model's ``.safetensors``. torch.ao is imported in this file
only, as the peer; the library never uses it.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import warnings

import torch
from run import cpu_flags  # benchmarks/ is on sys.path when this file runs
from safetensors.torch import save_file
from timing import round_robin_ms
from torch import nn

import mono_quant as mq
from mono_quant.kernels import numerics
from mono_quant.qparams import sqnr_db


def _file_bytes(model: nn.Module, ours: bool) -> int:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "m.safetensors")
        if ours:
            mq.save(model, path)
        else:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return os.path.getsize(path)


def _torch_ao_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _variants(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    float_bytes = _file_bytes(model, ours=False)
    out = {"float": (model, float_bytes)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic  # the peer, here only

        ao = quantize_dynamic(model, {nn.LSTM, nn.GRU}, dtype=torch.qint8)
    out["torch.ao dynamic"] = (ao, _torch_ao_bytes(ao))
    for mode in ("dynamic", "weight_only"):
        q = mq.quantize(model, mode=mode).model
        out[f"mono-quant {mode}"] = (q, _file_bytes(q, ours=True))
    return out


def measure(rounds: int) -> list[dict]:
    """One row per layer, batch and variant: ``ms``, ``ratio`` (to float), ``sqnr`` (dB) and ``file_ratio``."""
    rows = []
    for float_type in (nn.LSTM, nn.GRU):
        torch.manual_seed(0)
        model = nn.Sequential(float_type(40, 256, num_layers=2, batch_first=True)).eval()
        variants = _variants(model)
        float_bytes = variants["float"][1]
        for batch in (1, 32):
            x = torch.randn(batch, 100, 40)
            with torch.inference_mode():
                reference = model(x)[0]
                fns = {name: (lambda m=m, x=x: m(x)) for name, (m, _) in variants.items()}
                times = round_robin_ms(fns, rounds)
                for name, (m, size) in variants.items():
                    rows.append({
                        "layer": float_type.__name__, "batch": batch, "variant": name, "ms": times[name],
                        "ratio": times[name] / times["float"],
                        "sqnr": sqnr_db(reference, m(x)[0]) if name != "float" else float("inf"),
                        "file_ratio": size / float_bytes,
                    })  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else 15
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, sequence 100, median of {rounds} rounds")
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "not set")
    print(f"{cpu_flags()}; ONEDNN_MAX_CPU_ISA {isa}; {numerics.describe()}")
    print("| layer | batch | variant | ms | x float | output SQNR dB | file x float |")
    print("|---|---|---|---|---|---|---|")
    for r in measure(rounds):
        print(
            f"| {r['layer']} | {r['batch']} | {r['variant']} | {r['ms']:.2f} | {r['ratio']:.2f} | {r['sqnr']:.1f} | "
            f"{r['file_ratio']:.2f} |"
        )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
