"""Sequence classifiers trained with Lightning on real data (Fashion-MNIST rows: benchmarks/fashion.py, digits rows)."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn


class SequenceClassifier(L.LightningModule):
    """A recurrent layer over the rows, then a linear head on the last step's output."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn
        directions = 2 if rnn.bidirectional else 1
        self.head = nn.Linear(rnn.hidden_size * directions, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_index: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-3)


def train(rnn: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> SequenceClassifier:
    torch.manual_seed(0)
    model = SequenceClassifier(rnn)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, loader)
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x.split(1000)])
    return (predictions == y).float().mean().item()
