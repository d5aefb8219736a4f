"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): rescale conv/linear pairs so that
each channel between them has the same weight range on both sides, with the float model's output unchanged.

For a pair ``A -> (ReLU or nothing) -> B`` where ``A``'s output goes nowhere else, dividing ``A``'s output
channel ``j`` (weight row and bias) by ``s_j > 0`` and multiplying ``B``'s input channel ``j`` (weight
column) by ``s_j`` leaves ``B``'s output unchanged (ReLU is positively homogeneous). ``s_j = sqrt(r1_j /
r2_j)`` (``r1``: the range of ``A``'s row ``j``, ``r2``: of ``B``'s column ``j``) gives both the range
``sqrt(r1_j * r2_j)``. ReLU6, residual adds and any other reader of ``A``'s output break the invariance.

Pairs are the conv/linear sites ``graph.channel_scaling`` proves by data flow (never by module order or
type). The equalized model is checked once more as a whole and restored if it moved.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mono_quant.batches import ForwardFn
from mono_quant.graph.channel_scaling import (
    ScaleSite,
    consumer_features,
    find_scale_sites,
    flat_output,
    relative_error,
    scale_site,
)

ITERATIONS = 4  # sweeps over all pairs: chains (A -> B -> C) converge in a few
TOLERANCE = 1e-4  # relative output change that still counts as "unchanged" (float rounding)
_Layer = nn.Linear | nn.Conv1d | nn.Conv2d


def equalize_pairs(model: nn.Module, example: Any, forward_fn: ForwardFn | None = None) -> list[tuple[str, str]]:
    """Equalize every proven ``A -> (ReLU) -> B`` pair of ``model`` in place; the ``(A, B)`` names equalized.

    ``example`` is a batch ``model`` (or ``forward_fn(model, example)``) runs on. The model's output on it is
    unchanged up to float rounding; refused candidates keep their weights bit for bit.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.ReLU6(), nn.Conv2d(4, 2, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight[0].mul_(100.0)
        >>> x = torch.randn(2, 3, 8, 8)
        >>> before = net(x)
        >>> equalize_pairs(net, x)
        [('0', '2')]
        >>> bool(torch.allclose(net(x), before, rtol=1e-4, atol=1e-5))
        True
    """
    consumers = [name for name, module in model.named_modules() if consumer_features(module) is not None]
    sites = [
        site
        for site in find_scale_sites(model, consumers, example, forward_fn)
        if isinstance(model.get_submodule(site.source), _Layer)
    ]
    if not sites:
        return []
    with torch.no_grad():
        reference = flat_output(model, example, forward_fn)
        applied = []
        for _ in range(ITERATIONS):
            for site in sites:
                scale = equalizing_scale(model, site)
                scale_site(model, site, scale)
                applied.append((site, scale))
        if relative_error(reference, flat_output(model, example, forward_fn)) > TOLERANCE:
            for site, scale in reversed(applied):  # sites that interact in ways one at a time missed
                scale_site(model, site, 1.0 / scale)
            return []
    return [(site.source, consumer) for site in sites for consumer in site.consumers]


def equalizing_scale(model: nn.Module, site: ScaleSite) -> torch.Tensor:
    """Nagel's ``s = sqrt(r1 / r2)`` for ``site``: ``r1`` the range of each source output channel's weights,
    ``r2`` the largest range of that input channel over the consumers (``1`` where either is 0).

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 1.0]]))
        ...     _ = net[1].weight.copy_(torch.ones(2, 2))
        >>> equalizing_scale(net, ScaleSite("0", ("1",), 2))
        tensor([10.,  1.])
    """
    source = model.get_submodule(site.source).weight.detach()
    r1 = source.abs().flatten(1).amax(1).double()
    r2 = torch.stack([
        model.get_submodule(name).weight.detach().abs().transpose(0, 1).flatten(1).amax(1).double()
        for name in site.consumers
    ]).amax(0)
    usable = (r1 > 0) & (r2 > 0)
    return torch.where(usable, (r1 / r2.clamp_min(1e-30)).sqrt(), torch.ones_like(r1)).float()


def equalization_note(pairs: list[tuple[str, str]]) -> str:
    """The report line for ``equalize=True``.

    Example:
        >>> equalization_note([("0", "2")])
        'equalize: 1 conv/linear pair(s) equalized (cross-layer equalization): 0->2'
    """
    shown = ", ".join(f"{a}->{b}" for a, b in pairs[:8]) + (" ..." if len(pairs) > 8 else "")
    if not pairs:
        return "equalize: no conv/linear pair passed the data-flow check (ReLU6, residual adds, other readers)"
    return f"equalize: {len(pairs)} conv/linear pair(s) equalized (cross-layer equalization): {shown}"
