"""Collect activation statistics: observers attached to layers with forward pre-hooks.

Calibration data may be a tensor, a list/tuple of tensors, of ``(inputs, target)`` tuples, of dicts,
or any iterable such as a ``DataLoader``. ``forward_fn(model, batch)`` overrides how a batch is fed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from mono_quant.config import QuantizationConfig, Scheme
from mono_quant.copying import eval_mode
from mono_quant.errors import CalibrationError
from mono_quant.modules.base import ActivationQParams
from mono_quant.observers import Observer, Reduce, make_observer

ForwardFn = Callable[[nn.Module, Any], Any]


class _ModeHandle:
    """Ends a torch function mode the way ``RemovableHandle.remove`` ends a hook."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self.mode = mode

    def remove(self) -> None:
        self.mode.__exit__(None, None, None)

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


_WEIGHT_CALLS = {  # function -> (index of the weight, index of the input)
    F.linear: (1, 0), F.conv1d: (1, 0), F.conv2d: (1, 0), torch.addmm: (2, 1), torch.Tensor.addmm: (2, 1),
    torch.matmul: (1, 0), torch.Tensor.matmul: (1, 0), torch.Tensor.__matmul__: (1, 0), torch.mm: (1, 0),
}  # fmt: skip


class _WeightInputObserver(TorchFunctionMode):
    """Feeds an observer the input of every linear/conv/matmul call whose weight is a watched tensor
    (or a view of one, such as ``weight.T``), wherever in the model the call is made."""

    def __init__(self, watched: dict[int, Observer]) -> None:
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        where = _WEIGHT_CALLS.get(func)
        if where is not None and len(args) > max(where):
            weight, x = args[where[0]], args[where[1]]
            observer = self.watched.get(id(weight)) or self.watched.get(id(getattr(weight, "_base", None)))
            if observer is not None and isinstance(x, torch.Tensor):
                observer.update(x)
        return func(*args, **(kwargs or {}))


class Calibrator:
    """Observers on named layers, recording each layer's input while attached.

    A layer is a module (its forward input is observed) or a weight tensor (the input of each
    ``F.linear``/``F.conv*``/``addmm``/``matmul`` that uses it is observed).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> cal = Calibrator({"0": model[0], "2": model[2]}, QuantizationConfig(mode="static"))
        >>> cal.run(model, [torch.randn(5, 4) for _ in range(3)])
        3
        >>> sorted(cal.qparams())
        ['0', '2']
    """

    def __init__(self, layers: Mapping[str, nn.Module | torch.Tensor], config: QuantizationConfig) -> None:
        self.layers = dict(layers)
        self.config = config
        self.observers: dict[str, Observer] = {name: make_observer(config, name) for name in self.layers}
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Start observing (idempotent)."""
        if self._handles:
            return
        watched = {}
        for name, layer in self.layers.items():
            observer = self.observers[name]
            if isinstance(layer, torch.Tensor):
                watched[id(layer)] = observer
            else:
                self._handles.append(layer.register_forward_pre_hook(lambda _m, a, obs=observer: obs.update(a[0])))
        if watched:
            mode = _WeightInputObserver(watched)
            mode.__enter__()
            self._handles.append(_ModeHandle(mode))

    def detach(self) -> None:
        """Stop observing; the layers are left exactly as before ``attach``."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def run(
        self, model: nn.Module, data: Any, forward_fn: ForwardFn | None = None, max_batches: int | None = None
    ) -> int:
        """Feed ``data`` through ``model`` (eval mode, no grad) while attached; returns the batch count."""
        feed = forward_fn or default_forward
        count = 0
        self.attach()
        try:
            with torch.inference_mode(), eval_mode(model):
                for batch in iterate_batches(data):
                    if max_batches is not None and count >= max_batches:
                        break
                    feed(model, batch)
                    count += 1
        finally:
            self.detach()
        if count == 0:
            raise CalibrationError("calibration_data is empty; pass at least one batch")
        return count

    def qparams(self, scheme: Scheme | None = None) -> dict[str, ActivationQParams]:
        """Per-layer activation parameters; raises naming every layer the data never reached."""
        unreached = sorted(name for name, obs in self.observers.items() if obs.empty)
        if unreached:
            raise CalibrationError(
                f"calibration data never reached layer(s) {unreached}; check forward_fn or the include/exclude patterns"
            )
        scheme = scheme or self.config.activation_scheme
        return {name: obs.qparams(scheme) for name, obs in self.observers.items()}

    def merge(self, other: Calibrator) -> None:
        for name, observer in self.observers.items():
            observer.merge(other.observers[name])

    def sync(self, reduce: Reduce) -> None:
        """All-reduce every observer across processes (same layer order on every rank)."""
        for name in sorted(self.observers):
            self.observers[name].sync(reduce)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: obs.state_dict() for name, obs in self.observers.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        missing = sorted(set(self.observers) - set(state))
        if missing:
            raise CalibrationError(f"observer state has no entry for layer(s) {missing}")
        for name, observer in self.observers.items():
            observer.load_state_dict(dict(state[name]))
