"""``Int8Embedding``: int8 weights with one scale per row (weight-only in every int8 mode).

A lookup gathers int8 rows and scales only those rows, so no call touches the whole table in float.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.config import Granularity, Mode, QuantDtype, QuantizationConfig, Scheme
from mono_quant.modules.base import ActivationQParams, QuantizedLayer, meta_embedding
from mono_quant.modules.int8_matmul import int8_state_dict_entry
from mono_quant.modules.registry import register
from mono_quant.qparams import QuantizedWeight, dequantize_weight, quantize_weight


@register(nn.Embedding)
class Int8Embedding(nn.Module, QuantizedLayer):
    """Drop-in ``nn.Embedding`` replacement (``padding_idx`` kept; ``max_norm`` is not supported).

    Example:
        >>> emb = Int8Embedding.from_float(nn.Embedding(100, 16), QuantizationConfig())
        >>> emb(torch.tensor([[1, 2, 3]])).shape, emb.weight.dtype
        (torch.Size([1, 3, 16]), torch.int8)
    """

    @classmethod
    def meta_float_module(cls, entry: dict[str, Any]) -> nn.Module:
        return meta_embedding(entry)

    dtypes = (QuantDtype.INT8,)
    bits = 8
    hf_exportable = True

    @classmethod
    def loads_entry(cls, entry: dict[str, Any], module: nn.Module) -> bool:
        """An int8 Linear entry with one symmetric scale per row and no bias (a bare state_dict's matrix)."""
        symmetric = entry.get("scheme", "symmetric") == "symmetric"
        rows = entry.get("scale_shape") == [module.num_embeddings]
        return entry["kind"] == "Linear" and entry["bits"] == 8 and not entry["bias"] and symmetric and rows

    @classmethod
    def state_dict_entry(cls, tensors: Mapping[str, torch.Tensor], name: str, mode: str) -> dict[str, Any] | None:
        return int8_state_dict_entry("Embedding", tensors, name, mode)

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def unsupported_reason(cls, module: nn.Module, config: QuantizationConfig) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalizes weights in place; no int8 path"
        return None

    @classmethod
    def from_float(
        cls, module: nn.Embedding, config: QuantizationConfig, activation: ActivationQParams | None = None
    ) -> Int8Embedding:
        qw = quantize_weight(module.weight, 8, Scheme.SYMMETRIC, Granularity.PER_CHANNEL)
        layer = cls(module.num_embeddings, module.embedding_dim, module.padding_idx)
        layer.weight, layer.weight_scale = qw.data, qw.scale
        return layer

    @classmethod
    def from_metadata(cls, module: nn.Embedding, metadata: dict[str, Any]) -> Int8Embedding:
        return cls(module.num_embeddings, module.embedding_dim, module.padding_idx)

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(indices, self.weight)
        return rows.float() * F.embedding(indices, self.weight_scale[:, None])

    def metadata(self) -> dict[str, Any]:
        return {"kind": "Embedding", "mode": Mode.WEIGHT_ONLY.value, "bits": 8, "scheme": Scheme.SYMMETRIC.value}

    def onnx_forward(self, ops: Any, indices: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``Gather`` of the int8 rows and of their scales, ``Mul``."""
        return ops.embedding(indices, self.weight, self.weight_scale)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(QuantizedWeight(self.weight, self.weight_scale, None))

    def dequantize(self) -> nn.Embedding:
        return nn.Embedding.from_pretrained(self.dequantized_weight(), freeze=False, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
