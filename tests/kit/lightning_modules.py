"""Shared pieces of the Lightning tests: a quiet CPU ``Trainer`` and a dataset of dict batches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mono_quant_lightning import QuantizationCallback


def quiet_trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    """``L.Trainer`` on one CPU device for 2 epochs, quiet; ``kwargs`` override any option."""
    options = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)


class DictDigits(Dataset):
    """Images and labels as dict batches (``{"image", "label"}``: the torchvision-v2 / Hugging Face shape)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.x[i], "label": self.y[i]}


class DigitsCNN(L.LightningModule):
    """A tiny CNN; ``batch_kind`` says how batches look ("tuple", "dict" or "reversed" (target, image))."""

    def __init__(self, batch_kind: str = "tuple", lr: float = 0.02) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 64, 32), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image.reshape(-1, 1, 8, 8))

    def _split(self, batch):
        if self.hparams.batch_kind == "dict":
            return batch["image"], batch["label"]
        if self.hparams.batch_kind == "reversed":
            return batch[1], batch[0]
        return batch

    def training_step(self, batch, batch_idx):
        x, y = self._split(batch)
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = self._split(batch)
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def test_step(self, batch, batch_idx):
        x, y = self._split(batch)
        self.log("test_acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def loaders(digits, kind: str = "tuple", n_train: int = 512, n_val: int = 256, batch_size: int = 64):
    x_train, y_train, x_val, y_val = digits
    x_train, y_train, x_val, y_val = x_train[:n_train], y_train[:n_train], x_val[:n_val], y_val[:n_val]
    if kind == "dict":
        train, val = DictDigits(x_train, y_train), DictDigits(x_val, y_val)
    elif kind == "reversed":
        train, val = TensorDataset(y_train, x_train), TensorDataset(y_val, x_val)
    else:
        train, val = TensorDataset(x_train, y_train), TensorDataset(x_val, y_val)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=batch_size)


def trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    return quiet_trainer(tmp_path, callbacks, **kwargs)


def quiet(**kwargs) -> QuantizationCallback:
    return QuantizationCallback(verbose=False, **kwargs)
