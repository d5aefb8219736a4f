"""``Int4Linear``: group-wise int4 weights, float activations, the fused int4 matmul kernels.

The canonical state (what files hold) is the compressed-tensors layout: ``weight_packed`` int32
``[out, in/8]``, ``weight_scale`` ``[out, in/group]``, optional ``weight_zero_point``, ``weight_shape``.
The kernel's own packed form depends on the device, so it is built from the canonical state on the
first forward on a device and cached (not saved).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mono_quant import kernels
from mono_quant.config import Granularity, QuantDtype, QuantizationConfig, Scheme
from mono_quant.kernels import choice
from mono_quant.modules.base import ActivationQParams, QuantizedLayer, copy_bias, float_linear
from mono_quant.modules.int4_weight import Int4Weight, group_size_for, no_group_reason
from mono_quant.modules.registry import register
from mono_quant.qparams import QuantizedWeight, quantize_weight, unpack_int4_words

_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Candidates above _DEQUANTIZE_MIN_ROWS rows on CPU: the packed int4 kernel (bf16 activations; its cost grows
# with the rows, 1.5-4x float from 64 rows on this project's AVX-512 CPU without AMX) and, measured only,
# unpacking the weight for one float matmul per call (the dequantize cost is shared by the rows). At 1-8 rows
# the packed kernel always serves (it beats float there for layers from 384 x 1536 up: linear_kernels.py).
_KERNELS = ("int4pack", "dequantize")
_DEQUANTIZE_MIN_ROWS = 8
# CUDA's _convert_weight_to_int4pack needs in_features to be a multiple of 16 x the 8 inner k-tiles it packs
# (checked in its source: isEvenDivisor(K, innerKTiles * kKTileSize)); the CPU kernel takes any multiple of the
# group. Narrower groups (group_size_for) reach widths like 1568: on CUDA those unpack the weight instead.
_CUDA_PACK_MULTIPLE = 128


@register(nn.Linear)
class Int4Linear(Int4Weight, nn.Module, QuantizedLayer):
    """Drop-in ``nn.Linear`` replacement with int4 group-wise weights (about 1/7 of float bytes).

    Example:
        >>> layer = Int4Linear.from_float(nn.Linear(256, 64), QuantizationConfig(dtype="int4"))
        >>> layer(torch.randn(2, 256)).shape, layer.weight_packed.shape
        (torch.Size([2, 64]), torch.Size([64, 32]))
    """

    dtypes = (QuantDtype.INT4,)
    bits = 4

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int, scheme: Scheme) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_int4(out_features, in_features, group_size, scheme)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._kernel_state: tuple[torch.device, torch.Tensor, torch.Tensor] | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: module._drop_kernel_state())

    @classmethod
    def unsupported_reason(cls, module: nn.Module, config: QuantizationConfig) -> str | None:
        if config.group_size not in _KERNEL_GROUP_SIZES:
            return f"group_size={config.group_size} has no int4 kernel; use one of {_KERNEL_GROUP_SIZES}"
        if group_size_for(module.in_features, config.group_size) is None:
            return no_group_reason("in_features", module.in_features, config.group_size)
        return None

    @classmethod
    def from_float(
        cls, module: nn.Linear, config: QuantizationConfig, activation: ActivationQParams | None = None
    ) -> Int4Linear:
        group = group_size_for(module.in_features, config.group_size)
        weight = quantize_weight(module.weight, 4, config.scheme, Granularity.PER_GROUP, group)
        return cls.from_quantized(module, config, weight)

    @classmethod
    def from_quantized(cls, module: nn.Linear, config: QuantizationConfig, weight: QuantizedWeight) -> Int4Linear:
        """The layer holding ``weight``: int4 values and group scales fitted elsewhere (GPTQ, AWQ).

        Example:
            >>> from mono_quant.qparams import quantize_weight
            >>> w = quantize_weight(torch.randn(8, 64), 4, Scheme.ASYMMETRIC, Granularity.PER_GROUP, 32)
            >>> layer = Int4Linear.from_quantized(nn.Linear(64, 8), QuantizationConfig(dtype="int4"), w)
            >>> layer.group_size, layer.scheme.value
            (32, 'asymmetric')
        """
        group = module.in_features // weight.scale.shape[1]
        scheme = Scheme.SYMMETRIC if weight.zero_point is None else Scheme.ASYMMETRIC
        layer = cls(module.in_features, module.out_features, module.bias is not None, group, scheme)
        layer.store_quantized(weight)
        layer.bias = copy_bias(module)
        return layer

    @classmethod
    def from_metadata(cls, module: nn.Linear, metadata: dict[str, Any]) -> Int4Linear:
        return cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            int(metadata["group_size"]),
            Scheme(metadata["scheme"]),
        )

    def _drop_kernel_state(self) -> None:
        self._kernel_state = None

    def _kernel_inputs(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._kernel_state
        if state is None or state[0] != device:
            unsigned = unpack_int4_words(self.weight_packed, self.in_features).to(torch.int32) + 8
            table = kernels.int4_scales_and_zeros(self.weight_scale, self.weight_zero_point)
            state = (device, kernels.pack_int4(unsigned.to(device)), table.to(device))
            self._kernel_state = state
        return state[1], state[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        kernel = "int4pack"
        if x2.device.type != "cpu" and self.in_features % _CUDA_PACK_MULTIPLE:
            kernel = "dequantize"
        elif x2.device.type == "cpu" and x2.shape[0] > _DEQUANTIZE_MIN_ROWS:
            run = lambda name: self._run(name, x2)  # noqa: E731
            kernel = choice.pick("int4_linear", (self.out_features, self.in_features), x2, _KERNELS, kernel, run)
        return self._run(kernel, x2).reshape(*x.shape[:-1], self.out_features)

    def _run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        if kernel == "dequantize":
            return nn.functional.linear(x, self.dequantized_weight().to(x.dtype), self.bias)
        packed, table = self._kernel_inputs(x.device)
        return kernels.int4_mm(x, packed, self.group_size, table, self.out_features, self.bias)

    def metadata(self) -> dict[str, Any]:
        return self.int4_metadata("Linear")

    def dequantize(self) -> nn.Linear:
        return float_linear(self.dequantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, scheme={self.scheme.value}, bias={self.bias is not None}"
        )
