"""``FoldedBatchNorm``, what a BatchNorm2d folded into a conv becomes, and the fold itself.

Layer-level pieces that both ``fusion`` (which proves pairs) and the file format (which folds a fresh
skeleton the way a file records) need.
"""

from __future__ import annotations

import torch
from torch import nn


def fold_pairs(model: nn.Module, pairs: dict[str, str]) -> None:
    """Fold each BatchNorm named in ``pairs`` (batchnorm name -> conv name) into its conv, in place, as a
    file records them (no detection); raises ``ValueError`` naming a pair that is not a conv and a BatchNorm.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> fold_pairs(model, {"1": "0"})
        >>> type(model[1]).__name__
        'FoldedBatchNorm'
    """
    modules = dict(model.named_modules())
    for bn_name, conv_name in pairs.items():
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        if isinstance(bn, FoldedBatchNorm) and bn.into == conv_name:
            continue  # the model was folded already
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)):
            raise ValueError(f"{bn_name!r} -> {conv_name!r} is not a BatchNorm2d folded into a Conv2d in this model")
        fold_pair(conv, bn)
        model.set_submodule(bn_name, FoldedBatchNorm(conv_name))


class FoldedBatchNorm(nn.Identity):
    """What a folded BatchNorm becomes: an identity that remembers which conv absorbed it (files record it).

    Example:
        >>> FoldedBatchNorm("features.0")
        FoldedBatchNorm(folded into 'features.0')
    """

    def __init__(self, into: str) -> None:
        super().__init__()
        self.into = into

    def extra_repr(self) -> str:
        return f"folded into {self.into!r}"


@torch.no_grad()
def fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """``bn(conv(x)) == conv'(x)`` with ``w' = w * g / sqrt(v + eps)``, ``b' = (b - m) * g / sqrt(v + eps) + beta``."""
    weight = conv.weight
    factor = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        factor = factor * bn.weight.double()
    bias = torch.zeros(conv.out_channels, dtype=torch.float64, device=weight.device)
    if conv.bias is not None:
        bias = conv.bias.double()
    bias = (bias - bn.running_mean.double()) * factor
    if bn.bias is not None:
        bias = bias + bn.bias.double()
    new_weight = (weight.double() * factor.reshape(-1, 1, 1, 1)).to(weight.dtype)
    conv.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    conv.bias = nn.Parameter(bias.to(weight.dtype), requires_grad=weight.requires_grad)
