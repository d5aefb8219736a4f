"""Reach over real modelling code: the share of matmul weights each mode makes integer, per architecture.

Builds 27 ``transformers`` architectures from small configs (``transformers_zoo.py`` beside it; random weights,
real modelling code), quantizes each in int8 dynamic, int8 static (calibrated on 3 random batches) and int4
(group 32), and prints a markdown table: share of matmul weights quantized, output SQNR against float
(n/a where the random model's output is ~0) and whether a save -> load into a freshly built skeleton
reproduces the outputs exactly. ``python benchmarks/reach.py [arch ...] > benchmarks/reach.md``.
"""

from __future__ import annotations

import math
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import transformers_zoo as zoo

import mono_quant as mq
from mono_quant.engine.selection import matmul_weight_numel

MODES = {"int8 dynamic": {"mode": "dynamic"}, "int8 static": {"mode": "static"},
         "int4 (g32)": {"dtype": "int4", "group_size": 32}}  # fmt: skip


def measure(name: str, options: dict) -> tuple[float, float, bool, int, int]:
    model, make = zoo.build(name)
    inputs = make()
    with torch.inference_mode():
        reference = zoo.output(model(**inputs))
    calibration = [make() for _ in range(2)] + [inputs] if options.get("mode") == "static" else None
    q = mq.quantize(model, calibration_data=calibration, **options).model
    total = sum(matmul_weight_numel(m) for m in model.modules())
    done = sum(matmul_weight_numel(model.get_submodule(n)) for n in mq.quantized_layers(q))
    with torch.inference_mode():
        out = zoo.output(q(**inputs))
    sqnr = mq.qparams.sqnr_db(reference, out) if reference.norm() > 1e-3 else math.nan
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.safetensors"
        mq.save(q, path)
        loaded = mq.load(path, zoo.build(name, seed=1)[0])
        with torch.inference_mode():
            same = torch.equal(zoo.output(loaded(**inputs)), out)
    return done / total, sqnr, same, done, total


def main(names: list[str]) -> None:
    warnings.filterwarnings("ignore")
    print("| architecture | " + " | ".join(f"{m}: share, SQNR dB, round trip" for m in MODES) + " |")
    print("|---|" + "---|" * len(MODES))
    totals = {mode: [0, 0] for mode in MODES}
    for name in names:
        cells = []
        for mode, options in MODES.items():
            share, sqnr, same, done, total = measure(name, options)
            totals[mode][0] += done
            totals[mode][1] += total
            sqnr_text = "n/a" if math.isnan(sqnr) else f"{sqnr:.1f}"
            cells.append(f"{share:.2f}, {sqnr_text}, {'exact' if same else 'DIFFERS'}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print("| **all (weighted)** | " + " | ".join(f"**{d / t:.3f}**" for d, t in totals.values()) + " |")


if __name__ == "__main__":
    main(sys.argv[1:] or zoo.names())
