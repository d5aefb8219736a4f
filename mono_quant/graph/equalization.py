"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization"): rescale conv/linear pairs so that
each channel between them has the same weight range on both sides, with the float model's output unchanged.

For a pair ``A -> (ReLU or nothing) -> B`` where ``A``'s output goes nowhere else, dividing ``A``'s output
channel ``j`` (weight row and bias) by ``s_j > 0`` and multiplying ``B``'s input channel ``j`` (weight
column) by ``s_j`` leaves ``B``'s output unchanged (ReLU is positively homogeneous). ``s_j = sqrt(r1_j /
r2_j)`` (``r1``: the range of ``A``'s row ``j``, ``r2``: of ``B``'s column ``j``) gives both the range
``sqrt(r1_j * r2_j)``. ReLU6, residual adds and any other reader of ``A``'s output break the invariance.

Pairs are proven by data flow, never by module order or type: ``A`` is the nearest module executed before
``B`` whose output channels match ``B``'s input channels (call order recorded with hooks), and the pair is
kept only if random power-of-two scales (exact in floating point) leave the model's output on the example
batch unchanged. The equalized model is checked once more as a whole and restored if it moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mono_quant.batches import default_forward

ITERATIONS = 4  # sweeps over all pairs: chains (A -> B -> C) converge in a few
TOLERANCE = 1e-4  # relative output change that still counts as "unchanged" (float rounding)
_CHECK_ROWS = 2  # rows of the example batch the data-flow checks run on (power-of-two probes are exact: 2 suffice)
_Layer = nn.Linear | nn.Conv1d | nn.Conv2d


def equalize_pairs(
    model: nn.Module, example: Any, forward_fn: Callable[[nn.Module, Any], Any] | None = None
) -> list[tuple[str, str]]:
    """Equalize every proven ``A -> (ReLU) -> B`` pair of ``model`` in place; the ``(A, B)`` names equalized.

    ``example`` is a batch ``model`` (or ``forward_fn(model, example)``) runs on. The model's output on it is
    unchanged up to float rounding; refused candidates keep their weights bit for bit.

    Example:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
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
    run = _runner(model, example, forward_fn)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            reference = run()
            pairs = [pair for pair in candidate_pairs(model, run) if _proven(model, pair, run, reference)]
            if not pairs:
                return []
            saved = {name: _state(model.get_submodule(name)) for pair in pairs for name in pair}
            for _ in range(ITERATIONS):
                for first, second in pairs:
                    equalize_pair(model.get_submodule(first), model.get_submodule(second))
            if _relative_change(run(), reference) > TOLERANCE:  # pairs that interact in ways one at a time missed
                for name, state in saved.items():
                    _restore(model.get_submodule(name), state)
                return []
            return pairs
    finally:
        model.train(was_training)


def candidate_pairs(model: nn.Module, run: Callable[[], Any]) -> list[tuple[str, str]]:
    """``(A, B)`` names where ``A`` is the nearest layer executed before ``B`` with as many output channels as
    ``B`` has input channels (one forward through ``run``, call order recorded); layers called more than once
    and unsupported ``B`` (grouped, depthwise) are left out.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 2))
        >>> candidate_pairs(net, lambda: net(torch.randn(3, 4)))
        [('0', '2'), ('2', '3')]
    """
    calls: list[str] = []
    layers = {name: m for name, m in model.named_modules() if isinstance(m, _Layer) and _weight(m) is not None}
    handles = [m.register_forward_pre_hook(lambda _m, _a, n=name: calls.append(n)) for name, m in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    once = [name for name in calls if calls.count(name) == 1]
    pairs = []
    for index, second in enumerate(once):
        if not _supported_second(layers[second]):
            continue
        width = _in_channels(layers[second])
        first = next((name for name in reversed(once[:index]) if _out_channels(layers[name]) == width), None)
        if first is not None:
            pairs.append((first, second))
    return pairs


def equalize_pair(first: nn.Module, second: nn.Module) -> torch.Tensor:
    """Scale ``first``'s output channels by ``1/s`` and ``second``'s input channels by ``s`` (Nagel's
    ``s = sqrt(r1 / r2)``), so both ranges become ``sqrt(r1 * r2)``; returns ``s``.

    Example:
        >>> a, b = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     _ = a.weight.copy_(torch.tensor([[100.0, 0.0], [0.0, 1.0]]))
        ...     _ = b.weight.copy_(torch.tensor([[1.0, 1.0], [1.0, 1.0]]))
        >>> equalize_pair(a, b)
        tensor([10.,  1.])
        >>> a.weight.detach().abs().amax(1), b.weight.detach().abs().amax(0)
        (tensor([10.,  1.]), tensor([10.,  1.]))
    """
    r1 = _weight(first).detach().abs().flatten(1).amax(1).double()
    r2 = _weight(second).detach().abs().transpose(0, 1).flatten(1).amax(1).double()
    usable = (r1 > 0) & (r2 > 0)
    scale = torch.where(usable, (r1 / r2.clamp_min(1e-30)).sqrt(), torch.ones_like(r1)).float()
    _scale_channels(first, second, scale)
    return scale


def _scale_channels(first: nn.Module, second: nn.Module, scale: torch.Tensor) -> None:
    """``first``'s output channel ``j`` divided by ``scale[j]``, ``second``'s input channel ``j`` multiplied."""
    with torch.no_grad():
        weight = _weight(first)
        weight.div_(scale.to(weight).reshape(-1, *[1] * (weight.dim() - 1)))
        bias = getattr(first, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(scale.to(bias))
        weight = _weight(second)
        weight.mul_(scale.to(weight).reshape(1, -1, *[1] * (weight.dim() - 2)))


def _proven(model: nn.Module, pair: tuple[str, str], run: Callable[[], Any], reference: Any) -> bool:
    """Whether random powers of two on the pair's channels leave the output unchanged; restored either way."""
    first, second = (model.get_submodule(name) for name in pair)
    saved = [_state(first), _state(second)]
    generator = torch.Generator().manual_seed(0)
    exponents = torch.randint(-4, 5, (_out_channels(first),), generator=generator)
    exponents[exponents == 0] = 3  # every channel moves
    try:
        _scale_channels(first, second, torch.pow(2.0, exponents.float()))
        return _relative_change(run(), reference) <= TOLERANCE
    except RuntimeError:  # shapes that do not pair up after all
        return False
    finally:
        _restore(first, saved[0])
        _restore(second, saved[1])


def _relative_change(output: Any, reference: Any) -> float:
    """Largest ``||out - ref|| / ||ref||`` over the floating-point tensors of two (nested) outputs."""
    outs, refs = _tensors(output), _tensors(reference)
    if len(outs) != len(refs) or not refs:
        return math.inf
    worst = 0.0
    for out, ref in zip(outs, refs, strict=True):
        if out.shape != ref.shape:
            return math.inf
        norm = float(torch.linalg.vector_norm(ref.double()))
        change = float(torch.linalg.vector_norm((out - ref).double()))
        if not math.isfinite(change):
            return math.inf
        worst = max(worst, change / norm if norm > 0 else change)
    return worst


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value.detach()] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _runner(model: nn.Module, example: Any, forward_fn: Callable[[nn.Module, Any], Any] | None) -> Callable[[], Any]:
    if isinstance(example, torch.Tensor) and example.dim() > 1:
        example = example[:_CHECK_ROWS]
    forward = forward_fn or default_forward
    return lambda: forward(model, example)


def _weight(module: nn.Module) -> torch.Tensor | None:
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.is_floating_point() else None


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _in_channels(module: nn.Module) -> int:
    return module.in_features if isinstance(module, nn.Linear) else module.in_channels


def _supported_second(module: nn.Module) -> bool:
    """A Linear, or a convolution with ``groups=1`` (a depthwise one would carry the scale to its output)."""
    return isinstance(module, nn.Linear) or getattr(module, "groups", 1) == 1


def _state(module: nn.Module) -> list[torch.Tensor | None]:
    bias = getattr(module, "bias", None)
    return [_weight(module).detach().clone(), bias.detach().clone() if isinstance(bias, torch.Tensor) else None]


def _restore(module: nn.Module, state: list[torch.Tensor | None]) -> None:
    with torch.no_grad():
        _weight(module).copy_(state[0])
        if state[1] is not None:
            module.bias.copy_(state[1])


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
