"""quantize_with_budget on real data (scikit-learn digits), its evaluation bound, limits and bad inputs."""

from __future__ import annotations

import math
import sys

import pytest
import torch
from kit.helpers import mlp
from torch import nn

import mono_quant as mq
from mono_quant.modules import Int4Linear, Int8Linear

SIZES = (64, 32, 32, 32, 32, 10)  # 5 Linear layers: "0", "2", "4", "6", "8"
LADDER = ("int4", "int8", "float")
# symmetric int4 (the coarser grid): plain int4 breaks a one-point budget on this model, so the search has work
INT4 = mq.QuantizationConfig(dtype="int4", group_size=32, scheme="symmetric")
BUDGET = 0.01  # one accuracy point


pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp() -> nn.Sequential:
    return mlp(*SIZES)


@pytest.fixture(scope="module")
def trained(digits) -> nn.Sequential:
    """A narrow MLP trained 20 epochs (well under a second) on digits; its int4 copy loses > 1 point."""
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(20):
        for start in range(0, len(x_train), 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x_train[start : start + 64]), y_train[start : start + 64]).backward()
            optimizer.step()
    return model.eval()


def _accuracy_fn(x: torch.Tensor, y: torch.Tensor, per_item: bool = False):
    def accuracy(model: nn.Module):
        with torch.inference_mode():
            correct = (model(x).argmax(1) == y).float()
        return (correct.mean().item(), correct) if per_item else correct.mean().item()

    return accuracy


def _snapshot(model: nn.Module) -> list[tuple[str, torch.Tensor, int, bool]]:
    return [(name, p.detach().clone(), p.data_ptr(), p.requires_grad) for name, p in model.named_parameters()]


def _assert_untouched(model: nn.Module, snapshot, modules: list[type]) -> None:
    for (name, value, ptr, grad), (name2, p) in zip(snapshot, model.named_parameters(), strict=True):
        assert name == name2 and p.data_ptr() == ptr and p.requires_grad == grad and torch.equal(p, value)
    assert [type(m) for m in model.modules()] == modules


@pytest.mark.parametrize("per_item", [False, True])
def test_search_reaches_the_budget_keeping_most_layers_quantized(trained, digits, per_item):
    x_train, _, x_test, y_test = digits
    accuracy = _accuracy_fn(x_test, y_test, per_item)
    snapshot, modules = _snapshot(trained), [type(m) for m in trained.modules()]
    float_score = _accuracy_fn(x_test, y_test)(trained)
    assert float_score > 0.9  # it really learned the task
    int4_score = _accuracy_fn(x_test, y_test)(mq.quantize(trained, INT4).model)
    assert float_score - int4_score > BUDGET, "precondition: plain int4 must break the budget"

    ranking_data = x_test if per_item else x_train[:512]  # per-item scores line up with x_test's items
    result = mq.quantize_with_budget(
        trained, accuracy, config=INT4, ladder=LADDER, max_drop=BUDGET, sensitivity_data=ranking_data
    )
    print(result.report)
    assert result.reached and result.stop_reason == "budget reached"
    assert result.float_score == float_score and result.quantized_score == int4_score
    assert result.drop == pytest.approx(float_score - result.final_score) and result.drop <= BUDGET
    assert _accuracy_fn(x_test, y_test)(result.model) == result.final_score
    assert len(result.precisions) == 5 and sum(p != "float" for p in result.precisions.values()) >= 4
    assert sum(p == "int4" for p in result.precisions.values()) >= 3  # most layers stay at int4
    assert result.moves and set(result.moves) == {n for n, p in result.precisions.items() if p != "int4"}
    kept = [step for step in result.steps if step.kept]
    assert result.evaluations == 2 + len(kept) + result.reranks  # the bound, met exactly without limits
    assert [row.rank for row in result.sensitivity] == [1, 2, 3, 4, 5]
    assert result.sensitivity[0].layer in result.moves  # the most sensitive layer moved first
    assert result.seconds > 0 and result.report.evaluations == result.evaluations
    _assert_untouched(trained, snapshot, modules)


def test_zero_budget_on_real_data_respects_the_evaluation_bound(trained, digits):
    x_train, _, x_test, y_test = digits
    accuracy = _accuracy_fn(x_test, y_test)
    result = mq.quantize_with_budget(
        trained, accuracy, config=INT4, ladder=LADDER, max_drop=0.0, sensitivity_data=x_train[:512]
    )
    kept = [step for step in result.steps if step.kept]
    assert result.evaluations == 2 + len(kept) + result.reranks == 2 + len(result.steps)
    assert result.reached == (result.final_score >= result.float_score) and accuracy(result.model) == result.final_score
    assert all(
        not step.kept or step.score >= prev for step, prev in zip(result.steps, _running_best(result), strict=True)
    )


def _running_best(result) -> list[float]:
    """The score before each step: kept steps never lower it."""
    best, out = result.quantized_score, []
    for step in result.steps:
        out.append(best)
        best = step.score if step.kept else best
    return out


def test_budget_already_met_needs_two_evaluations(trained, digits):
    _, _, x_test, y_test = digits
    result = mq.quantize_with_budget(trained, _accuracy_fn(x_test, y_test), max_drop=0.05, sensitivity_data=x_test)
    assert result.reached and result.evaluations == 2 and result.moves == {} and result.sensitivity == []
    assert all(type(result.model.get_submodule(n)) is Int8Linear for n in result.precisions)


def _output_mse_fn(reference_model: nn.Module, x: torch.Tensor):
    """Lower is better; only the float model scores 0, so a ladder without 'float' cannot reach max_drop=0."""
    with torch.inference_mode():
        reference = reference_model(x)

    def mse(model: nn.Module) -> float:
        with torch.inference_mode():
            return nn.functional.mse_loss(model(x), reference).item()

    return mse


def test_unreachable_budget_returns_the_best_model_found(trained, digits):
    _, _, x_test, _ = digits
    mse = _output_mse_fn(trained, x_test)
    options = {"config": INT4, "ladder": ("int4", "int8"), "higher_is_better": False, "sensitivity_data": x_test}
    result = mq.quantize_with_budget(trained, mse, max_drop=0.0, **options)
    assert not result.reached and result.stop_reason == "ladder exhausted" and result.drop > 0
    scores = [result.quantized_score] + [step.score for step in result.steps]
    assert result.final_score == min(scores) == mse(result.model)  # the best model evaluated
    assert result.evaluations <= 2 + len([s for s in result.steps if s.kept]) + result.reranks
    assert "NOT reached" in str(result.report)


def test_max_evals_and_time_budget_stop_the_search(trained, digits):
    _, _, x_test, _ = digits
    mse = _output_mse_fn(trained, x_test)
    common = {"config": INT4, "ladder": LADDER, "max_drop": 0.0, "higher_is_better": False, "sensitivity_data": x_test}
    limited = mq.quantize_with_budget(trained, mse, max_evals=4, **common)
    assert limited.evaluations == 4 and not limited.reached and "max_evals" in limited.stop_reason
    assert limited.final_score == mse(limited.model) < limited.quantized_score
    timed = mq.quantize_with_budget(trained, mse, time_budget_s=1e-9, **common)
    assert timed.evaluations == 2 and not timed.reached and "time_budget_s" in timed.stop_reason
    assert timed.final_score == timed.quantized_score == mse(timed.model)


def test_a_worse_step_is_undone_and_the_layers_re_ranked():
    """A scripted score: int8 on layer '0' hurts, every other move helps; the bound still holds."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval()
    weights = {"0": 1000.0, "2": 10.0, "4": 1.0}  # make '0' clearly the most sensitive

    with torch.no_grad():
        for name, scale in weights.items():
            model.get_submodule(name).weight.mul_(scale**0.1)

    def score(m: nn.Module) -> float:
        kinds = {n: type(m.get_submodule(n)) for n in weights}
        value = -sum(kind is Int4Linear for kind in kinds.values()) * 1.0
        return value - (5.0 if kinds["0"] is Int8Linear else 0.0)

    result = mq.quantize_with_budget(
        model, score, config=INT4, ladder=LADDER, max_drop=1.5, sensitivity_data=torch.randn(64, 64)
    )
    undone = [step for step in result.steps if not step.kept]
    assert [(s.layer, s.to_rung) for s in undone] == [("0", "int8")] and result.reranks == 1
    assert result.reached and result.precisions["0"] == "int4"  # frozen after the bad move
    kept = [step for step in result.steps if step.kept]
    assert result.evaluations == 2 + len(kept) + result.reranks
    assert "undone" in str(result.report)


def test_mixed_int4_int8_float_model_reloads_with_the_same_accuracy(trained, digits, tmp_path):
    x_train, _, x_test, y_test = digits
    accuracy = _accuracy_fn(x_test, y_test)
    config = INT4.replace(exclude=("8",))  # the classifier head stays float
    result = mq.quantize_with_budget(
        trained, accuracy, config=config, ladder=LADDER, max_drop=BUDGET, sensitivity_data=x_train[:256]
    )
    kinds = {type(m).__name__ for m in result.model.modules()}
    assert {"Int4Linear", "Int8Linear", "Linear"} <= kinds, kinds
    path = tmp_path / "mixed.safetensors"
    mq.save(result.model, path)
    reloaded = mq.load(path, model=_mlp())
    assert accuracy(reloaded) == result.final_score
    assert torch.allclose(reloaded(x_test), result.model(x_test), atol=1e-5)
    assert type(reloaded.get_submodule("8")) is nn.Linear


def test_static_int8_calibrates_once_and_keeps_the_budget(trained, digits):
    x_train, _, x_test, y_test = digits
    calls = []
    original = mq.Calibrator.run

    def counting_run(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    mq.Calibrator.run = counting_run
    try:
        result = mq.quantize_with_budget(
            trained,
            _accuracy_fn(x_test, y_test),
            config=mq.QuantizationConfig(dtype="int8", mode="static", group_size=32),
            calibration_data=list(x_train[:256].split(64)),
            ladder=LADDER,
            max_drop=0.0,
        )
    finally:
        mq.Calibrator.run = original
    assert len(calls) == 1 and result.reached
    moved = [n for n, p in result.precisions.items() if p == "int8"]
    assert moved and all(result.model.get_submodule(n).input_scale.item() > 0 for n in moved)


def test_report_prints_the_ranking_and_to_png_needs_matplotlib(trained, digits, tmp_path, monkeypatch):
    x_train, _, x_test, y_test = digits
    result = mq.quantize_with_budget(
        trained, _accuracy_fn(x_test, y_test), config=INT4, ladder=LADDER, sensitivity_data=x_train[:128]
    )
    text = str(result.report)
    assert "rank" in text and "sensitivity" in text and all(name in text for name in result.precisions)
    assert result.report.to_dict()["sensitivity"][0]["rank"] == 1
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"mono-quant\[plot\]"):
        result.report.to_png(str(tmp_path / "r.png"))
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    result.report.to_png(str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").stat().st_size > 1000


def _tiny() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), torch.randn(8, 32)


def _raises_then(exc: Exception, at: int):
    calls = []

    def eval_fn(model: nn.Module) -> float:
        calls.append(1)
        if len(calls) == at:
            raise exc
        return 1.0

    return eval_fn


@pytest.mark.parametrize(
    ("eval_fn", "match"),
    [
        (_raises_then(ZeroDivisionError("boom"), 1), r"eval_fn raised ZeroDivisionError while scoring the float"),
        (_raises_then(RuntimeError("late"), 2), r"eval_fn raised RuntimeError while scoring the fully quantized"),
        (lambda m: math.nan, r"eval_fn returned nan for the float model"),
        (lambda m: math.inf, r"eval_fn returned inf"),
        (lambda m: "0.9", r"eval_fn returned str '0.9'.*expected a number"),
        (lambda m: None, r"eval_fn returned NoneType"),
        (lambda m: True, r"eval_fn returned bool"),
        (lambda m: (1.0, 2.0, 3.0), r"eval_fn returned a tuple of 3 items"),
        (lambda m: (1.0, object()), r"per_item_scores of type object"),
        (lambda m: torch.ones(3), r"eval_fn returned Tensor"),
    ],
)
def test_bad_eval_fn_raises_clearly_and_leaves_the_model_untouched(eval_fn, match):
    model, x = _tiny()
    model.train()  # the flag must come back too
    snapshot, modules = _snapshot(model), [type(m) for m in model.modules()]
    with pytest.raises(mq.QuantizationError, match=match) as info:
        mq.quantize_with_budget(model, eval_fn, sensitivity_data=x)
    if "raised" in match:
        assert isinstance(info.value.__cause__, (ZeroDivisionError, RuntimeError))
    _assert_untouched(model, snapshot, modules)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"ladder": ()}, r"ladder=\(\) is empty"),
        ({"ladder": ("int8", "int4")}, r"must go from lowest to highest precision"),
        ({"ladder": ("fp16", "bf16")}, r"must go from lowest to highest precision"),
        ({"ladder": ("int8", "int8", "float")}, r"no rung repeated"),
        ({"ladder": ("int3", "float")}, r"unknown rung 'int3'"),
        ({"ladder": "int8"}, r"must be a sequence"),
        ({"ladder": ("float",)}, r"no quantized rung"),
        ({"ladder": ("int8", "float"), "config": INT4}, r"config.dtype='int4' is not a rung"),
        ({"ladder": ("int4-gptq", "int4-awq", "float")}, r"no rung repeated"),
        ({"ladder": ("int4-gptq", "int4", "float")}, r"must go from lowest to highest precision"),
        ({"ladder": ("int4-rtn", "float")}, r"unknown rung 'int4-rtn'.*'int4-gptq'"),
        (
            {"ladder": ("int4", "int8", "float"), "config": INT4.replace(algorithm="gptq")},
            r"config.dtype='int4' with algorithm='gptq' \(rung 'int4-gptq'\) is not a rung",
        ),
        (
            {"ladder": ("int4", "int4-gptq", "float"), "config": INT4, "sensitivity_data": None},
            r"ladder rung 'int4-gptq' fits int4 weights to data: pass calibration_data",
        ),
        ({"max_drop": -0.1}, r"max_drop=-0.1 must be >= 0"),
        ({"max_drop": math.nan}, r"max_drop=nan must be a finite number"),
        ({"drop_type": "percent"}, r"drop_type='percent'"),
        ({"max_evals": 1}, r"max_evals=1 must be None or an integer >= 2"),
        ({"time_budget_s": 0}, r"time_budget_s=0"),
        ({"sensitivity_data": None}, r"needs sensitivity_data"),
    ],
)
def test_bad_options_raise_config_errors_before_any_evaluation(options, match):
    model, x = _tiny()
    snapshot, modules = _snapshot(model), [type(m) for m in model.modules()]
    calls = []
    options = {"sensitivity_data": x, **options}
    with pytest.raises(mq.ConfigError, match=match):
        mq.quantize_with_budget(model, lambda m: calls.append(1) or 1.0, **options)
    assert calls == []
    _assert_untouched(model, snapshot, modules)


def test_relative_drop_and_a_zero_float_score():
    model, x = _tiny()
    scores = iter([0.0, 0.0])
    with pytest.raises(mq.QuantizationError, match="drop_type='relative' is undefined"):
        mq.quantize_with_budget(model, lambda m: next(scores), drop_type="relative", sensitivity_data=x)
    result = mq.quantize_with_budget(model, lambda m: 2.0, drop_type="relative", sensitivity_data=x)
    assert result.reached and result.drop == 0.0


def test_quantization_result_of_a_cnn_with_a_quantized_conv_and_a_moved_layer(digits):
    """Convolutions are quantized through their weight tensor (the module stays an ``nn.Conv2d``); the result's
    rows are the ones ``quantize`` measured on the BatchNorm-folded weights, not re-read from the modules."""
    x_train, y_train, x_test, y_test = digits
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(512, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for start in range(0, len(x_train), 64):
        optimizer.zero_grad()
        logits = model(x_train[start : start + 64].reshape(-1, 1, 8, 8))
        nn.functional.cross_entropy(logits, y_train[start : start + 64]).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        model[4].weight[:, 0] = 100.0  # the same for every class: argmax unchanged, int8 rows zero out the rest
    images = x_test.reshape(-1, 1, 8, 8)
    accuracy = _accuracy_fn(images, y_test)
    budget = mq.quantize_with_budget(
        model, accuracy, max_drop=0.02, sensitivity_data=x_train[:128].reshape(-1, 1, 8, 8)
    )
    assert budget.reached and budget.moves == {"4": "float"} and budget.float_score > 0.8
    assert isinstance(budget.model[0], nn.Conv2d) and type(budget.model[0].weight.layer).__name__ == "Int8Conv2d"
    plain = mq.quantize(model)
    result = budget.quantization_result(model, plain)
    (row,) = result.report.layers
    assert (row.name, row.kind, row.bits) == ("0", "Conv2d", 8)
    assert row == plain.report.layers[0]  # measured on the folded weight, like the plain quantization
    assert result.report.skipped == {"1": "folded into 0", "4": "kept in float by the accuracy budget"}
    assert result.report.warning.startswith("only 1% of the matmul weights were quantized")
    assert result.model is budget.model


# ----------------------------------------------------------------------------- the fitted int4 rung


FITTED_LADDER = ("int4", "int4-gptq", "int8", "float")


def test_int4_gptq_rung_fits_moved_layers_to_the_float_models_inputs(trained, digits):
    """Layers moved to "int4-gptq" stay 4-bit, are GPTQ-fitted to statistics of the float model's inputs on
    calibration_data (exactly the weights quantize builds from those statistics), and the fitted rung alone
    brings back what plain int4 lost here."""
    x_train, _, x_test, y_test = digits
    accuracy = _accuracy_fn(x_test, y_test)
    snapshot, modules = _snapshot(trained), [type(m) for m in trained.modules()]
    calibration = list(x_train[:512].split(64))
    result = mq.quantize_with_budget(
        trained, accuracy, config=INT4, ladder=FITTED_LADDER, max_drop=BUDGET, calibration_data=calibration
    )
    print(result.report)
    assert result.float_score - result.quantized_score > BUDGET  # plain int4 broke the budget
    assert result.reached and result.drop <= BUDGET
    fitted = [name for name, rung in result.precisions.items() if rung == "int4-gptq"]
    assert fitted and result.moves  # the search used the fitted rung
    assert all(f"{name} int4 -> int4-gptq" in str(result.report) for name in fitted)

    gptq = INT4.replace(algorithm="gptq")
    collector = mq.StatisticsCollector(mq.fitted_layers(trained, gptq), gptq)
    collector.run(trained, calibration)
    reference = mq.quantize(trained, gptq, input_statistics=collector.statistics()).model
    rounded = mq.quantize(trained, INT4).model
    for name in fitted:
        layer = result.model.get_submodule(name)
        assert isinstance(layer, Int4Linear)
        expected, rtn = reference.get_submodule(name).state_dict(), rounded.get_submodule(name).state_dict()
        assert all(torch.equal(value, expected[key]) for key, value in layer.state_dict().items()), name
        assert any(not torch.equal(value, rtn[key]) for key, value in layer.state_dict().items()), name
    _assert_untouched(trained, snapshot, modules)


def test_int4_gptq_rung_takes_given_statistics_and_names_missing_layers(trained, digits):
    x_train, _, x_test, y_test = digits
    gptq = INT4.replace(algorithm="gptq")
    collector = mq.StatisticsCollector(mq.fitted_layers(trained, gptq), gptq)
    collector.run(trained, x_train[:256])
    statistics = collector.statistics()
    # The search starts at the fitted rung: every layer GPTQ-fitted from the given statistics, no data needed for it.
    result = mq.quantize_with_budget(
        trained,
        _accuracy_fn(x_test, y_test),
        config=gptq,
        ladder=("int4-gptq", "int8", "float"),
        max_drop=1.0,
        sensitivity_data=x_test[:64],
        input_statistics=statistics,
    )
    assert result.evaluations == 2 and set(result.precisions.values()) == {"int4-gptq"}
    expected = mq.quantize(trained, gptq, input_statistics=statistics).model
    for name in result.precisions:
        got, want = result.model.get_submodule(name).state_dict(), expected.get_submodule(name).state_dict()
        assert all(torch.equal(value, want[key]) for key, value in got.items()), name
    del statistics["2"]
    with pytest.raises(mq.CalibrationError, match=r"input_statistics has no entry for layer\(s\) \['2'\].*'int4-gptq'"):
        mq.quantize_with_budget(
            trained, _accuracy_fn(x_test, y_test), config=gptq, ladder=("int4-gptq", "float"),
            sensitivity_data=x_test[:64], input_statistics=statistics,
        )  # fmt: skip
