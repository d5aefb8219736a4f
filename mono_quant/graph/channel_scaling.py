"""Channel scaling proven by data flow: divide one module's output channels by ``s``, multiply the input
channels of the layers it feeds by ``s``, and the model computes the same function.

A ``ScaleSite`` names such a pair: a ``source`` (``nn.Linear`` rows and bias, a convolution's output
channels and bias, a ``LayerNorm``/RMSNorm-like affine ``weight`` and ``bias``) and the ``consumers``
(``nn.Linear``, ``nn.Conv1d``/``nn.Conv2d`` with ``groups=1``) that all take the same input tensor.
SmoothQuant and AWQ pick ``s``; this module only finds and applies sites.

Sites are never assumed from module order or names. ``find_scale_sites`` groups the consumers by the input
tensor they receive in one recorded forward of an example batch, looks at the nearest few modules that
finished before the group was called and have a matching channel count, and *proves* each candidate: a
seeded random ``s`` in ``[0.5, 2]`` is applied, the example batch runs again, and the model's output must
match the unscaled one (relative error below ``PROOF_TOLERANCE``); otherwise the weights are restored
bit-exactly. Ops that commute with a positive per-channel scale between source and consumers (ReLU,
dropout in eval, attention's softmax-weighted sum over a value projection, reshapes) pass; a GELU, a
residual add or a normalization in between fails.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mono_quant.batches import ForwardFn, default_forward
from mono_quant.copying import eval_mode
from mono_quant.errors import QuantizationError

PROOF_TOLERANCE = 1e-4  # relative output error allowed for a proven site (float32 rounding is ~1e-7)
NEAREST_CANDIDATES = 3  # how many earlier modules with the right channel count are tried as a source...
LOOK_BACK = 6  # ...among this many leaf modules that returned last before the consumers were called
_PROOF_SEED = 0x5CA1E


@dataclasses.dataclass(frozen=True)
class ScaleSite:
    """Dividing the output channels of ``source`` by a positive ``s`` (``channels`` long) and multiplying the
    input channels of every module in ``consumers`` by ``s`` leaves the model's output unchanged.

    Example:
        >>> ScaleSite("0", ("2",), 8)
        ScaleSite(source='0', consumers=('2',), channels=8)
    """

    source: str
    consumers: tuple[str, ...]
    channels: int


def source_channels(module: nn.Module) -> int | None:
    """How many output channels ``module`` can have scaled (``None``: not a scalable source).

    Example:
        >>> source_channels(nn.Linear(4, 6)), source_channels(nn.LayerNorm(5)), source_channels(nn.GELU())
        (6, 5, None)
    """
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.out_channels
    if isinstance(module, nn.LayerNorm):
        affine = module.elementwise_affine and len(module.normalized_shape) == 1
        return module.normalized_shape[0] if affine else None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if isinstance(module, nn.Embedding) or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape):
        return None
    return weight.shape[0]  # norm-like: RMSNorm, GroupNorm, eval-mode BatchNorm (the proof decides)


def consumer_features(module: nn.Module) -> int | None:
    """How many input channels ``module`` can have scaled (``None``: not a scalable consumer).

    Example:
        >>> consumer_features(nn.Linear(4, 6)), consumer_features(nn.Conv2d(8, 8, 3, groups=8))
        (4, None)
    """
    if isinstance(module, nn.Linear):
        return module.in_features
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1:
        return module.in_channels
    return None


def scale_site(model: nn.Module, site: ScaleSite, s: torch.Tensor) -> None:
    """Apply ``s`` in place: ``site.source``'s output channels divided by ``s``, every consumer's input channels
    multiplied by it (computed in float64). Pass a copy (``quantize`` passes its own), never the user's model.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> x = torch.randn(5, 4)
        >>> before = model(x)
        >>> scale_site(model, ScaleSite("0", ("2",), 3), torch.tensor([0.5, 2.0, 4.0]))
        >>> bool(torch.allclose(model(x), before, atol=1e-6))
        True
    """
    if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.numel() != site.channels:
        shape = list(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
        raise QuantizationError(f"s must be a 1-D tensor of {site.channels} scales for {site.source!r}; got {shape}")
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        raise QuantizationError(f"s for source {site.source!r} must be finite and positive")
    source = _module(model, site.source, "site.source")
    consumers = [_module(model, name, "site.consumers") for name in site.consumers]
    if source_channels(source) != site.channels:
        kind = type(source).__name__
        raise QuantizationError(f"site.source {site.source!r} ({kind}) has no {site.channels} scalable outputs")
    for name, consumer in zip(site.consumers, consumers, strict=True):
        if consumer_features(consumer) != site.channels:
            kind = type(consumer).__name__
            raise QuantizationError(f"site.consumers {name!r} ({kind}) has no {site.channels} scalable inputs")
    s = s.detach().to(device="cpu", dtype=torch.float64)
    with torch.no_grad():
        weight = source.weight
        _rescale(weight, 1.0 / s.view(-1, *([1] * (weight.dim() - 1))))
        if getattr(source, "bias", None) is not None:
            _rescale(source.bias, 1.0 / s)
        for consumer in consumers:
            weight = consumer.weight
            _rescale(weight, s.view(1, -1, *([1] * (weight.dim() - 2))))


def find_scale_sites(
    model: nn.Module, consumers: Sequence[str], example_batch: Any, forward_fn: ForwardFn | None = None
) -> list[ScaleSite]:
    """The proven ``ScaleSite``s for ``consumers`` (module names), from one recorded forward of ``example_batch``.

    Consumers are grouped by the input tensor they receive (a transformer's q/k/v projections form one
    group); each group gets the first of its nearest ``NEAREST_CANDIDATES`` scalable modules with the group's
    channel count among the ``LOOK_BACK`` leaf modules that returned last before the group was called, that
    passes the proof (see the module docstring). Consumers without a proven
    source are left out. ``model`` is left exactly as it was (weights restored bit-exactly after each proof).

    Example:
        >>> torch.manual_seed(0) and None
        >>> model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4), nn.GELU())
        >>> _ = model.append(nn.Linear(4, 2))
        >>> find_scale_sites(model, ["1", "3", "5"], torch.randn(16, 8))
        [ScaleSite(source='0', consumers=('1',), channels=8), ScaleSite(source='1', consumers=('3',), channels=8)]
    """
    if isinstance(consumers, str) or not all(isinstance(name, str) for name in consumers):
        raise QuantizationError(f"consumers must be a sequence of module names; got {consumers!r}")
    for name in consumers:
        if consumer_features(_module(model, name, "consumers")) is None:
            module = model.get_submodule(name)
            raise QuantizationError(
                f"consumers entry {name!r} is a {type(module).__name__}; expected nn.Linear or nn.Conv1d/nn.Conv2d "
                "with groups=1"
            )
    if example_batch is None:
        raise QuantizationError("example_batch=None: sites are proven on one batch the model accepts")
    finished, calls, inputs, started, reference = _record(model, list(consumers), example_batch, forward_fn)
    modules = dict(model.named_modules())
    sites = []
    for group in _groups(inputs):
        channels = consumer_features(modules[group[0]])
        before = finished[: min(started[name] for name in group)][-LOOK_BACK:]
        candidates = [
            name
            for name in reversed(before)
            if name not in group and calls[name] == 1 and source_channels(modules[name]) == channels
        ][:NEAREST_CANDIDATES]
        for source in candidates:
            site = ScaleSite(source, group, channels)
            if _proven(model, site, example_batch, forward_fn, reference):
                sites.append(site)
                break
    return sites


def _module(model: nn.Module, name: str, argument: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise QuantizationError(f"{argument} names {name!r}, which is not a submodule of the model") from None


def _rescale(tensor: torch.Tensor, factor: torch.Tensor) -> None:
    tensor.copy_((tensor.double() * factor.to(tensor.device)).to(tensor.dtype))


def _record(
    model: nn.Module, consumers: list[str], example: Any, forward_fn: ForwardFn | None
) -> tuple[list[str], Counter[str], dict[str, torch.Tensor], dict[str, int], torch.Tensor]:
    """One forward: leaf module names in the order their forward returned, call counts, each consumer's first
    input (in call order), how many modules had returned when it was called, and the flat output."""
    finished: list[str] = []
    calls: Counter[str] = Counter()
    inputs: dict[str, torch.Tensor] = {}
    started: dict[str, int] = {}
    wanted = set(consumers)

    def leave(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, _output: Any) -> None:
            calls[name] += 1
            finished.append(name)

        return hook

    def enter(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple) -> None:
            if name not in inputs and args and isinstance(args[0], torch.Tensor):
                inputs[name] = args[0].detach().clone()
                started[name] = len(finished)

        return hook

    handles = []
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:
            handles.append(module.register_forward_hook(leave(name)))
        if name in wanted:
            handles.append(module.register_forward_pre_hook(enter(name)))
    try:
        output = flat_output(model, example, forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    return finished, calls, inputs, started, output


def _groups(inputs: dict[str, torch.Tensor]) -> list[tuple[str, ...]]:
    """Consumers (in call order) grouped by equal recorded inputs."""
    groups: list[tuple[str, ...]] = []
    placed: set[str] = set()
    for name, x in inputs.items():
        if name in placed:
            continue
        same = tuple(n for n, y in inputs.items() if n not in placed and y.shape == x.shape and torch.equal(x, y))
        placed.update(same)
        groups.append(same)
    return groups


def flat_output(model: nn.Module, example_batch: Any, forward_fn: ForwardFn | None = None) -> torch.Tensor:
    """Every floating-point tensor of ``model``'s output on ``example_batch`` (eval mode, no grad), flattened, float64.

    Example:
        >>> flat_output(nn.Linear(3, 2), torch.zeros(4, 3)).shape
        torch.Size([8])
    """
    example = example_batch
    with torch.no_grad(), eval_mode(model):
        return _flat((forward_fn or default_forward)(model, example))


def _flat(output: Any) -> torch.Tensor:
    """Every floating-point tensor in a model's output (tensors, tuples, dicts, ``ModelOutput``), flattened."""
    if isinstance(output, torch.Tensor):
        return output.detach().double().reshape(-1) if output.is_floating_point() else torch.zeros(0)
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    parts = [_flat(value) for value in values]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _proven(
    model: nn.Module, site: ScaleSite, example: Any, forward_fn: ForwardFn | None, reference: torch.Tensor
) -> bool:
    """Whether a random ``s`` at ``site`` keeps the output on ``example``; the weights are restored either way."""
    touched = [model.get_submodule(name) for name in (site.source, *site.consumers)]
    saved = [(t, t.detach().clone()) for m in touched for t in (m.weight, getattr(m, "bias", None)) if t is not None]
    generator = torch.Generator().manual_seed(_PROOF_SEED)
    s = 0.5 * 4.0 ** torch.rand(site.channels, generator=generator, dtype=torch.float64)  # log-uniform in [0.5, 2]
    try:
        scale_site(model, site, s)
        scaled = flat_output(model, example, forward_fn)
    except Exception:  # a source whose weight cannot be rescaled in place, a shape the model refuses...
        return False
    finally:
        with torch.no_grad():
            for tensor, copy in saved:
                tensor.copy_(copy)
    if reference.numel() == 0:
        return False
    return relative_error(reference, scaled) < PROOF_TOLERANCE


def relative_error(reference: torch.Tensor, other: torch.Tensor) -> float:
    """``||other - reference|| / ||reference||`` (``inf`` for NaN/Inf or a shape mismatch).

    Example:
        >>> relative_error(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 4.5]))
        0.1
    """
    if other.shape != reference.shape or not bool(torch.isfinite(other).all()):
        return float("inf")
    return float((other.double() - reference.double()).norm() / reference.double().norm().clamp_min(1e-30))
