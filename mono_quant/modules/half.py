"""fp16 / bf16 layers: the float module with its weights cast, computing in the half dtype.

Inputs are cast to the half dtype at the layer boundary and outputs cast back to the input's dtype
(``float32`` for embeddings), so the surrounding model is unaffected. Tensor names are unchanged.
On CPU this is a storage format (half the bytes); on CUDA it is also an execution speedup.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.config import Mode, QuantDtype, QuantizationConfig
from mono_quant.modules.base import ActivationQParams, QuantizedLayer, meta_conv2d, meta_embedding
from mono_quant.modules.registry import register

_TORCH_DTYPES = {QuantDtype.FP16: torch.float16, QuantDtype.BF16: torch.bfloat16}


class _HalfMixin(QuantizedLayer):
    dtypes = (QuantDtype.FP16, QuantDtype.BF16)
    bits = 16

    @classmethod
    def from_float(
        cls, module: nn.Module, config: QuantizationConfig, activation: ActivationQParams | None = None
    ) -> nn.Module:
        layer = copy.deepcopy(module).to(_TORCH_DTYPES[config.dtype])
        layer.__class__ = cls
        return layer

    @classmethod
    def from_metadata(cls, module: nn.Module, metadata: dict[str, Any]) -> nn.Module:
        return cls.from_float(module, QuantizationConfig(dtype=metadata["dtype"]))

    @classmethod
    def state_dict_entry(cls, tensors: Mapping[str, torch.Tensor], name: str, mode: str) -> dict[str, Any] | None:
        weight = tensors.get(f"{name}.weight")
        if weight is None:
            return None
        dtype = QuantDtype.FP16 if weight.dtype == torch.float16 else QuantDtype.BF16
        kind, shape = cls.float_type.__name__, list(weight.shape)
        return {"kind": kind, "mode": Mode.WEIGHT_ONLY.value, "bits": 16, "dtype": dtype.value, "shape": shape}

    def _cast_call(self, x: torch.Tensor, output_dtype: torch.dtype) -> torch.Tensor:
        x = x.to(self.weight.dtype) if x.is_floating_point() else x
        return self.float_type.forward(self, x).to(output_dtype)

    def metadata(self) -> dict[str, Any]:
        dtype = QuantDtype.FP16 if self.weight.dtype == torch.float16 else QuantDtype.BF16
        return {"kind": self.float_type.__name__, "mode": Mode.WEIGHT_ONLY.value, "bits": 16, "dtype": dtype.value}

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.detach().float()

    def dequantize(self) -> nn.Module:
        layer = copy.deepcopy(self).float()
        layer.__class__ = self.float_type
        return layer


@register(nn.Linear)
class HalfLinear(_HalfMixin, nn.Linear):
    """``nn.Linear`` in fp16/bf16.

    Example:
        >>> HalfLinear.from_float(nn.Linear(4, 2), QuantizationConfig(dtype="bf16"))(torch.ones(1, 4)).dtype
        torch.float32
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._cast_call(x, x.dtype)


@register(nn.Conv2d)
class HalfConv2d(_HalfMixin, nn.Conv2d):
    """``nn.Conv2d`` in fp16/bf16.

    Example:
        >>> HalfConv2d.from_float(nn.Conv2d(1, 2, 3), QuantizationConfig(dtype="bf16"))(torch.ones(1, 1, 5, 5)).shape
        torch.Size([1, 2, 3, 3])
    """

    weight_ranks = (2, 4)

    @classmethod
    def meta_float_module(cls, entry: dict[str, Any]) -> nn.Module:
        return meta_conv2d(entry)

    swap_module = False

    def with_geometry(self, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> HalfConv2d:
        """A layer sharing this one's half weight but convolving with other stride/padding/dilation (the owner
        pads first for ``padding_mode`` reflect/replicate/circular and string padding).

        Example:
            >>> conv = HalfConv2d.from_float(nn.Conv2d(1, 2, 3, padding=1), QuantizationConfig(dtype="fp16"))
            >>> conv.with_geometry((1, 1), (0, 0), (1, 1))(torch.ones(1, 1, 5, 5)).shape
            torch.Size([1, 2, 3, 3])
        """
        twin = copy.copy(self)  # shallow: the same parameters
        twin._parameters = dict(self._parameters)
        twin.stride, twin.padding, twin.dilation = tuple(stride), tuple(padding), tuple(dilation)
        twin.padding_mode = "zeros"
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._cast_call(x, x.dtype)


@register(nn.Embedding)
class HalfEmbedding(_HalfMixin, nn.Embedding):
    """``nn.Embedding`` in fp16/bf16, returning float32 rows.

    Example:
        >>> HalfEmbedding.from_float(nn.Embedding(5, 3), QuantizationConfig(dtype="fp16"))(torch.tensor([1])).dtype
        torch.float32
    """

    @classmethod
    def meta_float_module(cls, entry: dict[str, Any]) -> nn.Module:
        return meta_embedding(entry)

    @classmethod
    def loads_entry(cls, entry: dict[str, Any], module: nn.Module) -> bool:
        """A half Linear entry without bias (a bare state_dict's matrix): the same tensor."""
        symmetric = entry.get("scheme", "symmetric") == "symmetric"
        return entry["kind"] == "Linear" and entry["bits"] == 16 and not entry["bias"] and symmetric

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return self._cast_call(indices, torch.float32)
