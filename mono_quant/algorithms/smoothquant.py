"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before static int8 calibration.

Static int8 quantizes a layer's input with one scale per tensor, so a few input channels far larger than the
rest (transformer outlier features) waste most of the 8 bits. For each proven ``ScaleSite`` (a source whose
output channels feed only the consumer layers, up to ops that commute with a per-channel scale; see
``graph.channel_scaling``), SmoothQuant divides input channel ``j`` by

    s_j = max|x_j| ** alpha / max over consumers |W[:, j]| ** (1 - alpha)

(folded into the source's weights and bias) and multiplies the consumers' weight columns by ``s_j``. The float
model computes the same function; the consumers' inputs are flatter and their weights (per output channel
int8) absorb the range. ``alpha`` (``QuantizationConfig.smoothquant``) sets how much moves: 0 none, 1 all.

Layers whose input has no provable source (in a post-LN transformer the LayerNorm output also feeds the
residual; a GELU sits before the FFN output projection) are not smoothed; ``Smoothing`` and the report's
notes count them. Nothing changes in the quantized layers or the file format: only float weights and biases
move before calibration, and the quantized model runs the same modules with no extra ops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.batches import ForwardFn, feed_batches, first_batch
from mono_quant.config import QuantizationConfig
from mono_quant.errors import CalibrationError, ConfigError
from mono_quant.graph.channel_scaling import (
    ScaleSite,
    consumer_features,
    find_scale_sites,
    flat_output,
    relative_error,
    scale_site,
)

_CHECK_TOLERANCE = 1e-3  # relative output change allowed after every site is scaled (float32 rounding: ~1e-6)
_TINY = 1e-5  # floor for activation and weight maxima (SmoothQuant's reference code clamps at 1e-5)


@dataclasses.dataclass(frozen=True)
class Smoothing:
    """What ``smooth`` did: the sites it scaled, and the layers it could not smooth (no proven source).

    Example:
        >>> print(Smoothing(0.5, [ScaleSite("0", ("1", "2"), 8)], ("3",)).note())
        SmoothQuant alpha=0.5: 2 of 3 layer(s) smoothed over 1 proven source(s); 1 not smoothed (no provable source): 3
    """

    alpha: float
    sites: list[ScaleSite]
    unproven: tuple[str, ...]
    reason: str = "no provable source"

    @property
    def smoothed(self) -> tuple[str, ...]:
        """The consumer layers whose inputs were smoothed."""
        return tuple(name for site in self.sites for name in site.consumers)

    def note(self) -> str:
        """One line for the quantization report."""
        total = len(self.smoothed) + len(self.unproven)
        line = f"SmoothQuant alpha={self.alpha:g}: {len(self.smoothed)} of {total} layer(s) smoothed over "
        line += f"{len(self.sites)} proven source(s)"
        if self.unproven:
            shown = ", ".join(self.unproven[:8]) + (", ..." if len(self.unproven) > 8 else "")
            line += f"; {len(self.unproven)} not smoothed ({self.reason}): {shown}"
        return line


def smoothing_scales(activation_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s_j = max|x_j|^alpha / max|W[:, j]|^(1 - alpha)`` over every consumer weight (float64); 1 where a
    channel never fired or has no weight.

    ``weights`` are ``[out, in, ...]`` (Linear or convolution weights, input channels on dimension 1).

    Example:
        >>> smoothing_scales(torch.tensor([4.0, 1.0, 0.0]), [torch.tensor([[1.0, 1.0, 1.0]])], 0.5).tolist()
        [2.0, 1.0, 1.0]
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} must be a migration strength in (0, 1)")
    if not weights:
        raise ConfigError("weights is empty; pass the weight of every layer fed by the smoothed channels")
    weight_max = torch.stack([_column_max(w) for w in weights]).amax(0)
    activation_max = activation_max.detach().to(device="cpu", dtype=torch.float64)
    if activation_max.shape != weight_max.shape:
        raise ConfigError(
            f"activation_max has {activation_max.numel()} channels; the weights have {weight_max.numel()}"
        )
    s = activation_max.clamp_min(_TINY) ** alpha / weight_max.clamp_min(_TINY) ** (1.0 - alpha)
    dead = (activation_max <= 0) | (weight_max <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s)


def smooth(
    model: nn.Module,
    layers: Sequence[str],
    alpha: float,
    calibration_data: Any,
    forward_fn: ForwardFn | None = None,
    max_batches: int | None = None,
) -> Smoothing:
    """Smooth the inputs of ``layers`` (module names) of ``model`` in place (pass a copy), with statistics from
    up to ``max_batches`` batches of ``calibration_data``; the model's function is unchanged.

    Layers that are not ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` (``groups=1``) or have no proven source are
    left as they are and listed in ``Smoothing.unproven``.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> data = [torch.randn(16, 8) for _ in range(2)]
        >>> before = model(data[0])
        >>> done = smooth(model, ["0", "2"], 0.5, data)
        >>> done.smoothed, done.unproven, bool(torch.allclose(model(data[0]), before, atol=1e-5))
        (('2',), ('0',), True)
    """
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha={alpha!r} must be a migration strength in (0, 1)")
    layers = list(layers)
    example = first_batch(calibration_data)
    scalable = [name for name in layers if consumer_features(model.get_submodule(name)) is not None]
    if example is None:
        reason = "calibration_data can be read only once (an iterator): no batch to prove sources on"
        return Smoothing(alpha, [], tuple(layers), reason)
    sites = find_scale_sites(model, scalable, example, forward_fn)
    if not sites:
        return Smoothing(alpha, [], tuple(layers))
    statistics = _input_maxima(model, sites, calibration_data, forward_fn, max_batches)
    before = flat_output(model, example, forward_fn)
    applied = []
    for site in sites:
        weights = [model.get_submodule(name).weight.detach() for name in site.consumers]
        s = smoothing_scales(statistics[site.consumers[0]].abs_max, weights, alpha)
        scale_site(model, site, s)
        applied.append((site, s))
    if relative_error(before, flat_output(model, example, forward_fn)) >= _CHECK_TOLERANCE:
        for site, s in reversed(applied):  # undo: the scaled model computes something else on this batch
            scale_site(model, site, 1.0 / s)
        reason = "the smoothed model's output differed on calibration batch 0, so nothing was smoothed"
        return Smoothing(alpha, [], tuple(layers), reason)
    smoothed = {name for site in sites for name in site.consumers}
    return Smoothing(alpha, sites, tuple(name for name in layers if name not in smoothed))


def smoothquant_notes(
    model: nn.Module,
    config: QuantizationConfig,
    layers: Sequence[str],
    calibration_data: Any,
    forward_fn: ForwardFn | None,
    activation_qparams: Mapping[str, Any] | None,
) -> list[str]:
    """``quantize``'s step: smooth ``layers`` of its copy when ``config.smoothquant`` is set; the report notes.

    Example:
        >>> smoothquant_notes(nn.Linear(2, 2), QuantizationConfig(), [], None, None, None)
        []
    """
    if config.smoothquant is None:
        return []
    if activation_qparams is not None:
        raise ConfigError(
            "smoothquant= changes the layers' inputs before calibration, so activation_qparams calibrated on the "
            "unsmoothed model do not apply; pass calibration_data instead (or drop smoothquant=)"
        )
    if calibration_data is None:
        raise CalibrationError("smoothquant= needs calibration_data (the activation ranges it migrates)")
    done = smooth(model, layers, config.smoothquant, calibration_data, forward_fn, config.calibration_batches)
    return [done.note()]


def _column_max(weight: torch.Tensor) -> torch.Tensor:
    """``max |W[:, j]|`` over every dimension but the input channels (dimension 1), float64."""
    magnitude = weight.detach().to(device="cpu", dtype=torch.float64).abs().transpose(0, 1)
    return magnitude.reshape(magnitude.shape[0], -1).amax(1)


def _input_maxima(
    model: nn.Module, sites: list[ScaleSite], data: Any, forward_fn: ForwardFn | None, max_batches: int | None
) -> dict[str, InputStatistics]:
    """Per-channel input statistics (no ``X^T X``) of each site's first consumer over the calibration batches."""
    statistics: dict[str, InputStatistics] = {}

    def hook(name: str, channels_first: bool) -> Callable[..., None]:
        def record(_module: nn.Module, args: tuple) -> None:
            if args and isinstance(args[0], torch.Tensor):
                x = args[0].movedim(1, -1) if channels_first else args[0]
                statistics[name].update(x)

        return record

    handles = []
    for site in sites:
        name = site.consumers[0]
        module = model.get_submodule(name)
        statistics[name] = InputStatistics(site.channels, hessian=False)
        handles.append(module.register_forward_pre_hook(hook(name, not isinstance(module, nn.Linear))))
    try:
        feed_batches(model, data, forward_fn, max_batches)
    finally:
        for handle in handles:
            handle.remove()
    return statistics
