"""Which modules get quantized: layer type, include/exclude globs, minimum size, registry support."""

from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import NamedTuple

import torch
from torch import nn

from mono_quant.config import Mode, QuantizationConfig
from mono_quant.modules import QuantizedLayer, QuantizedTensor, quantized_class_for, swapped_types
from mono_quant.modules.attach import Attachment, attachment_for, proxy_module
from mono_quant.modules.base import float_weight
from mono_quant.skips import Skip, SkipKind, kind_of


class Selection(NamedTuple):
    """``chosen`` maps module name -> quantized class; ``skipped`` maps name -> reason.

    ``attached`` names the chosen modules that keep their own class and ``forward`` and get a quantized
    weight tensor instead (``modules/attach.py``); the others are swapped for the quantized class.
    """

    chosen: dict[str, type[QuantizedLayer]]
    skipped: dict[str, str]
    attached: dict[str, Attachment]


def matches(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first glob in ``patterns`` that matches ``name`` (``None`` if none).

    Example:
        >>> matches("encoder.layer.0.fc", ("decoder.*", "encoder.*"))
        'encoder.*'
    """
    return next((p for p in patterns if fnmatchcase(name, p)), None)


def select_layers(model: nn.Module, config: QuantizationConfig) -> Selection:
    """Decide, for every module that owns parameters, whether and how it is quantized.

    Example:
        >>> model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        >>> sel = select_layers(model, QuantizationConfig(exclude=("2",)))
        >>> list(sel.chosen), sel.skipped
        (['0'], {'1': 'LayerNorm is not a supported layer type', '2': "excluded by pattern '2'"})
    """
    chosen: dict[str, type[QuantizedLayer]] = {}
    skipped: dict[str, str] = {}
    attached: dict[str, Attachment] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer) or any(isinstance(b, QuantizedTensor) for b in module._buffers.values()):
            skipped[name] = Skip(SkipKind.ALREADY_QUANTIZED, "already quantized")
            continue
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        attachment = attachment_for(module)
        types = config.layer_types
        linear_like = attachment is not None and attachment.kind == "linear" and types and nn.Linear in types
        if types is not None and not isinstance(module, types) and not linear_like:
            if owns_parameters:
                supported = attachment is not None or type(module) in swapped_types()
                kind = SkipKind.NOT_IN_LAYER_TYPES if supported else SkipKind.UNSUPPORTED
                skipped[name] = Skip(kind, f"{type(module).__name__} is " + (
                    "not in layer_types" if supported else "not a supported layer type"
                ))
            continue
        if attachment is None and type(module) not in swapped_types():
            if owns_parameters:
                skipped[name] = Skip(SkipKind.UNSUPPORTED, f"{type(module).__name__} is not a supported layer type")
            continue
        weight = getattr(module, attachment.attribute, None) if attachment else float_weight(module)
        if config.include is not None and not matches(name, config.include):
            skipped[name] = Skip(SkipKind.NOT_INCLUDED, f"not matched by include={list(config.include)}")
        elif pattern := matches(name, config.exclude):
            skipped[name] = Skip(SkipKind.EXCLUDED, f"excluded by pattern {pattern!r}")
        elif weight is not None and weight.numel() < config.min_numel:
            skipped[name] = Skip(SkipKind.TOO_SMALL, f"{weight.numel()} weights < min_numel={config.min_numel}")
        elif weight is not None and weight.numel() == 0:
            skipped[name] = Skip(SkipKind.EMPTY, f"{type(module).__name__} has an empty weight {list(weight.shape)}")
        elif weight is not None and weight.is_meta:
            skipped[name] = Skip(SkipKind.META, "weight is on the meta device (no values to quantize)")
        else:
            cls, reason = quantized_class_for(proxy_module(module, attachment) if attachment else module, config)
            if cls is None:
                skipped[name] = Skip(SkipKind.UNSUPPORTED, reason)
            else:
                chosen[name] = cls
                if attachment is not None:
                    attached[name] = attachment
    return Selection(chosen, skipped, attached)


def calibrated_layers(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module | torch.Tensor]:
    """The layers whose inputs static quantization observes (int8 Linear/Conv2d); empty unless static.

    A swapped layer is observed through its module's input; an attached one through the weight tensor
    (the input of the ``F.linear``/``F.conv2d``... call that uses it, wherever it is called from), except a
    plain ``nn.Conv1d/2d/3d`` with zero padding, whose forward hands its input to that call unchanged: a
    module hook sees the same values without a torch function mode intercepting every op of the forward
    (``benchmarks/callback_overhead.py``).

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
        >>> list(calibrated_layers(model, QuantizationConfig(mode="static")))
        ['1']
    """
    if config.mode is not Mode.STATIC:
        return {}
    selection = select_layers(model, config)
    targets: dict[str, nn.Module | torch.Tensor] = {}
    for name, cls in selection.chosen.items():
        if cls.needs_calibration:
            module = model.get_submodule(name)
            attachment = selection.attached.get(name)
            observed_directly = attachment is None or _input_is_the_weight_call_input(module)
            targets[name] = module if observed_directly else getattr(module, attachment.attribute)
    return targets


def calibrated_outputs(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module | torch.Tensor]:
    """The static layers whose outputs calibration also observes (``calibrates_output``: int8 ``nn.Conv2d``,
    whose fused CPU graph can then keep a projection shortcut's output uint8); empty unless static.

    Observed as ``calibrated_layers`` observes inputs: a plain zero-padded ``nn.Conv2d`` through its module's
    forward output, any other through the result of its weight's call. BatchNorm is folded before calibration
    (``quantize``), so that is the value a residual add receives.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(2, 2))
        >>> list(calibrated_outputs(model, QuantizationConfig(mode="static")))
        ['0']
    """
    inputs = calibrated_layers(model, config)
    selection = select_layers(model, config) if inputs else None
    return {
        name: target
        for name, target in inputs.items()
        if getattr(selection.chosen[name], "calibrates_output", False)
        and isinstance(model.get_submodule(name), nn.Conv2d)
    }


def _input_is_the_weight_call_input(module: nn.Module) -> bool:
    """Whether ``module``'s forward input is exactly the input of its weight's convolution call."""
    plain = type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return plain and module.padding_mode == "zeros"


def matmul_weight_numel(module: nn.Module) -> int:
    """How many weights ``module`` multiplies its input by (0 for norms, activations, containers).

    Example:
        >>> matmul_weight_numel(nn.Linear(4, 3)), matmul_weight_numel(nn.LayerNorm(4))
        (12, 0)
    """
    attachment = attachment_for(module)
    if attachment is None and type(module) not in swapped_types():
        return 0
    weight = getattr(module, attachment.attribute, None) if attachment else float_weight(module)
    return weight.numel() if isinstance(weight, torch.Tensor) else 0


def coverage_warning(model: nn.Module, quantized_numel: int, skipped: dict[str, str]) -> str:
    """A warning (also issued with ``warnings.warn``) when nothing or under half of the matmul weights of
    ``model`` (the float model, or the copy before swapping) got quantized; ``""`` otherwise.

    Example:
        >>> coverage_warning(nn.Sequential(nn.Linear(4, 4)), 0, {"0": "excluded by pattern '0'"})
        "no layer was quantized (0% of the matmul weights): 0: excluded by pattern '0'"
    """
    missed = {}
    by_user = {name for name, reason in skipped.items() if (kind := kind_of(reason)) and kind.chosen_by_user}
    if quantized_numel and len(by_user) == len(skipped):
        return ""  # the user's own filters left these out
    for name, reason in skipped.items():
        if quantized_numel and name in by_user:
            continue
        try:
            numel = matmul_weight_numel(model.get_submodule(name))
        except AttributeError:
            continue
        if numel:
            missed[name] = (numel, reason)
    total = quantized_numel + sum(numel for numel, _ in missed.values())
    if total == 0 or quantized_numel / total >= 0.5:
        return ""
    share = quantized_numel / total
    main = sorted(missed.items(), key=lambda item: -item[1][0])[:3]
    reasons = "; ".join(f"{name or '<root>'}: {reason}" for name, (_, reason) in main)
    if quantized_numel == 0:
        message = f"no layer was quantized ({share:.0%} of the matmul weights): {reasons}"
    else:
        message = f"only {share:.0%} of the matmul weights were quantized: {reasons}"
    warnings.warn(message, UserWarning, stacklevel=3)
    return message
