"""Scores from the module's own ``validation_step``, on the float module and on quantized copies.

``StepRunner`` runs ``validation_step`` (``evaluate`` also the validation epoch hooks) the way Lightning's
validation loop does (eval mode, inference mode, the module's batch-transfer hooks, ``dataloader_idx`` with
several loaders) and records what the step logs and what ``forward`` returns, so any batch format works
without ``batch_fn``. It changes nothing that outlives it: the ``log`` override, the forward hook, the
train/eval flag, a temporarily attached trainer and the state of every torchmetrics ``Metric`` in the module
are restored on exit.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torchmetrics import Metric
from tqdm.auto import tqdm

import mono_quant as mq
from mono_quant import output_tensor
from mono_quant_lightning.batches import BatchFn, call_model, default_batch_fn, iterate


@dataclasses.dataclass(frozen=True)
class Scores:
    """One validation pass: every value ``validation_step`` logged (epoch means, synced across processes), the
    ``higher_is_better`` of each logged torchmetrics ``Metric`` (``None`` for plain values), and the callback's own
    ``metric=`` (``None`` without one)."""

    values: dict[str, float]
    higher_is_better: dict[str, bool | None]
    metric: float | None


class StepRunner:
    """A context in which ``step`` runs ``module.validation_step`` on one batch and returns ``forward``'s output.

    Example:
        >>> import lightning as L
        >>> class M(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(); self.fc = nn.Linear(2, 1)
        ...     def forward(self, x):
        ...         return self.fc(x)
        ...     def validation_step(self, batch, batch_idx):
        ...         self.log("val_mean", self(batch["x"]).mean() * 0 + 3.0)
        >>> trainer = L.Trainer(logger=False, enable_progress_bar=False)
        >>> with StepRunner(M(), trainer, n_loaders=1) as runner:
        ...     out = runner.step({"x": torch.ones(4, 2)}, 0, 0)
        ...     scores = runner.scores()
        >>> out.shape, scores.values
        (torch.Size([4, 1]), {'val_mean': 3.0})
    """

    def __init__(self, module: LightningModule, trainer: Trainer, n_loaders: int) -> None:
        self.module, self.trainer, self.n_loaders = module, trainer, n_loaders
        self.sums: dict[str, list[float]] = {}
        self.metrics: dict[str, Metric] = {}
        self.output: Any = None
        self._batch_size = 1
        self._dataloader_idx = 0

    def __enter__(self) -> StepRunner:
        module = self.module
        self._was_training = module.training
        self._saved_metrics = _reset_metrics(module)
        self._attached = _needs_trainer(module)
        if self._attached:
            module.trainer = self.trainer
        module.log = self._log  # an instance attribute shadows LightningModule.log (log_dict calls it too)
        self._hook = module.register_forward_hook(self._on_forward)
        module.eval()
        return self

    def __exit__(self, *exc: object) -> None:
        module = self.module
        self._hook.remove()
        del module.log
        if self._attached:
            module.trainer = None
        _restore_metrics(self._saved_metrics)
        module.train(self._was_training)

    def step(self, batch: Any, batch_idx: int, dataloader_idx: int) -> Any:
        """Transfer ``batch`` with the module's hooks, run ``validation_step``; the first ``forward`` output."""
        module = self.module
        batch = module.on_before_batch_transfer(batch, dataloader_idx)
        batch = module.transfer_batch_to_device(batch, self.trainer.strategy.root_device, dataloader_idx)
        batch = module.on_after_batch_transfer(batch, dataloader_idx)
        self.batch, self.output = batch, None
        self._batch_size, self._dataloader_idx = _batch_size(batch), dataloader_idx
        extra = {"dataloader_idx": dataloader_idx} if self.n_loaders > 1 else {}
        with torch.inference_mode():
            module.validation_step(batch, batch_idx, **extra)
        return self.output

    def scores(self, metric: float | None = None) -> Scores:
        """Epoch means of the logged plain values (weighted by batch size) and ``compute()`` of logged Metrics,
        both reduced over every process."""
        names = sorted(self.sums)
        values: dict[str, float] = {}
        if names:
            sums = torch.tensor([self.sums[n] for n in names], dtype=torch.float64, device=self.module.device)
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            values = {name: s / n for name, (s, n) in zip(names, sums.tolist(), strict=True)}
        directions: dict[str, bool | None] = dict.fromkeys(values)
        for name, logged in self.metrics.items():
            values[name] = float(logged.compute())
            directions[name] = logged.higher_is_better
        return Scores(values, directions, metric)

    def _log(self, name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        if self.n_loaders > 1 and kwargs.get("add_dataloader_idx", True):
            name = f"{name}/dataloader_idx_{self._dataloader_idx}"
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        value = value.detach().float().mean().item() if isinstance(value, torch.Tensor) else float(value)
        count = float(batch_size or self._batch_size)
        total = self.sums.setdefault(name, [0.0, 0.0])
        total[0] += value * count
        total[1] += count

    def _on_forward(self, _module: nn.Module, _args: Any, output: Any) -> None:
        if self.output is None:
            self.output = output


def evaluate(
    module: LightningModule,
    trainer: Trainer,
    loaders: list[tuple[Any, float]],
    metric: Metric | None = None,
    batch_fn: BatchFn | None = None,
    desc: str = "validation",
) -> Scores:
    """Run ``validation_step`` over ``loaders``; with ``metric``, also score ``forward``'s outputs (or, with
    ``batch_fn``, ``model(inputs)``) against the batch's target.

    Example:
        >>> import lightning as L
        >>> class M(L.LightningModule):
        ...     def __init__(self):
        ...         super().__init__(); self.fc = nn.Linear(2, 1)
        ...     def validation_step(self, batch, batch_idx):
        ...         self.log("val_loss", batch[1].float().mean())
        >>> data = [(torch.ones(2, 2), torch.tensor([1, 3])), (torch.ones(1, 2), torch.tensor([7]))]
        >>> evaluate(M(), L.Trainer(logger=False, enable_progress_bar=False), [(data, math.inf)]).values
        {'val_loss': 3.6666666666666665}
    """
    score = None
    if metric is not None:
        score = metric.clone().to(trainer.strategy.root_device)
        score.reset()
    with StepRunner(module, trainer, len(loaders)) as runner:
        module.on_validation_epoch_start()
        for dataloader_idx, batch_idx, batch in progress(trainer, iterate(loaders), desc):
            output = runner.step(batch, batch_idx, dataloader_idx)
            if score is None:
                continue
            with torch.inference_mode():
                if batch_fn is not None:
                    inputs, target = batch_fn(runner.batch)
                    output = call_model(module, inputs)
                else:
                    target = default_batch_fn(runner.batch)[1]
                if output is None:
                    raise _no_forward(module)
                score.update(output_tensor(output), target)
        module.on_validation_epoch_end()
        return runner.scores(None if score is None else float(score.compute()))


def progress(trainer: Trainer, batches: Iterable[Any], desc: str) -> Iterable[Any]:
    """``batches`` with a progress bar on global rank zero that appears only once a pass takes over a second
    (and only when the trainer shows progress bars).

    Example:
        >>> import lightning as L
        >>> list(progress(L.Trainer(logger=False, enable_progress_bar=False), [1, 2], "pass"))
        [1, 2]
    """
    if trainer.progress_bar_callback is None or not trainer.is_global_zero:
        return batches
    return tqdm(batches, desc=f"[mono-quant] {desc}", delay=1.0, leave=False, unit="batch")


def step_forward(trainer: Trainer, batch_fn: BatchFn | None = None) -> Callable[[nn.Module, Any], Any]:
    """A ``forward_fn(model, batch)`` for ``mono_quant`` (calibration, ``compare``, the fallback's ranking): the
    output of ``forward`` inside the model's own ``validation_step`` (or ``model(batch_fn(batch)[0])``).

    Example:
        >>> import lightning as L
        >>> feed = step_forward(L.Trainer(logger=False, enable_progress_bar=False), batch_fn=lambda b: (b, None))
        >>> feed(nn.Linear(2, 3), torch.ones(1, 2)).shape
        torch.Size([1, 3])
    """

    def feed(model: nn.Module, batch: Any) -> Any:
        if batch_fn is not None or not isinstance(model, LightningModule):
            inputs = batch_fn(batch)[0] if batch_fn is not None else batch
            return call_model(model, _to(model, inputs))
        with StepRunner(model, trainer, n_loaders=1) as runner:
            output = runner.step(batch, 0, 0)
        if output is None:
            raise _no_forward(model)
        return output

    return feed


def fidelity(
    float_module: nn.Module, q_module: nn.Module, trainer: Trainer, loaders: list[tuple[Any, float]], **options: Any
) -> mq.FidelityReport:
    """``mono_quant.compare`` of the two modules' outputs on the first ``max_batches`` validation batches.

    Example:
        >>> import lightning as L
        >>> model = nn.Sequential(nn.Linear(8, 8))
        >>> q, _ = mq.dynamic_quantize(model)
        >>> t = L.Trainer(logger=False, enable_progress_bar=False)
        >>> fidelity(model, q, t, [([torch.randn(4, 8)], math.inf)], max_batches=1).cosine_min > 0.99
        True
    """
    batches = [batch for _, _, batch in iterate(loaders, options.get("max_batches", math.inf))]
    feed = step_forward(trainer, options.get("batch_fn"))
    return mq.compare(float_module, q_module, batches, feed, reference=options.get("reference"))


def _no_forward(module: nn.Module) -> mq.ConfigError:
    return mq.ConfigError(
        f"{type(module).__name__}.validation_step never calls the module's forward (self(...)), so "
        "QuantizationCallback has no outputs to score or compare; pass batch_fn=lambda batch: (inputs, target), "
        "or gate on a value validation_step logs with monitor='...'"
    )


def _to(model: nn.Module, inputs: Any) -> Any:
    from lightning.pytorch.utilities import move_data_to_device

    device = next((p.device for p in model.parameters()), None) or next(
        (b.device for b in model.buffers()), torch.device("cpu")
    )
    return move_data_to_device(inputs, device)


def _needs_trainer(module: LightningModule) -> bool:
    try:
        module.trainer  # noqa: B018 (raises when no trainer is attached)
    except RuntimeError:
        return True
    return False


def _batch_size(batch: Any) -> int:
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    return next((_batch_size(item) for item in items if isinstance(item, (torch.Tensor, dict, list, tuple))), 1)


def _reset_metrics(module: nn.Module) -> list[tuple[Metric, dict[str, Any] | None, int]]:
    """Reset every Metric in ``module``; return what ``_restore_metrics`` needs to put their state back."""
    saved = []
    for metric in module.modules():
        if isinstance(metric, Metric):
            state = {k: _detached(v) for k, v in metric.metric_state.items()} if metric.update_count else None
            saved.append((metric, state, metric.update_count))
            metric.reset()
    return saved


def _restore_metrics(saved: list[tuple[Metric, dict[str, Any] | None, int]]) -> None:
    for metric, state, count in saved:
        metric.reset()
        if state is not None:
            for name, value in state.items():
                setattr(metric, name, value)
            metric._update_count = count  # no public setter; compute() checks it


def _detached(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_detached(v) for v in value]
    return value
