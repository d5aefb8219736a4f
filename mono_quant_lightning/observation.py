"""What the callback watches during fit validation: activation statistics, and the names the module logs.

``Observation`` keeps observers on the module's quantizable layers (forward pre-hooks) for the first
``calibration_batches`` batches of each fit validation epoch, all-reduces them at the epoch's end and keeps
the last complete epoch's statistics. ``LogWatcher`` records what ``validation_step`` logs (to check
``monitor=`` at the first validation). Both remove everything they attach.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

import mono_quant as mq
from mono_quant import calibrated_layers


class Observation:
    """Activation statistics of fit validation epochs.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 4))
        >>> obs = Observation(mq.QuantizationConfig(mode="static"), calibration_batches=1)
        >>> obs.start(model); _ = model(torch.randn(3, 4)); obs.batch_end(); _ = model(torch.randn(3, 4))
        >>> obs.epoch_end(None); int(obs.statistics.observers["0"].batches)
        1
    """

    def __init__(self, config: mq.QuantizationConfig, calibration_batches: int) -> None:
        self.config = config.replace(dtype="int8", mode="static")
        self.calibration_batches = calibration_batches
        self.statistics: mq.Calibrator | None = None  # the last completed (and synced) epoch
        self.pending: dict[str, Any] | None = None  # loaded from a checkpoint before the module was known
        self._calibrator: mq.Calibrator | None = None
        self._seen = 0

    def calibrator(self, module: nn.Module) -> mq.Calibrator:
        """A new ``Calibrator`` on the layers of ``module`` that static quantization observes."""
        return mq.Calibrator(calibrated_layers(module, self.config), self.config)

    def start(self, module: nn.Module) -> None:
        self.stop()
        self._calibrator, self._seen = self.calibrator(module), 0
        self._calibrator.attach()

    def batch_end(self) -> None:
        if self._calibrator is None:
            return
        self._seen += 1
        if self._seen >= self.calibration_batches:
            self._calibrator.detach()

    def epoch_end(self, trainer: Trainer | None) -> None:
        """Detach and all-reduce; a non-empty epoch becomes the current statistics."""
        if self._calibrator is None:
            return
        calibrator, self._calibrator = self._calibrator, None
        calibrator.detach()
        if trainer is not None and trainer.world_size > 1 and torch.distributed.is_initialized():
            calibrator.sync(_all_reduce(trainer.strategy.root_device))
        if any(not obs.empty for obs in calibrator.observers.values()):
            self.statistics = calibrator

    def stop(self) -> None:
        if self._calibrator is not None:
            self._calibrator.detach()
            self._calibrator = None

    def state_dict(self) -> dict[str, Any] | None:
        return self.statistics.state_dict() if self.statistics is not None else self.pending

    def apply_pending(self, module: nn.Module | None) -> None:
        """Turn statistics loaded from a checkpoint into a ``Calibrator`` once the module is known."""
        if self.pending is None or module is None:
            return
        calibrator = self.calibrator(module)
        try:
            calibrator.load_state_dict(self.pending)
        except mq.CalibrationError as err:
            raise mq.CalibrationError(
                f"QuantizationCallback: the checkpoint's callback state 'statistics' does not fit "
                f"{type(module).__name__}: {err}"
            ) from None
        self.statistics, self.pending = calibrator, None


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
