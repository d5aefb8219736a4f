"""What quantization did, per layer: kind, mode, bits, weight SQNR, bytes before/after, and skips."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from mono_quant.config import QuantizationConfig
from mono_quant.engine.output_check import OutputCheck
from mono_quant.errors import QuantizationError
from mono_quant.modules import QuantizedLayer, tensor_bytes
from mono_quant.modules.base import float_weight
from mono_quant.qparams import all_finite, weight_sqnr_db


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """One quantized layer."""

    name: str
    kind: str
    mode: str
    bits: int
    sqnr_db: float
    bytes_before: int
    bytes_after: int
    output_sqnr_db: float | None = None  # the layer's output against float on calibration data or a probe
    note: str = ""  # why the layer moved from the requested precision, kernels that failed their check


@dataclasses.dataclass
class QuantizationReport:
    """All layers plus the skipped modules (name -> reason), the model's total bytes, a warning and notes.

    ``print(report)`` shows a table; ``to_dict()`` is JSON-friendly.

    Example:
        >>> r = QuantizationReport([LayerReport("fc", "Linear", "dynamic", 8, 41.5, 4096, 1056)], {"head": "excluded"})
        >>> round(r.compression_ratio, 2)
        3.88
    """

    layers: list[LayerReport]
    skipped: dict[str, str]
    model_bytes_before: int | None = None
    model_bytes_after: int | None = None
    warning: str = ""  # e.g. "only 40% of the matmul weights were quantized (...)"; printed first
    notes: list[str] = dataclasses.field(default_factory=list)  # what the user should know about speed; printed last

    @property
    def bytes_before(self) -> int:
        return sum(row.bytes_before for row in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(row.bytes_after for row in self.layers)

    @property
    def compression_ratio(self) -> float:
        """Float bytes / quantized bytes over the quantized layers (``inf`` if nothing was quantized)."""
        return self.bytes_before / self.bytes_after if self.bytes_after else math.inf

    @property
    def min_sqnr_db(self) -> float:
        return min((row.sqnr_db for row in self.layers), default=math.inf)

    @property
    def min_output_sqnr_db(self) -> float:
        """The lowest measured output SQNR against float over the checked layers (``inf`` if none)."""
        return min((row.output_sqnr_db for row in self.layers if row.output_sqnr_db is not None), default=math.inf)

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": [dataclasses.asdict(row) for row in self.layers],
            "skipped": dict(self.skipped),
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "compression_ratio": self.compression_ratio,
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "warning": self.warning,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        header = ("layer", "kind", "mode", "bits", "weight dB", "output dB", "bytes before", "bytes after")
        rows = [
            (r.name, r.kind, r.mode, str(r.bits), f"{r.sqnr_db:.1f}", _db(r.output_sqnr_db), f"{r.bytes_before:,}",
             f"{r.bytes_after:,}")
            for r in self.layers
        ]  # fmt: skip
        widths = [max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out = [f"WARNING: {self.warning}"] if self.warning else []
        out += [line.format(*header), line.format(*("-" * w for w in widths))]
        out += [line.format(*row) for row in rows]
        out.append(
            f"{len(self.layers)} layers quantized: {self.bytes_before:,} -> {self.bytes_after:,} bytes "
            f"({self.compression_ratio:.2f}x smaller), min weight SQNR {self.min_sqnr_db:.1f} dB, "
            f"min output SQNR {_db(self.min_output_sqnr_db)} dB"
        )
        out += [f"{r.name}: {r.note}" for r in self.layers if r.note]
        if self.model_bytes_before:
            out.append(f"whole model: {self.model_bytes_before:,} -> {self.model_bytes_after:,} bytes")
        for name, reason in self.skipped.items():
            out.append(f"skipped {name or '<root>'}: {reason}")
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)


def _db(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


@dataclasses.dataclass
class QuantizationResult:
    """The quantized model (or state_dict), the skipped module names, the report and the config."""

    model: nn.Module | dict[str, torch.Tensor]
    skipped: list[str]
    report: QuantizationReport
    config: QuantizationConfig


def check_finite(name: str, module: nn.Module) -> None:
    """Raise ``QuantizationError`` naming layer ``name`` and the parameter holding NaN or Inf.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> with torch.no_grad():
        ...     layer.bias[0] = float("nan")
        >>> check_finite("fc", layer)
        Traceback (most recent call last):
        ...
        mono_quant.errors.QuantizationError: layer 'fc' has NaN or Inf values in its 'bias'; fix the model first
    """
    for param_name, tensor in module.named_parameters(recurse=False):
        if tensor.is_floating_point() and not all_finite(tensor):
            raise QuantizationError(f"layer {name!r} has NaN or Inf values in its {param_name!r}; fix the model first")


def module_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s state_dict (what a file holds).

    Example:
        >>> module_bytes(nn.Linear(4, 2))  # 8 weights and 2 biases, float32
        40
    """
    return tensor_bytes(*module.state_dict().values())


def layer_report(
    name: str, float_module: nn.Module, quantized: QuantizedLayer, checked: OutputCheck | None = None
) -> LayerReport:
    """The report row of layer ``name``: kind, mode, bits, weight and output SQNR, bytes before and after.

    Example:
        >>> from mono_quant.modules import Int8Linear
        >>> fc = nn.Linear(64, 8)
        >>> row = layer_report("fc", fc, Int8Linear.from_float(fc, QuantizationConfig()))
        >>> row.kind, row.bits, row.sqnr_db > 30
        ('Linear', 8, True)
    """
    checked = checked or OutputCheck(None)
    sqnr = checked.weight_sqnr_db
    if sqnr is None:
        reference = float_weight(float_module)  # the noise is computed in place: one float copy at a time
        sqnr = weight_sqnr_db(name, reference, quantized.dequantized_weight().reshape(reference.shape))
    meta = quantized.metadata()
    return LayerReport(
        name, meta["kind"], meta["mode"], meta["bits"], sqnr, module_bytes(float_module), module_bytes(quantized),
        checked.sqnr_db, checked.note,
    )  # fmt: skip
