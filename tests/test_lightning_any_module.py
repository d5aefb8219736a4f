"""QuantizationCallback on modules written the way Lightning users write them (real fits on digits)."""

from __future__ import annotations

import os
import stat

import lightning as L
import pytest
import torch
from kit.lightning_modules import DictDigits, quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

import mono_quant as mq
from mono_quant.errors import ConfigError
from mono_quant_lightning import QuantizationCallback, QuantizationGateError, QuantMode
from mono_quant_lightning.checkpoint_io import SidecarCheckpointIO
from mono_quant_lightning.export import read_gate

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class Classifier(L.LightningModule):
    """``forward(self, x)``, dict batches, torchmetrics updated in training and validation, ``val_acc`` logged."""

    steps = 0

    def __init__(self, hidden: int = 64, lr: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.train_mse = MeanSquaredError()
        self.loss_mean = MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        Classifier.steps += 1
        out = self(batch["image"])
        loss = nn.functional.cross_entropy(out, batch["label"])
        self.log("train_mse", self.train_mse(out.softmax(1), nn.functional.one_hot(batch["label"], 10).float()))
        self.log("loss_mean", self.loss_mean(loss))
        return loss

    def validation_step(self, batch, batch_idx):
        out = self(batch["image"])
        self.val_acc(out, batch["label"])
        self.log("val_acc", self.val_acc)
        self.log("val_loss", nn.functional.cross_entropy(out, batch["label"]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def data(digits, n_train: int = 640):
    x_train, y_train, x_val, y_val = digits
    train = DictDigits(x_train[:n_train].reshape(-1, 1, 8, 8), y_train[:n_train])
    val = DictDigits(x_val[:256].reshape(-1, 1, 8, 8), y_val[:256])
    return DataLoader(train, batch_size=64, shuffle=True), DataLoader(val, batch_size=64)


def fit(tmp_path, digits, cb, model=None, **kwargs):
    trainer = quiet_trainer(tmp_path, [cb] if cb is not None else [], **{"max_epochs": 3, **kwargs})
    model = model or Classifier()
    Classifier.steps = 0
    trainer.fit(model, *data(digits))
    return trainer, model


def with_outlier(model: Classifier) -> Classifier:
    """A big weight on pixel 0 (always 0 in digits): float accuracy is unchanged, int4 groups lose the rest."""
    with torch.no_grad():
        model.net[1].weight[:, 0] = 2.0
    return model


def outlier_classifier(digits) -> Classifier:
    """Random ReLU features + a ridge-regression head (accurate), with a big weight on pixel 0 (always 0 in
    digits): the float model is unaffected, but int4 groups of 32 inputs that hold it lose their other weights."""
    model = with_outlier(Classifier(lr=0.0))  # lr 0: one training step changes nothing
    with torch.no_grad():
        hidden = torch.relu(model.net[1](digits[0]))
        features = torch.cat([hidden, torch.ones(len(hidden), 1)], 1).double()
        ridge = features.T @ features + 1e-2 * torch.eye(features.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(ridge, features.T @ nn.functional.one_hot(digits[1], 10).double()).float()
        model.net[3].weight.copy_(solution[:-1].T)
        model.net[3].bias.copy_(solution[-1])
    return model


def one_step_trainer(tmp_path, cb) -> L.Trainer:
    return quiet_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1)


def test_dict_batches_with_the_zero_argument_callback(tmp_path, digits, caplog):
    cb = QuantizationCallback()
    trainer, _ = fit(tmp_path, digits, cb)
    assert cb.mode_used is QuantMode.STATIC
    assert cb.fidelity.cosine_min > 0.98
    assert cb.export_path.is_file() and (cb.export_path.parent / "model.quant.report.txt").is_file()
    reloaded = mq.load(cb.export_path, model=Classifier())
    x = digits[2][:16].reshape(-1, 1, 8, 8)
    torch.testing.assert_close(reloaded(x), cb.result.model(x))
    assert "quantization report" in caplog.text and "fidelity" in caplog.text
    assert trainer.callback_metrics["quant/sqnr_db"] > 20


def test_monitor_gates_on_the_logged_metric(tmp_path, digits):
    cb = QuantizationCallback(monitor="val_acc", max_drop=0.02, verbose=False)
    trainer, model = fit(tmp_path, digits, cb)
    # the float score is what the module itself logged at the last validation (same weights, same data)
    assert cb.decision.float_score == pytest.approx(float(trainer.callback_metrics["val_acc"]))
    assert cb.decision.float_score > 0.8 and cb.decision.passed
    assert float(trainer.callback_metrics["quant/val_acc_quantized"]) == pytest.approx(cb.decision.quantized_score)
    assert float(trainer.callback_metrics["quant/passed"]) == 1.0
    gate = read_gate(cb.export_path)
    assert gate["metric"] == "val_acc" and gate["passed"] is True
    assert model.val_acc.update_count == 0  # the module's own metric was left as Lightning left it


def test_gated_export_is_written_once_and_follows_the_umask(tmp_path, digits):
    cb = QuantizationCallback(monitor="val_acc", max_drop=1.0, verbose=False)
    previous = os.umask(0o022)
    try:
        one_step_trainer(tmp_path, cb).fit(Classifier(), *data(digits))
    finally:
        os.umask(previous)
    assert read_gate(cb.export_path)["passed"] is True  # the gate record is in the file's metadata document
    assert mq.load(cb.export_path)[1]["extra"]["mono_quant_lightning.gate"]["metric"] == "val_acc"
    assert stat.S_IMODE(cb.export_path.stat().st_mode) == 0o644  # what a plain open gives, not safetensors' 0600
    assert cb.outcome.extra_paths == (cb.export_path.with_name("model.quant.report.txt"),)


def test_monitor_min_on_a_plain_value(tmp_path, digits):
    cb = QuantizationCallback(mode="dynamic", monitor="val_loss", monitor_mode="min", max_drop=0.05, verbose=False)
    fit(tmp_path, digits, cb, max_epochs=2)
    assert cb.decision.passed and 0 < cb.decision.float_score < 1.0


@pytest.mark.parametrize("on_violation", ["raise", "skip_export", "warn"])
def test_int4_failing_the_monitor_gate(tmp_path, digits, on_violation):
    stale = tmp_path / "out" / "model.quant.safetensors"
    stale.parent.mkdir()
    stale.write_bytes(b"an export of an earlier run")
    cb = QuantizationCallback(
        config=mq.QuantizationConfig(dtype="int4", group_size=32),
        monitor="val_acc",
        max_drop=0.02,
        on_violation=on_violation,
        export_dir=tmp_path / "out",
        verbose=False,
    )
    model = outlier_classifier(digits)
    trainer = one_step_trainer(tmp_path, cb)
    if on_violation == "raise":
        with pytest.raises(QuantizationGateError, match=r"val_acc float .*removed the stale model.quant.safetensors"):
            trainer.fit(model, *data(digits))
    else:
        with pytest.warns(UserWarning, match="failed the gate"):
            trainer.fit(model, *data(digits))
    assert cb.decision.float_score > 0.8 and cb.decision.drop > 0.1 and not cb.decision.passed
    assert stale.is_file() == (on_violation == "warn")
    if on_violation == "warn":
        gate = read_gate(stale)
        assert gate["passed"] is False and gate["metric"] == "val_acc"
        assert gate["drop"] == pytest.approx(cb.decision.drop) and gate["float"] == cb.decision.float_score


def test_fallback_scores_candidates_with_the_monitor(tmp_path, digits):
    cb = QuantizationCallback(
        config=mq.QuantizationConfig(dtype="int4", group_size=32),
        monitor="val_acc",
        max_drop=0.02,
        on_violation="fallback",
        export_dir=tmp_path / "out",
        verbose=False,
    )
    one_step_trainer(tmp_path, cb).fit(outlier_classifier(digits), *data(digits))
    budget = cb.budget
    assert budget.float_score - budget.quantized_score > 0.1  # plain int4 fails by far
    assert budget.reached and budget.drop <= 0.02 and budget.moves["net.1"] == "int8"  # the outlier layer moved
    assert budget.steps[0].layer == "net.1"  # ranked most sensitive by the module's own validation forward
    assert cb.decision.passed and cb.decision.quantized_score == budget.final_score
    reloaded = mq.load(cb.export_path, model=Classifier())
    bits = {"int8": "Int8Linear", "int4": "Int4Linear"}
    assert {n: type(reloaded.get_submodule(n)).__name__ for n in ("net.1", "net.3")} == {
        n: bits[p] for n, p in budget.precisions.items()
    }


def test_monitor_never_logged_fails_at_the_first_validation(tmp_path, digits):
    cb = QuantizationCallback(monitor="val_accuracy")
    with pytest.raises(ConfigError, match=r"never logs 'val_accuracy' \(it logged \['val_acc', 'val_loss'\]\)"):
        fit(tmp_path, digits, cb, num_sanity_val_steps=1)
    assert Classifier.steps == 0


def test_monitor_plain_value_without_mode_fails_at_the_first_validation(tmp_path, digits):
    cb = QuantizationCallback(monitor="val_loss")
    with pytest.raises(ConfigError, match=r"plain value.*monitor_mode='max'"):
        fit(tmp_path, digits, cb, num_sanity_val_steps=1)
    assert Classifier.steps == 0


def test_export_dir_that_is_a_file_fails_before_training(tmp_path, digits):
    (tmp_path / "taken").write_text("x")
    with pytest.raises(ConfigError, match=r"export_dir=.*taken'\): export_dir is a file"):
        fit(tmp_path, digits, QuantizationCallback(export_dir=tmp_path / "taken"))
    assert Classifier.steps == 0


def test_int4_group_size_no_layer_takes_fails_before_training(tmp_path, digits):
    cb = QuantizationCallback(config=mq.QuantizationConfig(dtype="int4", group_size=48))  # no int4 kernel: all int8
    with pytest.raises(ConfigError, match=r"group_size=48\): no layer takes int4.*net.1: group_size=48 has no int4"):
        fit(tmp_path, digits, cb)
    assert Classifier.steps == 0


def test_config_exposes_the_core_options(tmp_path, digits):
    config = mq.QuantizationConfig(dtype="int4", group_size=32, scheme="asymmetric", exclude=("net.3",))
    cb = QuantizationCallback(config=config, verbose=False)
    fit(tmp_path, digits, cb, max_epochs=1)
    layer = cb.result.model.net[1]
    assert type(layer).__name__ == "Int4Linear" and layer.group_size == 32 and layer.scheme.value == "asymmetric"
    assert type(cb.result.model.net[3]) is nn.Linear


class NaNAfter(Classifier):
    """Weights go NaN after step 6 (a diverged run): checkpoints still save, sidecars cannot be quantized."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.global_step == 6:
            with torch.no_grad():
                self.net[1].weight[0, 0] = float("nan")


def test_failing_sidecar_warns_and_training_goes_on(tmp_path, digits):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, save_last=True)
    cb = QuantizationCallback(quantize_on="checkpoint", verbose=False)
    trainer = quiet_trainer(tmp_path, [checkpoint, cb])
    with pytest.warns(UserWarning, match=r"no quantized sidecar for .*NaN or Inf.*training goes on"):
        trainer.fit(NaNAfter(), *data(digits))
    assert trainer.global_step == 20  # training was not stopped
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "epoch=0-step=4.quant.safetensors" in names  # before the NaN
    assert "epoch=1-step=20.ckpt" in names and "epoch=1-step=20.quant.safetensors" not in names
    assert "last.ckpt" in names and "last.quant.safetensors" not in names  # no stale sidecar under "last"
    assert not isinstance(trainer.strategy.checkpoint_io, SidecarCheckpointIO)  # restored at teardown
    trainer.save_checkpoint(tmp_path / "manual.ckpt")  # later saves are plain again
    assert not (tmp_path / "manual.quant.safetensors").exists()


def test_checkpoint_io_is_restored_when_fit_raises(tmp_path, digits):
    cb = QuantizationCallback(quantize_on=("fit_end", "checkpoint"), monitor="nope")
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=1, num_sanity_val_steps=1)
    with pytest.raises(ConfigError):
        trainer.fit(Classifier(), *data(digits))
    assert not isinstance(trainer.strategy.checkpoint_io, SidecarCheckpointIO)


def test_torchmetrics_updated_in_training_step(tmp_path, digits):
    cb = QuantizationCallback(monitor="val_acc", max_drop=0.05, verbose=False)
    _, model = fit(tmp_path, digits, cb, max_epochs=1, limit_train_batches=3)
    assert model.train_mse.update_count > 0  # the non-leaf state that broke the deep copy is really there
    assert cb.decision.passed and cb.export_path.is_file()
    assert read_gate(cb.export_path)["metric"] == "val_acc"


def test_load_quantized_rebuilds_from_hyperparameters(tmp_path, digits):
    from mono_quant_lightning import load_quantized

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = QuantizationCallback(quantize_on=("fit_end", "checkpoint"), verbose=False)
    trainer = quiet_trainer(tmp_path, [checkpoint, cb], max_epochs=1)
    trainer.fit(Classifier(hidden=48), *data(digits))
    q = load_quantized(checkpoint.last_model_path, Classifier)
    assert not q.training and q.net[1].out_features == 48  # hidden=48 came from the checkpoint's hyperparameters
    assert type(q.net[1]).__name__ == "Int8Linear"
    x = digits[2][:16].reshape(-1, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(q(x), mq.load(tmp_path / "ckpt" / "last.quant.safetensors", Classifier(48))(x))
    with pytest.raises(mq.SerializationError, match="no quantized file beside"):
        load_quantized(checkpoint.last_model_path, Classifier, quantized_path=tmp_path / "none.safetensors")
    with pytest.raises(mq.ConfigError, match=r"safetensors'\): that is a quantized file.*last\.ckpt'") as err:
        load_quantized(tmp_path / "ckpt" / "last.quant.safetensors", Classifier)  # the sidecar, not the checkpoint
    assert ".quant.quant" not in str(err.value)


class FrozenNorm(Classifier):
    """A BatchNorm the user froze (eval while the rest trains): the standard fine-tuning pattern."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))

    def on_train_epoch_start(self) -> None:
        self.net[2].eval()


def test_frozen_batchnorm_keeps_its_mode_through_the_callback(tmp_path, digits):
    modes: dict[str, dict[str, bool]] = {}

    class Probe(L.Callback):
        def __init__(self, when: str) -> None:
            self.when = when

        def on_fit_end(self, trainer, pl_module) -> None:
            modes[self.when] = {name: m.training for name, m in pl_module.named_modules()}

    cb = QuantizationCallback(mode="static", verbose=False)
    trainer = quiet_trainer(tmp_path, [Probe("before"), cb, Probe("after")], max_epochs=1, limit_train_batches=3)
    model = FrozenNorm()
    trainer.fit(model, *data(digits))
    assert modes["before"]["net.2"] is False and modes["before"]["net.1"] is True
    assert modes["after"] == modes["before"]
    assert cb.export_path.is_file()
