"""What ``QuantizationCallback()`` with default settings adds to a short Lightning fit's wall time.

    python benchmarks/callback_overhead.py [--rounds 5] [--epochs 4]

The main example's job (``examples/train_digits.py``: a small CNN on scikit-learn's real digits, CPU) is fitted
with and without the callback, alternating (one fit of each per round, so a burst of other work on the machine
hits both), and the median wall times are compared. Default settings: int8 dynamic, quantized at fit end, no
accuracy gate. A static run (calibration on every validation batch) and one with the accuracy gate follow, since
users turn those on. Target (issue 23): default overhead <= 5% of the fit.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from train_digits import DigitsCNN, digits_loaders  # the main example's model and real data

from mono_quant_lightning import QuantizationCallback


def fit_seconds(epochs: int, callback: Callable[[], QuantizationCallback] | None) -> float:
    """Wall seconds of one ``trainer.fit`` from a fixed seed (model, data and trainer built outside the timing)."""
    torch.manual_seed(0)
    train, val = digits_loaders()
    model = DigitsCNN()
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            max_epochs=epochs,
            accelerator="cpu",
            callbacks=[callback()] if callback else [],
            default_root_dir=folder,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        start = time.perf_counter()
        trainer.fit(model, train, val)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    variants: dict[str, Callable[[], QuantizationCallback] | None] = {
        "no callback": None,
        "QuantizationCallback() (default)": QuantizationCallback,
        'QuantizationCallback(mode="static")': lambda: QuantizationCallback(mode="static"),
        "static + accuracy gate": lambda: QuantizationCallback(
            mode="static", metric=MulticlassAccuracy(num_classes=10), max_drop=0.01
        ),
    }
    fit_seconds(1, None)  # warm-up: imports, allocator, oneDNN primitives
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, callback in variants.items():
            times[name].append(fit_seconds(args.epochs, callback))
    base = statistics.median(times["no callback"])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, digits CNN, {args.epochs} epochs, "
          f"median of {args.rounds} alternating rounds\n")  # fmt: skip
    print("| fit | seconds | overhead |\n|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {100 * (median / base - 1):+.1f}% |")


if __name__ == "__main__":
    main()
