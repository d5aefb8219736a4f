"""``Int8Linear``: ``nn.Linear`` with int8 per-channel weights; dynamic, static or weight-only activations.

The int8 state and kernels (and how each mode computes) are ``Int8Matmul``'s (``int8_matmul.py``), which
``Int8Conv2d`` shares; this class is the layer kind: building from ``nn.Linear`` and back, the file entry,
the Hugging Face layout and the ONNX graph.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.config import Mode, QuantDtype, QuantizationConfig, Scheme
from mono_quant.modules.base import ActivationQParams, QuantizedLayer, copy_bias, float_linear
from mono_quant.modules.int8_matmul import Int8Matmul, int8_state_dict_entry
from mono_quant.modules.registry import register
from mono_quant.qparams import quantize_weight


@register(nn.Linear)
class Int8Linear(Int8Matmul, QuantizedLayer):
    """Drop-in replacement for ``nn.Linear`` holding int8 weights (``[out, in]``) and float scales.

    Example:
        >>> layer = Int8Linear.from_float(nn.Linear(64, 32), QuantizationConfig(dtype="int8"))
        >>> layer(torch.randn(3, 64)).shape, layer.weight.dtype
        (torch.Size([3, 32]), torch.int8)
    """

    dtypes = (QuantDtype.INT8,)
    bits = 8
    needs_calibration = True  # in static mode
    hf_exportable = True

    @classmethod
    def from_float(
        cls, module: nn.Linear, config: QuantizationConfig, activation: ActivationQParams | None = None
    ) -> Int8Linear:
        qw = quantize_weight(module.weight, 8, config.scheme, config.granularity)
        layer = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            config.mode,
            config.scheme,
            tuple(qw.scale.shape),
        )
        layer.set_quantized(qw, copy_bias(module), activation)
        return layer

    @classmethod
    def from_metadata(cls, module: nn.Linear, metadata: dict[str, Any]) -> Int8Linear:
        scale_shape = tuple(metadata.get("scale_shape", (module.out_features,)))
        return cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            Mode(metadata["mode"]),
            Scheme(metadata["scheme"]),
            scale_shape,
        )

    @classmethod
    def state_dict_entry(cls, tensors: Mapping[str, torch.Tensor], name: str, mode: str) -> dict[str, Any] | None:
        return int8_state_dict_entry(cls.float_type.__name__, tensors, name, mode)

    def metadata(self) -> dict[str, Any]:
        return self.int8_metadata("Linear")

    def dequantize(self) -> nn.Linear:
        return float_linear(self.dequantized_weight(), self.bias)

    def onnx_forward(self, ops: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``MatMulInteger`` on per-row (dynamic) or calibrated (static) uint8 codes; weight-only mode and
        asymmetric weights: ``DequantizeLinear`` + ``MatMul``."""
        w_t = self.weight.t().contiguous()
        if self.mode is Mode.WEIGHT_ONLY or self.weight_zero_point is not None:
            dequantized = self.dequantized_weight()
            return ops.weight_only_linear(x, w_t, self.weight_scale, self.weight_zero_point, self.bias, dequantized)
        return ops.linear(x, w_t, self._weight_scale_n, self.bias, self.stored_input_qparams())

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode.value}, "
            f"scheme={self.scheme.value}, bias={self.bias is not None}"
        )
