"""Fitting int4 weights to calibration data (``algorithm="gptq"`` / ``"awq"``), one group of layers at a time.

``quantize`` visits layers in the order the model calls them. Before a fitted layer is built, the calibration
batches run through the model as it stands (every layer before it already quantized, so each layer corrects
the error of those before it, as GPTQ's sequential mode does) until they reach the layer; its input
statistics are gathered and the forward stops there. Layers that take the same input (a transformer's
query, key and value projections) share one pass and one ``InputStatistics``; only that one group's
statistics are alive at a time. Statistics collected elsewhere (the Lightning callback, all-reduced across
processes) can be passed instead, keyed by layer name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.algorithms.clipping import clipped_quantize
from mono_quant.algorithms.gptq import gptq_quantize
from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.batches import ForwardFn, ReachedLayer, feed_batches
from mono_quant.config import QuantizationConfig, WeightAlgorithm
from mono_quant.errors import CalibrationError
from mono_quant.modules.int4_weight import group_size_for
from mono_quant.qparams import QuantizedWeight

Fit = Callable[[nn.Module, QuantizationConfig], QuantizedWeight]


def fit_weight(module: nn.Module, config: QuantizationConfig, statistics: InputStatistics | None) -> QuantizedWeight:
    """The int4 values and group scales of ``module``'s weight under ``config.algorithm``.

    An embedding's output is a row of its weight, so its output error is its weight error: its groups take the
    ranges with the least squared rounding error, no data needed (MiniLM, GPTQ group 128: embedding cosine
    0.980 with these ranges, 0.978 with min/max ones).

    Example:
        >>> layer, stats = nn.Linear(64, 8), InputStatistics(64)
        >>> stats.update(torch.randn(128, 64))
        >>> fitted = fit_weight(layer, QuantizationConfig(dtype="int4", algorithm="gptq", group_size=32), stats)
        >>> fitted.data.shape, fitted.scale.shape
        (torch.Size([8, 64]), torch.Size([8, 2]))
    """
    weight = module.weight.detach()
    group = group_size_for(weight.shape[1], config.group_size)
    if group is None:
        raise CalibrationError(f"no int4 group divides the {weight.shape[1]} inputs of {type(module).__name__}")
    if statistics is None or isinstance(module, nn.Embedding):
        return clipped_quantize(weight, torch.eye(weight.shape[1]), 4, config.scheme, group)
    if config.algorithm is WeightAlgorithm.GPTQ:
        # columns in order of input energy, group ranges fixed up front (MiniLM g128: cosine 0.978 vs 0.974 in
        # column order with ranges taken as each group comes up)
        return gptq_quantize(weight, statistics.hessian(), 4, config.scheme, group, act_order=True)
    return clipped_quantize(weight, statistics.hessian(), 4, config.scheme, group)


def input_groups(inputs: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, ...]]:
    """Layer -> the layers (in call order) whose recorded input equals its own; ``inputs`` is in call order.

    Example:
        >>> x, y = torch.ones(2, 3), torch.zeros(2, 3)
        >>> input_groups({"q": x, "k": x.clone(), "o": y})
        {'q': ('q', 'k'), 'k': ('q', 'k'), 'o': ('o',)}
    """
    groups: dict[str, tuple[str, ...]] = {}
    for name, x in inputs.items():
        if name in groups:
            continue
        same = tuple(n for n, y in inputs.items() if n not in groups and y.shape == x.shape and torch.equal(x, y))
        groups.update(dict.fromkeys(same, same))
    return groups


class SequentialStatistics:
    """Input statistics of one group of layers at a time, gathered on demand (see the module docstring).

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [torch.randn(4, 8) for _ in range(3)]
        >>> seq = SequentialStatistics(model, {"0": ("0",), "2": ("2",)}, data, None, QuantizationConfig())
        >>> seq.statistics("2").rows
        12
    """

    def __init__(
        self,
        model: nn.Module,
        groups: Mapping[str, tuple[str, ...]],
        data: Any,
        forward_fn: ForwardFn | None,
        config: QuantizationConfig,
    ) -> None:
        self.model, self.groups, self.data = model, dict(groups), data
        self.forward_fn, self.limit = forward_fn, config.calibration_batches
        self._group: tuple[str, ...] | None = None
        self._statistics: InputStatistics | None = None

    def statistics(self, name: str) -> InputStatistics:
        """``name``'s input statistics, gathered now unless its group's are the current ones."""
        group = self.groups.get(name, (name,))
        if group != self._group:
            self._statistics = None  # free the previous group's before gathering the next
            self._statistics, self._group = self._collect(group[0]), group
        assert self._statistics is not None
        return self._statistics

    def _collect(self, name: str) -> InputStatistics:
        layer = self.model.get_submodule(name)
        statistics = InputStatistics(layer.weight.shape[1])

        def reached(_module: nn.Module, args: tuple) -> None:
            statistics.update(args[0])
            raise ReachedLayer

        handle = layer.register_forward_pre_hook(reached)
        try:
            feed_batches(self.model, self.data, self.forward_fn, self.limit)
        finally:
            handle.remove()
        if statistics.rows == 0:
            raise CalibrationError(f"calibration data never reached layer {name!r}; check forward_fn")
        return statistics


def fitter(statistics_for: Callable[[str], InputStatistics], name: str) -> Fit:
    """A ``Fit`` for layer ``name`` that reads its statistics when called (after the layers before it are built).

    Example:
        >>> stats = InputStatistics(32)
        >>> stats.update(torch.randn(64, 32))
        >>> fit = fitter({"fc": stats}.__getitem__, "fc")
        >>> fit(nn.Linear(32, 4), QuantizationConfig(dtype="int4", algorithm="awq", group_size=32)).scale.shape
        torch.Size([4, 1])
    """
    def fit(module: nn.Module, config: QuantizationConfig) -> QuantizedWeight:
        return fit_weight(module, config, None if needs_no_data(module) else statistics_for(name))

    return fit


def needs_no_data(module: nn.Module) -> bool:
    """Whether ``module``'s fitted weight needs no input statistics (an embedding: its inputs are indices).

    Example:
        >>> needs_no_data(nn.Embedding(4, 8)), needs_no_data(nn.Linear(8, 4))
        (True, False)
    """
    return isinstance(module, nn.Embedding)
