"""Calibration and evaluation batches: what a batch may be, how one is fed to a model, how one is described.

A batch is a tensor, a ``(inputs, target)`` tuple or list, or a dict of keyword arguments (target keys such
as ``"labels"`` left out); any iterable of them (a ``DataLoader``) is a stream of batches.
``forward_fn(model, batch)`` overrides how a batch is fed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.copying import eval_mode
from mono_quant.errors import CalibrationError

ForwardFn = Callable[[nn.Module, Any], Any]
TARGET_KEYS = frozenset({"target", "targets", "label", "labels", "y"})


def iterate_batches(data: Any) -> Iterator[Any]:
    """Yield the batches of ``data``; a lone tensor or dict is one batch.

    Example:
        >>> len(list(iterate_batches([torch.zeros(2, 3), torch.ones(2, 3)])))
        2
    """
    if data is None:
        raise CalibrationError("calibration_data=None; static mode needs calibration batches")
    if isinstance(data, (torch.Tensor, Mapping)):
        yield data
        return
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise CalibrationError(
            f"calibration_data of type {type(data).__name__} is not iterable; expected a tensor, a list of "
            "tensors, (inputs, target) tuples or dicts, or a DataLoader"
        )
    yield from data


def first_batch(data: Any) -> Any:
    """The first batch of ``data`` when it can be read again afterwards (a tensor, dict, list, DataLoader...);
    ``None`` for ``None``, an empty collection or a one-shot iterator (which must not be consumed).

    Example:
        >>> first_batch([torch.zeros(1), torch.ones(1)]), first_batch(iter([torch.zeros(1)]))
        (tensor([0.]), None)
    """
    if data is None or isinstance(data, (str, bytes)) or (isinstance(data, Iterator) and not isinstance(data, Mapping)):
        return None
    if isinstance(data, (torch.Tensor, Mapping)):
        return data
    if not isinstance(data, Iterable):
        return None
    return next(iter(data), None)


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


def default_forward(model: nn.Module, batch: Any) -> Any:
    """Feed one batch: a tensor as is, a tuple/list's first item, a dict as keyword arguments
    (without target keys such as ``"labels"`` or ``"y"``).

    Example:
        >>> default_forward(nn.Linear(3, 1), (torch.zeros(2, 3), torch.zeros(2))).shape
        torch.Size([2, 1])
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    batch = _to_device(batch, device)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k not in TARGET_KEYS})
    if isinstance(batch, (list, tuple)) and batch:
        return model(batch[0])
    raise CalibrationError(
        f"cannot feed a calibration batch of type {type(batch).__name__}; pass forward_fn=(model, batch) -> output"
    )


def describe_batch(batch: Any) -> str:
    """A short description of a batch for error messages.

    Example:
        >>> describe_batch({"pixels": torch.zeros(2, 3)}), describe_batch((torch.zeros(4), 1))
        ("a dict with keys ['pixels']", 'a tuple of 2 (first: a tensor of shape [4])')
    """
    if isinstance(batch, torch.Tensor):
        return f"a tensor of shape {list(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict with keys {sorted(map(str, batch))}"
    if isinstance(batch, (list, tuple)) and batch:
        return f"a {type(batch).__name__} of {len(batch)} (first: {describe_batch(batch[0])})"
    return f"a {type(batch).__name__}"


class ReachedLayer(BaseException):
    """Raised by a hook to end one batch's forward once the layer it watches has its input (the rest of the
    model need not run). A ``BaseException``, so that a model's own ``except Exception`` cannot swallow it."""


def feed_batches(model: nn.Module, data: Any, forward_fn: ForwardFn | None, limit: int | None) -> int:
    """Feed at most ``limit`` batches of ``data`` through ``model`` (eval mode, no grad); returns the count.

    A batch the model cannot take raises ``CalibrationError`` naming it; no batch at all raises too. A hook
    that raises ``ReachedLayer`` ends that batch's forward early.

    Example:
        >>> feed_batches(nn.Linear(4, 2), [torch.randn(3, 4)] * 5, None, 2)
        2
    """
    feed, count = forward_fn or default_forward, 0
    with torch.inference_mode(), eval_mode(model):
        for batch in iterate_batches(data):
            if limit is not None and count >= limit:
                break
            with contextlib.suppress(ReachedLayer):
                _feed_one(feed, model, batch, count, forward_fn is not None)
            count += 1
    if count == 0:
        raise CalibrationError("calibration_data is empty; pass at least one batch")
    return count


def _feed_one(feed: ForwardFn, model: nn.Module, batch: Any, index: int, custom: bool) -> None:
    """Feed one batch; a failure becomes a ``CalibrationError`` naming the batch (mono-quant errors pass)."""
    try:
        feed(model, batch)
    except CalibrationError as err:
        raise CalibrationError(f"calibration batch {index}: {err}") from None
    except Exception as err:
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        if custom:
            message = f"forward_fn failed on calibration batch {index} ({describe_batch(batch)}): {detail}"
        else:
            message = (
                f"calibration batch {index} ({describe_batch(batch)}) does not fit the model's forward: {detail}; "
                "pass forward_fn=lambda model, batch: model(...) to feed batches of this form"
            )
        raise CalibrationError(message) from err
