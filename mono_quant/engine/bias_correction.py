"""Bias correction (Nagel et al. 2019): remove a quantized layer's mean output error from its bias.

Quantizing a Conv/Linear layer's weights (and, in static mode, its input) shifts the mean of each output
channel: ``E[y_q - y_float]`` is not zero, and the next layers see that shift as a systematic error. On the
layer's recorded calibration input, ``correct_bias`` measures the shift per output channel and subtracts it
from the float bias the quantized layer adds. The bias lives in the quantized layer (a swapped
``Int8Linear``) or in the module that owns an attached weight (convolutions keep their class and their own
``bias``, which the int8 kernel fuses); either way it is what the fused CNN graph, ``save`` and ``load``
use, so files keep their format and only bias values differ. A layer without a bias is left alone (a new
bias would not load into the user's model skeleton), with a note.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mono_quant.config import QuantizationConfig
from mono_quant.engine.output_check import OutputCheck
from mono_quant.errors import ConfigError
from mono_quant.modules.base import QuantizedLayer


def correct_bias(
    quantized: QuantizedLayer, float_module: nn.Module, owner: nn.Module | None, x: torch.Tensor | None
) -> str:
    """Subtract ``quantized``'s mean output error against ``float_module`` on ``x`` (per output channel) from
    the bias: ``quantized.bias``, or ``owner.bias`` when ``owner`` holds the attached weight (then
    ``float_module`` is its bias-free proxy). Returns a note for the report.

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> from mono_quant.modules import Int8Linear
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> fc, x = nn.Linear(64, 8), torch.randn(256, 64) + 3.0
        >>> q = Int8Linear.from_float(fc, QuantizationConfig())
        >>> error = lambda: (q(x) - fc(x)).mean(0).abs().max().item()
        >>> before = error()
        >>> correct_bias(q, fc, None, x)[:25]
        'bias corrected: mean outp'
        >>> error() < before / 3
        True
    """
    if not isinstance(float_module, (nn.Linear, nn.Conv2d)):
        return ""  # embeddings, recurrent layers: no per-channel output bias to correct
    holder = owner if owner is not None else quantized
    bias = getattr(holder, "bias", None)
    if not isinstance(bias, torch.Tensor):
        return "bias correction skipped: the layer has no bias (a new one would not load into the model skeleton)"
    if x is None:
        return "bias correction skipped: no recorded calibration input"
    try:
        with torch.no_grad():
            error = _first(quantized(x)).float() - _first(float_module(x)).float()
    except (RuntimeError, ValueError, TypeError, IndexError):  # a parent reshapes the input first
        return "bias correction skipped: the recorded input does not fit the layer's product"
    channel = -1 if isinstance(float_module, nn.Linear) else 1
    if error.dim() == 0 or error.shape[channel] != bias.numel():
        return "bias correction skipped: output channels do not match the bias"
    shift = error.transpose(channel, -1).reshape(-1, bias.numel()).mean(0)
    if not torch.isfinite(shift).all():
        return "bias correction skipped: non-finite output error"
    with torch.no_grad():
        if owner is not None:
            bias.sub_(shift.to(bias))
        else:
            quantized.bias = bias - shift.to(bias)
            quantized.prepare()  # static kernels fold the bias into derived terms
    return f"bias corrected: mean output error up to {float(shift.abs().max()):.2g} removed"


def require_data(config: QuantizationConfig, example: Any) -> None:
    """Raise ``ConfigError`` naming the flag when ``equalize``/``bias_correction`` is on without a batch to run.

    Example:
        >>> require_data(QuantizationConfig(bias_correction=True), None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: bias_correction=True measures each layer's mean output error ...
    """
    for flag, does in (
        ("equalize", "proves each layer pair by data flow"),
        ("bias_correction", "measures each layer's mean output error"),
    ):
        if getattr(config, flag) and example is None:
            raise ConfigError(
                f"{flag}=True {does} on real inputs: pass calibration_data (a few batches), or set {flag}=False"
            )


def corrected_check(
    checked: OutputCheck,
    quantized: QuantizedLayer,
    float_module: nn.Module,
    owner: nn.Module | None,
    x: torch.Tensor | None,
) -> OutputCheck:
    """``correct_bias`` with its note added to ``checked`` (what the report shows for the layer).

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> from mono_quant.modules import Int8Linear
        >>> fc = nn.Linear(8, 4, bias=False)
        >>> q = Int8Linear.from_float(fc, QuantizationConfig())
        >>> corrected_check(OutputCheck(40.0), q, fc, None, torch.randn(4, 8)).note[:22]
        'bias correction skippe'
    """
    note = correct_bias(quantized, float_module, owner, x)
    return dataclasses.replace(checked, note="; ".join(filter(None, [checked.note, note])))


def _first(value: object) -> torch.Tensor:
    while isinstance(value, (tuple, list)):
        value = value[0]
    return value
