"""QuantizationCallback with the real Lightning Trainer on scikit-learn digits (no mocks of Lightning)."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from kit.lightning_modules import DigitsCNN, loaders, quiet, trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy
from torchmetrics.regression import MeanSquaredError

import mono_quant as mq
from mono_quant.errors import ConfigError
from mono_quant_lightning import OnViolation, QuantizationCallback, QuantizationGateError, QuantizeOn, QuantMode
from mono_quant_lightning.options import CallbackOptions


def module_fingerprint(module: nn.Module) -> dict:
    return {
        name: (sorted(vars(m)), dict(m._forward_pre_hooks), dict(m._forward_hooks), "forward" in vars(m))
        for name, m in module.named_modules()
    }


# ---------------------------------------------------------------------- default use


def test_zero_argument_use(tmp_path, digits, caplog):
    train, val = loaders(digits)
    model = DigitsCNN()
    cb = QuantizationCallback()
    trainer(tmp_path, [cb]).fit(model, train, val)
    out = caplog.text
    assert "mode='static' (auto: activation statistics from the last validation epoch)" in out
    assert "quantization report" in out and "fidelity" in out
    assert cb.mode_used is QuantMode.STATIC
    assert cb.export_path == tmp_path / "checkpoints" / "model.quant.safetensors"
    assert cb.export_path.is_file()
    assert cb.drop is None and cb.decision is None
    assert cb.fidelity.cosine_mean > 0.99
    assert type(cb.result.model.net[5]).__name__ == "Int8Linear"
    reloaded = mq.load(cb.export_path, model=DigitsCNN())
    x = digits[2][:32]
    torch.testing.assert_close(reloaded(x), cb.result.model(x))


def test_auto_mode_without_validation_is_dynamic_and_says_so(tmp_path, digits, caplog):
    train, _ = loaders(digits)
    cb = QuantizationCallback()
    trainer(tmp_path, [cb], max_epochs=1).fit(DigitsCNN(), train)
    assert cb.mode_used is QuantMode.DYNAMIC
    assert "mode='dynamic' (auto: no validation batches were observed)" in caplog.text
    assert cb.fidelity is None and cb.export_path.is_file()


def test_dynamic_and_weight_only_dtypes_do_not_calibrate(tmp_path, digits):
    train, val = loaders(digits)
    for cb in (quiet(mode="dynamic"), quiet(dtype="int4"), quiet(dtype="bf16")):
        model = DigitsCNN()
        trainer(tmp_path, [cb], max_epochs=1, enable_checkpointing=False).fit(model, train, val)
        assert cb.observation.statistics is None
        assert cb.export_path.is_file()
    assert cb.mode_used is QuantMode.DYNAMIC  # bf16 casts whatever the mode


# ---------------------------------------------------------------------- calibration


def test_calibrates_on_fit_validation_only(tmp_path, digits):
    train, val = loaders(digits)  # 4 validation batches per epoch
    model = DigitsCNN()
    cb = quiet(calibration_batches=100, quantize_on="fit_end")
    t = trainer(tmp_path, [cb], num_sanity_val_steps=2, max_epochs=2)
    t.fit(model, train, val)
    observers = cb.observation.statistics.observers
    assert sorted(observers) == ["net.0", "net.3", "net.5"]
    # last validation epoch only: not the sanity check (2 more), not training (8 per epoch)
    assert all(int(obs.batches) == 4 for obs in observers.values())
    before = {k: v.clone() for k, v in cb.state_dict()["statistics"]["net.5"].items()}
    t.validate(model, val, verbose=False)
    t.test(model, val, verbose=False)
    t.predict(model, DataLoader(digits[2][:64], batch_size=32))
    after = cb.state_dict()["statistics"]["net.5"]
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_calibration_batches_limits_observed_batches(tmp_path, digits):
    train, val = loaders(digits)
    cb = quiet(calibration_batches=2, observer="histogram")
    trainer(tmp_path, [cb], max_epochs=1).fit(DigitsCNN(), train, val)
    assert all(int(obs.batches) == 2 for obs in cb.observation.statistics.observers.values())
    assert cb.mode_used is QuantMode.STATIC


def test_module_is_never_modified(tmp_path, digits):
    train, val = loaders(digits)
    model = DigitsCNN()
    keys, fingerprint = list(model.state_dict()), module_fingerprint(model)
    forward = type(model).forward
    trainer(tmp_path, [quiet(quantize_on=("fit_end", "checkpoint"))]).fit(model, train, val)
    assert list(model.state_dict()) == keys
    assert module_fingerprint(model) == fingerprint
    assert type(model).forward is forward
    assert all(type(m) in (nn.Conv2d, nn.Linear, nn.ReLU, nn.Flatten) for m in model.net)


def test_test_and_load_from_checkpoint_after_fit(tmp_path, digits):
    train, val = loaders(digits)
    model = DigitsCNN()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    t = trainer(tmp_path, [checkpoint, quiet(quantize_on=("fit_end", "checkpoint"))])
    t.fit(model, train, val)
    (result,) = t.test(model, val, ckpt_path="best", verbose=False)
    assert result["test_acc"] > 0.5
    restored = DigitsCNN.load_from_checkpoint(checkpoint.best_model_path)
    torch.testing.assert_close(restored.state_dict(), model.state_dict())
    state = torch.load(checkpoint.best_model_path, weights_only=True)
    (cb_state,) = [v for k, v in state["callbacks"].items() if k.startswith("QuantizationCallback")]
    assert set(cb_state["statistics"]) == {"net.0", "net.3", "net.5"}


def test_dict_batches(tmp_path, digits):
    train, val = loaders(digits, "dict")
    cb = quiet(metric=MulticlassAccuracy(num_classes=10), max_drop=0.05)
    trainer(tmp_path, [cb]).fit(DigitsCNN("dict"), train, val)
    assert cb.mode_used is QuantMode.STATIC
    assert cb.decision.passed and cb.decision.float_score > 0.5


def test_batch_fn(tmp_path, digits):
    train, val = loaders(digits, "reversed")
    cb = quiet(metric=MulticlassAccuracy(num_classes=10), max_drop=0.05, batch_fn=lambda b: (b[1], b[0]))
    trainer(tmp_path, [cb]).fit(DigitsCNN("reversed"), train, val)
    assert cb.decision.passed and cb.decision.float_score > 0.5
    assert cb.fidelity.cosine_mean > 0.99


def test_calibration_dataloader_replaces_validation(tmp_path, digits):
    train, _ = loaders(digits)
    subset = DataLoader(TensorDataset(digits[0][:128], digits[1][:128]), batch_size=32)
    cb = quiet(mode="static", calibration_dataloader=subset, calibration_batches=3)
    trainer(tmp_path, [cb], max_epochs=1).fit(DigitsCNN(), train)
    assert cb.mode_used is QuantMode.STATIC
    assert cb.result.model.net[5].input_scale.item() > 0


# ---------------------------------------------------------------------- gate


class OutlierLinear(L.LightningModule):
    """A ridge-regression digit classifier plus one huge weight on pixel 0 (always 0 in digits).

    The float model is accurate; per-channel int8 rounds every real weight of each row to zero.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        features = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        ridge = features.T @ features + 1e-3 * torch.eye(65, dtype=torch.float64)
        solution = torch.linalg.solve(ridge, features.T @ nn.functional.one_hot(y, 10).double()).float()
        with torch.no_grad():
            self.fc.weight.copy_(solution[:64].T)
            self.fc.bias.copy_(solution[64])
            self.fc.weight[:, 0] = 1e4

    def forward(self, x):
        return self.fc(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])  # metric= scores the forward output inside validation_step

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("on_violation", ["raise", "warn", "skip_export"])
def test_failing_gate(tmp_path, digits, on_violation):
    assert float(digits[0][:, 0].abs().max()) == 0.0
    train, val = loaders(digits)
    metric = MulticlassAccuracy(num_classes=10, average="micro")
    cb = quiet(metric=metric, max_drop=0.05, on_violation=on_violation, export_dir=tmp_path / "out")
    logger = CSVLogger(tmp_path, name="logs")
    t = trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=1, logger=logger, enable_checkpointing=False)
    model = OutlierLinear(digits[0], digits[1])
    if on_violation == "raise":
        with pytest.raises(
            QuantizationGateError, match=r"failed the gate: drop .* > max_drop 0.05 .*; nothing exported"
        ):
            t.fit(model, train, val)
    elif on_violation == "warn":
        with pytest.warns(UserWarning, match="exporting anyway"):
            t.fit(model, train, val)
    else:
        with pytest.warns(UserWarning, match="skipping the export"):
            t.fit(model, train, val)
    assert cb.decision.float_score > 0.8 and cb.decision.quantized_score < 0.2
    assert cb.drop == pytest.approx(cb.decision.float_score - cb.decision.quantized_score)
    exported = (tmp_path / "out" / "model.quant.safetensors").is_file()
    assert exported == (on_violation == "warn")
    assert (cb.export_path is not None) == exported
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        logged = {k: v for row in csv.DictReader(f) for k, v in row.items() if v}
    for name in ("multiclass_accuracy_float", "multiclass_accuracy_quantized", "drop", "size_ratio", "sqnr_db"):
        assert f"quant/{name}" in logged
    assert float(logged["quant/drop"]) == pytest.approx(cb.drop)


def test_lower_is_better_metric_passes(tmp_path, digits):
    train, val = loaders(digits)
    cb = quiet(metric=MeanSquaredError(), max_drop=10.0, batch_fn=lambda b: (b[0], nn.functional.one_hot(b[1], 10)))
    trainer(tmp_path, [cb], max_epochs=1).fit(DigitsCNN(), train, val)
    assert cb.decision.passed and math.isfinite(cb.drop)


# ---------------------------------------------------------------------- checkpoints, state


def test_sidecars_follow_top_k_rotation_save_last_and_weights_only(tmp_path, digits):
    train, val = loaders(digits)
    ckpt_dir = tmp_path / "ckpt"
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir, monitor="step", mode="max", save_top_k=2, save_last=True, save_weights_only=True
    )
    cb = quiet(quantize_on=("fit_end", "checkpoint"))
    trainer(tmp_path, [checkpoint, cb], max_epochs=4).fit(DigitsCNN(), train, val)
    ckpts = sorted(p.name[: -len(".ckpt")] for p in ckpt_dir.glob("*.ckpt"))
    sidecars = sorted(p.name[: -len(".quant.safetensors")] for p in ckpt_dir.glob("*.quant.safetensors"))
    assert ckpts == ["epoch=2-step=24", "epoch=3-step=32", "last"]
    assert sidecars == [*ckpts, "model"]
    q = mq.load(ckpt_dir / "epoch=2-step=24.quant.safetensors", model=DigitsCNN())
    assert type(q.net[0].weight.layer).__name__ == "Int8Conv2d"
    assert not list(ckpt_dir.glob("*.tmp*"))


def test_resume_restores_observer_statistics(tmp_path, digits):
    train, val = loaders(digits)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = quiet()
    trainer(tmp_path, [checkpoint, first]).fit(DigitsCNN(), train, val)
    expected = first.state_dict()["statistics"]

    resumed = quiet()
    model = DigitsCNN()
    trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "ckpt2"), resumed]).fit(
        model, train, val, ckpt_path=checkpoint.last_model_path
    )
    assert resumed.mode_used is QuantMode.STATIC
    got = resumed.state_dict()["statistics"]
    assert sorted(got) == sorted(expected)
    for layer, state in expected.items():
        for key, value in state.items():
            assert torch.equal(got[layer][key], value), (layer, key)
    assert resumed.result.model.net[5].input_scale.item() == first.result.model.net[5].input_scale.item()


class WideHeadCNN(DigitsCNN):
    """32 channels of 7 x 7 into a 1568-wide classifier (1568 = 32 x 49: no int4 group of 128 or 64 divides it)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(1, 32, 2), nn.ReLU(), nn.Flatten(), nn.Linear(1568, 10))


@pytest.mark.slow
def test_int4_on_a_1568_wide_classifier_takes_groups_of_32(tmp_path, digits):
    train, val = loaders(digits)
    cb = quiet(dtype="int4", monitor="val_loss", monitor_mode="min", max_drop=0.5)
    trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=4).fit(WideHeadCNN(), train, val)
    head = cb.result.model.net[3]
    assert type(head).__name__ == "Int4Linear" and head.group_size == 32
    assert not cb.result.report.warning and "WARNING" not in cb.decision.reason and cb.decision.passed
    _, metadata = mq.load(cb.export_path)
    assert (metadata["layers"]["net.3"]["bits"], metadata["layers"]["net.3"]["group_size"]) == (4, 32)
    assert cb.export_path.stat().st_size < 0.25 * 4 * sum(p.numel() for p in WideHeadCNN().parameters())
    reloaded = mq.load(cb.export_path, model=WideHeadCNN())
    x = digits[2][:16]
    torch.testing.assert_close(reloaded(x), cb.result.model(x))


@pytest.mark.slow
def test_fast_dev_run_leaves_a_real_runs_export_alone(tmp_path, digits, caplog):
    train, val = loaders(digits)
    out = tmp_path / "out"
    real = QuantizationCallback(export_dir=out)
    trainer(tmp_path, [real], max_epochs=1, limit_train_batches=4).fit(DigitsCNN(), train, val)
    exported, report = real.export_path.read_bytes(), (out / "model.quant.report.txt").read_bytes()

    class FloatOnly(DigitsCNN):  # logs 1 for the float module, 0 for a quantized copy: the gate always fails
        def validation_step(self, batch, batch_idx):
            self.log("val_float", float(type(self.net[5]) is nn.Linear), batch_size=1)
            return super().validation_step(batch, batch_idx)

    dev = QuantizationCallback(export_dir=out, monitor="val_float", monitor_mode="max")
    trainer(tmp_path, [dev], fast_dev_run=True).fit(FloatOnly(), train, val)
    assert dev.result is not None and dev.export_path is None and not dev.decision.passed  # ran, raised nothing
    assert "[mono-quant] fast_dev_run: quantized and measured (quantized model failed the gate" in caplog.text
    assert f"exported nothing, so an earlier run's {out / 'model.quant.safetensors'} stays as it is" in caplog.text
    assert real.export_path.read_bytes() == exported and (out / "model.quant.report.txt").read_bytes() == report
    assert sorted(p.name for p in out.iterdir()) == ["model.quant.report.txt", "model.quant.safetensors"]


@pytest.mark.slow
def test_resume_keeps_the_statistics_and_garbage_statistics_name_the_key(tmp_path, digits):
    train, val = loaders(digits)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    first = quiet()
    trainer(tmp_path, [checkpoint, first], max_epochs=1, limit_train_batches=2).fit(DigitsCNN(), train, val)
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    (key,) = [k for k in saved["callbacks"] if k.startswith("QuantizationCallback")]
    cases = {
        "min_val": (lambda stats: stats["net.5"].update(min_val="garbage"), r"\['net.5'\]\['min_val'\] is a str"),
        "shape": (lambda stats: stats["net.0"].update(max_val=torch.ones(3)), r"\['net.0'\]\['max_val'\] is torch"),
        "layer": (lambda stats: stats.pop("net.3"), r"no entry for layer\(s\) \['net.3'\]"),
    }
    for name, (corrupt, match) in cases.items():
        broken = torch.load(checkpoint.last_model_path, weights_only=True)
        corrupt(broken["callbacks"][key]["statistics"])
        path = tmp_path / f"{name}.ckpt"
        torch.save(broken, path)
        resumed = quiet()
        resume = trainer(tmp_path, [resumed], max_epochs=2, limit_train_batches=2)
        with pytest.raises(mq.CalibrationError, match=r"state .statistics. does not fit DigitsCNN: .*" + match):
            resume.fit(DigitsCNN(), train, val, ckpt_path=path)
        assert resumed.result is None, name  # it stopped while restoring, before any training or export

    resumed = quiet()  # the intact checkpoint: one more epoch, no validation after resuming
    resume = trainer(tmp_path, [resumed], max_epochs=2, limit_train_batches=2, limit_val_batches=0)
    resume.fit(DigitsCNN(), train, val, ckpt_path=checkpoint.last_model_path)
    assert resumed.mode_used is QuantMode.STATIC  # static on the restored statistics
    restored, expected = resumed.state_dict()["statistics"], saved["callbacks"][key]["statistics"]
    assert all(torch.equal(restored[n][k], v) for n, state in expected.items() for k, v in state.items())


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dtype": "int3"}, r"QuantizationCallback\(dtype='int3'\): dtype='int3' is not supported"),
        ({"mode": "smart"}, r"QuantizationCallback\(mode='smart'\)"),
        ({"dtype": "int4", "mode": "static"}, r"QuantizationCallback\(mode='static'\).*int4"),
        ({"observer": "max"}, r"QuantizationCallback\(observer='max'\)"),
        ({"quantize_on": ("fit_end", "epoch")}, r"QuantizationCallback\(quantize_on=\('fit_end', 'epoch'\)\)"),
        ({"quantize_on": ()}, r"at least one"),
        ({"max_drop": -0.1}, r"QuantizationCallback\(max_drop=-0.1\): max_drop must be a finite number >= 0"),
        ({"max_drop": math.nan}, r"max_drop=nan"),
        ({"calibration_batches": 0}, r"QuantizationCallback\(calibration_batches=0\)"),
        ({"calibration_batches": 2.5}, r"calibration_batches must be an integer >= 1"),
        ({"metric": "accuracy"}, r"QuantizationCallback\(metric='accuracy'\): metric must be a torchmetrics Metric"),
        ({"metric": MulticlassAccuracy}, r"not the class"),
        ({"drop_type": "percent"}, r"QuantizationCallback\(drop_type='percent'\)"),
        ({"on_violation": "ignore"}, r"QuantizationCallback\(on_violation='ignore'\)"),
        ({"on_violation": "fallback"}, r"QuantizationCallback\(on_violation='fallback'\): .*needs monitor="),
        ({"fallback_ladder": ("int8", "float")}, r"fallback_ladder=.*only used with on_violation='fallback'"),
        ({"batch_fn": 3}, r"QuantizationCallback\(batch_fn=3\)"),
        ({"exclude": 5}, r"exclude"),
    ],
)
def test_constructor_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        QuantizationCallback(**kwargs)


def test_options_and_results_are_read_only_views_of_the_callback_state():
    cb = QuantizationCallback(max_drop=0.05, on_violation="warn", monitor="val_acc", monitor_mode="max")
    assert cb.options.max_drop == cb.max_drop == 0.05 and cb.on_violation is OnViolation.WARN
    assert cb.outcome is None and cb.result is None and cb.decision is None and cb.export_path is None
    for name in ("max_drop", "config", "result", "decision", "export_path"):
        with pytest.raises(AttributeError):
            setattr(cb, name, None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cb.options.max_drop = 0.5
    defaults = inspect.signature(QuantizationCallback).parameters
    assert QuantizationCallback().options == CallbackOptions.from_arguments()  # one set of defaults
    assert {name: defaults[name].default for name in ("max_drop", "on_violation", "quantize_on")} == {
        "max_drop": 0.01,
        "on_violation": OnViolation.RAISE,
        "quantize_on": (QuantizeOn.FIT_END,),
    }


class CountingCNN(DigitsCNN):
    """Counts training steps, so fail-fast tests can assert that none ran."""

    steps = 0

    def training_step(self, batch, batch_idx):
        CountingCNN.steps += 1
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("no_validation", ["no_loader", "limit_val_batches", "no_validation_step"])
@pytest.mark.parametrize(
    "kwargs",
    [{"mode": "static"}, {"mode": "dynamic", "metric": MulticlassAccuracy(num_classes=10)}, {"monitor": "val_loss"}],
)
def test_gates_and_static_mode_without_validation_fail_before_training(tmp_path, digits, no_validation, kwargs):
    train, val = loaders(digits)
    cb = quiet(**kwargs)
    extra = {"limit_val_batches": 0} if no_validation == "limit_val_batches" else {}
    model = CountingCNN()
    if no_validation == "no_validation_step":
        model.validation_step = None  # Lightning treats a module without validation_step as "no validation"
    CountingCNN.steps = 0
    t = trainer(tmp_path, [cb], max_epochs=1, **extra)
    with pytest.raises(ConfigError, match=r"needs validation data, but this fit has none"):
        t.fit(model, train, None if no_validation == "no_loader" else val)
    assert CountingCNN.steps == 0
    assert cb.export_path is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_training(tmp_path, digits):
    train, val = loaders(digits)
    cb = quiet(metric=MulticlassAccuracy(num_classes=10), max_drop=0.05)
    trainer(tmp_path, [cb], accelerator="gpu").fit(DigitsCNN(), train, val)
    assert cb.decision.passed
    assert next(cb.result.model.buffers()).device.type == "cuda"
