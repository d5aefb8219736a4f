"""``Int4Weight``: the group-wise int4 state shared by ``Int4Linear`` and ``Int4Embedding``.

The compressed-tensors layout: ``weight_packed`` int32 ``[rows, cols/8]`` (eight 4-bit values per word,
least significant first, offset by 8), ``weight_scale`` ``[rows, cols/group]``, ``weight_zero_point``
int8 of the same shape when asymmetric, and ``weight_shape`` int64 ``[2]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mono_quant.config import Granularity, Mode, QuantizationConfig, Scheme
from mono_quant.qparams import QuantizedWeight, dequantize_weight, pack_int4_words, quantize_weight, unpack_int4_words


class Int4Weight:
    """Mixin for ``nn.Module`` classes holding one int4 group-wise weight.

    Example:
        >>> from torch import nn
        >>> from mono_quant.modules import Int4Linear
        >>> layer = Int4Linear.from_float(nn.Linear(64, 16), QuantizationConfig(dtype="int4", group_size=32))
        >>> layer.dequantized_weight().shape, layer.int4_metadata("Linear")["group_size"]
        (torch.Size([16, 64]), 32)
    """

    group_size: int
    scheme: Scheme

    def register_int4(self: Any, rows: int, cols: int, group_size: int, scheme: Scheme) -> None:
        """Empty buffers for a ``[rows, cols]`` weight (filled by ``store_int4`` or ``load_state_dict``)."""
        self.group_size, self.scheme = group_size, scheme
        groups = cols // group_size
        self.register_buffer("weight_packed", torch.zeros(rows, cols // 8, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.ones(rows, groups))
        zero_point = torch.zeros(rows, groups, dtype=torch.int8) if scheme is Scheme.ASYMMETRIC else None
        self.register_buffer("weight_zero_point", zero_point)
        self.register_buffer("weight_shape", torch.tensor([rows, cols], dtype=torch.int64))

    def store_int4(self: Any, weight: torch.Tensor, config: QuantizationConfig) -> None:
        """Quantize a float ``[rows, cols]`` weight into the buffers."""
        qw = quantize_weight(weight, 4, config.scheme, Granularity.PER_GROUP, config.group_size)
        self.weight_packed = pack_int4_words(qw.data)
        self.weight_scale = qw.scale
        self.weight_zero_point = qw.zero_point

    def int4_metadata(self, kind: str) -> dict[str, Any]:
        return {
            "kind": kind,
            "mode": Mode.WEIGHT_ONLY.value,
            "bits": 4,
            "scheme": self.scheme.value,
            "group_size": self.group_size,
        }

    @property
    def weight(self: Any) -> torch.Tensor:
        """A stand-in with the float weight's shape, dtype (float32) and device, for code that reads
        ``layer.weight.dtype`` (T5 casts its activations to it). It holds no values (one NaN, broadcast):
        use ``dequantized_weight()`` for those.

        Example:
            >>> layer = Int4Weight.__new__(Int4Weight)
            >>> layer.weight_shape, layer.weight_scale = torch.tensor([4, 64]), torch.ones(4, 1)
            >>> layer.weight.shape, layer.weight.dtype
            (torch.Size([4, 64]), torch.float32)
        """
        rows, cols = (int(v) for v in self.weight_shape.tolist())
        return torch.full((), math.nan, device=self.weight_scale.device).expand(rows, cols)

    def dequantized_weight(self: Any) -> torch.Tensor:
        q = unpack_int4_words(self.weight_packed, self.weight_packed.shape[1] * 8)
        return dequantize_weight(QuantizedWeight(q, self.weight_scale, self.weight_zero_point))
