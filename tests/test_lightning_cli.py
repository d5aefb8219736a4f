"""``QuantizationCallback`` configured from a LightningCLI YAML (``trainer.callbacks``, ``metric`` as class_path)."""

from __future__ import annotations

import textwrap

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mono_quant as mq

pytest.importorskip("jsonargparse")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class Model(L.LightningModule):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


class Digits(L.LightningDataModule):
    def __init__(self, batch_size: int = 64) -> None:
        super().__init__()
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
        self.y = torch.tensor(digits.target)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[:640], self.y[:640]), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x[1400:], self.y[1400:]), batch_size=self.batch_size)


def test_callback_and_metric_from_a_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI
    from torchmetrics.classification import MulticlassAccuracy

    from mono_quant_lightning import QuantizationCallback

    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""
            trainer:
              max_epochs: 2
              accelerator: cpu
              logger: false
              enable_progress_bar: false
              enable_model_summary: false
              default_root_dir: {tmp_path}
              callbacks:
                - class_path: mono_quant_lightning.QuantizationCallback
                  init_args:
                    dtype: int8
                    metric:
                      class_path: torchmetrics.classification.MulticlassAccuracy
                      init_args:
                        num_classes: 10
                    max_drop: 0.03
                    export_dir: {tmp_path / "out"}
                    verbose: false
            model:
              hidden: 48
            """
        )
    )
    cli = LightningCLI(Model, Digits, args=["fit", "--config", str(config)], save_config_callback=None)
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, QuantizationCallback)]
    assert isinstance(cb.metric, MulticlassAccuracy) and cb.metric.num_classes == 10
    assert cb.max_drop == 0.03 and cb.decision.passed and cb.decision.float_score > 0.7
    q = mq.load(tmp_path / "out" / "model.quant.safetensors", model=Model(hidden=48))
    assert type(q.net[0]).__name__ == "Int8Linear"
