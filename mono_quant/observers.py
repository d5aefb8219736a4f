"""Activation observers: MinMax, MovingAverageMinMax and Histogram (percentile or MSE range).

State is tensors only (``state_dict``), so checkpoints and distributed reductions can carry it.
``merge`` combines two observers (exact for MinMax and Histogram); ``sync(reduce)`` does the same
across processes given a ``reduce(tensor, op)`` function with ops ``"min"``, ``"max"``, ``"sum"``.
The histogram covers ``[-2**k, 2**k]`` and only grows by powers of two, so re-binning onto a larger
range (and merging histograms of different ranges) adds whole bins: no approximation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import torch

from mono_quant.config import HistogramMethod, ObserverKind, QuantizationConfig, Scheme
from mono_quant.errors import CalibrationError
from mono_quant.qparams import ActivationQParams, scale_zero_point

Reduce = Callable[[torch.Tensor, str], torch.Tensor]


class Observer:
    """Base class. ``name`` (the layer) appears in every error message."""

    kind: ClassVar[ObserverKind]

    def __init__(self, name: str = "") -> None:
        self.name = name
        self.min_val = torch.tensor(math.inf)
        self.max_val = torch.tensor(-math.inf)
        self.batches = torch.tensor(0)

    @property
    def empty(self) -> bool:
        return int(self.batches) == 0

    def _observe_range(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's min and max, left on x's device: no host sync per batch (NaN/Inf propagate into
        the running range and are reported by ``qparams``/``value_range``)."""
        if x.numel() == 0:
            raise CalibrationError(f"layer {self.name!r} received an empty activation tensor")
        low, high = torch.aminmax(x.detach())
        self.batches += 1
        return low.float(), high.float()

    def _check_finite(self, low: torch.Tensor, high: torch.Tensor) -> None:
        if not bool(torch.isfinite(low) & torch.isfinite(high)):
            raise CalibrationError(f"layer {self.name!r} received NaN or Inf activations during calibration")

    def update(self, x: torch.Tensor) -> None:
        """Record one batch of activations."""
        raise NotImplementedError

    def value_range(self, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(low, high)`` range to quantize, per the observer's method (on the CPU)."""
        low, high = self.min_val.cpu(), self.max_val.cpu()
        self._check_finite(low, high)
        return low, high

    def qparams(self, scheme: Scheme = Scheme.ASYMMETRIC) -> ActivationQParams:
        """Per-tensor int8 scale and zero point for the observed activations.

        Example:
            >>> obs = MinMaxObserver("fc"); obs.update(torch.tensor([-1.0, 3.0]))
            >>> round(obs.qparams().scale.item() * 255, 4)
            4.0
        """
        if self.empty:
            raise CalibrationError(f"layer {self.name!r} was never reached by the calibration data")
        low, high = self.value_range(scheme)
        scale, zero_point = scale_zero_point(low, high, 8, scheme)
        return ActivationQParams(scale, torch.zeros((), dtype=torch.int8) if zero_point is None else zero_point)

    def merge(self, other: Observer) -> None:
        """Fold ``other``'s statistics into this observer (same kind)."""
        if type(other) is not type(self):
            raise CalibrationError(f"cannot merge {type(other).__name__} into {type(self).__name__}")
        self.min_val = torch.minimum(self.min_val, other.min_val)
        self.max_val = torch.maximum(self.max_val, other.max_val)
        self.batches = self.batches + other.batches

    def sync(self, reduce: Reduce) -> None:
        """Combine this observer with its copies in other processes (``reduce`` is an all-reduce)."""
        self.min_val = reduce(self.min_val, "min")
        self.max_val = reduce(self.max_val, "max")
        self.batches = reduce(self.batches, "sum")

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"min_val": self.min_val, "max_val": self.max_val, "batches": self.batches}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            setattr(self, key, value.clone())


class MinMaxObserver(Observer):
    """Running minimum and maximum.

    Example:
        >>> obs = MinMaxObserver(); obs.update(torch.tensor([1.0, -2.0])); obs.update(torch.tensor([5.0]))
        >>> obs.min_val.item(), obs.max_val.item()
        (-2.0, 5.0)
    """

    kind = ObserverKind.MINMAX

    def update(self, x: torch.Tensor) -> None:
        low, high = self._observe_range(x)
        self.min_val = torch.minimum(self.min_val, low)
        self.max_val = torch.maximum(self.max_val, high)


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min and max (robust to a few outlier batches).

    ``merge``/``sync`` average the two states (weighted by batch count): approximate by nature.

    Example:
        >>> obs = MovingAverageMinMaxObserver(averaging_constant=0.5)
        >>> obs.update(torch.tensor([0.0, 4.0])); obs.update(torch.tensor([0.0, 2.0]))
        >>> obs.max_val.item()
        3.0
    """

    kind = ObserverKind.MOVING_AVERAGE

    def __init__(self, name: str = "", averaging_constant: float = 0.01) -> None:
        super().__init__(name)
        self.averaging_constant = averaging_constant

    def update(self, x: torch.Tensor) -> None:
        first = self.empty
        low, high = self._observe_range(x)
        if first:
            self.min_val, self.max_val = low, high
            return
        c = self.averaging_constant
        self.min_val = self.min_val + c * (low - self.min_val)
        self.max_val = self.max_val + c * (high - self.max_val)

    def merge(self, other: Observer) -> None:
        if other.empty:
            return
        if self.empty:
            self.load_state_dict(other.state_dict())
            return
        total = (self.batches + other.batches).float()
        self.min_val = (self.min_val * self.batches + other.min_val * other.batches) / total
        self.max_val = (self.max_val * self.batches + other.max_val * other.batches) / total
        self.batches = self.batches + other.batches

    def sync(self, reduce: Reduce) -> None:
        weight = self.batches.float()
        total = reduce(weight.clone(), "sum").clamp_min(1)
        self.min_val = reduce(torch.nan_to_num(self.min_val * weight, posinf=0.0), "sum") / total
        self.max_val = reduce(torch.nan_to_num(self.max_val * weight, neginf=0.0), "sum") / total
        self.batches = reduce(self.batches, "sum")


class HistogramObserver(Observer):
    """Histogram of activations; the range is chosen by a percentile or by minimizing the MSE.

    Example:
        >>> obs = HistogramObserver(method="percentile", percentile=99.0)
        >>> obs.update(torch.cat([torch.linspace(-1, 1, 10000), torch.tensor([50.0])]))
        >>> low, high = obs.value_range(Scheme.SYMMETRIC)
        >>> float(high) < 2.0
        True
    """

    kind = ObserverKind.HISTOGRAM

    def __init__(
        self,
        name: str = "",
        bins: int = 2048,
        method: HistogramMethod | str = HistogramMethod.PERCENTILE,
        percentile: float = 99.99,
    ) -> None:
        super().__init__(name)
        if bins < 8 or bins & (bins - 1):
            raise CalibrationError(f"bins={bins} must be a power of two >= 8")
        self.bins = bins
        self.method = HistogramMethod(method)
        self.percentile = percentile
        self.counts = torch.zeros(bins, dtype=torch.float64)
        self.range_exp = torch.tensor(-126)  # histogram covers [-2**range_exp, 2**range_exp]

    def _grow_to(self, exp: int) -> None:
        steps = min(exp - int(self.range_exp), int(math.log2(self.bins)))
        if steps <= 0:
            return
        factor = 2**steps
        folded = self.counts.reshape(self.bins // factor, factor).sum(1)
        counts = torch.zeros_like(self.counts)
        start = (self.bins - folded.numel()) // 2
        counts[start : start + folded.numel()] = folded
        self.counts, self.range_exp = counts, torch.tensor(exp)

    def update(self, x: torch.Tensor) -> None:
        low, high = (t.cpu() for t in self._observe_range(x))  # the bin range is needed on the host anyway
        self._check_finite(low, high)
        self.min_val = torch.minimum(self.min_val, low)
        self.max_val = torch.maximum(self.max_val, high)
        amax = max(abs(float(low)), abs(float(high)), 2.0**-126)
        needed = math.ceil(math.log2(amax))
        if int(self.batches) == 1:
            self.range_exp = torch.tensor(needed)
        else:
            self._grow_to(needed)
        edge = 2.0 ** int(self.range_exp)
        self.counts += torch.histc(x.detach().float(), self.bins, -edge, edge).double().cpu()

    def merge(self, other: Observer) -> None:
        if not isinstance(other, HistogramObserver) or other.bins != self.bins:
            raise CalibrationError("can only merge HistogramObservers with the same number of bins")
        if other.empty:
            return
        if self.empty:
            self.load_state_dict(other.state_dict())
            return
        exp = max(int(self.range_exp), int(other.range_exp))
        other_copy = HistogramObserver(bins=other.bins)
        other_copy.load_state_dict(other.state_dict())
        other_copy._grow_to(exp)
        self._grow_to(exp)
        self.counts = self.counts + other_copy.counts
        super().merge(other)

    def sync(self, reduce: Reduce) -> None:
        exp = reduce(torch.where(self.batches > 0, self.range_exp, torch.tensor(-126)), "max")
        self._grow_to(int(exp))
        self.range_exp = exp
        self.counts = reduce(self.counts, "sum")
        super().sync(reduce)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), "counts": self.counts, "range_exp": self.range_exp}

    def _centers(self) -> torch.Tensor:
        edge = 2.0 ** int(self.range_exp)
        width = 2 * edge / self.bins
        return torch.linspace(-edge + width / 2, edge - width / 2, self.bins, dtype=torch.float64)

    def value_range(self, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
        low, high = (t.double() for t in super().value_range(scheme))
        if self.method is HistogramMethod.PERCENTILE:
            low, high = self._percentile_range(scheme, low, high)
        else:
            low, high = self._mse_range(scheme, low, high)
        return low.float(), high.float()

    def _percentile_range(self, scheme: Scheme, low: torch.Tensor, high: torch.Tensor):
        centers, counts = self._centers(), self.counts
        width = float(centers[1] - centers[0])
        fraction = self.percentile / 100.0
        if scheme is Scheme.SYMMETRIC:
            order = torch.argsort(centers.abs())
            cumulative = torch.cumsum(counts[order], 0) / counts.sum()
            index = int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=torch.float64)))
            amax = centers.abs()[order][min(index, self.bins - 1)] + width / 2
            amax = torch.minimum(amax, torch.maximum(-low, high))
            return -amax, amax
        cumulative = torch.cumsum(counts, 0) / counts.sum()
        tail = torch.tensor([1 - fraction, fraction], dtype=torch.float64)
        lo_index, hi_index = torch.searchsorted(cumulative, tail).clamp(max=self.bins - 1).tolist()
        return (torch.maximum(centers[lo_index] - width / 2, low), torch.minimum(centers[hi_index] + width / 2, high))

    def _mse_range(self, scheme: Scheme, low: torch.Tensor, high: torch.Tensor):
        centers, counts = self._centers(), self.counts
        fractions = torch.linspace(0.05, 1.0, 96, dtype=torch.float64)[:, None]
        if scheme is Scheme.SYMMETRIC:
            amax = torch.maximum(-low, high)
            lows, highs, levels = -amax * fractions, amax * fractions, 254
        else:
            lows, highs, levels = low * fractions, high * fractions, 255
        step = ((highs - lows) / levels).clamp_min(1e-12)
        clipped = torch.minimum(torch.maximum(centers, lows), highs)
        error = (centers - clipped) ** 2 + step**2 / 12
        best = int(torch.argmin((error * counts).sum(1)))
        return lows[best, 0], highs[best, 0]


def make_observer(config: QuantizationConfig, name: str = "") -> Observer:
    """The observer ``config.observer`` names, configured from ``config``.

    Example:
        >>> type(make_observer(QuantizationConfig(observer="histogram"), "fc1")).__name__
        'HistogramObserver'
    """
    if config.observer is ObserverKind.HISTOGRAM:
        return HistogramObserver(name, method=config.histogram_method, percentile=config.percentile)
    if config.observer is ObserverKind.MOVING_AVERAGE:
        return MovingAverageMinMaxObserver(name)
    return MinMaxObserver(name)
