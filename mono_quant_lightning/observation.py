"""What the callback watches during fit validation: activation and input statistics, and the names the module logs.

``Observation`` keeps observers on the module's quantizable layers (forward pre-hooks) and, for int4
``gptq``/``awq``, an ``InputStatistics`` per int4 Linear layer, for the first ``calibration_batches`` batches of
each fit validation epoch, all-reduces them at the epoch's end and keeps the last complete epoch's statistics.
``LogWatcher`` records what ``validation_step`` logs (to check ``monitor=`` at the first validation).
Both remove everything they attach.
"""

from __future__ import annotations

import reprlib
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

import mono_quant as mq
from mono_quant import calibrated_layers
from mono_quant_lightning.messages import warn


class Observation:
    """Activation statistics (int8 static) and input statistics (int4 ``gptq``/``awq``) of fit validation epochs.

    With ``calibrates``, a ``Calibrator`` observes the layers static int8 calibrates; with ``fits``, a
    ``StatisticsCollector`` feeds one ``InputStatistics`` per int4 Linear layer (``mq.fitted_layers``). Both see the
    same batches, are all-reduced at the same epoch end and are kept for the last complete epoch.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> obs = Observation(mq.QuantizationConfig(mode="static"), calibration_batches=1)
        >>> obs.start(model); _ = model(torch.randn(3, 4)); obs.batch_end(); _ = model(torch.randn(3, 4))
        >>> obs.epoch_end(None); int(obs.statistics.observers["0"].batches)
        1
        >>> fitting = Observation(mq.QuantizationConfig(dtype="int4", algorithm="gptq", group_size=32), 1,
        ...                       calibrates=False, fits=True)
        >>> model = nn.Sequential(nn.Linear(32, 4))
        >>> fitting.start(model); _ = model(torch.randn(3, 32)); fitting.batch_end(); _ = model(torch.randn(3, 32))
        >>> fitting.epoch_end(None); fitting.statistics, fitting.inputs.inputs["0"].rows
        (None, 3)
    """

    def __init__(
        self, config: mq.QuantizationConfig, calibration_batches: int, calibrates: bool = True, fits: bool = False
    ) -> None:
        self.config = config.replace(dtype="int8", mode="static")
        self.fitting_config = (
            config if config.dtype is mq.QuantDtype.INT4 else config.replace(dtype="int4", mode="weight_only")
        ) if fits else None  # fmt: skip
        self.calibration_batches = calibration_batches
        self.calibrates = calibrates
        self.statistics: mq.Calibrator | None = None  # the last completed (and synced) epoch
        self.inputs: mq.StatisticsCollector | None = None  # the same epoch's input statistics (``fits``)
        self.pending: dict[str, Any] | None = None  # loaded from a checkpoint before the module was known
        self.pending_inputs: dict[str, Any] | None = None
        self._calibrator: mq.Calibrator | None = None
        self._collector: mq.StatisticsCollector | None = None
        self._seen = 0

    @property
    def fits(self) -> bool:
        """Whether input statistics for fitted int4 weights are collected."""
        return self.fitting_config is not None

    def calibrator(self, module: nn.Module) -> mq.Calibrator:
        """A new ``Calibrator`` on the layers of ``module`` that static quantization observes."""
        return mq.Calibrator(calibrated_layers(module, self.config), self.config)

    def collector(self, module: nn.Module) -> mq.StatisticsCollector:
        """A new ``StatisticsCollector`` on the int4 Linear layers of ``module`` whose weights are fitted."""
        config = self.fitting_config or self.config.replace(dtype="int4", mode="weight_only")
        return mq.StatisticsCollector(mq.fitted_layers(module, config), config)

    def start(self, module: nn.Module) -> None:
        self.stop()
        self._seen = 0
        if self.calibrates:
            self._calibrator = self.calibrator(module)
            self._calibrator.attach()
        if self.fits:
            self._collector = self.collector(module)
            self._collector.attach()

    def batch_end(self) -> None:
        if self._calibrator is None and self._collector is None:
            return
        self._seen += 1
        if self._seen >= self.calibration_batches:
            self._detach()

    def epoch_end(self, trainer: Trainer | None) -> None:
        """Detach and all-reduce; a non-empty epoch becomes the current statistics."""
        calibrator, collector = self._calibrator, self._collector
        self._calibrator = self._collector = None
        distributed = trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized()
        reduce = _all_reduce(trainer.strategy.root_device) if distributed else None
        if calibrator is not None:
            calibrator.detach()
            if reduce is not None:
                calibrator.sync(reduce)
            if any(not obs.empty for obs in calibrator.observers.values()):
                self.statistics = calibrator
        if collector is not None:
            collector.detach()
            if reduce is not None:
                collector.sync(reduce)  # sums and maxima: every rank ends with the same statistics
            if not collector.empty:
                self.inputs = collector

    def stop(self) -> None:
        self._detach()
        self._calibrator = self._collector = None

    def _detach(self) -> None:
        for watcher in (self._calibrator, self._collector):
            if watcher is not None:
                watcher.detach()

    def state_dict(self) -> dict[str, Any] | None:
        return self.statistics.state_dict() if self.statistics is not None else self.pending

    def inputs_state_dict(self) -> dict[str, Any] | None:
        """The input statistics as plain tensors (``None`` when none were collected or none are collected)."""
        return self.inputs.state_dict() if self.inputs is not None else self.pending_inputs

    def restore(self, state_dict: Any, module: nn.Module | None) -> None:
        """Take the callback state ``QuantizationCallback.state_dict`` wrote (applied once ``module`` is known).

        Example:
            >>> Observation(mq.QuantizationConfig(mode="static"), 1).restore({"observer": 3}, None)
            Traceback (most recent call last):
            ...
            mono_quant.errors.CalibrationError: QuantizationCallback: the checkpoint's callback state {'observer': 3}...
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("observer", ""), str):
            raise mq.CalibrationError(
                f"QuantizationCallback: the checkpoint's callback state {reprlib.repr(state_dict)} is not what "
                "state_dict() writes ({'observer': name, 'statistics': per-layer tensors or None, "
                "'input_statistics': per-layer tensors or None})"
            )
        observer = self.config.observer.value
        if state_dict.get("observer", observer) != observer:
            warn(f"checkpoint statistics come from observer={state_dict['observer']!r}; ignoring them")
            return
        self.pending = state_dict.get("statistics")
        self.pending_inputs = state_dict.get("input_statistics")  # absent in older checkpoints
        self.apply_pending(module)

    def apply_pending(self, module: nn.Module | None) -> None:
        """Turn statistics loaded from a checkpoint into a ``Calibrator`` (and a ``StatisticsCollector``) once the
        module is known; statistics that do not fit the module raise ``CalibrationError`` naming the state."""
        if module is None:
            return
        if self.pending is not None:
            calibrator = self.calibrator(module)
            _load(calibrator, self.pending, "statistics", module)
            self.statistics, self.pending = calibrator, None
        if self.pending_inputs is not None and not self.fits:
            self.pending_inputs = None  # this callback fits no weights: nothing to restore them into
        if self.pending_inputs is not None:
            collector = self.collector(module)
            _load(collector, self.pending_inputs, "input_statistics", module)
            self.inputs, self.pending_inputs = collector, None


def _load(target: mq.Calibrator | mq.StatisticsCollector, state: Any, key: str, module: nn.Module) -> None:
    try:
        target.load_state_dict(state)
    except mq.CalibrationError as err:
        raise mq.CalibrationError(
            f"QuantizationCallback: the checkpoint's callback state {key!r} does not fit {type(module).__name__}: {err}"
        ) from None


class LogWatcher:
    """Records ``name -> value`` of every ``self.log`` call while attached (the call still goes to Lightning).

    Example:
        >>> import lightning as L
        >>> module = L.LightningModule()
        >>> watcher = LogWatcher.attached(module)
        >>> module.log("val_acc", 0.5)  # no trainer: Lightning warns and ignores it; the watcher saw it
        >>> watcher.detach(); sorted(watcher.seen), "log" in vars(module)
        (['val_acc'], False)
    """

    def __init__(self, module: LightningModule) -> None:
        self.module = module
        self.seen: dict[str, Any] = {}

    @classmethod
    def attached(cls, module: LightningModule) -> LogWatcher:
        """A watcher already attached to ``module``."""
        watcher = cls(module)
        watcher.attach()
        return watcher

    def attach(self) -> None:
        module, seen = self.module, self.seen
        original = type(module).log

        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            seen[name] = value
            original(module, name, value, *args, **kwargs)

        module.log = log

    def detach(self) -> None:
        self.module.__dict__.pop("log", None)


def check_monitor(monitor: str, mode: str | None, seen: dict[str, Any], module: LightningModule) -> bool:
    """Whether higher is better for ``monitor``, from ``mode`` or the logged Metric; a clear error otherwise.

    Example:
        >>> from torchmetrics.classification import MulticlassAccuracy
        >>> check_monitor("val_acc", None, {"val_acc": MulticlassAccuracy(3)}, None)
        True
        >>> check_monitor("val_loss", "min", {"val_loss": 0.3}, None)
        False
    """
    from torchmetrics import Metric

    name = type(module).__name__
    if monitor not in seen:
        logged = sorted(seen) or "nothing"
        raise mq.ConfigError(
            f"QuantizationCallback(monitor={monitor!r}): {name}.validation_step never logs {monitor!r} "
            f"(it logged {logged}); log it with self.log({monitor!r}, ...) or pick one of those names"
        )
    if mode is not None:
        return mode == "max"
    value = seen[monitor]
    if isinstance(value, Metric) and value.higher_is_better is not None:
        return bool(value.higher_is_better)
    raise mq.ConfigError(
        f"QuantizationCallback(monitor={monitor!r}): {monitor!r} is logged as a plain value, so its direction is "
        "unknown; pass monitor_mode='max' (higher is better) or 'min', or log a torchmetrics Metric object"
    )


def _all_reduce(device: torch.device) -> Any:
    ops = {"min": torch.distributed.ReduceOp.MIN, "max": torch.distributed.ReduceOp.MAX}

    def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
        out = tensor.detach().clone().to(device)
        torch.distributed.all_reduce(out, op=ops.get(op, torch.distributed.ReduceOp.SUM))
        return out.to(tensor.device)

    return reduce
