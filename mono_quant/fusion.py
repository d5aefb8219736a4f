"""Conv2d + BatchNorm2d folding: an eval-mode BatchNorm that only ever sees one conv's output is an
affine map per output channel, so it folds exactly into that conv's weight and bias.

Detection is conservative. When ``torch.fx.symbolic_trace`` succeeds, a pair is folded only if the
graph shows the BatchNorm consuming the conv's output and nothing else consuming it; otherwise
only adjacent ``nn.Sequential`` children are considered. Either way each module must be called
and registered exactly once, carry no hooks, and the BatchNorm must use running statistics in
eval mode. Folded BatchNorms become ``FoldedBatchNorm`` (an ``nn.Identity``); a conv without a bias gains one.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import torch
from torch import nn

_TRAIN_MODE = "not folded into {conv}: BatchNorm2d is in train mode (call model.eval() to fold it)"


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` for every BatchNorm2d provably fed only by one Conv2d's output.

    Train/eval mode is not considered here (see ``fold_batchnorm``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        >>> conv_bn_pairs(model)
        [('0', '1')]
    """
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    modules = dict(model.named_modules())

    def candidate(conv_name: str, bn_name: str) -> bool:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        return (
            type(conv) is nn.Conv2d
            and type(bn) is nn.BatchNorm2d
            and bn.num_features == conv.out_channels
            and bn.running_mean is not None
            and bn.running_var is not None
            and registrations[id(conv)] == 1
            and registrations[id(bn)] == 1
            and not _has_hooks(conv)
            and not _has_hooks(bn)
        )

    pairs = _traced_pairs(model)
    if pairs is None:
        pairs = _sequential_pairs(model)
    return [(conv, bn) for conv, bn in pairs if candidate(conv, bn)]


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that conv.

    Returns ``(folded model, [(conv name, batchnorm name), ...])``. The input is untouched unless
    ``inplace=True``; BatchNorms in train mode are left as they are (their running statistics are
    still changing). Exact up to float rounding (the fold is computed in float64).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> folded, pairs = fold_batchnorm(model)
        >>> pairs, type(folded[1]).__name__, type(model[1]).__name__
        ([('0', '1')], 'FoldedBatchNorm', 'BatchNorm2d')
        >>> x = torch.randn(2, 1, 8, 8)
        >>> bool((folded(x) - model(x)).abs().max() < 1e-5)
        True
    """
    folded, notes = _fold(model if inplace else copy.deepcopy(model))
    return folded, [(conv, bn) for bn, (conv, done) in notes.items() if done]


def fold_batchnorm_notes(model: nn.Module) -> dict[str, str]:
    """Fold ``model`` in place; ``{batchnorm name: reason}`` for each conv->bn pair (for a report's skips).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> fold_batchnorm_notes(model)["1"][:14]
        'not folded int'
        >>> fold_batchnorm_notes(model.eval())
        {'1': 'folded into 0'}
    """
    _, notes = _fold(model)
    return {bn: f"folded into {conv}" if done else _TRAIN_MODE.format(conv=conv) for bn, (conv, done) in notes.items()}


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


def _fold(model: nn.Module) -> tuple[nn.Module, dict[str, tuple[str, bool]]]:
    notes: dict[str, tuple[str, bool]] = {}
    for conv_name, bn_name in conv_bn_pairs(model):
        bn = model.get_submodule(bn_name)
        if bn.training:
            notes[bn_name] = (conv_name, False)
            continue
        _fold_pair(model.get_submodule(conv_name), bn)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, FoldedBatchNorm(conv_name))
        notes[bn_name] = (conv_name, True)
    return model, notes


@torch.no_grad()
def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
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


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """Pairs read off the ``torch.fx`` graph, or ``None`` when the model does not trace."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable control flow, unsupported ops, ...: fall back to Sequential order
        return None
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Adjacent children of every ``nn.Sequential`` (which feeds each child only the previous output)."""
    pairs = []
    for name, module in model.named_modules():
        if type(module) is not nn.Sequential:
            continue
        children = list(module.named_children())
        prefix = f"{name}." if name else ""
        pairs += [(prefix + a, prefix + b) for (a, _), (b, _) in itertools.pairwise(children)]
    return pairs
