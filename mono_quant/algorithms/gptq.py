"""GPTQ (Frantar et al., 2023): round a weight one input column at a time, pushing each column's rounding
error onto the columns not yet rounded, weighted by the inverse Hessian of the layer's output error.

The layer's output error on calibration inputs ``X`` is ``||X W^T - X Q^T||^2``; its Hessian over a row of
``W`` is ``H = 2 X^T X / n`` (``InputStatistics.hessian``). Rounding column ``j`` to ``q_j`` leaves an error
``e = (w_j - q_j) / [H^-1]_jj`` that the optimal update of the remaining columns cancels as far as the
inputs' correlations allow: ``W[:, j+1:] -= e [H^-1]_{j, j+1:}``. The upper Cholesky factor of ``H^-1`` gives
those rows directly; columns go in blocks of ``BLOCK`` with the far columns updated once per block.

Group scales (``[rows, cols / group]``, the int4 file layout) are computed from each group's values as they
stand when its first column comes up, after the updates from the groups before it, so the result is an
ordinary group-wise weight that every int4 kernel, file and exporter takes.

Damping: ``DAMP`` (1%) of the mean diagonal is added to ``H`` so that features the data never varies stay
well-conditioned; a feature that was always 0 keeps its rounded weight (it never reaches the output).
"""

from __future__ import annotations

import torch

from mono_quant.config import Granularity, Scheme
from mono_quant.qparams import QuantizedWeight, dequantize, quantize, quantize_weight, scale_zero_point

DAMP = 0.01
BLOCK = 128


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    scheme: Scheme,
    group_size: int,
    damp: float = DAMP,
    static_groups: QuantizedWeight | None = None,
    act_order: bool = False,
) -> QuantizedWeight:
    """Group-wise ``bits``-bit values and scales for ``weight`` (``[rows, cols]``) that minimize the output
    error under ``hessian`` (``[cols, cols]``, e.g. ``InputStatistics.hessian()``).

    ``act_order`` rounds columns in order of decreasing ``H`` diagonal (input energy); the group ranges are then
    ``static_groups``' (default: each group's min/max in ``weight``), fixed before any update.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x, w = torch.randn(512, 64) * torch.linspace(0.1, 3, 64), torch.randn(16, 64)
        >>> q = gptq_quantize(w, 2 * x.double().T @ x.double() / 512, 4, Scheme.ASYMMETRIC, 32)
        >>> from mono_quant.qparams import dequantize_weight, quantize_weight
        >>> from mono_quant.config import Granularity
        >>> rtn = quantize_weight(w, 4, Scheme.ASYMMETRIC, Granularity.PER_GROUP, 32)
        >>> error = lambda qw: (x @ (dequantize_weight(qw) - w).T).norm()
        >>> bool(error(q) < error(rtn)), q.scale.shape
        (True, torch.Size([16, 2]))
    """
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group_size={group_size} does not divide the weight's {cols} columns")
    if act_order and static_groups is None:  # permuted columns cannot take each group's range as it comes up
        static_groups = quantize_weight(weight, bits, scheme, Granularity.PER_GROUP, group_size)
    w = weight.detach().to(torch.float64).clone()
    h = hessian.to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damp * torch.diagonal(h).mean())
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(cols)
    if act_order:
        w, h = w[:, perm], h[perm][:, perm]
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    groups = cols // group_size
    if static_groups is not None:
        scale, zero_point = static_groups.scale, static_groups.zero_point
    else:
        scale = torch.empty(rows, groups, dtype=torch.float32)
        zero_point = torch.empty(rows, groups, dtype=torch.int8) if scheme is Scheme.ASYMMETRIC else None
    q = torch.empty(rows, cols, dtype=torch.int8)
    block = max(BLOCK // group_size, 1) * group_size  # whole groups per block: a group's values are all current
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w_block, errors = w[:, start:end], torch.zeros(rows, end - start, dtype=torch.float64)
        h_block = hinv[start:end, start:end]
        for i in range(end - start):
            column = int(perm[start + i])
            if static_groups is not None:
                group = column // group_size
                s, z = scale[:, group], None if zero_point is None else zero_point[:, group]
            elif column % group_size == 0:
                group = column // group_size
                values = w_block[:, i : i + group_size]
                s, z = scale_zero_point(values.amin(1), values.amax(1), bits, scheme)
                scale[:, group] = s
                if zero_point is not None:
                    zero_point[:, group] = z
            codes = quantize(w_block[:, i], s, z, bits, scheme)
            q[:, column] = codes
            rounded = dequantize(codes, s, z).double()  # what the kernels compute: float32 scales
            error = (w_block[:, i] - rounded) / h_block[i, i]
            w_block[:, i:].sub_(error[:, None] * h_block[i, i:][None, :])
            errors[:, i] = error
        w[:, end:].sub_(errors @ hinv[start:end, end:])
    return QuantizedWeight(q, scale, zero_point)
