"""``QuantizationCallback``: calibrate on validation, quantize at fit end, gate on a validation score, export.

This file holds the hooks and their state; they decide *when* and *on what data*. The module's own
validation forward feeds the observers (``observation``), its own ``validation_step`` produces the scores
(``evaluation``), ``gate.decide`` takes the decision, ``fallback`` searches mixed precision, ``export`` and
``checkpoint_io`` write files, and ``mono_quant`` does the quantization on a copy: the user's module is
never changed.
"""

from __future__ import annotations

import os
import reprlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

import mono_quant as mq
from mono_quant_lightning import checkpoint_io, export
from mono_quant_lightning.batches import BatchFn
from mono_quant_lightning.evaluation import step_forward
from mono_quant_lightning.export_formats import remove_extras, write_extras
from mono_quant_lightning.gate import DropType, GateDecision, QuantizationGateError
from mono_quant_lightning.measure import Measurer
from mono_quant_lightning.observation import LogWatcher, Observation, check_monitor
from mono_quant_lightning.options import OnViolation, QuantizeOn, QuantMode, parse_arguments
from mono_quant_lightning.preflight import check_data, check_layers


class QuantizationCallback(Callback):
    r"""Quantize the model a Lightning run trains, measure what it costs on validation, and export it.

    With no arguments: int8, ``mode="auto"`` (static when validation batches were observed, otherwise dynamic),
    quantize at fit end, report output fidelity, write ``model.quant.safetensors`` (and its text report
    ``model.quant.report.txt``) next to the checkpoints. Scores come from the module's **own**
    ``validation_step`` run on the float module and on the quantized copy, so any batch format works.

    Lightning hands the callback a train-mode module: it quantizes an eval-mode copy, so BatchNorms fold as in
    ``mono_quant.engine.quantize`` of the eval model (the report says so), and never changes the module or its mode.
    Under ``fast_dev_run`` it quantizes and measures, but writes and removes no file (like Lightning's checkpoints).

    Args:
        dtype: ``"int8"`` (default), ``"int4"`` (weight-only), ``"fp16"`` or ``"bf16"``.
        mode: ``"auto"``, ``"static"``, ``"dynamic"`` or ``"weight_only"``. Only int8 static/auto calibrates.
        config: a ``mono_quant.QuantizationConfig`` for every core option (``group_size``, ``scheme``,
            ``observer``, ``include``/``exclude``, ...). Explicit arguments win over it; with ``config`` and no
            ``mode``, the mode is the config's.
        monitor: gate on this value logged by ``validation_step`` (e.g. ``"val_acc"``), like ``ModelCheckpoint``.
        monitor_mode: ``"max"`` or ``"min"``; default: the logged torchmetrics Metric's ``higher_is_better``.
        metric: instead of ``monitor``, a torchmetrics ``Metric`` fed ``forward``'s output in ``validation_step``
            and the batch's target.
        max_drop, drop_type: the largest allowed drop (``"absolute"`` or ``"relative"``).
        on_violation: ``"raise"`` (``QuantizationGateError``; no export, a stale one of the same name is removed),
            ``"warn"`` (export; its metadata records the gate), ``"skip_export"`` (no export, a stale one removed)
            or ``"fallback"`` (``mono_quant.quantize_with_budget`` moves the most sensitive layers up
            ``fallback_ladder`` until the drop fits; raise if it cannot).
        fallback_ladder: the precisions the fallback may use, lowest first, starting at ``dtype``.
        quantize_on: ``"fit_end"`` and/or ``"checkpoint"`` (a ``<stem>.quant.safetensors`` beside each ``.ckpt``;
            a failing one warns and training goes on).
        export_dir: where the fit-end file goes; default: the first ``ModelCheckpoint``'s ``dirpath``, else
            ``trainer.default_root_dir``.
        export_formats: ``"safetensors"`` (required) plus ``"onnx"`` (``model.quant.onnx``, traced on the forward
            input of the first validation batch) and/or ``"hf"`` (``model.quant.hf/``, for a transformers model inside
            the module): artifacts that load without mono-quant, written beside the fit-end file.
        observer, include, exclude: shortcuts for the same ``QuantizationConfig`` fields.
        calibration_batches: batches of each validation epoch (per process) that feed the observers; also the
            batches of the fidelity comparison and the fallback's ranking.
        calibration_dataloader: calibrate on this data (e.g. a training subset) instead of validation batches.
        batch_fn: optional override ``batch -> (inputs, target)``: ``metric`` and fidelity then feed
            ``model(inputs)`` instead of using the forward inside ``validation_step``.
        verbose: report through Lightning's ``rank_zero_info`` (the report table, fidelity, the gate).

    Configuration errors that can be known before training (no validation data for static mode, ``monitor`` or
    ``metric``; an ``export_dir`` that is a file or not writable; int4 where no layer gets 4 bits; a
    ``monitor`` the module never logs) raise before the first training step. The ``quant/*`` figures go to
    ``trainer.callback_metrics`` and every logger. int4 layers take the largest of ``group_size``, its half, ...
    down to 32 that divides their input width (int8 when none does). A gate decision on a model the report
    warns is mostly float ends with that warning.

    Example:
        >>> cb = QuantizationCallback()
        >>> cb.mode, cb.quantize_on
        (<QuantMode.AUTO: 'auto'>, (<QuantizeOn.FIT_END: 'fit_end'>,))
        >>> QuantizationCallback(config=mq.QuantizationConfig(dtype="int4", group_size=32)).config.group_size
        32
        >>> QuantizationCallback(mode="fallback")
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: QuantizationCallback(mode='fallback'): ...
    """

    def __init__(
        self,
        dtype: Any = None,
        mode: QuantMode | str | None = None,
        config: mq.QuantizationConfig | None = None,
        monitor: str | None = None,
        monitor_mode: str | None = None,
        metric: Any = None,
        max_drop: float = 0.01,
        drop_type: DropType | str = "absolute",
        on_violation: OnViolation | str = "raise",
        fallback_ladder: Iterable[Any] | None = None,
        quantize_on: Iterable[QuantizeOn | str] | str = ("fit_end",),
        export_dir: str | os.PathLike[str] | None = None,
        export_formats: Iterable[str] | str = ("safetensors",),
        observer: str | None = None,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        calibration_batches: int = 32,
        calibration_dataloader: Iterable[Any] | None = None,
        batch_fn: BatchFn | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        arguments = parse_arguments(**{k: v for k, v in locals().items() if k not in ("self", "__class__")})
        self.__dict__.update(arguments)
        self.dtype: mq.QuantDtype = self.config.dtype
        self.observation = Observation(self.config, self.calibration_batches)
        self.measurer = Measurer(self)
        self.result: mq.QuantizationResult | None = None
        self.export_path: Path | None = None
        self.drop: float | None = None
        self.decision: GateDecision | None = None
        self.fidelity: mq.FidelityReport | None = None
        self.mode_used: QuantMode | None = None
        self.budget: mq.BudgetResult | None = None
        self.higher_is_better: bool | None = None if self.metric is None else bool(self.metric.higher_is_better)
        self._module: LightningModule | None = None
        self._trainer: Trainer | None = None
        self._watcher: LogWatcher | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dtype=self.dtype.value, observer=self.config.observer.value)

    @property
    def calibrates(self) -> bool:
        """Whether this configuration collects activation statistics (int8 with mode auto/static).

        Example:
            >>> QuantizationCallback().calibrates, QuantizationCallback(mode="dynamic").calibrates
            (True, False)
        """
        return self.dtype is mq.QuantDtype.INT8 and self.mode in (QuantMode.AUTO, QuantMode.STATIC)

    def state_dict(self) -> dict[str, Any]:
        """The last validation epoch's observer statistics, as plain tensors (``weights_only``-loadable).

        Example:
            >>> QuantizationCallback().state_dict()
            {'observer': 'minmax', 'statistics': None}
        """
        return {"observer": self.config.observer.value, "statistics": self.observation.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore statistics saved by ``state_dict`` (applied once the model is known, in ``setup``).

        Example:
            >>> cb = QuantizationCallback(); cb.load_state_dict({"observer": "minmax", "statistics": None})
            >>> cb.load_state_dict({"observer": 3})
            Traceback (most recent call last):
            ...
            mono_quant.errors.CalibrationError: QuantizationCallback: the checkpoint's callback state {'observer': 3}...
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("observer", ""), str):
            raise mq.CalibrationError(
                f"QuantizationCallback: the checkpoint's callback state {reprlib.repr(state_dict)} is not what "
                "state_dict() writes ({'observer': name, 'statistics': per-layer tensors or None})"
            )
        if state_dict.get("observer", self.config.observer.value) != self.config.observer.value:
            self.measurer.warn(f"checkpoint statistics come from observer={state_dict['observer']!r}; ignoring them")
            return
        self.observation.pending = state_dict.get("statistics")
        self.observation.apply_pending(self._module)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check ``export_dir`` and, with ``"checkpoint"`` in ``quantize_on``, wrap the checkpoint IO."""
        if stage != TrainerFn.FITTING.value:
            return
        if self.export_dir is not None:
            export.check_export_dir(self.export_dir)
        self._module, self._trainer = pl_module, trainer
        self.observation.apply_pending(pl_module)
        if QuantizeOn.CHECKPOINT in self.quantize_on:
            checkpoint_io.install(trainer, self._write_sidecar)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail fast on layer choices that cannot work (int4 where no layer gets 4 bits)."""
        check_layers(pl_module, self.config)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail fast, before the first training step, when validation data is needed but absent."""
        check_data(self, trainer)
        export.check_export_dir(export.export_path(trainer, self.export_dir).parent)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove any hooks and give the strategy its own checkpoint IO back."""
        self._stop(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._stop(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At the first fit validation (the sanity check included), watch what the module logs for ``monitor``."""
        if self.monitor is not None and self.higher_is_better is None and trainer.state.fn == TrainerFn.FITTING:
            self._watcher = LogWatcher(pl_module)
            self._watcher.attach()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A ``monitor`` that was never logged, or has no direction, is an error now, not at fit end."""
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            watcher.detach()
            self.higher_is_better = check_monitor(self.monitor, self.monitor_mode, watcher.seen, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start observing the selected layers (fit validation only; never the sanity check)."""
        if self._observes_validation(trainer):
            self.observation.start(pl_module)

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        """Stop observing after ``calibration_batches`` batches."""
        self.observation.batch_end()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the hooks and all-reduce the statistics across processes; they become the current ones."""
        self.observation.epoch_end(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Quantize, measure, gate (the same decision on every rank) and export on global rank zero."""
        if QuantizeOn.FIT_END not in self.quantize_on:
            return
        self.observation.stop()
        path = export.export_path(trainer, self.export_dir)
        failed = self.measurer.run(trainer, pl_module)
        if trainer.fast_dev_run:  # a smoke test of the code: like Lightning's checkpoints, no file is touched
            verdict = f" ({self.measurer.failure_message()})" if failed else ""
            rank_zero_info(
                f"[mono-quant] fast_dev_run: quantized and measured{verdict}; exported nothing, so an earlier run's "
                f"{path} stays as it is"
            )
            return
        if failed:
            message = self.measurer.failure_message()
            if trainer.is_global_zero:
                remove_extras(path)
            if trainer.is_global_zero and export.remove(path):
                message += f"; removed the stale {path.name} of an earlier run"
            if self.on_violation in (OnViolation.RAISE, OnViolation.FALLBACK):
                raise QuantizationGateError(message + "; nothing exported", self.decision)
            if self.on_violation is OnViolation.SKIP_EXPORT:
                self.measurer.warn(message + "; skipping the export (on_violation='skip_export')")
                return
            self.measurer.warn(message + "; exporting anyway (on_violation='warn'), the gate result is in its metadata")
        if trainer.is_global_zero:
            gate = None if self.decision is None else export.gate_record(self.decision, self.measurer.gate_name())
            export.write(self.result, path, gate)
            self.measurer.info(f"exported {path} ({path.stat().st_size:,} bytes) and {export.report_path(path).name}")
            write_extras(self.result.model, path, self.export_formats, trainer, self.measurer)
        self.export_path = path

    # ------------------------------------------------------------------ pieces

    def _observes_validation(self, trainer: Trainer) -> bool:
        return (
            self.calibrates
            and self.calibration_dataloader is None
            and not trainer.sanity_checking
            and trainer.state.fn == TrainerFn.FITTING
        )

    def _stop(self, trainer: Trainer) -> None:
        self.observation.stop()
        if self._watcher is not None:
            self._watcher.detach()
            self._watcher = None
        checkpoint_io.restore(trainer)

    def resolve_mode(self, module: LightningModule, trainer: Trainer) -> tuple[QuantMode, Any, str]:
        """The mode to apply, the activation parameters for static mode, and why."""
        if not self.calibrates:
            mode = QuantMode(self.config.mode.value)
            return mode, None, f"mode={mode.value!r}"
        statistics, source = self.observation.statistics, "the last validation epoch"
        if self.calibration_dataloader is not None:
            statistics, source = self.observation.calibrator(module), "calibration_dataloader"
            feed = step_forward(trainer, self.batch_fn)
            statistics.run(module, self.calibration_dataloader, feed, max_batches=self.calibration_batches)
        if statistics is None:
            if self.mode is QuantMode.STATIC:
                raise mq.CalibrationError(
                    "QuantizationCallback(mode='static') has no activation statistics: validation never ran during "
                    "fit; pass calibration_dataloader=... to calibrate on other data, or use mode='dynamic'"
                )
            return QuantMode.DYNAMIC, None, "mode='dynamic' (auto: no validation batches were observed)"
        try:
            qparams = statistics.qparams()
        except mq.CalibrationError as err:
            if self.mode is QuantMode.STATIC:
                raise
            return QuantMode.DYNAMIC, None, f"mode='dynamic' (auto: {err})"
        why = "auto: " if self.mode is QuantMode.AUTO else ""
        return QuantMode.STATIC, qparams, f"mode='static' ({why}activation statistics from {source})"

    def _write_sidecar(self, path: Path) -> None:
        """Called by ``SidecarCheckpointIO`` on global rank zero after a checkpoint is written."""
        if self._module is not None:
            result, _ = self.measurer.quantize(self._module, self._trainer, announce=False)
            export.write(result, path, report=False)
