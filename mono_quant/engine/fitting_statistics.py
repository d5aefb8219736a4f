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

from torch import nn

from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.config import QuantDtype, QuantizationConfig
from mono_quant.engine.per_layer import PerLayer
from mono_quant.engine.selection import select_layers
from mono_quant.engine.weight_fitting import needs_no_data
from mono_quant.modules.registry import layer_config


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


class StatisticsCollector(PerLayer):
    """One ``InputStatistics`` per named layer, fed by forward pre-hooks while attached.

    Example:
        >>> import torch
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
        super().__init__({name: InputStatistics(layer.weight.shape[1]) for name, layer in self.layers.items()},
                         "input statistics", config)  # fmt: skip
        self.inputs: dict[str, InputStatistics] = self.items

    def attach(self) -> None:
        """Start collecting (idempotent)."""
        if self._handles:
            return
        for name, layer in self.layers.items():
            stats = self.inputs[name]
            self._handles.append(layer.register_forward_pre_hook(lambda _m, a, s=stats: s.update(a[0])))

    @property
    def empty(self) -> bool:
        """Whether no row reached any layer."""
        return all(stats.rows == 0 for stats in self.inputs.values())

    def statistics(self) -> dict[str, InputStatistics]:
        """Layer -> its statistics (for ``quantize(input_statistics=...)``); raises naming unreached layers."""
        self.require_reached([name for name, stats in self.inputs.items() if stats.rows == 0])
        return dict(self.inputs)
