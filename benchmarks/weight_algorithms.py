"""int4 weight algorithms on real models: round-to-nearest vs GPTQ vs AWQ, against torchao in the same run.

- MiniLM (all-MiniLM-L6-v2, ``minilm.py``): calibrated on sentences 256-511, evaluated on the first 256
  (held out): embedding cosine to float (mean, min) and nearest-neighbour agreement; quantize time and the
  process's peak memory growth during quantize (each variant in a fresh process, so peaks do not mix).
  torchao's int4 weight-only (``IntxWeightOnlyConfig``, its CPU path, Linear layers) where torchao imports.
- digits MLP (scikit-learn) and Fashion-MNIST MLP (Debian ``dataset-fashion-mnist``): held-out accuracy
  of float, RTN and GPTQ at int4 group 32, calibrated on 512 training images.

    python benchmarks/weight_algorithms.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

import mono_quant as mq

MINILM_VARIANTS = [(alg, g) for g in (128, 32) for alg in ("rtn", "gptq", "awq", "torchao")]


def cpu_flags() -> str:
    out = subprocess.run(
        "grep -o 'amx\\|avx512_vnni\\|avx2' /proc/cpuinfo | sort -u", shell=True, capture_output=True, text=True
    )
    return " ".join(out.stdout.split()) or "(none of amx, avx512_vnni, avx2)"


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def minilm_variant(algorithm: str, group: int, evaluate: int) -> dict:
    """One MiniLM variant in this process: fidelity, quantize seconds and peak memory growth (MiB)."""
    import copy

    from minilm import encode, fidelity, load_minilm, sentences, tokenize

    model, tokenizer = load_minilm()
    texts = sentences(512)
    batches, order = tokenize(tokenizer, texts[:evaluate])
    calibration, _ = tokenize(tokenizer, texts[256:512])
    reference = encode(model, batches, order)
    base = _peak_mib()
    start = time.perf_counter()
    if algorithm == "torchao":
        from torchao.quantization import IntxWeightOnlyConfig, quantize_
        from torchao.quantization.granularity import PerGroup

        quantized = copy.deepcopy(model)
        quantize_(quantized, IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group)))
    else:
        data = calibration if algorithm != "rtn" else None
        config = mq.QuantizationConfig(dtype="int4", group_size=group, algorithm=algorithm)
        quantized = mq.quantize(model, config, calibration_data=data).model
    seconds = time.perf_counter() - start
    scores = fidelity(reference, encode(quantized, batches, order))
    return {"seconds": seconds, "peak_mib": _peak_mib() - base, **scores}


def _mlp_accuracy(name: str, x: torch.Tensor, y: torch.Tensor, split: int, width: int, epochs: int) -> list[dict]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), width), nn.ReLU(), nn.Linear(width, width),
                          nn.ReLU(), nn.Linear(width, 10))  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _epoch in range(epochs):
        for batch in torch.randperm(split).split(256):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    calibration = list(x[:512].split(64))

    def accuracy(m: nn.Module) -> float:
        with torch.no_grad():
            return (m(x[split:]).argmax(1) == y[split:]).float().mean().item()

    rows = [{"model": name, "variant": "float", "accuracy": accuracy(model)}]
    for algorithm in ("rtn", "gptq", "awq"):
        data = calibration if algorithm != "rtn" else None
        q = mq.quantize(model, dtype="int4", group_size=32, algorithm=algorithm, calibration_data=data).model
        rows.append({"model": name, "variant": f"int4 g32 {algorithm}", "accuracy": accuracy(q)})
    return rows


def classifier_rows() -> list[dict]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    rows = _mlp_accuracy("digits MLP 64-128-128-10", x, torch.tensor(digits.target), 1200, 128, epochs=60)
    import fashion

    if fashion.available():
        x_train, y_train, x_test, y_test = fashion.fashion_rows(20000, 5000)
        x, y = torch.cat([x_train, x_test]), torch.cat([y_train, y_test])
        rows += _mlp_accuracy("Fashion-MNIST MLP 784-256-256-10", x, y, 20000, 256, epochs=8)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="64 evaluation sentences instead of 256")
    parser.add_argument("--variant", nargs=2, help=argparse.SUPPRESS)  # one MiniLM variant, JSON on stdout
    parser.add_argument("--classifiers-only", action="store_true", help="skip MiniLM")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    evaluate = 64 if args.quick else 256
    if args.variant:
        print(json.dumps(minilm_variant(args.variant[0], int(args.variant[1]), evaluate)))
        return
    print(f"CPU flags: {cpu_flags()}; torch {torch.__version__}, 2 threads\n")
    if not args.classifiers_only:
        print(f"MiniLM, {evaluate} held-out sentences, calibrated on 256 others")
        print("| variant | cos mean | cos min | NN agree | quantize s | peak MiB |\n|---|---|---|---|---|---|")
    for algorithm, group in [] if args.classifiers_only else MINILM_VARIANTS:
        command = [sys.executable, __file__, "--variant", algorithm, str(group)] + (["--quick"] if args.quick else [])
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            print(f"| int4 g{group} {algorithm} | failed: {done.stderr.strip().splitlines()[-1][:80]} |||||")
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"| int4 g{group} {algorithm} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['nn_agree']:.3f} | "
              f"{r['seconds']:.1f} | {r['peak_mib']:.0f} |", flush=True)  # fmt: skip
    print("\n| model | variant | held-out accuracy |\n|---|---|---|")
    for row in classifier_rows():
        print(f"| {row['model']} | {row['variant']} | {row['accuracy']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
