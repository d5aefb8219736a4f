"""Cost of QuantizationCallback's calibration: a validation epoch with the observers attached vs without.

    python benchmarks/calibration_overhead.py [--repeats 7] [--batches 32]

Runs ``trainer.validate`` on a CNN over real digits (upsampled to 32x32 so the layers do real work)
and reports the median epoch time with the callback observing (minmax, histogram) relative to a
plain epoch. Targets: minmax <= 1.15x, histogram <= 1.5x.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mono_quant_lightning import QuantizationCallback


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 256),
            nn.ReLU(),
            nn.Linear(256, 10),
        )

    def forward(self, x):
        return self.net(x)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))


class ObserveInValidate(QuantizationCallback):
    """Benchmark only: observe during ``trainer.validate`` (the real callback observes fit validation only)."""

    def _observes_validation(self, trainer: L.Trainer) -> bool:
        state = trainer.state.fn
        trainer.state.fn = TrainerFn.FITTING
        try:
            return super()._observes_validation(trainer)
        finally:
            trainer.state.fn = state


def epoch_seconds(model: Net, loader: DataLoader, callbacks: list) -> float:
    trainer = L.Trainer(
        accelerator="cpu",
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    start = time.perf_counter()
    trainer.validate(model, loader, verbose=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batches", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = nn.functional.interpolate(images, size=32, mode="bilinear")
    loader = DataLoader(TensorDataset(images, torch.tensor(data.target)), batch_size=56)
    model = Net()
    variants = {
        "none": lambda: [],
        "minmax": lambda: [ObserveInValidate(observer="minmax", calibration_batches=args.batches, verbose=False)],
        "histogram": lambda: [ObserveInValidate(observer="histogram", calibration_batches=args.batches, verbose=False)],
    }
    epoch_seconds(model, loader, [])  # warm-up
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every variant alike
        for name, make in variants.items():
            times[name].append(epoch_seconds(model, loader, make()))
    base = statistics.median(times["none"])
    print(
        f"validation epoch: {len(loader)} batches of 56 (1x32x32), {args.batches} observed, "
        f"median of {args.repeats}, torch threads {torch.get_num_threads()}"
    )
    print(f"{'observer':<12}{'median s':>10}{'ratio':>8}{'target':>8}")
    for name, target in (("none", None), ("minmax", 1.15), ("histogram", 1.5)):
        median = statistics.median(times[name])
        print(f"{name:<12}{median:>10.4f}{median / base:>8.3f}{'' if target is None else f'{target:.2f}':>8}")


if __name__ == "__main__":
    main()
