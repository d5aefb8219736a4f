"""Shared pieces of the Lightning tests: a quiet CPU ``Trainer`` and a dataset of dict batches."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset


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
