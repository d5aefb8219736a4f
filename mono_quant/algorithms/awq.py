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

import torch

from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.config import Granularity, Scheme
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
