"""How the callback reads batches: split into ``(inputs, target)``, feed a model, find validation loaders."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import move_data_to_device
from torch import nn

from mono_quant.calibration import TARGET_KEYS
from mono_quant.errors import ConfigError

BatchFn = Callable[[Any], tuple[Any, Any]]


def default_batch_fn(batch: Any) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, target)``: tuples/lists by first and last item, dicts by key.

    Example:
        >>> default_batch_fn((torch.zeros(2, 3), torch.ones(2)))[1]
        tensor([1., 1.])
        >>> inputs, target = default_batch_fn({"pixels": torch.zeros(2, 3), "label": torch.ones(2)})
        >>> list(inputs), target
        (['pixels'], tensor([1., 1.]))
    """
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[-1]
    if isinstance(batch, Mapping):
        key = next((k for k in ("target", "targets", "label", "labels", "y") if k in batch), None)
        if key is not None:
            return {k: v for k, v in batch.items() if k not in TARGET_KEYS}, batch[key]
    raise ConfigError(
        f"cannot split a batch of type {type(batch).__name__} into (inputs, target); pass "
        "QuantizationCallback(batch_fn=lambda batch: (inputs, target))"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def make_forward(batch_fn: BatchFn | None) -> Callable[[nn.Module, Any], Any]:
    def feed(model: nn.Module, batch: Any) -> Any:
        device = next((p.device for p in model.parameters()), None)
        if device is None:
            device = next((b.device for b in model.buffers()), torch.device("cpu"))
        batch = move_data_to_device(batch, device)
        if batch_fn is not None:
            inputs = batch_fn(batch)[0]
        elif isinstance(batch, torch.Tensor):
            inputs = batch
        elif isinstance(batch, Mapping):
            inputs = {k: v for k, v in batch.items() if k not in TARGET_KEYS}
        else:
            inputs = default_batch_fn(batch)[0]
        return call_model(model, inputs)

    return feed


def val_loaders(trainer: Trainer) -> list[Any]:
    """The fit validation dataloader(s) (already sharded per process by Lightning); empty when there are none."""
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return [loader for loader in loaders if has_batches(loader)]


def has_batches(loader: Any) -> bool:
    try:
        return len(loader) > 0
    except TypeError:
        return True
