"""``QuantizationCallback(on_violation="fallback")`` with the real Lightning Trainer on scikit-learn digits.

The model is a small MLP trained on real digits. Pixel 0 is 0 in every digits image, so the weights it feeds never
train (Adam leaves a weight with zero gradient exactly where it is): ``outlier`` puts one large weight there in
each row of the first layer. The float model ignores it, but it sets that row's quantization scale, so the first
layer breaks at int4 (the 127 other weights round to about 0) and survives int8 (outlier 4), or breaks at int8 too
(outlier 1e4).
"""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch
from kit.lightning_modules import quiet_trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

import mono_quant as mq
from mono_quant.errors import CalibrationError, ConfigError
from mono_quant_lightning import OnViolation, QuantizationCallback, QuantizationGateError, export
from mono_quant_lightning.options import default_fallback_ladder

LAYERS = ("net.0", "net.2", "net.4")


pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


class DigitsMLP(L.LightningModule):
    """Digits pixels duplicated to 128 features (int4 groups are 128 wide), 128-128-10, one outlier per row of
    the first layer on the always-zero pixel 0."""

    def __init__(self, outlier: float = 4.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        with torch.no_grad():
            self.net[0].weight[:, 0] = outlier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, x], 1))

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self(batch[0])  # what the observers see

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def fit(tmp_path: Path, digits, cb: QuantizationCallback, outlier: float, logger=False) -> DigitsMLP:
    x_train, y_train, x_val, y_val = digits
    assert float(x_train[:, 0].abs().max()) == float(x_val[:, 0].abs().max()) == 0.0
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=64)
    model = DigitsMLP(outlier)
    trainer = L.Trainer(
        max_epochs=6,
        accelerator="cpu",
        devices=1,
        callbacks=[cb],
        logger=logger,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, train, val)
    return model


def accuracy(model: nn.Module, digits) -> float:
    metric = MulticlassAccuracy(num_classes=10)
    with torch.inference_mode():
        for x, y in zip(digits[2].split(64), digits[3].split(64), strict=True):
            metric.update(model(x), y)
    return float(metric.compute())


def logged_metrics(logger: CSVLogger) -> dict[str, str]:
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        return {k: v for row in csv.DictReader(f) for k, v in row.items() if v}


def fallback(**kwargs) -> QuantizationCallback:
    return QuantizationCallback(metric=MulticlassAccuracy(num_classes=10), on_violation="fallback", **kwargs)


# ---------------------------------------------------------------------- the budget is reached


def test_int4_fallback_reaches_the_budget_and_exports_a_mixed_model_that_reloads(tmp_path, digits, caplog):
    logger = CSVLogger(tmp_path, name="logs")
    cb = fallback(dtype="int4", max_drop=0.02, export_dir=tmp_path / "out")
    model = fit(tmp_path, digits, cb, outlier=4.0, logger=logger)
    out = caplog.text
    budget = cb.budget

    assert budget.float_score > 0.9  # it learned the task
    assert budget.float_score - budget.quantized_score > 0.04  # plain int4 fails the 0.02 gate (measured 0.053)
    assert budget.reached and budget.drop <= 0.02
    assert budget.moves == {"net.0": "int8"}  # only the outlier layer left int4
    assert budget.precisions == {"net.0": "int8", "net.2": "int4", "net.4": "int4"}
    assert budget.evaluations <= 2 + sum(step.kept for step in budget.steps) + budget.reranks
    # result, drop and decision describe the final model
    assert cb.result.model is budget.model
    assert cb.decision.passed and cb.decision.quantized_score == budget.final_score
    assert cb.drop == pytest.approx(budget.drop)
    assert {row.name: row.bits for row in cb.result.report.layers} == {"net.0": 8, "net.2": 4, "net.4": 4}
    assert "[mono-quant] fallback: budget reached" in out and "1 layer(s) moved up the ladder: net.0 -> int8" in out

    assert cb.export_path == tmp_path / "out" / "model.quant.safetensors" and cb.export_path.is_file()
    reloaded = mq.load(cb.export_path, model=DigitsMLP())
    assert [type(reloaded.net[i]).__name__ for i in (0, 2, 4)] == ["Int8Linear", "Int4Linear", "Int4Linear"]
    assert accuracy(reloaded, digits) == budget.final_score
    assert accuracy(model, digits) == budget.float_score  # the trained module itself is untouched

    logged = logged_metrics(logger)
    assert float(logged["quant/reverted_layers"]) == 1
    assert float(logged["quant/multiclass_accuracy_quantized"]) == pytest.approx(budget.final_score)
    assert float(logged["quant/multiclass_accuracy_before_fallback"]) == pytest.approx(budget.quantized_score)
    assert float(logged["quant/drop"]) == pytest.approx(cb.drop)
    assert float(logged["quant/fallback_evaluations"]) == budget.evaluations


class DigitsBatchNormCNN(L.LightningModule):
    """Conv -> BatchNorm -> ReLU features and a linear head that also reads the always-zero pixel 0; the head weights
    on it never train, and at ``outlier`` they break the head at int8 (each row's other weights round to 0)."""

    def __init__(self, outlier: float = 1e4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten())
        self.head = nn.Linear(8 * 64 + 1, 10)
        with torch.no_grad():
            self.head.weight[:, -1] = outlier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.net(x.reshape(-1, 1, 8, 8)), x[:, :1]], 1))

    training_step = DigitsMLP.training_step
    validation_step = DigitsMLP.validation_step
    configure_optimizers = DigitsMLP.configure_optimizers


def test_cnn_fallback_keeps_the_quantized_conv_and_folds_batchnorm_on_an_eval_copy(tmp_path, digits):
    x_train, y_train, x_val, y_val = digits
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=64)
    seen: dict[str, tuple[bool, dict]] = {}

    class Probe(L.Callback):
        def __init__(self, when: str) -> None:
            self.when = when

        def on_fit_end(self, trainer, pl_module) -> None:
            seen[self.when] = (pl_module.training, {k: v.clone() for k, v in pl_module.state_dict().items()})

    cb = fallback(max_drop=0.02, export_dir=tmp_path / "out", verbose=False)  # int8 auto: static
    model = DigitsBatchNormCNN()
    quiet_trainer(tmp_path, [Probe("before"), cb, Probe("after")], max_epochs=1).fit(model, train, val)

    budget = cb.budget
    assert budget.float_score > 0.8 and budget.quantized_score < 0.3 and budget.reached
    assert budget.moves == {"head": "float"}
    assert type(cb.result.model.net[0].weight.layer).__name__ == "Int8Conv2d"  # still an nn.Conv2d: attached
    (row,) = cb.result.report.layers
    plain = mq.quantize(model.eval(), mode="static", activation_qparams=cb.observation.statistics.qparams())
    assert row == plain.report.layers[0]  # the conv folded and measured exactly as quantize of the eval model
    assert plain.report.skipped["net.1"] == "folded into net.0"
    assert cb.result.report.skipped["net.1"].startswith("folded into net.0 (its BatchNorm2d was in train mode")
    assert cb.result.report.skipped["head"] == "kept in float by the accuracy budget"
    # the gate passes a mostly-float model, and its decision says so
    assert cb.decision.passed and cb.decision.reason.endswith(
        "; WARNING: only 1% of the matmul weights were quantized: head: kept in float by the accuracy budget"
    )
    assert "folded into net.0 (its BatchNorm2d was in train mode" in export.report_path(cb.export_path).read_text()
    # the module Lightning handed over is still in train mode and unchanged
    assert seen["before"][0] is True and seen["after"][0] is True
    assert all(torch.equal(v, seen["after"][1][k]) for k, v in seen["before"][1].items())
    reloaded = mq.load(cb.export_path, model=DigitsBatchNormCNN())
    torch.testing.assert_close(reloaded(x_val), cb.result.model(x_val))
    assert accuracy(reloaded, digits) == budget.final_score


def test_static_int8_fallback_reuses_the_validation_statistics(tmp_path, digits, monkeypatch):
    runs = []
    original = mq.Calibrator.run
    monkeypatch.setattr(mq.Calibrator, "run", lambda self, *a, **k: runs.append(1) or original(self, *a, **k))
    cb = fallback(max_drop=0.02, verbose=False)  # int8, mode auto: static from the validation epoch
    fit(tmp_path, digits, cb, outlier=1e4)
    assert cb.mode_used.value == "static" and not runs  # no calibration pass: hooks during validation only
    assert cb.budget.quantized_score < 0.2 and cb.budget.reached
    assert cb.budget.moves == {"net.0": "float"}
    statistics = cb.observation.statistics.qparams()
    for name in ("net.2", "net.4"):
        assert cb.result.model.get_submodule(name).input_scale.item() == statistics[name].scale.item()
    assert "net.0" in cb.result.skipped
    reloaded = mq.load(cb.export_path, model=DigitsMLP(1e4))
    assert type(reloaded.net[0]) is nn.Linear
    assert accuracy(reloaded, digits) == cb.budget.final_score


def test_passing_gate_runs_no_search(tmp_path, digits):
    cb = fallback(dtype="int8", mode="dynamic", max_drop=0.05, verbose=False)
    fit(tmp_path, digits, cb, outlier=0.0)
    assert cb.decision.passed and cb.budget is None and cb.export_path.is_file()


# ---------------------------------------------------------------------- the budget is out of reach


def test_unreachable_budget_raises_with_the_best_drop_and_exports_nothing(tmp_path, digits):
    logger = CSVLogger(tmp_path, name="logs")
    # the outlier layer is broken at int8 too, and this ladder never reaches float
    cb = fallback(dtype="int4", max_drop=0.02, fallback_ladder=("int4", "int8"), export_dir=tmp_path / "out")
    with pytest.raises(
        QuantizationGateError, match=r"did not reach the budget: best drop 0\.\d+ > max_drop 0.02 .*nothing exported"
    ) as raised:
        fit(tmp_path, digits, cb, outlier=1e4, logger=logger)
    budget = cb.budget
    assert not budget.reached and budget.stop_reason == "ladder exhausted"
    assert budget.precisions == dict.fromkeys(LAYERS, "int8")
    assert f"best drop {budget.drop:.4g}" in str(raised.value)
    assert raised.value.decision is cb.decision and not cb.decision.passed
    assert cb.drop == pytest.approx(budget.drop)
    assert cb.export_path is None and not (tmp_path / "out").exists()
    assert float(logged_metrics(logger)["quant/reverted_layers"]) == len(budget.moves) == 3


# ---------------------------------------------------------------------- the core keyword it relies on


def test_quantize_with_budget_takes_precomputed_activation_qparams(digits):
    x = digits[2][:128]
    model = DigitsMLP(0.0).eval()
    static = mq.QuantizationConfig(mode="static")
    calibrator = mq.Calibrator({name: model.get_submodule(name) for name in LAYERS}, static)
    calibrator.run(model, [x[:64]])
    qparams = calibrator.qparams()
    result = mq.quantize_with_budget(  # no calibration_data: the given parameters are used as they are
        model,
        lambda m: accuracy(m, digits),
        config=static,
        max_drop=1.0,
        sensitivity_data=x,
        activation_qparams=qparams,
    )
    assert result.reached and result.evaluations == 2
    assert all(result.model.get_submodule(n).input_scale.item() == qparams[n].scale.item() for n in LAYERS)
    with pytest.raises(CalibrationError, match=r"activation_qparams has no entry for layer\(s\) \['net.4'\]"):
        mq.quantize_with_budget(
            model, lambda m: 1.0, config=static, sensitivity_data=x, activation_qparams=dict(list(qparams.items())[:2])
        )
    with pytest.raises(ConfigError, match="activation_qparams of type list"):
        mq.quantize_with_budget(model, lambda m: 1.0, config=static, sensitivity_data=x, activation_qparams=[])


# ---------------------------------------------------------------------- construction


def test_default_ladders():
    assert fallback(dtype="int4").fallback_ladder == ("int4", "int8", "float")
    assert fallback().fallback_ladder == default_fallback_ladder("int8") == ("int8", "float")
    assert fallback(dtype="fp16").fallback_ladder == ("fp16", "float")
    assert fallback(fallback_ladder=["int8", "bf16", "fp32"]).fallback_ladder == ("int8", "bf16", "float")
    assert fallback().on_violation is OnViolation.FALLBACK


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fallback_ladder": ()}, r"QuantizationCallback\(fallback_ladder=\(\)\): ladder=\(\) is empty"),
        ({"fallback_ladder": ("int8", "int4")}, r"fallback_ladder=.*must go from lowest to highest precision"),
        ({"fallback_ladder": ("int8", "int9")}, r"fallback_ladder=.*unknown rung 'int9'"),
        ({"fallback_ladder": "int8"}, r"QuantizationCallback\(fallback_ladder='int8'\): .*must be a sequence"),
        ({"fallback_ladder": 8}, r"QuantizationCallback\(fallback_ladder=8\): .*must be a sequence"),
        ({"fallback_ladder": ("float",)}, r"no quantized rung"),
        ({"dtype": "int4", "fallback_ladder": ("int8", "float")}, r"must start at dtype='int4'"),
        ({"metric": None}, r"QuantizationCallback\(on_violation='fallback'\): .*needs monitor="),
        ({"on_violation": "raise", "fallback_ladder": ("int8", "float")}, r"only used with on_violation='fallback'"),
    ],
)
def test_constructor_validation(kwargs, match):
    options = {"metric": MulticlassAccuracy(num_classes=10), "on_violation": "fallback", **kwargs}
    with pytest.raises(ConfigError, match=match):
        QuantizationCallback(**options)
