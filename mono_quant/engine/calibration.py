"""Collect activation statistics: observers attached to layers with forward pre-hooks.

Calibration data may be a tensor, a list/tuple of tensors, of ``(inputs, target)`` tuples, of dicts,
or any iterable such as a ``DataLoader``. ``forward_fn(model, batch)`` overrides how a batch is fed.
At most ``QuantizationConfig.calibration_batches`` batches are used (default ``DEFAULT_BATCH_LIMIT``,
256), so an endless iterable stops there. A batch the model cannot take raises ``CalibrationError``
naming the batch index and what the batch holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mono_quant.config import QuantizationConfig, Scheme
from mono_quant.engine.per_layer import PerLayer
from mono_quant.errors import CalibrationError, ConfigError
from mono_quant.modules.weight_calls import WEIGHT_CALLS, operand
from mono_quant.observers import Observer, make_observer
from mono_quant.qparams import ActivationQParams


class _ModeHandle:
    """Ends a torch function mode the way ``RemovableHandle.remove`` ends a hook."""

    def __init__(self, mode: TorchFunctionMode) -> None:
        self.mode = mode

    def remove(self) -> None:
        self.mode.__exit__(None, None, None)


DEFAULT_BATCH_LIMIT = QuantizationConfig().calibration_batches


OUTPUT = ":output"  # ``Calibrator`` key suffix of a layer's output observer: ``output_key(name)``


def output_key(name: str) -> str:
    """The key of layer ``name``'s calibrated output in ``Calibrator.qparams()``.

    Example:
        >>> output_key("layer1.0.downsample.0")
        'layer1.0.downsample.0:output'
    """
    return name + OUTPUT


class _WeightInputObserver(TorchFunctionMode):
    """Feeds an observer the input of every linear/conv/matmul call whose weight is a watched tensor
    (or a view of one, such as ``weight.T``), wherever in the model the call is made; and ``outputs``'
    observers that call's result."""

    def __init__(self, watched: dict[int, Observer], outputs: dict[int, Observer] | None = None) -> None:
        super().__init__()
        self.watched, self.outputs = watched, outputs or {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        call = WEIGHT_CALLS.get(func)
        if call is not None and call.kind != "embedding":  # an embedding's input is indices: nothing to observe
            weight, x = operand(args, kwargs or {}, call.weight), operand(args, kwargs or {}, call.input)
            observer = self.watched.get(id(weight)) or self.watched.get(id(getattr(weight, "_base", None)))
            if observer is not None and isinstance(x, torch.Tensor):
                observer.update(x)
            observer = self.outputs.get(id(weight)) or self.outputs.get(id(getattr(weight, "_base", None)))
            if observer is not None:
                out = func(*args, **(kwargs or {}))
                observer.update(out)
                return out
        return func(*args, **(kwargs or {}))


class Calibrator(PerLayer):
    """Observers on named layers, recording each layer's input while attached.

    A layer is a module (its forward input is observed) or a weight tensor (the input of each
    ``F.linear``/``F.conv*``/``addmm``/``matmul`` that uses it is observed). ``outputs`` names layers whose
    output is also observed (a module's forward output, or the result of its weight's call), under
    ``output_key(name)``; an output the data never reached is left out of ``qparams()``, not an error.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> cal = Calibrator({"0": model[0], "2": model[2]}, QuantizationConfig(mode="static"))
        >>> cal.run(model, [torch.randn(5, 4) for _ in range(3)])
        3
        >>> sorted(cal.qparams())
        ['0', '2']
    """

    def __init__(
        self,
        layers: Mapping[str, nn.Module | torch.Tensor],
        config: QuantizationConfig,
        outputs: Mapping[str, nn.Module | torch.Tensor] | None = None,
    ) -> None:
        self.layers = dict(layers)
        self.outputs = {output_key(name): layer for name, layer in (outputs or {}).items()}
        names = [*self.layers, *self.outputs]
        super().__init__({name: make_observer(config, name) for name in names}, "observer state", config)
        self.observers: dict[str, Observer] = self.items

    def attach(self) -> None:
        """Start observing (idempotent)."""
        if self._handles:
            return
        watched, outputs = {}, {}
        for name, layer in self.layers.items():
            observer = self.observers[name]
            if isinstance(layer, torch.Tensor):
                watched[id(layer)] = observer
            else:
                self._handles.append(layer.register_forward_pre_hook(lambda _m, a, obs=observer: obs.update(a[0])))
        for name, layer in self.outputs.items():
            observer = self.observers[name]
            if isinstance(layer, torch.Tensor):
                outputs[id(layer)] = observer
            else:
                self._handles.append(layer.register_forward_hook(lambda _m, _a, out, obs=observer: obs.update(out)))
        if watched or outputs:
            mode = _WeightInputObserver(watched, outputs)
            mode.__enter__()
            self._handles.append(_ModeHandle(mode))

    def qparams(self, scheme: Scheme | None = None) -> dict[str, ActivationQParams]:
        """Per-layer activation parameters; raises naming every layer the data never reached."""
        self.require_reached([name for name, obs in self.observers.items() if obs.empty and name in self.layers])
        scheme = scheme or self.config.activation_scheme
        out = {}
        for name, observer in self.observers.items():
            if observer.empty:
                continue  # an output never observed (or absent from restored state): not calibrated
            try:  # ActivationQParams refuses a scale that is not finite and positive (a range beyond float32)
                out[name] = observer.qparams(scheme)
            except ConfigError as err:
                raise CalibrationError(
                    f"layer {name!r}: the calibrated {err} (its activations' range overflows float32); check the "
                    "calibration data and the layers before this one"
                ) from None
        return out

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """``PerLayer.load_state_dict``; a state without this calibrator's output entries (saved before outputs
        were observed) leaves those outputs unobserved instead of failing."""
        if isinstance(state, Mapping):
            state = {**{name: self.observers[name].state_dict() for name in self.outputs if name not in state}, **state}
        super().load_state_dict(state)


def check_state(layer: str, state: Any, expected: Mapping[str, torch.Tensor], what: str = "observer state") -> None:
    """A ``CalibrationError`` naming ``what``, the layer and key when ``state`` is not shaped like ``expected``.

    Example:
        >>> check_state("fc", {"rows": torch.tensor(-1)}, {"rows": torch.tensor(0)}, "input statistics")
        Traceback (most recent call last):
        ...
        mono_quant.errors.CalibrationError: input statistics ['fc']['rows'] is -1; expected a count >= 0
    """
    where = f"{what} [{layer!r}]"
    if not isinstance(state, Mapping) or set(state) != set(expected):
        got = sorted(map(str, state)) if isinstance(state, Mapping) else f"a {type(state).__name__}"
        raise CalibrationError(f"{where} has {got}; expected the keys {sorted(expected)}")
    for key, reference in expected.items():
        value = state[key]
        kind = "float" if reference.is_floating_point() else "integer"
        if (
            not isinstance(value, torch.Tensor)
            or value.is_floating_point() != reference.is_floating_point()
            or value.dtype == torch.bool
            or value.shape != reference.shape
        ):
            tensor = isinstance(value, torch.Tensor)
            got = f"{value.dtype} {list(value.shape)}" if tensor else f"a {type(value).__name__}"
            raise CalibrationError(
                f"{where}[{key!r}] is {got}; expected a {kind} tensor of shape {list(reference.shape)} "
                "(statistics saved by a different observer or library version?)"
            )
        if key in ("batches", "rows") and int(value) < 0:
            raise CalibrationError(f"{where}[{key!r}] is {int(value)}; expected a count >= 0")
