"""``evaluation``: the module's own validation_step, run on any module, leaves nothing behind (no training)."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from tqdm.auto import tqdm

from mono_quant_lightning.evaluation import StepRunner, evaluate, progress


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        return {**batch, "pixels": batch["pixels"] / 16.0}  # the module's own preprocessing

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.acc(self(batch["pixels"]), batch["label"])
        self.log("acc", self.acc)
        self.log_dict({"max_pixel": batch["pixels"].max()})


def digits_batches(digits, n: int = 3) -> list[dict[str, torch.Tensor]]:
    x, y = digits[2][: 32 * n] * 16.0, digits[3][: 32 * n]
    return [{"pixels": a, "label": b} for a, b in zip(x.split(32), y.split(32), strict=True)]


def test_scores_follow_the_modules_own_hooks_and_metric(digits):
    module = Module()
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    batches = digits_batches(digits)
    scores = evaluate(module, trainer, [(batches, math.inf)])
    with torch.inference_mode():
        expected = torch.cat([(module(b["pixels"] / 16.0).argmax(1) == b["label"]) for b in batches]).float().mean()
    assert scores.values["acc"] == expected.item()
    assert scores.values["max_pixel"] <= 1.0  # on_after_batch_transfer ran before validation_step
    assert scores.higher_is_better == {"acc": True, "max_pixel": None}
    limited = evaluate(module, trainer, [(batches, 1)])  # limit_val_batches-style limits are honoured
    with torch.inference_mode():
        first = (module(batches[0]["pixels"] / 16.0).argmax(1) == batches[0]["label"]).float().mean()
    assert limited.values["acc"] == first.item()


def test_runner_restores_everything(digits):
    module = Module().train()
    batch = digits_batches(digits, 1)[0]
    module.acc.update(torch.eye(10)[:4], torch.arange(4))  # a metric mid-accumulation (4 of 4 right)
    before = {k: v.clone() for k, v in module.acc.metric_state.items()}
    trainer = L.Trainer(logger=False, enable_progress_bar=False)
    with StepRunner(module, trainer, n_loaders=1) as runner:
        assert not module.training and module.acc.update_count == 0  # a fresh metric for the pass
        output = runner.step(batch, 0, 0)
    assert output.shape == (32, 10)
    assert module.training and "log" not in vars(module) and not module._forward_hooks
    assert module.acc.update_count == 1
    assert all(torch.equal(module.acc.metric_state[k], v) for k, v in before.items())
    assert module.acc.compute().item() == 1.0
    with pytest.raises(RuntimeError, match="not attached to a `Trainer`"):
        module.trainer  # noqa: B018 - the trainer attached for the pass is detached again


def test_progress_bar_only_with_the_trainers_bar():
    with_bar = progress(L.Trainer(logger=False, enable_progress_bar=True), [1, 2], "pass")
    assert isinstance(with_bar, tqdm) and with_bar.delay == 1.0 and list(with_bar) == [1, 2]
    assert progress(L.Trainer(logger=False, enable_progress_bar=False), [1, 2], "pass") == [1, 2]
