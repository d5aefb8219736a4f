"""``QuantizationCallback``: calibrate on validation, quantize at fit end, gate on a validation score, export.

This file holds the hooks and the callback's state: its ``options`` (a frozen ``CallbackOptions``), what it
observes during fit (``observation``), and the ``outcome`` of the last fit end. Each hook is a guard plus one
call; they decide *when* and *on what data*. The module's own validation forward feeds the observers
(``observation``), ``fit_end.run`` quantizes, scores with the module's own ``validation_step``, gates, falls
back and exports, returning a ``FitEndOutcome``; ``checkpoint_io`` writes the sidecars; ``mono_quant`` does the
quantization on a copy: the user's module is never changed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

import mono_quant as mq
from mono_quant_lightning import checkpoint_io, export, fit_end
from mono_quant_lightning.batches import BatchFn
from mono_quant_lightning.choices import MonitorMode, OnViolation, QuantizeOn, QuantMode
from mono_quant_lightning.fit_end import FitEndOutcome
from mono_quant_lightning.gate import DropType
from mono_quant_lightning.measure import quantize
from mono_quant_lightning.observation import LogWatcher, Observation, check_monitor
from mono_quant_lightning.options import CallbackOptions
from mono_quant_lightning.preflight import check_layers, check_training_start
from mono_quant_lightning.reference import ReferenceOutputs


def _option(name: str) -> property:
    """A read-only attribute of the callback that is the option ``name`` of ``cb.options``."""
    return property(lambda cb: getattr(cb.options, name), doc=f"The ``{name}`` option (read-only; see ``options``).")


def _outcome(name: str) -> property:
    """A read-only attribute of the callback that is ``name`` of the last fit end's outcome (``None`` before)."""
    return property(
        lambda cb: None if cb.outcome is None else getattr(cb.outcome, name),
        doc=f"The last fit end's ``{name}`` (read-only; ``None`` before the first fit end; see ``outcome``).",
    )


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
        calibration_batches: batches of each validation epoch (per process) that feed the observers (and the input
            statistics of fitted int4 weights); also the batches of the fidelity comparison and the fallback's ranking.
        calibration_dataloader: calibrate (or fit int4 weights) on this data (e.g. a training subset) instead of
            validation batches.
        batch_fn: optional override ``batch -> (inputs, target)``: ``metric`` and fidelity then feed
            ``model(inputs)`` instead of using the forward inside ``validation_step``.
        verbose: report through Lightning's ``rank_zero_info`` (the report table, fidelity, the gate).

    **Fitted int4 weights** (``config=QuantizationConfig(dtype="int4", algorithm="gptq")``, or an ``"int4-gptq"``
    fallback rung): input statistics of every int4 Linear layer are collected on the observed validation batches,
    all-reduced across processes, kept in checkpoints and fitted to at fit end; all of them are alive at once
    (``8 K^2`` bytes per layer with ``K`` inputs: 128 MiB at 4096). docs/lightning.md has the details.

    Configuration errors that can be known before training (no validation data for static mode, ``monitor`` or
    ``metric``; an ``export_dir`` that is a file or not writable; int4 where no layer gets 4 bits; a
    ``monitor`` the module never logs) raise before the first training step. The ``quant/*`` figures go to
    ``trainer.callback_metrics`` and every logger. int4 layers take the largest of ``group_size``, its half, ...
    down to 32 that divides their input width (int8 when none does). A gate decision on a model the report
    warns is mostly float ends with that warning.

    The callback's state is three attributes: ``options`` (the validated arguments, a frozen ``CallbackOptions``),
    ``observation`` (the activation statistics of fit validation) and ``outcome`` (the ``FitEndOutcome`` of the
    last fit end). The options (``cb.max_drop``, ``cb.mode``, ``cb.config``, ...) and the results (``cb.result``,
    ``cb.decision``, ``cb.drop``, ``cb.fidelity``, ``cb.budget``, ``cb.mode_used``, ``cb.export_path``) read as
    read-only attributes of those.

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
        monitor: str | None = CallbackOptions.monitor,
        monitor_mode: MonitorMode | str | None = CallbackOptions.monitor_mode,
        metric: Any = CallbackOptions.metric,
        max_drop: float = CallbackOptions.max_drop,
        drop_type: DropType | str = CallbackOptions.drop_type,
        on_violation: OnViolation | str = CallbackOptions.on_violation,
        fallback_ladder: Iterable[Any] | None = None,
        quantize_on: Iterable[QuantizeOn | str] | QuantizeOn | str = CallbackOptions.quantize_on,
        export_dir: str | os.PathLike[str] | None = CallbackOptions.export_dir,
        export_formats: Iterable[str] | str = CallbackOptions.export_formats,
        observer: str | None = None,
        include: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = None,
        calibration_batches: int = CallbackOptions.calibration_batches,
        calibration_dataloader: Iterable[Any] | None = CallbackOptions.calibration_dataloader,
        batch_fn: BatchFn | None = CallbackOptions.batch_fn,
        verbose: bool = CallbackOptions.verbose,
    ) -> None:
        super().__init__()
        self.options = CallbackOptions.from_arguments(
            dtype=dtype,
            mode=mode,
            config=config,
            monitor=monitor,
            monitor_mode=monitor_mode,
            metric=metric,
            max_drop=max_drop,
            drop_type=drop_type,
            on_violation=on_violation,
            fallback_ladder=fallback_ladder,
            quantize_on=quantize_on,
            export_dir=export_dir,
            export_formats=export_formats,
            observer=observer,
            include=include,
            exclude=exclude,
            calibration_batches=calibration_batches,
            calibration_dataloader=calibration_dataloader,
            batch_fn=batch_fn,
            verbose=verbose,
        )
        self.observation = Observation(
            self.options.config, self.options.calibration_batches, self.options.calibrates, self.options.fits
        )
        self.references = ReferenceOutputs(self.options.calibration_batches)  # float outputs for the fidelity pass
        self.outcome: FitEndOutcome | None = None
        # the gate's direction, learned at the first fit validation when the module logs ``monitor`` as a Metric
        self._higher_is_better: bool | None = None if self.metric is None else bool(self.metric.higher_is_better)
        self._module: LightningModule | None = None
        self._trainer: Trainer | None = None
        self._watcher: LogWatcher | None = None

    dtype = _option("dtype")
    mode = _option("mode")
    config = _option("config")
    monitor = _option("monitor")
    monitor_mode = _option("monitor_mode")
    metric = _option("metric")
    max_drop = _option("max_drop")
    drop_type = _option("drop_type")
    on_violation = _option("on_violation")
    fallback_ladder = _option("fallback_ladder")
    quantize_on = _option("quantize_on")
    export_dir = _option("export_dir")
    export_formats = _option("export_formats")
    calibration_batches = _option("calibration_batches")
    calibration_dataloader = _option("calibration_dataloader")
    batch_fn = _option("batch_fn")
    verbose = _option("verbose")
    calibrates = _option("calibrates")

    result = _outcome("result")
    decision = _outcome("decision")
    drop = _outcome("drop")
    fidelity = _outcome("fidelity")
    budget = _outcome("budget")
    mode_used = _outcome("mode_used")
    export_path = _outcome("export_path")

    @property
    def higher_is_better(self) -> bool | None:
        """The gate's direction: the last fit end's, else what is known so far (``None`` while unknown).

        Example:
            >>> QuantizationCallback(monitor="val_loss", monitor_mode="min").higher_is_better is None
            True
        """
        return self._higher_is_better if self.outcome is None else self.outcome.higher_is_better

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dtype=self.dtype.value, observer=self.config.observer.value)

    def state_dict(self) -> dict[str, Any]:
        """The last validation epoch's observer statistics and (int4 ``gptq``/``awq``) input statistics, as plain
        tensors (``weights_only``-loadable).

        Example:
            >>> QuantizationCallback().state_dict()
            {'observer': 'minmax', 'statistics': None, 'input_statistics': None}
        """
        return {
            "observer": self.config.observer.value,
            "statistics": self.observation.state_dict(),
            "input_statistics": self.observation.inputs_state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore statistics saved by ``state_dict`` (applied once the model is known, in ``setup``).

        Example:
            >>> cb = QuantizationCallback(); cb.load_state_dict({"observer": "minmax", "statistics": None})
            >>> cb.load_state_dict({"observer": 3})
            Traceback (most recent call last):
            ...
            mono_quant.errors.CalibrationError: QuantizationCallback: the checkpoint's callback state {'observer': 3}...
        """
        self.observation.restore(state_dict, self._module)

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Check ``export_dir``, restore checkpoint statistics and, with ``"checkpoint"``, wrap the checkpoint IO."""
        if stage != TrainerFn.FITTING.value:
            return
        self._attach(trainer, pl_module)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail fast on layer choices that cannot work (int4 where no layer gets 4 bits)."""
        check_layers(pl_module, self.config)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fail fast, before the first training step, when validation data is needed but absent."""
        check_training_start(self.options, trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove any hooks and give the strategy its own checkpoint IO back."""
        self._detach(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._detach(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """At the first fit validation (the sanity check included), watch what the module logs for ``monitor``."""
        if self.monitor is None or self._higher_is_better is not None or trainer.state.fn != TrainerFn.FITTING:
            return
        self._watcher = LogWatcher.attached(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """A ``monitor`` that was never logged, or has no direction, is an error now, not at fit end."""
        if self._watcher is None:
            return
        self._higher_is_better = check_monitor(self.monitor, self.monitor_mode, self._stop_watching().seen, pl_module)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start observing the selected layers and keeping float outputs (fit validation only; never the sanity
        check)."""
        if self._observes_validation(trainer):
            self.observation.start(pl_module)
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.references.start(pl_module, trainer.global_step)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, *args: Any) -> None:
        self.references.batch_start(batch)

    def on_validation_batch_end(self, trainer: Trainer, *args: Any, **kwargs: Any) -> None:
        """Stop observing after ``calibration_batches`` batches."""
        self.observation.batch_end()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Remove the hooks and all-reduce the statistics across processes; they become the current ones."""
        self.observation.epoch_end(trainer)
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.references.epoch_end()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Quantize, measure, gate (the same decision on every rank) and export on global rank zero
        (``fit_end.run``); keep the outcome, and raise the ``QuantizationGateError`` it carries."""
        if QuantizeOn.FIT_END not in self.quantize_on:
            return
        reference = self.references.lookup(trainer.global_step)
        self.outcome = fit_end.run(
            self.options, self.observation, trainer, pl_module, self._higher_is_better, reference
        )
        if self.outcome.error is not None:
            raise self.outcome.error

    # ------------------------------------------------------------------ pieces

    def _attach(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_dir is not None:
            export.check_export_dir(self.export_dir)
        self._module, self._trainer = pl_module, trainer
        self.observation.apply_pending(pl_module)
        if QuantizeOn.CHECKPOINT in self.quantize_on:
            checkpoint_io.install(trainer, self._write_sidecar)

    def _detach(self, trainer: Trainer) -> None:
        self.observation.stop()
        self.references.stop()
        self._stop_watching()
        checkpoint_io.restore(trainer)

    def _stop_watching(self) -> LogWatcher | None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.detach()
        return watcher

    def _observes_validation(self, trainer: Trainer) -> bool:
        return (
            (self.calibrates or self.options.fits)
            and self.calibration_dataloader is None
            and not trainer.sanity_checking
            and trainer.state.fn == TrainerFn.FITTING
        )

    def _write_sidecar(self, path: Path) -> None:
        """Called by ``SidecarCheckpointIO`` on global rank zero after a checkpoint is written."""
        if self._module is not None:
            quantized = quantize(self.options, self.observation, self._module, self._trainer)
            export.write(quantized.result, path, report=False)
