"""What the callback needs to know about batches: the target of a batch and the fit's validation loaders.

The module's own ``validation_step`` decides how a batch feeds the model; only the callback's own
``metric=`` needs a target, and only ``batch_fn=`` (an optional override) needs the inputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lightning.pytorch import Trainer
from torch import nn

import mono_quant as mq
from mono_quant import TARGET_KEYS

BatchFn = Callable[[Any], tuple[Any, Any]]


def default_batch_fn(batch: Any) -> tuple[Any, Any]:
    """Split a batch into ``(inputs, target)``: tuples/lists by first and last item, dicts by key.

    Example:
        >>> import torch
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
    raise mq.ConfigError(
        f"cannot find the target of a batch of type {type(batch).__name__} for metric=; pass "
        "QuantizationCallback(batch_fn=lambda batch: (inputs, target)), or gate on a value validation_step logs "
        "with monitor='...'"
    )


def call_model(model: nn.Module, inputs: Any) -> Any:
    """Feed ``inputs``: a dict as keyword arguments, a tuple/list as positional ones, anything else as is.

    Example:
        >>> import torch
        >>> call_model(nn.Linear(3, 1), torch.zeros(2, 3)).shape
        torch.Size([2, 1])
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


def val_loaders(trainer: Trainer) -> list[tuple[Any, float]]:
    """The fit's validation loaders (sharded per process by Lightning) with their batch limits
    (``limit_val_batches`` applied); empty when validation does not run.

    Example:
        >>> import lightning as L
        >>> val_loaders(L.Trainer(logger=False, enable_progress_bar=False))
        []
    """
    loaders = trainer.val_dataloaders
    if loaders is None:
        return []
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    limits = list(trainer.num_val_batches) or [math.inf] * len(loaders)
    return [(loader, limit) for loader, limit in zip(loaders, limits, strict=False) if limit > 0]


def iterate(loaders: list[tuple[Any, float]], max_batches: float = math.inf) -> Iterator[tuple[int, int, Any]]:
    """``(dataloader_idx, batch_idx, batch)`` over ``loaders`` within their limits, at most ``max_batches`` in all.

    Example:
        >>> [(d, b) for d, b, _ in iterate([([1, 2, 3], 2), ([4], 5)])]
        [(0, 0), (0, 1), (1, 0)]
    """
    chained = (
        (index, batch_idx, batch)
        for index, (loader, limit) in enumerate(loaders)
        for batch_idx, batch in enumerate(loader if math.isinf(limit) else itertools.islice(loader, int(limit)))
    )
    return chained if math.isinf(max_batches) else itertools.islice(chained, int(max_batches))
