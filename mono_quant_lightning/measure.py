"""The measurements of fit end, as functions of the callback's options: quantize an eval-mode copy, score the
float and quantized models with the module's own ``validation_step``, gate, and search the fallback.

None of them keeps state or writes on the callback; ``fit_end.run`` collects their results in a ``FitEndOutcome``.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer

import mono_quant as mq
from mono_quant.algorithms.statistics import InputStatistics
from mono_quant_lightning import fallback
from mono_quant_lightning.choices import OnViolation, QuantMode
from mono_quant_lightning.evaluation import Scores, fidelity, step_forward
from mono_quant_lightning.gate import GateDecision, decide
from mono_quant_lightning.messages import info, warn
from mono_quant_lightning.observation import Observation, check_monitor
from mono_quant_lightning.options import CallbackOptions


@dataclasses.dataclass(frozen=True)
class Quantized:
    """A quantized copy, the static activation parameters it used (``None`` unless static), its seconds, and the
    input statistics for fitted int4 weights (``None`` unless the options fit weights)."""

    result: mq.QuantizationResult
    qparams: Any
    seconds: float
    statistics: dict[str, InputStatistics] | None = None


def gate_name(options: CallbackOptions) -> str:
    """``monitor``, else the metric's class name in snake case (``multiclass_accuracy``), else ``metric``.

    Example:
        >>> gate_name(CallbackOptions.from_arguments(monitor="val_acc", monitor_mode="max"))
        'val_acc'
    """
    if options.monitor is not None:
        return options.monitor
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(options.metric).__name__).lower() if options.metric else "metric"


def resolve_mode(
    options: CallbackOptions, observation: Observation, module: LightningModule, trainer: Trainer | None
) -> tuple[QuantMode, Any, str]:
    """The mode to apply, the activation parameters for static mode, and why.

    Example:
        >>> options = CallbackOptions.from_arguments(mode="dynamic")
        >>> resolve_mode(options, Observation(options.config, 1), None, None)
        (<QuantMode.DYNAMIC: 'dynamic'>, None, "mode='dynamic'")
    """
    if not options.calibrates:
        mode = QuantMode(options.config.mode.value)
        return mode, None, f"mode={mode.value!r}"
    statistics, source = observation.statistics, "the last validation epoch"
    if options.calibration_dataloader is not None:
        statistics, source = observation.calibrator(module), "calibration_dataloader"
        feed = step_forward(trainer, options.batch_fn)
        statistics.run(module, options.calibration_dataloader, feed, max_batches=options.calibration_batches)
    if statistics is None:
        if options.mode is QuantMode.STATIC:
            raise mq.CalibrationError(
                "QuantizationCallback(mode='static') has no activation statistics: validation never ran during "
                "fit; pass calibration_dataloader=... to calibrate on other data, or use mode='dynamic'"
            )
        return QuantMode.DYNAMIC, None, "mode='dynamic' (auto: no validation batches were observed)"
    try:
        qparams = statistics.qparams()
    except mq.CalibrationError as err:
        if options.mode is QuantMode.STATIC:
            raise
        return QuantMode.DYNAMIC, None, f"mode='dynamic' (auto: {err})"
    why = "auto: " if options.mode is QuantMode.AUTO else ""
    return QuantMode.STATIC, qparams, f"mode='static' ({why}activation statistics from {source})"


def input_statistics(
    options: CallbackOptions, observation: Observation, module: LightningModule, trainer: Trainer | None
) -> dict[str, InputStatistics] | None:
    """Input statistics for fitted int4 weights: collected on ``calibration_dataloader`` now, else the last validation
    epoch's; ``None`` when the options fit no weights. A config that fits weights but has no statistics raises.

    Example:
        >>> from torch import nn
        >>> options = CallbackOptions.from_arguments(config=mq.QuantizationConfig(dtype="int4", algorithm="gptq"))
        >>> input_statistics(options, Observation(options.config, 1, False, True), nn.Linear(128, 2), None)
        Traceback (most recent call last):
        ...
        mono_quant.errors.CalibrationError: QuantizationCallback(config.algorithm='gptq') has no input statistics: ...
    """
    if not options.fits:
        return None
    collector = observation.inputs
    if options.calibration_dataloader is not None:
        collector = observation.collector(module)
        feed = step_forward(trainer, options.batch_fn)
        collector.run(module, options.calibration_dataloader, feed, max_batches=options.calibration_batches)
    if collector is None:
        if options.config.algorithm is mq.WeightAlgorithm.RTN:
            return None  # only the fallback's fitted rung needs them; it says so if it gets that far
        raise mq.CalibrationError(
            f"QuantizationCallback(config.algorithm={options.config.algorithm.value!r}) has no input statistics: "
            "no fit validation epoch was observed; pass calibration_dataloader=... to fit the int4 weights on other "
            "data, or use algorithm='rtn'"
        )
    return collector.statistics()


def quantize(
    options: CallbackOptions,
    observation: Observation,
    module: LightningModule,
    trainer: Trainer | None,
    announce: bool = False,
) -> Quantized:
    """Quantize an eval-mode copy of ``module`` (``mono_quant.quantize`` never changes the module).

    Example:
        >>> from torch import nn
        >>> options = CallbackOptions.from_arguments(mode="dynamic")
        >>> model = nn.Sequential(nn.Linear(32, 8))
        >>> quantize(options, Observation(options.config, 1), model, None).result.model[0].__class__.__name__
        'Int8Linear'
    """
    mode, qparams, why = resolve_mode(options, observation, module, trainer)
    statistics = input_statistics(options, observation, module, trainer)
    if announce:
        algorithm = options.config.algorithm
        fitted = "" if algorithm is mq.WeightAlgorithm.RTN else f" ({algorithm.value} on {len(statistics)} layer(s))"
        info(f"quantizing an eval-mode copy of the module to {options.dtype.value}{fitted} with {why}", options.verbose)
    started = time.perf_counter()
    config = options.config.replace(mode=mode.value)
    result = mq.quantize(module, config, activation_qparams=qparams, input_statistics=statistics)
    return Quantized(result, qparams, time.perf_counter() - started, statistics)


def direction(options: CallbackOptions, seen: dict[str, Any]) -> bool:
    """Whether higher is better for the gated value: ``metric``'s or ``monitor_mode``, else what the Metric logged
    as ``monitor`` declares (``seen``: name -> ``higher_is_better``, ``None`` for a plain value).

    Example:
        >>> direction(CallbackOptions.from_arguments(monitor="val_loss", monitor_mode="min"), {})
        False
        >>> direction(CallbackOptions.from_arguments(monitor="val_acc"), {"val_acc": True})
        True
    """
    if options.metric is not None:
        return bool(options.metric.higher_is_better)
    if options.monitor_mode is not None:
        return options.monitor_mode.value == "max"
    higher = seen.get(options.monitor)
    if higher is None:
        raise mq.ConfigError(
            f"QuantizationCallback(monitor={options.monitor!r}): {options.monitor!r} is logged as a plain value, so "
            "its direction is unknown; pass monitor_mode='max' (higher is better) or 'min', or log a torchmetrics "
            "Metric object"
        )
    return bool(higher)


def score(options: CallbackOptions, scores: Scores, module: LightningModule) -> float:
    """The gated value of one validation pass.

    Example:
        >>> score(CallbackOptions.from_arguments(monitor="val_acc"), Scores({"val_acc": 0.9}, {}, None), None)
        0.9
    """
    if options.metric is not None:
        return float(scores.metric)
    if options.monitor not in scores.values:
        check_monitor(options.monitor, options.monitor_mode, scores.values, module)  # raises
    return scores.values[options.monitor]


def gate(
    options: CallbackOptions, float_score: float, quantized_score: float, higher_is_better: bool, warning: str
) -> GateDecision:
    """The gate's decision on two scores; ``warning`` (the report's coverage warning) ends its reason.

    Example:
        >>> gate(CallbackOptions.from_arguments(max_drop=0.05), 0.9, 0.88, True, "").reason
        'drop 0.02 <= max_drop 0.05'
    """
    return decide(
        float_score,
        quantized_score,
        options.max_drop,
        higher_is_better=higher_is_better,
        drop_type=options.drop_type,
        coverage_warning=warning,
    )


def fidelity_report(
    options: CallbackOptions,
    trainer: Trainer,
    module: LightningModule,
    q_model: Any,
    loaders: list,
    reference: Callable[[int, Any], Any] | None = None,
) -> mq.FidelityReport | None:
    """Output fidelity of ``q_model`` against ``module`` on the validation batches (``None``: nothing to compare);
    ``reference`` gives float outputs already known (``mq.compare``)."""
    try:
        return fidelity(
            module, q_model, trainer, loaders, max_batches=options.calibration_batches, batch_fn=options.batch_fn,
            reference=reference,
        )  # fmt: skip
    except mq.ConfigError as err:  # validation_step never calls forward: nothing to compare
        warn(f"no fidelity figures: {err}")
        return None


def search_fallback(
    options: CallbackOptions,
    trainer: Trainer,
    module: LightningModule,
    loaders: list,
    quantized: Quantized,
    higher_is_better: bool,
) -> mq.BudgetResult:
    """Move the most sensitive layers up ``fallback_ladder`` until the drop fits (every rank: rank zero's moves)."""
    search = fallback.Search(
        score=lambda scores: score(options, scores, module),
        higher_is_better=higher_is_better,
        max_drop=options.max_drop,
        drop_type=options.drop_type.value,
        ladder=options.fallback_ladder,
        ranking_batches=options.calibration_batches,
        metric=options.metric,
        batch_fn=options.batch_fn,
    )
    config, qparams, statistics = quantized.result.config, quantized.qparams, quantized.statistics
    budget = fallback.search(search, trainer, module, loaders, config, qparams, statistics)
    listed = ", ".join(f"{name} -> {rung}" for name, rung in budget.moves.items()) or "none"
    verdict = "reached" if budget.reached else "NOT reached"
    info(
        f"fallback: budget {verdict} after {budget.evaluations} evaluations in {budget.seconds:.2f} s; "
        f"{len(budget.moves)} layer(s) moved up the ladder: {listed}\n{budget.report}",
        options.verbose,
    )
    return budget


def failure_message(options: CallbackOptions, decision: GateDecision, budget: mq.BudgetResult | None) -> str:
    """Why the gate failed, with the scores (and the fallback's search, when there was one).

    Example:
        >>> failure_message(CallbackOptions.from_arguments(monitor="val_acc", monitor_mode="max"),
        ...                 decide(0.9, 0.5, 0.01), None)
        'quantized model failed the gate: drop 0.4 > max_drop 0.01 (val_acc float 0.9000, quantized 0.5000)'
    """
    name, d = gate_name(options), decision
    if options.on_violation is OnViolation.FALLBACK and budget is not None:
        return (
            f"accuracy fallback did not reach the budget: best drop {d.drop:.4g} > max_drop {options.max_drop:.4g} "
            f"with fallback_ladder={options.fallback_ladder} ({name} float {d.float_score:.4f}, best "
            f"quantized {d.quantized_score:.4f}, {len(budget.moves)} layer(s) moved, {budget.evaluations} "
            f"evaluations, stopped: {budget.stop_reason})"
        )
    return (
        f"quantized model failed the gate: {d.reason} ({name} float {d.float_score:.4f}, "
        f"quantized {d.quantized_score:.4f})"
    )
