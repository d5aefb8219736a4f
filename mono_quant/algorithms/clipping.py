"""Clipping search: each group's range shrunk by the ratio that rounds it with the least output error.

Round-to-nearest maps a group's ``[min, max]`` onto the integer grid; one outlier stretches the grid for the
whole group. Shrinking the range (``RATIOS``) clips the outlier and refines the grid for the rest. Which
ratio is best depends on what the layer's inputs do with each weight: with a Hessian block ``H_g`` (from
``InputStatistics``) the error of group ``g`` is ``d^T H_g d`` for the rounding change ``d`` (the layer's
output error on the calibration inputs, cross-group terms aside), the clipping step of AWQ (Lin et al., 2024).
"""

from __future__ import annotations

import torch

from mono_quant.config import Scheme
from mono_quant.qparams import QuantizedWeight, dequantize, quantize, scale_zero_point

RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5


def clipped_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, scheme: Scheme, group_size: int
) -> QuantizedWeight:
    """Group-wise ``bits``-bit values and scales of ``weight`` (``[rows, cols]``), each group's range clipped by
    the ratio in ``RATIOS`` with the least output error under ``hessian`` (``[cols, cols]``).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> w, x = torch.randn(16, 64), torch.randn(256, 64)
        >>> w[:, 0] = 8.0  # one outlier column
        >>> from mono_quant.qparams import dequantize_weight, quantize_weight
        >>> from mono_quant.config import Granularity
        >>> clipped = clipped_quantize(w, x.double().T @ x.double(), 4, Scheme.ASYMMETRIC, 32)
        >>> rtn = quantize_weight(w, 4, Scheme.ASYMMETRIC, Granularity.PER_GROUP, 32)
        >>> error = lambda qw: (x @ (dequantize_weight(qw) - w).T).norm()
        >>> bool(error(clipped) <= error(rtn))
        True
    """
    rows, cols = weight.shape
    groups = cols // group_size
    w = weight.detach().float().reshape(rows, groups, group_size)
    h = hessian.to(torch.float32)
    blocks = torch.stack([h[g * group_size : (g + 1) * group_size, g * group_size : (g + 1) * group_size]
                          for g in range(groups)])  # fmt: skip
    low, high = torch.aminmax(w, dim=-1)
    best_error = torch.full((rows, groups), float("inf"))
    best_scale, best_zero = None, None
    for ratio in RATIOS:
        scale, zero = scale_zero_point(low * ratio, high * ratio, bits, scheme)
        codes = quantize(w, scale[..., None], None if zero is None else zero[..., None], bits, scheme)
        change = dequantize(codes, scale[..., None], None if zero is None else zero[..., None]) - w
        error = torch.einsum("rgi,gij,rgj->rg", change, blocks, change)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scale = scale if best_scale is None else torch.where(better, scale, best_scale)
        if zero is not None:
            best_zero = zero if best_zero is None else torch.where(better, zero, best_zero)
    codes = quantize(w, best_scale[..., None], None if best_zero is None else best_zero[..., None], bits, scheme)
    return QuantizedWeight(codes.reshape(rows, cols), best_scale, best_zero)
