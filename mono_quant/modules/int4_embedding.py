"""``Int4Embedding``: group-wise int4 rows (weight-only), stored in the compressed-tensors packed layout.

The state is the one ``Int4Linear`` files hold: ``weight_packed`` int32 ``[num_embeddings, dim/8]`` (eight
4-bit values per word, least significant first, offset by 8), ``weight_scale`` ``[num_embeddings,
dim/group]``, optional ``weight_zero_point`` (asymmetric) and ``weight_shape``. A lookup gathers the
packed rows of the requested indices and unpacks and scales only those rows: no call touches the whole
table in float.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.config import QuantDtype, QuantizationConfig, Scheme
from mono_quant.modules.base import ActivationQParams, QuantizedLayer, meta_embedding
from mono_quant.modules.int4_weight import Int4Weight, group_size_for, no_group_reason
from mono_quant.modules.registry import register
from mono_quant.qparams import QuantizedWeight, unpack_int4_words


@register(nn.Embedding)
class Int4Embedding(Int4Weight, nn.Module, QuantizedLayer):
    """Drop-in ``nn.Embedding`` replacement with int4 group-wise rows (``padding_idx`` kept; no ``max_norm``).

    Example:
        >>> emb = Int4Embedding.from_float(nn.Embedding(100, 64), QuantizationConfig(dtype="int4", group_size=32))
        >>> emb(torch.tensor([[1, 2, 3]])).shape, emb.weight_packed.shape, emb.weight_scale.shape
        (torch.Size([1, 3, 64]), torch.Size([100, 8]), torch.Size([100, 2]))
    """

    @classmethod
    def meta_float_module(cls, entry: dict[str, Any]) -> nn.Module:
        return meta_embedding(entry)

    dtypes = (QuantDtype.INT4,)
    bits = 4

    @classmethod
    def loads_entry(cls, entry: dict[str, Any], module: nn.Module) -> bool:
        """An int4 Linear entry without bias (a bare state_dict's matrix): the same tensors, either scheme."""
        return entry["kind"] == "Linear" and entry["bits"] == 4 and not entry["bias"]

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, group_size: int, scheme: Scheme
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_int4(num_embeddings, embedding_dim, group_size, scheme)

    @classmethod
    def unsupported_reason(cls, module: nn.Module, config: QuantizationConfig) -> str | None:
        if module.max_norm is not None:
            return "max_norm renormalizes weights in place; no int4 path"
        dim = module.embedding_dim
        if group_size_for(dim, config.group_size) is None:
            return no_group_reason("embedding_dim", dim, config.group_size)
        if dim % 8:
            return f"int4 packing needs embedding_dim={dim} to be a multiple of 8"
        return None

    @classmethod
    def from_float(
        cls, module: nn.Embedding, config: QuantizationConfig, activation: ActivationQParams | None = None
    ) -> Int4Embedding:
        group = group_size_for(module.embedding_dim, config.group_size)
        layer = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, group, config.scheme)
        layer.store_int4(module.weight, config)
        return layer

    @classmethod
    def from_quantized(cls, module: nn.Embedding, config: QuantizationConfig, weight: QuantizedWeight) -> Int4Embedding:
        """The layer holding ``weight``: int4 values and group scales chosen elsewhere (clipped ranges).

        Example:
            >>> from mono_quant.qparams import quantize_weight
            >>> from mono_quant.config import Granularity
            >>> w = quantize_weight(torch.randn(10, 64), 4, Scheme.ASYMMETRIC, Granularity.PER_GROUP, 32)
            >>> Int4Embedding.from_quantized(nn.Embedding(10, 64), QuantizationConfig(dtype="int4"), w).group_size
            32
        """
        group = module.embedding_dim // weight.scale.shape[1]
        scheme = Scheme.SYMMETRIC if weight.zero_point is None else Scheme.ASYMMETRIC
        layer = cls(module.num_embeddings, module.embedding_dim, module.padding_idx, group, scheme)
        layer.store_quantized(weight)
        return layer

    @classmethod
    def from_metadata(cls, module: nn.Embedding, metadata: dict[str, Any]) -> Int4Embedding:
        return cls(
            module.num_embeddings,
            module.embedding_dim,
            module.padding_idx,
            int(metadata["group_size"]),
            Scheme(metadata.get("scheme", Scheme.SYMMETRIC.value)),
        )

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        flat = indices.reshape(-1)
        q = unpack_int4_words(F.embedding(flat, self.weight_packed), self.embedding_dim)
        grouped = q.reshape(flat.numel(), -1, self.group_size).float()
        if self.weight_zero_point is not None:
            grouped.sub_(F.embedding(flat, self.weight_zero_point).unsqueeze(-1))
        grouped.mul_(F.embedding(flat, self.weight_scale).unsqueeze(-1))
        return grouped.reshape(*indices.shape, self.embedding_dim)

    def metadata(self) -> dict[str, Any]:
        return self.int4_metadata("Embedding")

    def dequantize(self) -> nn.Embedding:
        return nn.Embedding.from_pretrained(self.dequantized_weight(), freeze=False, padding_idx=self.padding_idx)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
            f"group_size={self.group_size}, scheme={self.scheme.value}"
        )
