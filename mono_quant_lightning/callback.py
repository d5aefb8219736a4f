"""``QuantizationCallback``: calibrate on validation, quantize at fit end, gate on the metric drop, export.

The hooks are thin: they decide *when* and *on what data*; ``mono_quant`` does the work
(``Calibrator`` for statistics, ``quantize`` for the model, ``quantize_with_budget`` for the accuracy
fallback, ``compare`` for fidelity, ``save`` for files) and ``gate.decide`` takes the decision. The
user's ``LightningModule`` is never modified: calibration uses forward pre-hooks on its layers that are
removed at the end of every validation epoch, and quantization works on a deep copy.
"""

from __future__ import annotations

import itertools
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import move_data_to_device
from torch import nn

import mono_quant as mq
from mono_quant.config import ObserverKind, QuantDtype, parse_dtype, parse_enum
from mono_quant.errors import CalibrationError, ConfigError
from mono_quant.fidelity import output_tensor
from mono_quant.modules import ActivationQParams
from mono_quant.selection import calibrated_layers
from mono_quant_lightning.batches import BatchFn, call_model, default_batch_fn, make_forward, val_loaders
from mono_quant_lightning.checkpoint_io import SidecarCheckpointIO
from mono_quant_lightning.gate import DropType, GateDecision, QuantizationGateError, decide
from mono_quant_lightning.options import (
    OnViolation,
    QuantizeOn,
    QuantMode,
    bad_argument,
    checked,
    parse_fallback_ladder,
    parse_metric,
    parse_quantize_on,
)

EXPORT_NAME = "model.quant.safetensors"


class QuantizationCallback(Callback):
    r"""Quantize the model a Lightning run trains, measure what it costs, and export it.

    With no arguments: int8, ``mode="auto"`` (static when validation batches were observed, otherwise
    dynamic), quantize at fit end, report output fidelity, and write ``model.quant.safetensors`` next to
    the checkpoints.

    Args:
        dtype: ``"int8"`` (default), ``"int4"`` (weight-only), ``"fp16"`` or ``"bf16"``.
        mode: ``"auto"``, ``"static"``, ``"dynamic"`` or ``"weight_only"``. Only int8 static/auto calibrates.
        observer: ``"minmax"``, ``"moving_average"`` or ``"histogram"`` (activation statistics).
        calibration_batches: how many batches of each validation epoch (per process) feed the observers.
        quantize_on: ``"fit_end"`` and/or ``"checkpoint"`` (a ``<stem>.quant.safetensors`` beside each ``.ckpt``).
        metric: a torchmetrics ``Metric`` evaluated on the validation data for the float and quantized model.
        max_drop: the largest allowed drop of ``metric`` (oriented by its ``higher_is_better``).
        drop_type: ``"absolute"`` or ``"relative"``.
        on_violation: ``"raise"`` (``QuantizationGateError``, nothing exported), ``"warn"``, ``"skip_export"`` or
            ``"fallback"`` (needs ``metric``): when the gate fails at fit end, run ``mono_quant.quantize_with_budget``
            with ``metric`` on the validation data as the score, moving the most sensitive layers up
            ``fallback_ladder`` until the drop fits ``max_drop``; export that mixed-precision model, or raise
            ``QuantizationGateError`` naming the best drop reached (nothing exported). Static int8 reuses the
            validation epoch's activation statistics (no recalibration). It costs ``2 + (layers moved) +
            (re-ranks)`` validation passes. Checkpoint sidecars are not searched.
        fallback_ladder: the precisions the fallback may move a layer through, lowest first, starting at ``dtype``.
            Default: ``dtype`` then ``"float"`` (``("int4", "int8", "float")`` for int4).
        export_dir: where the fit-end file goes; default: the first ``ModelCheckpoint``'s ``dirpath``, else
            ``trainer.default_root_dir``.
        include, exclude: glob patterns on module names (see ``mono_quant.QuantizationConfig``).
        batch_fn: ``batch -> (inputs, target)``. Default: tuples/lists give ``(batch[0], batch[-1])``; dicts give
            the items whose key is not a target key as keyword inputs and the first of ``"target"``,
            ``"targets"``, ``"label"``, ``"labels"``, ``"y"`` as target. Inputs are fed as ``model(x)`` for a
            tensor, ``model(**x)`` for a dict and ``model(*x)`` for a tuple/list.
        calibration_dataloader: calibrate on this data (e.g. a training subset) instead of validation batches.
        verbose: print the report table and the gate result on global rank zero.

    Attributes:
        result: the ``mono_quant.QuantizationResult`` built at fit end.
        export_path: the file written at fit end (``None`` when nothing was written).
        drop: the measured metric drop of ``result`` (``None`` without a metric).
        decision: the ``GateDecision`` of ``result`` (``None`` without a metric).
        budget: the ``mono_quant.BudgetResult`` of the fallback search (``None`` when it did not run). After a
            fallback, ``result``, ``drop``, ``decision`` and ``fidelity`` describe the searched (final) model.
        fidelity: the ``mono_quant.FidelityReport`` of outputs (float vs quantized).
        mode_used: the mode that was actually applied.

    Raises:
        ConfigError: at construction, for an argument that is not valid (the message quotes it).
        QuantizationGateError: out of ``trainer.fit`` when the gate fails with ``on_violation="raise"``, or with
            ``"fallback"`` when no precision assignment on the ladder meets the budget.

    Under DDP every rank takes the same decisions: the metric is synced by torchmetrics in ``compute()``, so each
    evaluation gives every rank the same score; the sensitivity ranking runs on rank zero's first
    ``calibration_batches`` validation batches, broadcast to every rank (and static activation statistics are
    rank zero's), so every rank runs the identical search; rank zero's final moves and verdict are broadcast and
    are the ones acted on (a rank that disagrees warns). The fallback has no time limit, since elapsed time
    differs between ranks.

    Example:
        >>> cb = QuantizationCallback()
        >>> cb.mode, cb.quantize_on
        (<QuantMode.AUTO: 'auto'>, (<QuantizeOn.FIT_END: 'fit_end'>,))
        >>> QuantizationCallback(mode="fallback")
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: QuantizationCallback(mode='fallback'): ...
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> QuantizationCallback(dtype="int4", metric=MulticlassAccuracy(10), on_violation="fallback").fallback_ladder
        ('int4', 'int8', 'float')
    """

    def __init__(
        self,
        dtype: Any = "int8",
        mode: QuantMode | str = "auto",
        observer: ObserverKind | str = "minmax",
        calibration_batches: int = 32,
        quantize_on: Iterable[QuantizeOn | str] | str = ("fit_end",),
        metric: Any = None,
        max_drop: float = 0.01,
        drop_type: DropType | str = "absolute",
        on_violation: OnViolation | str = "raise",
        export_dir: str | os.PathLike[str] | None = None,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        batch_fn: BatchFn | None = None,
        calibration_dataloader: Iterable[Any] | None = None,
        verbose: bool = True,
        fallback_ladder: Iterable[Any] | None = None,
    ) -> None:
        super().__init__()
        self.dtype: QuantDtype = checked("dtype", dtype, parse_dtype)
        self.mode: QuantMode = checked("mode", mode, lambda v: parse_enum(QuantMode, v, "mode"))
        self.observer: ObserverKind = checked("observer", observer, lambda v: parse_enum(ObserverKind, v, "observer"))
        if isinstance(calibration_batches, bool) or not isinstance(calibration_batches, int) or calibration_batches < 1:
            bad_argument("calibration_batches", calibration_batches, "must be an integer >= 1")
        self.calibration_batches = calibration_batches
        self.quantize_on = parse_quantize_on(quantize_on)
        self.metric = parse_metric(metric)
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < math.inf:
            bad_argument("max_drop", max_drop, "must be a finite number >= 0")
        self.max_drop = float(max_drop)
        self.drop_type: DropType = checked("drop_type", drop_type, lambda v: parse_enum(DropType, v, "drop_type"))
        self.on_violation: OnViolation = checked(
            "on_violation", on_violation, lambda v: parse_enum(OnViolation, v, "on_violation")
        )
        if self.on_violation is OnViolation.FALLBACK and self.metric is None:
            bad_argument(
                "on_violation", on_violation, "needs metric=... (e.g. MulticlassAccuracy(num_classes=10)) to score"
            )
        if fallback_ladder is not None and self.on_violation is not OnViolation.FALLBACK:
            bad_argument("fallback_ladder", fallback_ladder, "is only used with on_violation='fallback'")
        self.fallback_ladder: tuple[str, ...] = parse_fallback_ladder(fallback_ladder, self.dtype)
        if batch_fn is not None and not callable(batch_fn):
            bad_argument("batch_fn", batch_fn, "must be a callable batch -> (inputs, target)")
        if calibration_dataloader is not None and not isinstance(calibration_dataloader, Iterable):
            bad_argument(
                "calibration_dataloader", calibration_dataloader, "must be an iterable of batches (e.g. a DataLoader)"
            )
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.batch_fn = batch_fn
        self.calibration_dataloader = calibration_dataloader
        self.verbose = verbose
        # The base config; ``mode`` is resolved per export. Building it validates include/exclude and the
        # dtype/mode combination (e.g. int4 + static) now, not at fit end.
        base_mode = "static" if self.calibrates or self.mode is QuantMode.STATIC else "dynamic"
        if self.mode is QuantMode.WEIGHT_ONLY:
            base_mode = "weight_only"
        for argument, patterns in (("include", include), ("exclude", exclude)):
            if not (patterns is None or isinstance(patterns, (str, Iterable))):
                bad_argument(argument, patterns, "must be a glob pattern or a sequence of them")
        self.config: mq.QuantizationConfig = checked(
            "mode",
            mode,
            lambda _: mq.QuantizationConfig(
                dtype=self.dtype, mode=base_mode, observer=self.observer, include=include, exclude=exclude or ()
            ),
        )

        self.result: mq.QuantizationResult | None = None
        self.export_path: Path | None = None
        self.drop: float | None = None
        self.decision: GateDecision | None = None
        self.fidelity: mq.FidelityReport | None = None
        self.mode_used: QuantMode | None = None
        self.budget: mq.BudgetResult | None = None
        self._calibrator: mq.Calibrator | None = None  # observing the current validation epoch
        self._statistics: mq.Calibrator | None = None  # the last completed (and synced) epoch
        self._pending_state: dict[str, Any] | None = None
        self._batches_seen = 0
        self._module: LightningModule | None = None
        self._wrapped_io: Any = None

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dtype=self.dtype.value, observer=self.observer.value)

    @property
    def calibrates(self) -> bool:
        """Whether this configuration collects activation statistics (int8 with mode auto/static).

        Example:
            >>> QuantizationCallback().calibrates, QuantizationCallback(mode="dynamic").calibrates
            (True, False)
        """
        return self.dtype is QuantDtype.INT8 and self.mode in (QuantMode.AUTO, QuantMode.STATIC)

    def state_dict(self) -> dict[str, Any]:
        """The last validation epoch's observer statistics, as plain tensors (``weights_only``-loadable).

        Example:
            >>> QuantizationCallback().state_dict()
            {'observer': 'minmax', 'statistics': None}
        """
        stats = self._statistics.state_dict() if self._statistics is not None else self._pending_state
        return {"observer": self.observer.value, "statistics": stats}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore statistics saved by ``state_dict`` (applied once the model is known, in ``setup``).

        Example:
            >>> cb = QuantizationCallback(); cb.load_state_dict({"observer": "minmax", "statistics": None})
        """
        if state_dict.get("observer", self.observer.value) != self.observer.value:
            warnings.warn(
                f"checkpoint statistics come from observer={state_dict['observer']!r}, not {self.observer.value!r};"
                " ignoring them",
                stacklevel=2,
            )
            return
        self._pending_state = state_dict.get("statistics")
        if self._module is not None:
            self._apply_pending_state()

    def _apply_pending_state(self) -> None:
        if self._pending_state is None or self._module is None:
            return
        calibrator = self._new_calibrator(self._module)
        calibrator.load_state_dict(self._pending_state)
        self._statistics, self._pending_state = calibrator, None

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remember the module and, with ``"checkpoint"`` in ``quantize_on``, wrap the checkpoint IO."""
        if stage != TrainerFn.FITTING.value:
            return
        self._module = pl_module
        self._apply_pending_state()
        if QuantizeOn.CHECKPOINT in self.quantize_on and not isinstance(
            trainer.strategy.checkpoint_io, SidecarCheckpointIO
        ):
            self._wrapped_io = trainer.strategy.checkpoint_io
            trainer.strategy.checkpoint_io = SidecarCheckpointIO(self._wrapped_io, self._write_sidecar)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove any hooks and give the strategy its own checkpoint IO back."""
        self._stop_observing()
        if self._wrapped_io is not None and isinstance(trainer.strategy.checkpoint_io, SidecarCheckpointIO):
            trainer.strategy.checkpoint_io = self._wrapped_io
            self._wrapped_io = None

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop_observing()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start observing the selected layers (fit validation only; never the sanity check)."""
        if not self._observes_validation(trainer):
            return
        self._stop_observing()
        self._calibrator = self._new_calibrator(pl_module)
        self._batches_seen = 0
        self._calibrator.attach()

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, **kwargs: Any
    ) -> None:
        """Stop observing after ``calibration_batches`` batches."""
        if self._calibrator is None:
            return
        self._batches_seen += 1
        if self._batches_seen >= self.calibration_batches:
            self._calibrator.detach()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the hooks and all-reduce the statistics across processes; they become the current ones."""
        if self._calibrator is None:
            return
        calibrator, self._calibrator = self._calibrator, None
        calibrator.detach()
        if _distributed(trainer):
            calibrator.sync(_all_reduce(trainer.strategy.root_device))
        if any(not obs.empty for obs in calibrator.observers.values()):
            self._statistics = calibrator

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Quantize, measure, gate (the same decision on every rank) and export on global rank zero."""
        if QuantizeOn.FIT_END not in self.quantize_on:
            return
        self._stop_observing()
        result, qparams = self._quantize(pl_module, announce=trainer.is_global_zero and self.verbose)
        self.result, self.budget = result, None
        loaders = val_loaders(trainer)
        self._measure(trainer, pl_module, result.model, loaders)
        failed = self.decision is not None and not self.decision.passed
        if _distributed(trainer):  # every rank has synced metric values; rank zero's decision is the one
            failed = bool(trainer.strategy.broadcast(failed, src=0))
        if failed and self.on_violation is OnViolation.FALLBACK:
            if trainer.is_global_zero and self.verbose:
                print(
                    f"[mono-quant] gate failed ({self.decision.reason}); "
                    f"searching fallback_ladder={self.fallback_ladder}"
                )
            failed = not self._fallback(trainer, pl_module, loaders, qparams)
        result = self.result
        self._log(trainer, result)
        if failed:
            message = (
                f"quantized model failed the gate: {self.decision.reason} "
                f"({self._metric_name()} float {self.decision.float_score:.4f}, "
                f"quantized {self.decision.quantized_score:.4f})"
            )
            if self.on_violation is OnViolation.FALLBACK:
                message = (
                    f"accuracy fallback did not reach the budget: best drop {self.decision.drop:.4g} > max_drop "
                    f"{self.max_drop:.4g} with fallback_ladder={self.fallback_ladder} ({self._metric_name()} float "
                    f"{self.decision.float_score:.4f}, best quantized {self.decision.quantized_score:.4f}, "
                    f"{len(self.budget.moves)} layer(s) moved, {self.budget.evaluations} evaluations, stopped: "
                    f"{self.budget.stop_reason})"
                )
            if self.on_violation in (OnViolation.RAISE, OnViolation.FALLBACK):
                raise QuantizationGateError(message + "; nothing exported", self.decision)
            if self.on_violation is OnViolation.SKIP_EXPORT:
                _rank_zero_warn(trainer, message + "; skipping the export (on_violation='skip_export')")
                return
            _rank_zero_warn(trainer, message + "; exporting anyway (on_violation='warn')")
        path = self._export_path(trainer)
        if trainer.is_global_zero:
            _save(result, path)
            if self.verbose:
                print(f"[mono-quant] exported {path} ({path.stat().st_size:,} bytes)")
        self.export_path = path

    # ------------------------------------------------------------------ pieces

    def _observes_validation(self, trainer: Trainer) -> bool:
        return (
            self.calibrates
            and self.calibration_dataloader is None
            and not trainer.sanity_checking
            and trainer.state.fn == TrainerFn.FITTING
        )

    def _stop_observing(self) -> None:
        if self._calibrator is not None:
            self._calibrator.detach()
            self._calibrator = None

    def _calibrated_layers(self, module: nn.Module) -> dict[str, nn.Module]:
        return calibrated_layers(module, self.config.replace(mode="static"))

    def _new_calibrator(self, module: nn.Module) -> mq.Calibrator:
        return mq.Calibrator(self._calibrated_layers(module), self.config.replace(mode="static"))

    def _resolve_mode(self, module: LightningModule) -> tuple[QuantMode, dict[str, Any] | None, str]:
        """The mode to apply, the activation statistics for static mode, and why."""
        if not self.calibrates:
            mode = QuantMode(self.config.mode.value)
            return mode, None, f"mode={mode.value!r}"
        statistics = self._statistics
        source = "the last validation epoch"
        if self.calibration_dataloader is not None:
            statistics = self._new_calibrator(module)
            feed = make_forward(self.batch_fn)
            statistics.run(module, self.calibration_dataloader, feed, max_batches=self.calibration_batches)
            source = "calibration_dataloader"
        if statistics is None:
            if self.mode is QuantMode.STATIC:
                raise CalibrationError(
                    "QuantizationCallback(mode='static') has no activation statistics: validation never ran during fit"
                    " (no val dataloader or limit_val_batches=0). Pass calibration_dataloader=... to calibrate on other"
                    " data, or use mode='dynamic'"
                )
            return QuantMode.DYNAMIC, None, "mode='dynamic' (auto: no validation batches were observed)"
        try:
            qparams = statistics.qparams()
        except CalibrationError as err:
            if self.mode is QuantMode.STATIC:
                raise
            return QuantMode.DYNAMIC, None, f"mode='dynamic' (auto: {err})"
        why = "auto: " if self.mode is QuantMode.AUTO else ""
        return QuantMode.STATIC, qparams, f"mode='static' ({why}activation statistics from {source})"

    def _quantize(
        self, module: LightningModule, announce: bool
    ) -> tuple[mq.QuantizationResult, dict[str, ActivationQParams] | None]:
        """The quantized copy and the static activation parameters it used (``None`` unless static)."""
        mode, qparams, why = self._resolve_mode(module)
        if announce:
            print(f"[mono-quant] quantizing to {self.dtype.value} with {why}")
        result = mq.quantize(module, self.config.replace(mode=mode.value), activation_qparams=qparams)
        self.mode_used = QuantMode(result.config.mode.value)
        return result, qparams

    def _fallback(
        self,
        trainer: Trainer,
        module: LightningModule,
        loaders: list[Any],
        qparams: dict[str, ActivationQParams] | None,
    ) -> bool:
        """Search ``fallback_ladder`` for a model within the budget; make ``result``, ``decision``, ``drop``,
        ``fidelity`` and ``budget`` describe the model found. Returns rank zero's verdict: budget reached."""
        device = trainer.strategy.root_device

        def data() -> Iterable[Any]:
            return (batch for loader in loaders for batch in loader)

        # Identical ranking data (and activation statistics) on every rank, so every rank runs the same search.
        ranking = [move_data_to_device(b, "cpu") for b in itertools.islice(data(), self.calibration_batches)]
        ranking, qparams = trainer.strategy.broadcast((ranking, qparams), src=0)
        config = self.result.config
        budget = mq.quantize_with_budget(
            module,
            lambda model: self._score(model, data(), device),
            config=config,
            max_drop=self.max_drop,
            drop_type=self.drop_type.value,
            higher_is_better=bool(self.metric.higher_is_better),
            ladder=self.fallback_ladder,
            sensitivity_data=ranking,
            forward_fn=make_forward(self.batch_fn),
            activation_qparams=qparams,
        )
        moves, reached = trainer.strategy.broadcast((budget.moves, budget.reached), src=0)
        if (moves, reached) != (budget.moves, budget.reached):
            warnings.warn(
                f"rank {trainer.global_rank} found moves {budget.moves} but rank zero found {moves}; rank zero's "
                "model is the one exported",
                stacklevel=2,
            )
        self.budget = budget
        self.result = budget.quantization_result(module, self.result)
        self.decision = decide(
            budget.float_score,
            budget.final_score,
            self.max_drop,
            higher_is_better=bool(self.metric.higher_is_better),
            drop_type=self.drop_type,
        )
        self.drop = self.decision.drop
        feed = make_forward(self.batch_fn)
        self.fidelity = mq.compare(module, budget.model, itertools.islice(data(), self.calibration_batches), feed)
        if trainer.is_global_zero and self.verbose:
            verdict = "reached" if reached else "NOT reached"
            listed = ", ".join(f"{name} -> {rung}" for name, rung in moves.items()) or "none"
            print(
                f"[mono-quant] fallback: budget {verdict} after {budget.evaluations} evaluations in "
                f"{budget.seconds:.2f} s; {len(moves)} layer(s) moved up the ladder: {listed}\n{budget.report}"
            )
        return bool(reached)

    def _measure(self, trainer: Trainer, float_model: nn.Module, q_model: nn.Module, loaders: list[Any]) -> None:
        """Metric on the whole validation data (synced by torchmetrics) and output fidelity on its first batches."""
        self.decision = self.drop = self.fidelity = None

        def data() -> Iterable[Any]:
            return (batch for loader in loaders for batch in loader)

        if self.metric is not None:
            if not loaders:
                raise ConfigError(
                    f"QuantizationCallback(metric={type(self.metric).__name__}(...)) needs validation data to measure"
                    " the drop, but fit had no validation dataloader; add one or drop metric="
                )
            device = trainer.strategy.root_device
            float_score = self._score(float_model, data(), device)
            quantized_score = self._score(q_model, data(), device)
            self.decision = decide(
                float_score,
                quantized_score,
                self.max_drop,
                higher_is_better=bool(self.metric.higher_is_better),
                drop_type=self.drop_type,
            )
            self.drop = self.decision.drop
        if loaders:
            feed = make_forward(self.batch_fn)
            self.fidelity = mq.compare(float_model, q_model, itertools.islice(data(), self.calibration_batches), feed)

    def _score(self, model: nn.Module, data: Iterable[Any], device: torch.device) -> float:
        metric = self.metric.clone().to(device)
        metric.reset()
        split = self.batch_fn or default_batch_fn
        was_training = model.training
        model.eval()
        try:
            with torch.inference_mode():
                for batch in data:
                    inputs, target = split(move_data_to_device(batch, device))
                    metric.update(output_tensor(call_model(model, inputs)), target)
            return float(metric.compute())  # syncs across processes
        finally:
            model.train(was_training)

    def _log(self, trainer: Trainer, result: mq.QuantizationResult) -> None:
        report = result.report
        metrics: dict[str, float] = {}
        if report.model_bytes_before:
            metrics["quant/size_ratio"] = report.model_bytes_after / report.model_bytes_before
        if self.fidelity is not None:
            metrics["quant/sqnr_db"] = self.fidelity.sqnr_db
        if self.decision is not None:
            name = self._metric_name()
            metrics[f"quant/{name}_float"] = self.decision.float_score
            metrics[f"quant/{name}_quantized"] = self.decision.quantized_score
            metrics["quant/drop"] = self.decision.drop
        if self.budget is not None:
            metrics["quant/reverted_layers"] = float(len(self.budget.moves))
            metrics[f"quant/{self._metric_name()}_before_fallback"] = self.budget.quantized_score
            metrics["quant/fallback_evaluations"] = float(self.budget.evaluations)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()
        if self.verbose:
            print(f"[mono-quant] quantization report\n{report}")
            if self.fidelity is not None:
                print(f"[mono-quant] fidelity: {self.fidelity}")
            if self.decision is not None:
                verdict = "passed" if self.decision.passed else "FAILED"
                print(
                    f"[mono-quant] {self._metric_name()}: float {self.decision.float_score:.4f}, quantized "
                    f"{self.decision.quantized_score:.4f}; gate {verdict}: {self.decision.reason}"
                )

    def _metric_name(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", type(self.metric).__name__).lower() if self.metric else "metric"

    def _export_path(self, trainer: Trainer) -> Path:
        if self.export_dir is not None:
            directory = self.export_dir
        elif trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
            directory = Path(trainer.checkpoint_callback.dirpath)
        else:
            directory = Path(trainer.default_root_dir)
        return directory / EXPORT_NAME

    def _write_sidecar(self, path: Path) -> None:
        """Called by ``SidecarCheckpointIO`` on global rank zero after a checkpoint is written."""
        if self._module is None:
            return
        try:
            result, _ = self._quantize(self._module, announce=False)
        except CalibrationError as err:
            warnings.warn(f"no quantized sidecar for {path.name}: {err}", stacklevel=2)
            return
        _save(result, path)


# ---------------------------------------------------------------------- helpers


def _distributed(trainer: Trainer) -> bool:
    return trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()


def _all_reduce(device: torch.device) -> Callable[[torch.Tensor, str], torch.Tensor]:
    ops = {"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX}

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        out = tensor.detach().clone().to(device)
        torch.distributed.all_reduce(out, op=ops.get(op, torch.distributed.ReduceOp.SUM))
        return out.to(tensor.device)

    return reduce


def _rank_zero_warn(trainer: Trainer, message: str) -> None:
    if trainer.is_global_zero:
        warnings.warn(message, stacklevel=2)


def _save(result: mq.QuantizationResult, path: Path) -> None:
    from mono_quant.serialization import save  # written atomically by the core

    path.parent.mkdir(parents=True, exist_ok=True)
    save(result.model, os.fspath(path), config=result.config, report=result.report)


