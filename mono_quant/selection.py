"""Which modules get quantized: layer type, include/exclude globs, minimum size, registry support."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import NamedTuple

from torch import nn

from mono_quant.config import Mode, QuantizationConfig
from mono_quant.modules import QuantizedLayer, quantized_class_for


class Selection(NamedTuple):
    """``chosen`` maps module name -> quantized class; ``skipped`` maps name -> reason."""

    chosen: dict[str, type[QuantizedLayer]]
    skipped: dict[str, str]


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
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            skipped[name] = "already quantized"
            continue
        owns_parameters = any(True for _ in module.parameters(recurse=False))
        if not isinstance(module, config.layer_types):
            if owns_parameters:
                skipped[name] = f"{type(module).__name__} is not a supported layer type"
            continue
        weight = getattr(module, "weight", None)
        if config.include is not None and not matches(name, config.include):
            skipped[name] = f"not matched by include={list(config.include)}"
        elif pattern := matches(name, config.exclude):
            skipped[name] = f"excluded by pattern {pattern!r}"
        elif weight is not None and weight.numel() < config.min_numel:
            skipped[name] = f"{weight.numel()} weights < min_numel={config.min_numel}"
        else:
            cls, reason = quantized_class_for(module, config)
            if cls is None:
                skipped[name] = reason
            else:
                chosen[name] = cls
    return Selection(chosen, skipped)


def calibrated_layers(model: nn.Module, config: QuantizationConfig) -> dict[str, nn.Module]:
    """The layers whose inputs static quantization observes (int8 Linear/Conv2d); empty unless static.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 2))
        >>> list(calibrated_layers(model, QuantizationConfig(mode="static")))
        ['1']
    """
    if config.mode is not Mode.STATIC:
        return {}
    chosen = select_layers(model, config).chosen
    return {name: model.get_submodule(name) for name, cls in chosen.items() if cls.needs_calibration}
