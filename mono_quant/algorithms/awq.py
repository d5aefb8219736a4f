"""AWQ's scaling step (Lin et al., 2024): protect the weights that meet large activations by scaling them up.

Multiplying input feature ``j`` of a layer's weight by ``s_j`` and dividing the feature itself by ``s_j``
(folded into the module that produces it: ``graph.channel_scaling``) leaves the float output unchanged, but
rounding now errs relatively less on the scaled-up columns. AWQ takes ``s = mean|x|^alpha`` and searches
``alpha`` on a grid; each candidate is judged by the layers' output error on the calibration inputs,
``tr(D H D^T)`` for the rounding change ``D`` of each weight (``H = 2 X^T X / n`` from ``InputStatistics``),
so no inputs need to be kept. ``alpha = 0`` is plain rounding: the search never does worse than it on the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.batches import ForwardFn, ReachedLayer, feed_batches, first_batch
from mono_quant.config import Granularity, QuantizationConfig, Scheme, WeightAlgorithm
from mono_quant.graph.channel_scaling import find_scale_sites, scale_site
from mono_quant.modules.int4_weight import group_size_for
from mono_quant.qparams import dequantize_weight, quantize_weight

GRID = 20  # alpha in 0, 0.05, ..., 0.95


def output_error(change: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr(D H D^T)``: the output error a weight change ``D`` makes on inputs with Hessian ``H``.

    Example:
        >>> output_error(torch.ones(2, 3), torch.eye(3))
        6.0
    """
    change = change.double()
    return float(((change @ hessian.double()) * change).sum())


def awq_scales(
    weights: Sequence[torch.Tensor], statistics: InputStatistics, scheme: Scheme, group_size: int
) -> tuple[torch.Tensor, float]:
    """The per-feature scale ``s`` (and its ``alpha``) for layers ``weights`` that share the input described by
    ``statistics``; the caller multiplies the weights' columns by ``s`` and divides the input by it.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(512, 64) * torch.cat([torch.full((4,), 20.0), torch.ones(60)])  # 4 loud features
        >>> stats = InputStatistics(64)
        >>> stats.update(x)
        >>> s, alpha = awq_scales([torch.randn(32, 64)], stats, Scheme.ASYMMETRIC, 32)
        >>> alpha > 0, bool(s[:4].min() > s[4:].max())
        (True, True)
    """
    hessian = statistics.hessian()
    magnitude = statistics.mean_abs().float().clamp_min(1e-8)
    best, best_scale, best_alpha = float("inf"), torch.ones_like(magnitude), 0.0
    for step in range(GRID):
        alpha = step / GRID
        scale = magnitude.pow(alpha)
        scale = scale / (scale.max() * scale.min()).sqrt()  # centred on 1: neither overflows nor underflows
        error = 0.0
        for weight in weights:
            scaled = weight.detach().float() * scale
            rounded = quantize_weight(scaled, 4, scheme, Granularity.PER_GROUP, group_size)
            error += output_error(dequantize_weight(rounded) / scale - weight.detach().float(), hessian)
        if error < best:
            best, best_scale, best_alpha = error, scale, alpha
    return best_scale, best_alpha


def awq_notes(
    model: nn.Module,
    config: QuantizationConfig,
    layers: Sequence[str],
    calibration_data: Any,
    forward_fn: ForwardFn | None,
) -> list[str]:
    """``quantize``'s step for ``algorithm="awq"``: scale the inputs of ``layers`` (int4 Linear layers of its copy)
    wherever a proven source can take ``1/s`` (``graph.channel_scaling``); returns the report's note.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> config = QuantizationConfig(dtype="int4", algorithm="awq", group_size=32)
        >>> awq_notes(model, config, ["0", "2"], [torch.randn(32, 64)], None)[0][:45]
        'AWQ scaling: 1 of 2 layer(s) over 1 proven so'
    """
    if config.algorithm is not WeightAlgorithm.AWQ or not layers:
        return []
    example = first_batch(calibration_data)
    linear = [name for name in layers if isinstance(model.get_submodule(name), nn.Linear)]
    sites = find_scale_sites(model, linear, example, forward_fn) if example is not None else []
    alphas = []
    for site in sites:
        statistics = InputStatistics(site.channels)

        def record(_module: nn.Module, args: tuple, statistics: InputStatistics = statistics) -> None:
            statistics.update(args[0])
            raise ReachedLayer

        handle = model.get_submodule(site.consumers[0]).register_forward_pre_hook(record)
        try:
            feed_batches(model, calibration_data, forward_fn, config.calibration_batches)
        finally:
            handle.remove()
        group = group_size_for(site.channels, config.group_size)
        if group is None:
            continue
        weights = [model.get_submodule(name).weight.detach() for name in site.consumers]
        scale, alpha = awq_scales(weights, statistics, config.scheme, group)
        scale_site(model, site, scale)
        alphas.append(alpha)
    scaled = sum(len(site.consumers) for site in sites)
    alpha_range = f", alpha {min(alphas):.2f}-{max(alphas):.2f}" if alphas else ""
    return [
        f"AWQ scaling: {scaled} of {len(layers)} layer(s) over {len(sites)} proven source(s){alpha_range}; the "
        "others have no source that takes a per-channel scale exactly (a residual add, a GELU): clipping only"
    ]
