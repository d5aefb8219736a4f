"""The fit-end work of ``QuantizationCallback``: quantize, score float vs quantized with the module's own
``validation_step``, gate (the same decision on every rank), fall back, and publish the figures.

``Measurer`` writes its results on the callback (``result``, ``decision``, ``drop``, ``fidelity``, ``budget``,
``mode_used``), which the user reads.
"""

from __future__ import annotations

import re
import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

import mono_quant as mq
from mono_quant_lightning import fallback
from mono_quant_lightning.batches import val_loaders
from mono_quant_lightning.evaluation import Scores, evaluate, fidelity
from mono_quant_lightning.gate import decide
from mono_quant_lightning.observation import check_monitor
from mono_quant_lightning.options import OnViolation, QuantMode


class Measurer:
    """Fit-end measurement for one callback ``cb``.

    Example:
        >>> from mono_quant_lightning import QuantizationCallback
        >>> Measurer(QuantizationCallback(monitor="val_acc", monitor_mode="max")).gate_name()
        'val_acc'
    """

    def __init__(self, cb: Any) -> None:
        self.cb = cb
        self.seconds = 0.0

    def info(self, message: str) -> None:
        if self.cb.verbose:
            rank_zero_info(f"[mono-quant] {message}")

    def warn(self, message: str) -> None:
        rank_zero_warn(f"[mono-quant] {message}")

    def gate_name(self) -> str:
        """``monitor``, else the metric's class name in snake case (``multiclass_accuracy``), else ``metric``."""
        if self.cb.monitor is not None:
            return self.cb.monitor
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self.cb.metric).__name__).lower() if self.cb.metric else "metric"

    def quantize(self, module: LightningModule, trainer: Trainer | None, announce: bool) -> tuple[Any, Any]:
        """The quantized copy and the static activation parameters it used (``None`` unless static)."""
        mode, qparams, why = self.cb.resolve_mode(module, trainer)
        if announce:
            self.info(f"quantizing an eval-mode copy of the module to {self.cb.dtype.value} with {why}")
        started = time.perf_counter()
        result = mq.quantize(module, self.cb.config.replace(mode=mode.value), activation_qparams=qparams)
        self.seconds = time.perf_counter() - started
        self.cb.mode_used = QuantMode(result.config.mode.value)
        return result, qparams

    def score(self, scores: Scores) -> float:
        """The gated value of one validation pass."""
        if self.cb.metric is not None:
            return float(scores.metric)
        if self.cb.monitor not in scores.values:
            check_monitor(self.cb.monitor, self.cb.monitor_mode, scores.values, self.cb._module)  # raises
        return scores.values[self.cb.monitor]

    def run(self, trainer: Trainer, module: LightningModule) -> bool:
        """Quantize, measure, gate (and fall back); publish the figures. Whether the gate failed in the end."""
        cb = self.cb
        result, qparams = self.quantize(module, trainer, announce=True)
        cb.result, cb.budget, cb.decision, cb.drop, cb.fidelity = result, None, None, None, None
        loaders = val_loaders(trainer)
        gated = cb.monitor is not None or cb.metric is not None
        if gated:
            float_scores = evaluate(module, trainer, loaders, cb.metric, cb.batch_fn, desc="float validation")
            quantized = evaluate(result.model, trainer, loaders, cb.metric, cb.batch_fn, desc="quantized validation")
            if cb.higher_is_better is None:
                cb.higher_is_better = _direction(cb.monitor, cb.monitor_mode, float_scores.higher_is_better)
            self._decide(self.score(float_scores), self.score(quantized))
        if loaders:
            cb.fidelity = self._fidelity(trainer, module, result.model, loaders)
        failed = cb.decision is not None and not cb.decision.passed
        failed = bool(trainer.strategy.broadcast(failed, src=0))  # rank zero's decision is the one acted on
        if failed and cb.on_violation is OnViolation.FALLBACK:
            self.info(f"gate failed ({cb.decision.reason}); searching fallback_ladder={cb.fallback_ladder}")
            failed = not self._fallback(trainer, module, loaders, qparams)
        self.publish(trainer)
        return failed

    def failure_message(self) -> str:
        cb, d = self.cb, self.cb.decision
        if cb.on_violation is OnViolation.FALLBACK:
            return (
                f"accuracy fallback did not reach the budget: best drop {d.drop:.4g} > max_drop {cb.max_drop:.4g} "
                f"with fallback_ladder={cb.fallback_ladder} ({self.gate_name()} float {d.float_score:.4f}, best "
                f"quantized {d.quantized_score:.4f}, {len(cb.budget.moves)} layer(s) moved, {cb.budget.evaluations} "
                f"evaluations, stopped: {cb.budget.stop_reason})"
            )
        return (
            f"quantized model failed the gate: {d.reason} ({self.gate_name()} float {d.float_score:.4f}, "
            f"quantized {d.quantized_score:.4f})"
        )

    def publish(self, trainer: Trainer) -> None:
        """``quant/*`` figures to ``trainer.callback_metrics`` and every logger; the report through rank_zero_info."""
        cb, report = self.cb, self.cb.result.report
        metrics: dict[str, float] = {"quant/seconds": self.seconds}
        if report.model_bytes_before:
            metrics["quant/size_ratio"] = report.model_bytes_after / report.model_bytes_before
        if cb.fidelity is not None:
            metrics["quant/sqnr_db"] = cb.fidelity.sqnr_db
            metrics["quant/cosine_min"] = cb.fidelity.cosine_min
        name = self.gate_name()
        if cb.decision is not None:
            metrics[f"quant/{name}_float"] = cb.decision.float_score
            metrics[f"quant/{name}_quantized"] = cb.decision.quantized_score
            metrics["quant/drop"] = cb.decision.drop
            metrics["quant/passed"] = float(cb.decision.passed)
        if cb.budget is not None:
            metrics["quant/reverted_layers"] = float(len(cb.budget.moves))
            metrics[f"quant/{name}_before_fallback"] = cb.budget.quantized_score
            metrics["quant/fallback_evaluations"] = float(cb.budget.evaluations)
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
                logger.save()
        self.info(f"quantization report ({self.seconds:.2f} s)\n{report}")
        if cb.fidelity is not None:
            self.info(f"fidelity: {cb.fidelity}")
        if cb.decision is not None:
            verdict = "passed" if cb.decision.passed else "FAILED"
            self.info(
                f"{name}: float {cb.decision.float_score:.4f}, quantized {cb.decision.quantized_score:.4f}; "
                f"gate {verdict}: {cb.decision.reason}"
            )

    def _decide(self, float_score: float, quantized_score: float) -> None:
        cb = self.cb
        cb.decision = decide(
            float_score,
            quantized_score,
            cb.max_drop,
            higher_is_better=cb.higher_is_better,
            drop_type=cb.drop_type,
            coverage_warning=cb.result.report.warning,
        )
        cb.drop = cb.decision.drop

    def _fidelity(self, trainer: Trainer, module: Any, q_model: Any, loaders: list) -> mq.FidelityReport | None:
        try:
            options = {"max_batches": self.cb.calibration_batches, "batch_fn": self.cb.batch_fn}
            return fidelity(module, q_model, trainer, loaders, **options)
        except mq.ConfigError as err:  # validation_step never calls forward: nothing to compare
            self.warn(f"no fidelity figures: {err}")
            return None

    def _fallback(self, trainer: Trainer, module: LightningModule, loaders: list, qparams: Any) -> bool:
        cb = self.cb
        search = fallback.Search(
            score=self.score,
            higher_is_better=cb.higher_is_better,
            max_drop=cb.max_drop,
            drop_type=cb.drop_type.value,
            ladder=cb.fallback_ladder,
            ranking_batches=cb.calibration_batches,
            metric=cb.metric,
            batch_fn=cb.batch_fn,
        )
        budget = fallback.search(search, trainer, module, loaders, cb.result.config, qparams)
        cb.budget = budget
        cb.result = budget.quantization_result(module, cb.result)
        self._decide(budget.float_score, budget.final_score)
        cb.fidelity = self._fidelity(trainer, module, budget.model, loaders)
        listed = ", ".join(f"{name} -> {rung}" for name, rung in budget.moves.items()) or "none"
        verdict = "reached" if budget.reached else "NOT reached"
        self.info(
            f"fallback: budget {verdict} after {budget.evaluations} evaluations in {budget.seconds:.2f} s; "
            f"{len(budget.moves)} layer(s) moved up the ladder: {listed}\n{budget.report}"
        )
        return bool(budget.reached)


def _direction(monitor: str, mode: Any, seen: dict[str, Any]) -> bool:
    if mode is not None:
        return mode.value == "max"
    higher = seen.get(monitor)
    if higher is None:
        raise mq.ConfigError(
            f"QuantizationCallback(monitor={monitor!r}): {monitor!r} is logged as a plain value, so its direction is "
            "unknown; pass monitor_mode='max' (higher is better) or 'min', or log a torchmetrics Metric object"
        )
    return bool(higher)
