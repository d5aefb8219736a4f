"""Train a small CNN on scikit-learn's digits with Lightning, quantize it to int8, gate on accuracy, export.

    python examples/train_digits.py            # outputs under runs/digits
    python examples/train_digits.py --out /tmp/digits --epochs 8

One ``QuantizationCallback`` calibrates int8 activation scales on the validation batches, quantizes the
trained model at the end of ``fit``, fails the run if validation accuracy drops by more than 1 point, and
writes ``model.quant.safetensors`` plus a ``<checkpoint>.quant.safetensors`` beside each kept checkpoint.
The script then reloads the file with ``mono_quant.load`` and checks its accuracy again.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import mono_quant as mq
from mono_quant_lightning import QuantizationCallback


class DigitsCNN(L.LightningModule):
    """Two conv layers and two linear layers on 8x8 grey images."""

    def __init__(self, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4 * 4, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )
        self.val_acc = MulticlassAccuracy(num_classes=10)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log("val_loss", nn.functional.cross_entropy(logits, labels))
        self.log("val_acc", self.val_acc)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """scikit-learn's 1797 real 8x8 digits, scaled to [0, 1]; a fixed 80/20 split."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    images, labels = images[order], labels[order]
    split = int(0.8 * len(images))
    train = TensorDataset(images[:split], labels[:split])
    val = TensorDataset(images[split:], labels[split:])
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=256)


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader) -> float:
    metric = MulticlassAccuracy(num_classes=10)
    model.eval()
    for images, labels in loader:
        metric.update(model(images), labels)
    return float(metric.compute())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/digits"), help="output directory (default runs/digits)")
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()

    train, val = digits_loaders()
    model = DigitsCNN()
    checkpoint = ModelCheckpoint(dirpath=args.out / "checkpoints", monitor="val_acc", mode="max", save_top_k=2)
    quantization = QuantizationCallback(
        dtype="int8",
        mode="static",
        metric=MulticlassAccuracy(num_classes=10),
        max_drop=0.01,
        quantize_on=("fit_end", "checkpoint"),
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        callbacks=[checkpoint, quantization],
        default_root_dir=args.out,
        logger=L.pytorch.loggers.CSVLogger(args.out, name="logs"),
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    trainer.fit(model, train, val)

    decision, report = quantization.decision, quantization.result.report
    path = quantization.export_path
    reloaded = mq.load(path, model=DigitsCNN())
    reloaded_accuracy = accuracy(reloaded, val)
    float_bytes = sum(t.numel() * t.element_size() for t in model.net.state_dict().values())

    print()
    print(
        f"validation accuracy   float {decision.float_score:.4f}   int8 {decision.quantized_score:.4f}   "
        f"drop {decision.drop:+.4f} (max 0.01: {'passed' if decision.passed else 'FAILED'})"
    )
    print(
        f"weights               float {report.model_bytes_before:,} B   int8 {report.model_bytes_after:,} B   "
        f"({report.model_bytes_before / report.model_bytes_after:.2f}x smaller)"
    )
    print(f"float state_dict      {float_bytes:,} B    exported file {path.stat().st_size:,} B")
    print(f"exported              {path}")
    sidecars = sorted(p.name for p in (args.out / "checkpoints").glob("*.quant.safetensors") if p != path)
    print(f"checkpoint sidecars   {', '.join(sidecars)}")
    print(
        f"reloaded from file    accuracy {reloaded_accuracy:.4f} "
        f"({'matches' if abs(reloaded_accuracy - decision.quantized_score) < 1e-6 else 'DIFFERS from'} the gate)"
    )
    print(f"total time            {time.perf_counter() - started:.1f} s")
    if abs(reloaded_accuracy - decision.quantized_score) > 1e-6:
        raise SystemExit("the reloaded model does not reproduce the gated accuracy")


if __name__ == "__main__":
    main()
