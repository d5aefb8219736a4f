"""Quantizing a bare state_dict: the 2-D (Linear-like) and 4-D (Conv-like) ``*.weight`` tensors, no model run."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from mono_quant.config import QuantizationConfig
from mono_quant.engine.report import LayerReport, QuantizationReport, QuantizationResult, check_finite, layer_report
from mono_quant.engine.selection import matches
from mono_quant.errors import ConfigError, QuantizationError
from mono_quant.modules import quantized_class_for, tensor_bytes


def quantize_state_dict(state: Mapping[str, torch.Tensor], config: QuantizationConfig) -> QuantizationResult:
    """Quantize the 2-D (Linear-like) and 4-D (Conv-like) ``*.weight`` tensors of a state_dict.

    The output tensors are exactly what the quantized module's ``state_dict`` would hold.
    """
    if config.needs_model_run:
        raise ConfigError(
            f"{', '.join(config.needs_model_run)} need(s) a model to run calibration data through; a state_dict "
            "takes mode 'dynamic'/'weight_only' with algorithm='rtn' (pass the nn.Module instead)"
        )
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise QuantizationError(f"model looks like a state_dict but entry {bad[0]!r} is not a named tensor")
    out: dict[str, torch.Tensor] = {}
    rows: list[LayerReport] = []
    skipped: dict[str, str] = {}
    layers = [
        k[: -len(".weight")]
        for k, v in state.items()
        if k.endswith(".weight") and v.is_floating_point() and v.dim() in (2, 4)
    ]
    for name in layers:
        weight = state[f"{name}.weight"]
        reason = ""
        if config.include is not None and not matches(name, config.include):
            reason = f"not matched by include={list(config.include)}"
        elif pattern := matches(name, config.exclude):
            reason = f"excluded by pattern {pattern!r}"
        elif weight.numel() < config.min_numel:
            reason = f"{weight.numel()} weights < min_numel={config.min_numel}"
        module = _layer_from_tensors(weight, state.get(f"{name}.bias"))
        cls, why = quantized_class_for(module, config)
        if reason or cls is None:
            skipped[name] = reason or why
            continue
        check_finite(name, module)
        quantized = cls.from_float(module, config)
        rows.append(layer_report(name, module, quantized))
        out.update({f"{name}.{key}": value for key, value in quantized.state_dict().items()})
    for key, value in state.items():
        if key.rpartition(".")[0] not in {r.name for r in rows}:
            out[key] = value
    report = QuantizationReport(rows, skipped, tensor_bytes(*state.values()), tensor_bytes(*out.values()))
    return QuantizationResult(out, list(skipped), report, config)


def _layer_from_tensors(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    if weight.dim() == 2:
        module: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    else:
        module = nn.Conv2d(
            weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), bias=bias is not None, device="meta"
        )
    module.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return module
