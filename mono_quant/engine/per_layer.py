"""``PerLayer``: one statistics object per named layer (observers, input statistics), fed by hooks while
attached, merged, all-reduced and saved as one; the shared part of ``Calibrator`` and ``StatisticsCollector``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.batches import ForwardFn, feed_batches
from mono_quant.config import QuantizationConfig
from mono_quant.errors import CalibrationError
from mono_quant.observers import Reduce


class PerLayer:
    """``items``: layer name -> an object with ``merge``, ``sync``, ``state_dict`` and ``load_state_dict``;
    ``what`` names them in errors ("observer state", "input statistics"). Subclasses define ``attach`` (hooks
    into ``self._handles``) and inherit ``run``, ``detach`` and the rest.

    Example:
        >>> from mono_quant.algorithms.statistics import InputStatistics
        >>> per_layer = PerLayer({"fc": InputStatistics(2)}, "input statistics")
        >>> per_layer.load_state_dict({})
        Traceback (most recent call last):
        ...
        mono_quant.errors.CalibrationError: input statistics: no entry for layer(s) ['fc']
    """

    def __init__(self, items: Mapping[str, Any], what: str, config: QuantizationConfig | None = None) -> None:
        self.items, self.what = dict(items), what
        self.config = config or QuantizationConfig()
        self._handles: list[Any] = []

    def attach(self) -> None:
        """Start feeding the statistics (subclasses hook the layers)."""

    def detach(self) -> None:
        """Stop; the layers are left exactly as before ``attach``."""
        for handle in reversed(self._handles):
            handle.remove()
        self._handles.clear()

    def run(
        self, model: nn.Module, data: Any, forward_fn: ForwardFn | None = None, max_batches: int | None = None
    ) -> int:
        """Feed ``data`` through ``model`` (eval mode, no grad) while attached; returns the batch count.

        At most ``max_batches`` batches (default: the config's ``calibration_batches``) are drawn.

        Example:
            >>> import itertools
            >>> from mono_quant.engine.calibration import Calibrator
            >>> model = nn.Sequential(nn.Linear(4, 2))
            >>> cal = Calibrator({"0": model[0]}, QuantizationConfig(mode="static", calibration_batches=5))
            >>> cal.run(model, (torch.randn(1, 4) for _ in itertools.count()))
            5
        """
        limit = self.config.calibration_batches if max_batches is None else max_batches
        self.attach()
        try:
            return feed_batches(model, data, forward_fn, limit)
        finally:
            self.detach()

    def require_reached(self, unreached: list[str]) -> None:
        """Raise naming the layers (``unreached``) the calibration data never reached."""
        if unreached:
            raise CalibrationError(
                f"calibration data never reached layer(s) {sorted(unreached)}; check forward_fn or the "
                "include/exclude patterns"
            )

    def merge(self, other: PerLayer) -> None:
        """Fold ``other``'s statistics (the same layers, other data) into these."""
        for name, item in self.items.items():
            item.merge(other.items[name])

    def sync(self, reduce: Reduce) -> None:
        """All-reduce every layer's statistics across processes (same layer order on every rank)."""
        for name in sorted(self.items):
            self.items[name].sync(reduce)

    def state_dict(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: item.state_dict() for name, item in self.items.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Restore ``state_dict()``'s statistics, each checked (layers, keys, tensor kind and shape) first.

        Example:
            >>> from mono_quant.algorithms.statistics import InputStatistics
            >>> per_layer = PerLayer({"fc": InputStatistics(2)}, "input statistics")
            >>> state = per_layer.state_dict()
            >>> state["fc"]["xtx"] = torch.zeros(3, 3, dtype=torch.float64)
            >>> per_layer.load_state_dict(state)
            Traceback (most recent call last):
            ...
            mono_quant.errors.CalibrationError: input statistics ['fc']['xtx'] is torch.float64 [3, 3]; expected ...
        """
        from mono_quant.engine.calibration import check_state

        if not isinstance(state, Mapping):
            raise CalibrationError(f"{self.what} is a {type(state).__name__}; expected a mapping of layer -> state")
        missing = sorted(set(self.items) - set(state))
        if missing:
            raise CalibrationError(f"{self.what}: no entry for layer(s) {missing}")
        for name, item in self.items.items():
            check_state(name, state[name], item.state_dict(), self.what)
        for name, item in self.items.items():
            item.load_state_dict(dict(state[name]))
