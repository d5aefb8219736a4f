"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (offline, real data): images and labels."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

FASHION = Path("/usr/share/datasets/fashion-mnist")


def available() -> bool:
    """Whether the dataset is installed here (``apt-get install dataset-fashion-mnist``)."""
    return (FASHION / "t10k-images-idx3-ubyte.gz").is_file()


def fashion_rows(train: int, test: int) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: the first ``train``/``test`` images as ``[n, 28, 28]`` in [0, 1]."""

    def read(name: str, offset: int) -> np.ndarray:
        with gzip.open(FASHION / name) as handle:
            return np.frombuffer(handle.read(), dtype=np.uint8, offset=offset)

    def split(prefix: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        images = read(f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)[:count]
        labels = read(f"{prefix}-labels-idx1-ubyte.gz", 8)[:count]
        return torch.tensor(images, dtype=torch.float32) / 255.0, torch.tensor(labels, dtype=torch.long)

    return (*split("train", train), *split("t10k", test))
