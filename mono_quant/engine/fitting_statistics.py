"""Input statistics of the fitted int4 layers, collected outside ``quantize`` (e.g. during Lightning validation).

``fitted_layers`` names the layers ``algorithm="gptq"``/``"awq"`` fits (chosen, swapped, quantized class
``Int4Linear``: one that builds from fitted weights); ``StatisticsCollector`` feeds one ``InputStatistics`` per
such layer from forward pre-hooks while attached. Unlike ``quantize``'s own sequential gathering (each layer sees
the inputs of the model quantized before it), these are the float model's inputs, and every layer's statistics
are alive at once: ``8 K^2`` bytes per layer with ``K`` inputs (128 MiB for a 4096-wide layer). Like a
``Calibrator`` they all-reduce (``sync``) and round-trip through ``state_dict`` (checked on load).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.batches import ForwardFn, feed_batches
from mono_quant.config import QuantDtype, QuantizationConfig
from mono_quant.engine.calibration import check_state
from mono_quant.engine.selection import select_layers
from mono_quant.engine.weight_fitting import needs_no_data
from mono_quant.errors import CalibrationError
from mono_quant.modules.registry import layer_config
from mono_quant.observers import Reduce


def fitted_layers(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module]:
    """The layers whose int4 weights a data-driven ``config.algorithm`` fits, by name (call it on the float model).

    ``config``'s algorithm is not read: the layers are those an int4 config with ``config``'s selection (include,
    exclude, group size, ...) would build from fitted weights.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Conv1d(4, 4, 1), nn.Linear(64, 10))
        >>> list(fitted_layers(model, QuantizationConfig(dtype="int4", group_size=32)))
        ['0', '3']
    """
    config = config.replace(dtype=QuantDtype.INT4)
    selection = select_layers(model, config)
    return {
        name: model.get_submodule(name)
        for name, cls in selection.chosen.items()
        if name not in selection.attached
        and hasattr(cls, "from_quantized")
        and not needs_no_data(model.get_submodule(name))
        and layer_config(config, cls).dtype is QuantDtype.INT4
    }


class StatisticsCollector:
    """One ``InputStatistics`` per named layer, fed by forward pre-hooks while attached.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        >>> config = QuantizationConfig(dtype="int4", algorithm="gptq", group_size=32)
        >>> collector = StatisticsCollector(fitted_layers(model, config), config)
        >>> collector.run(model, [torch.randn(8, 64) for _ in range(3)])
        3
        >>> stats = collector.statistics()
        >>> sorted(stats), stats["2"].rows, stats["2"].xtx.shape
        (['0', '2'], 24, torch.Size([32, 32]))
        >>> import mono_quant as mq
        >>> q = mq.quantize(model, config, input_statistics=stats).model
        >>> type(q[0]).__name__
        'Int4Linear'
    """

    def __init__(self, layers: Mapping[str, nn.Module], config: QuantizationConfig) -> None:
        self.layers = dict(layers)
        self.config = config
        self.inputs = {name: InputStatistics(layer.weight.shape[1]) for name, layer in self.layers.items()}
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Start collecting (idempotent)."""
        if self._handles:
            return
        for name, layer in self.layers.items():
            stats = self.inputs[name]
            self._handles.append(layer.register_forward_pre_hook(lambda _m, a, s=stats: s.update(a[0])))

    def detach(self) -> None:
        """Stop collecting; the layers are left exactly as before ``attach``."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def run(
        self, model: nn.Module, data: Any, forward_fn: ForwardFn | None = None, max_batches: int | None = None
    ) -> int:
        """Feed ``data`` through ``model`` while attached, like ``Calibrator.run`` (at most ``max_batches``
        batches, default the config's ``calibration_batches``); returns the batch count."""
        limit = self.config.calibration_batches if max_batches is None else max_batches
        self.attach()
        try:
            return feed_batches(model, data, forward_fn, limit)
        finally:
            self.detach()

    @property
    def empty(self) -> bool:
        """Whether no row reached any layer."""
        return all(stats.rows == 0 for stats in self.inputs.values())

    def statistics(self) -> dict[str, InputStatistics]:
        """Layer -> its statistics (for ``quantize(input_statistics=...)``); raises naming unreached layers."""
        unreached = sorted(name for name, stats in self.inputs.items() if stats.rows == 0)
        if unreached:
            raise CalibrationError(
                f"calibration data never reached layer(s) {unreached}; check forward_fn or the include/exclude patterns"
            )
        return dict(self.inputs)

    def merge(self, other: StatisticsCollector) -> None:
        for name, stats in self.inputs.items():
            stats.merge(other.inputs[name])

    def sync(self, reduce: Reduce) -> None:
        """All-reduce every layer's statistics across processes (same layer order on every rank)."""
        for name in sorted(self.inputs):
            self.inputs[name].sync(reduce)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: stats.state_dict() for name, stats in self.inputs.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore ``state_dict()``'s statistics, each checked (layers, keys, tensor kind and shape) first.

        Example:
            >>> collector = StatisticsCollector({"fc": nn.Linear(4, 2)}, QuantizationConfig(dtype="int4"))
            >>> state = collector.state_dict()
            >>> state["fc"]["xtx"] = torch.zeros(3, 3, dtype=torch.float64)
            >>> collector.load_state_dict(state)
            Traceback (most recent call last):
            ...
            mono_quant.errors.CalibrationError: input statistics ['fc']['xtx'] is torch.float64 [3, 3]; expected ...
        """
        if not isinstance(state, Mapping):
            raise CalibrationError(
                f"input statistics are a {type(state).__name__}; expected a mapping of layer -> state"
            )
        missing = sorted(set(self.inputs) - set(state))
        if missing:
            raise CalibrationError(f"input statistics have no entry for layer(s) {missing}")
        for name, stats in self.inputs.items():
            check_state(name, state[name], stats.state_dict(), "input statistics")
        for name, stats in self.inputs.items():
            stats.load_state_dict(dict(state[name]))
