"""The fit-end step of ``QuantizationCallback``: quantize, measure, gate (and fall back), publish the figures,
then export or not as ``on_violation`` says. ``run`` returns a ``FitEndOutcome``; the callback keeps it.

Every rank measures and takes rank zero's gate decision; only global rank zero writes or removes files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer

import mono_quant as mq
from mono_quant_lightning import export
from mono_quant_lightning.batches import val_loaders
from mono_quant_lightning.choices import OnViolation, QuantMode
from mono_quant_lightning.evaluation import evaluate
from mono_quant_lightning.export_formats import remove_extras, write_extras
from mono_quant_lightning.gate import GateDecision, QuantizationGateError
from mono_quant_lightning.measure import (
    Quantized,
    direction,
    failure_message,
    fidelity_report,
    gate,
    gate_name,
    quantize,
    score,
    search_fallback,
)
from mono_quant_lightning.messages import info, warn
from mono_quant_lightning.observation import Observation
from mono_quant_lightning.options import CallbackOptions
from mono_quant_lightning.reference import Reference


@dataclasses.dataclass(frozen=True)
class FitEndOutcome:
    """What one fit end produced.

    ``result`` is the quantized copy that was (or would have been) exported; ``decision`` the gate's (``None``
    without ``monitor``/``metric``); ``budget`` the fallback's search; ``failed`` whether the gate failed in the
    end; ``export_path`` the fit-end file (``None`` when nothing was exported), ``extra_paths`` the files
    written beside it (the text report, ONNX, HF); ``error`` the ``QuantizationGateError`` fit end raises.

    Example:
        >>> from torch import nn
        >>> result = mq.quantize(nn.Sequential(nn.Linear(32, 8)), mode="dynamic")
        >>> outcome = FitEndOutcome(result, QuantMode.DYNAMIC, seconds=0.1)
        >>> outcome.drop, outcome.export_path, outcome.failed
        (None, None, False)
    """

    result: mq.QuantizationResult
    mode_used: QuantMode
    seconds: float
    higher_is_better: bool | None = None
    decision: GateDecision | None = None
    fidelity: mq.FidelityReport | None = None
    budget: mq.BudgetResult | None = None
    failed: bool = False
    export_path: Path | None = None
    extra_paths: tuple[Path, ...] = ()
    error: QuantizationGateError | None = None

    @property
    def drop(self) -> float | None:
        """The gate's drop (positive: the quantized model is worse), ``None`` without a gate."""
        return None if self.decision is None else self.decision.drop


def run(
    options: CallbackOptions,
    observation: Observation,
    trainer: Trainer,
    module: LightningModule,
    higher_is_better: bool | None,
    reference: Reference | None = None,
) -> FitEndOutcome:
    """Measure, publish and export; a failed gate that must raise is returned as ``error``, not raised.
    ``reference`` supplies float outputs kept from the last validation epoch (``reference.ReferenceOutputs``)."""
    observation.stop()
    outcome = _measure(options, observation, trainer, module, higher_is_better, reference)
    _publish(options, outcome, trainer)
    return _conclude(options, outcome, trainer)


def _measure(
    options: CallbackOptions,
    observation: Observation,
    trainer: Trainer,
    module: LightningModule,
    higher_is_better: bool | None,
    reference: Reference | None = None,
) -> FitEndOutcome:
    """Quantize, score float vs quantized, gate (the same decision on every rank) and fall back."""
    quantized = quantize(options, observation, module, trainer, announce=True)
    result = quantized.result
    outcome = FitEndOutcome(result, QuantMode(result.config.mode.value), quantized.seconds, higher_is_better)
    loaders = val_loaders(trainer)
    if options.gated:
        outcome = _gate(options, outcome, trainer, module, loaders)
    if loaders:
        fidelity = fidelity_report(options, trainer, module, result.model, loaders, reference)
        outcome = dataclasses.replace(outcome, fidelity=fidelity)
    failed = outcome.decision is not None and not outcome.decision.passed
    failed = bool(trainer.strategy.broadcast(failed, src=0))  # rank zero's decision is the one acted on
    if failed and options.on_violation is OnViolation.FALLBACK:
        outcome = _fall_back(options, outcome, trainer, module, loaders, quantized)
        failed = not outcome.budget.reached
    return dataclasses.replace(outcome, failed=failed)


def _gate(
    options: CallbackOptions, outcome: FitEndOutcome, trainer: Trainer, module: LightningModule, loaders: list
) -> FitEndOutcome:
    feed = (options.metric, options.batch_fn)
    float_scores = evaluate(module, trainer, loaders, *feed, desc="float validation")
    quantized_scores = evaluate(outcome.result.model, trainer, loaders, *feed, desc="quantized validation")
    higher = outcome.higher_is_better
    if higher is None:
        higher = direction(options, float_scores.higher_is_better)
    float_score, quantized_score = score(options, float_scores, module), score(options, quantized_scores, module)
    decision = gate(options, float_score, quantized_score, higher, outcome.result.report.warning)
    return dataclasses.replace(outcome, higher_is_better=higher, decision=decision)


def _fall_back(
    options: CallbackOptions,
    outcome: FitEndOutcome,
    trainer: Trainer,
    module: LightningModule,
    loaders: list,
    quantized: Quantized,
) -> FitEndOutcome:
    ladder = options.fallback_ladder
    info(f"gate failed ({outcome.decision.reason}); searching fallback_ladder={ladder}", options.verbose)
    budget = search_fallback(options, trainer, module, loaders, quantized, outcome.higher_is_better)
    result = budget.quantization_result(module, outcome.result)
    decision = gate(options, budget.float_score, budget.final_score, outcome.higher_is_better, result.report.warning)
    fidelity = fidelity_report(options, trainer, module, budget.model, loaders)
    return dataclasses.replace(outcome, result=result, budget=budget, decision=decision, fidelity=fidelity)


def _conclude(options: CallbackOptions, outcome: FitEndOutcome, trainer: Trainer) -> FitEndOutcome:
    """Export, skip or refuse as ``on_violation`` says; a failed gate removes the stale files of an earlier run.

    Under ``fast_dev_run`` (a smoke test of the code) no file is touched, like Lightning's checkpoints.
    """
    path = export.export_path(trainer, options.export_dir)
    if trainer.fast_dev_run:
        verdict = f" ({failure_message(options, outcome.decision, outcome.budget)})" if outcome.failed else ""
        info(
            f"fast_dev_run: quantized and measured{verdict}; exported nothing, so an earlier run's {path} stays "
            "as it is"
        )
        return outcome
    if outcome.failed:
        message = failure_message(options, outcome.decision, outcome.budget)
        if trainer.is_global_zero:
            remove_extras(path)
        if trainer.is_global_zero and export.remove(path):
            message += f"; removed the stale {path.name} of an earlier run"
        if options.on_violation in (OnViolation.RAISE, OnViolation.FALLBACK):
            error = QuantizationGateError(f"{message}; nothing exported", outcome.decision)
            return dataclasses.replace(outcome, error=error)
        if options.on_violation is OnViolation.SKIP_EXPORT:
            warn(f"{message}; skipping the export (on_violation='skip_export')")
            return outcome
        warn(f"{message}; exporting anyway (on_violation='warn'), the gate result is in its metadata")
    extra_paths = _export(options, outcome, path, trainer) if trainer.is_global_zero else ()
    return dataclasses.replace(outcome, export_path=path, extra_paths=extra_paths)


def _export(options: CallbackOptions, outcome: FitEndOutcome, path: Path, trainer: Trainer) -> tuple[Path, ...]:
    """Write the fit-end file (with the gate record in its metadata), its report and the extra formats."""
    gate_record = None if outcome.decision is None else export.gate_record(outcome.decision, gate_name(options))
    export.write(outcome.result, path, gate_record)
    info(f"exported {path} ({path.stat().st_size:,} bytes) and {export.report_path(path).name}", options.verbose)
    extras = write_extras(outcome.result.model, path, options.export_formats, trainer, options.verbose)
    return (export.report_path(path), *extras)


def _publish(options: CallbackOptions, outcome: FitEndOutcome, trainer: Trainer) -> None:
    """``quant/*`` figures to ``trainer.callback_metrics`` and every logger; the report through rank_zero_info."""
    report, decision, budget, name = outcome.result.report, outcome.decision, outcome.budget, gate_name(options)
    metrics: dict[str, float] = {"quant/seconds": outcome.seconds}
    if report.model_bytes_before:
        metrics["quant/size_ratio"] = report.model_bytes_after / report.model_bytes_before
    if outcome.fidelity is not None:
        metrics["quant/sqnr_db"] = outcome.fidelity.sqnr_db
        metrics["quant/cosine_min"] = outcome.fidelity.cosine_min
    if decision is not None:
        metrics[f"quant/{name}_float"] = decision.float_score
        metrics[f"quant/{name}_quantized"] = decision.quantized_score
        metrics["quant/drop"] = decision.drop
        metrics["quant/passed"] = float(decision.passed)
    if budget is not None:
        metrics["quant/reverted_layers"] = float(len(budget.moves))
        metrics[f"quant/{name}_before_fallback"] = budget.quantized_score
        metrics["quant/fallback_evaluations"] = float(budget.evaluations)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
    info(f"quantization report ({outcome.seconds:.2f} s)\n{report}", options.verbose)
    if outcome.fidelity is not None:
        info(f"fidelity: {outcome.fidelity}", options.verbose)
    if decision is not None:
        verdict = "passed" if decision.passed else "FAILED"
        info(
            f"{name}: float {decision.float_score:.4f}, quantized {decision.quantized_score:.4f}; "
            f"gate {verdict}: {decision.reason}",
            options.verbose,
        )
