"""Lightning integration for mono-quant: one callback that calibrates, quantizes, gates and exports.

Example:
    >>> from mono_quant_lightning import QuantizationCallback
    >>> QuantizationCallback(dtype="int8", max_drop=0.02).max_drop
    0.02
"""

from mono_quant_lightning.callback import QuantizationCallback
from mono_quant_lightning.choices import MonitorMode, OnViolation, QuantizeOn, QuantMode
from mono_quant_lightning.gate import DropType, GateDecision, QuantizationGateError, decide
from mono_quant_lightning.loading import load_quantized

__all__ = [
    "DropType",
    "GateDecision",
    "MonitorMode",
    "OnViolation",
    "QuantMode",
    "QuantizationCallback",
    "QuantizationGateError",
    "QuantizeOn",
    "decide",
    "load_quantized",
]
