"""QuantizationCallback with int4 weights fitted to data (``algorithm="gptq"``/``"awq"``, fallback rung
``"int4-gptq"``): statistics from the observed validation batches, checkpoint round trip, preflight errors."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from kit.lightning_modules import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import mono_quant as mq
from mono_quant.modules import Int4Linear
from mono_quant_lightning import QuantizationCallback, QuantizationGateError
from mono_quant_lightning.fallback import Search, search

GPTQ = mq.QuantizationConfig(dtype="int4", algorithm="gptq", group_size=32, scheme="symmetric")
LAYERS = ("net.0", "net.2", "net.4")

pytestmark = pytest.mark.usefixtures("one_thread")


class DigitsMLP(L.LightningModule):
    """64 -> 64 -> 64 -> 10 on digits; symmetric int4 in groups of 32 costs it visible output error."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        out = self(batch[0])
        self.log("val_acc", (out.argmax(1) == batch[1]).float().mean())
        self.log("val_loss", nn.functional.cross_entropy(out, batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _loaders(digits):
    x_train, y_train, _, _ = digits
    train = DataLoader(TensorDataset(x_train[:1000], y_train[:1000]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x_train[1000:1400], y_train[1000:1400]), batch_size=64)  # 7 batches, 400 rows
    return train, val


def _cb(**kwargs) -> QuantizationCallback:
    return QuantizationCallback(**{"config": GPTQ, "verbose": False, **kwargs})


def _same_layers(a: nn.Module, b: nn.Module, names=LAYERS) -> bool:
    for name in names:
        sa, sb = a.get_submodule(name).state_dict(), b.get_submodule(name).state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


@pytest.fixture(scope="module")
def fitted(digits, tmp_path_factory):
    """One 3-epoch fit with the gptq callback and a checkpoint (about a second)."""
    tmp_path = tmp_path_factory.mktemp("fit")
    train, val = _loaders(digits)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = _cb(calibration_batches=5, export_dir=tmp_path / "out")
    model = DigitsMLP()
    quiet_trainer(tmp_path, [checkpoint, cb], max_epochs=3).fit(model, train, val)
    return model.eval(), cb, checkpoint, tmp_path


def test_gptq_fits_the_int4_layers_to_the_observed_validation_batches(fitted, digits):
    model, cb, _, _ = fitted
    _, _, x_test, y_test = digits
    # the first 5 of 7 validation batches of the last epoch (64 rows each) fed every int4 Linear layer
    assert sorted(cb.observation.inputs.inputs) == list(LAYERS)
    assert all(stats.rows == 5 * 64 for stats in cb.observation.inputs.inputs.values())
    assert cb.observation.statistics is None  # int4 calibrates no activation observers
    q = cb.result.model
    assert all(isinstance(q.get_submodule(name), Int4Linear) for name in LAYERS)

    # Exactly what quantize fits to statistics collected independently on the same batches.
    collector = mq.StatisticsCollector(mq.fitted_layers(model, GPTQ), GPTQ)
    collector.run(model, [x for x, _ in _loaders(digits)[1]], max_batches=5)
    assert _same_layers(q, mq.quantize(model, GPTQ, input_statistics=collector.statistics()).model)
    rtn = mq.quantize(model, GPTQ.replace(algorithm="rtn")).model
    assert not any(_same_layers(q, rtn, (name,)) for name in LAYERS)  # every layer differs from rounding

    with torch.inference_mode():  # held-out digits the callback never saw
        reference = model(x_test)
        outputs = {"gptq": q(x_test), "rtn": rtn(x_test)}
        error = {name: (out - reference).pow(2).mean().item() for name, out in outputs.items()}
        accuracy = {name: (out.argmax(1) == y_test).float().mean().item() for name, out in outputs.items()}
    print(error, accuracy)
    assert error["gptq"] < 0.5 * error["rtn"]
    assert accuracy["gptq"] >= accuracy["rtn"]
    assert cb.export_path is not None and cb.export_path.is_file()
    reloaded = mq.load(cb.export_path, model=DigitsMLP())
    torch.testing.assert_close(reloaded(x_test), q(x_test))


def test_input_statistics_survive_a_checkpoint_round_trip(fitted, digits):
    _, cb, checkpoint, tmp_path = fitted
    saved = torch.load(checkpoint.last_model_path, weights_only=True)
    (key,) = [k for k in saved["callbacks"] if k.startswith("QuantizationCallback")]
    state = saved["callbacks"][key]["input_statistics"]
    expected = cb.state_dict()["input_statistics"]
    assert sorted(state) == list(LAYERS)
    assert all(torch.equal(state[n][k], v) for n, s in expected.items() for k, v in s.items())

    train, val = _loaders(digits)
    resumed = _cb(calibration_batches=5, export_dir=tmp_path / "resumed")  # no validation after resuming
    trainer = quiet_trainer(tmp_path, [resumed], max_epochs=3, limit_val_batches=0)
    resumed_model = DigitsMLP()
    trainer.fit(resumed_model, train, val, ckpt_path=checkpoint.last_model_path)
    assert resumed.observation.inputs is not None and resumed.observation.inputs.inputs["net.2"].rows == 5 * 64
    assert _same_layers(resumed.result.model, cb.result.model)  # the same weights, the same statistics

    broken = torch.load(checkpoint.last_model_path, weights_only=True)
    broken["callbacks"][key]["input_statistics"]["net.2"]["xtx"] = torch.zeros(3, 3, dtype=torch.float64)
    torch.save(broken, tmp_path / "broken.ckpt")
    again = _cb(export_dir=tmp_path / "broken")
    match = r"state 'input_statistics' does not fit DigitsMLP: .*\['net.2'\]\['xtx'\] is torch.float64 \[3, 3\]"
    with pytest.raises(mq.CalibrationError, match=match):
        quiet_trainer(tmp_path, [again], max_epochs=4, limit_val_batches=0).fit(
            DigitsMLP(), train, val, ckpt_path=tmp_path / "broken.ckpt"
        )
    assert again.result is None


def test_without_validation_data_gptq_fails_before_training(digits, tmp_path):
    train, _ = _loaders(digits)
    cb = _cb(export_dir=tmp_path / "out")
    trained = []

    class Watched(DigitsMLP):
        def training_step(self, batch, batch_idx):
            trained.append(batch_idx)
            return super().training_step(batch, batch_idx)

    with pytest.raises(mq.ConfigError, match=r"QuantizationCallback\(config.algorithm='gptq'\) needs validation data.*"
                       r"calibration_dataloader=\.\.\., or use algorithm='rtn'"):
        quiet_trainer(tmp_path, [cb], max_epochs=1).fit(Watched(), train)
    assert trained == [] and cb.result is None


def test_calibration_dataloader_feeds_the_fit_without_validation(digits, tmp_path):
    x_train, _, _, _ = digits
    train, _ = _loaders(digits)
    calibration = DataLoader(TensorDataset(x_train[:256], torch.zeros(256, dtype=torch.long)), batch_size=32)
    cb = _cb(config=GPTQ.replace(algorithm="awq"), calibration_dataloader=calibration, calibration_batches=4,
             export_dir=tmp_path / "out")  # fmt: skip
    model = DigitsMLP()
    quiet_trainer(tmp_path, [cb], max_epochs=1, limit_train_batches=3).fit(model, train)
    model.eval()
    assert cb.observation.inputs is None  # nothing observed during fit: the loader was used at fit end
    collector = mq.StatisticsCollector(mq.fitted_layers(model, GPTQ), GPTQ)
    collector.run(model, [x for x, _ in calibration], max_batches=4)  # 4 batches of 32, like the callback
    awq = GPTQ.replace(algorithm="awq")
    assert _same_layers(cb.result.model, mq.quantize(model, awq, input_statistics=collector.statistics()).model)
    assert not _same_layers(cb.result.model, mq.quantize(model, awq.replace(algorithm="rtn")).model)


def test_options_fitted_rungs_and_the_fallback_without_statistics():
    assert _cb().fallback_ladder == ("int4-gptq", "int8", "float")
    assert _cb().options.fits and not _cb().options.calibrates
    rtn = mq.QuantizationConfig(dtype="int4", group_size=32)
    assert not QuantizationCallback(config=rtn).options.fits
    ladder = ("int4", "int4-gptq", "int8", "float")
    fallback = QuantizationCallback(config=rtn, monitor="val_acc", monitor_mode="max", on_violation="fallback",
                                    fallback_ladder=ladder)  # fmt: skip
    assert fallback.options.fits and fallback.fallback_ladder == ladder
    with pytest.raises(mq.ConfigError, match=r"fallback_ladder must start at 'int4-gptq' \(dtype='int4', algorithm="):
        _cb(monitor="val_acc", monitor_mode="max", on_violation="fallback", fallback_ladder=("int4", "int8"))
    with pytest.raises(mq.ConfigError, match=r"unknown rung 'x'"):
        QuantizationCallback(config=rtn, monitor="val_acc", on_violation="fallback", fallback_ladder=("int4", "x"))
    plan = Search(lambda s: 0.0, True, 0.01, "absolute", ladder, 4)
    with pytest.raises(mq.CalibrationError, match=r"the rung 'int4-gptq' fits int4 weights to input statistics, but"):
        search(plan, None, DigitsMLP(), [], rtn, None, None)


def test_fallback_climbs_to_the_fitted_rung_on_the_collected_statistics(digits, tmp_path):
    train, val = _loaders(digits)
    rtn = GPTQ.replace(algorithm="rtn")
    cb = QuantizationCallback(config=rtn, monitor="val_loss", monitor_mode="min", max_drop=0.0,
                              on_violation="fallback", fallback_ladder=("int4", "int4-gptq", "int8", "float"),
                              verbose=False, export_dir=tmp_path / "out", calibration_batches=7)  # fmt: skip
    model = DigitsMLP()
    trainer = quiet_trainer(tmp_path, [cb], max_epochs=3)
    with contextlib.suppress(QuantizationGateError):  # a zero budget may stay out of reach; the search still ran
        trainer.fit(model, train, val)
    budget = cb.budget
    assert budget is not None and budget.steps, "precondition: plain int4 must raise the validation loss"
    assert budget.steps[0].to_rung == "int4-gptq"  # the first move of the most sensitive layer is the fitted rung
    assert sorted(cb.observation.inputs.inputs) == list(LAYERS)
    gptq_layers = [name for name, rung in budget.precisions.items() if rung == "int4-gptq"]
    print(budget.report)
    assert gptq_layers  # fitted to the callback's statistics: the same weights quantize builds from them
    model.eval()
    expected = mq.quantize(model, GPTQ, input_statistics=cb.observation.inputs.statistics()).model
    assert _same_layers(budget.model, expected, gptq_layers)
