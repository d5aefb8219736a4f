"""``Int4Weight``: the group-wise int4 state shared by ``Int4Linear`` and ``Int4Embedding``.

The compressed-tensors layout: ``weight_packed`` int32 ``[rows, cols/8]`` (eight 4-bit values per word,
least significant first, offset by 8), ``weight_scale`` ``[rows, cols/group]``, ``weight_zero_point``
int8 of the same shape when asymmetric, and ``weight_shape`` int64 ``[2]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from mono_quant.config import Granularity, Mode, QuantizationConfig, Scheme
from mono_quant.qparams import QuantizedWeight, dequantize_weight, pack_int4_words, quantize_weight, unpack_int4_words

MIN_GROUP_SIZE = 32  # the smallest group the int4 kernels take (they take 32, 64, 128 and 256)


def group_sizes(group_size: int) -> list[int]:
    """The group sizes an int4 layer may use under ``config.group_size``, largest first: ``group_size``, then
    its halves down to 32 (``group_size`` alone when it is smaller).

    Example:
        >>> group_sizes(128), group_sizes(96), group_sizes(16)
        ([128, 64, 32], [96, 48], [16])
    """
    sizes = [group_size]
    while sizes[-1] % 2 == 0 and sizes[-1] // 2 >= MIN_GROUP_SIZE:
        sizes.append(sizes[-1] // 2)
    return sizes


def group_size_for(width: int, group_size: int) -> int | None:
    """The group an int4 weight of ``width`` input values uses: the largest of ``group_sizes(group_size)`` that
    divides ``width``, or ``None`` (the layer then takes int8). Each layer's file entry records its own.

    Example:
        >>> group_size_for(1568, 128), group_size_for(384, 128), group_size_for(48, 128), group_size_for(48, 16)
        (32, 128, None, 16)
    """
    return next((size for size in group_sizes(group_size) if width % size == 0), None)


def no_group_reason(what: str, width: int, group_size: int) -> str:
    """Why a layer has no int4 group (see ``group_size_for``).

    Example:
        >>> no_group_reason("in_features", 100, 128)
        'no int4 group size of [128, 64, 32] divides in_features=100'
    """
    return f"no int4 group size of {group_sizes(group_size)} divides {what}={width}"


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
        """Quantize a float ``[rows, cols]`` weight into the buffers (groups of ``self.group_size``)."""
        self.store_quantized(quantize_weight(weight, 4, config.scheme, Granularity.PER_GROUP, self.group_size))

    def store_quantized(self: Any, qw: QuantizedWeight) -> None:
        """Hold ``qw``'s int4 values (packed), group scales and zero points."""
        self.weight_packed = pack_int4_words(qw.data)
        self.weight_scale = qw.scale
        self.weight_zero_point = qw.zero_point

    hf_exportable = True  # compressed-tensors' pack-quantized (naive-quantized where it cannot load packed)

    @classmethod
    def state_dict_entry(cls: Any, tensors: Mapping[str, torch.Tensor], name: str, mode: str) -> dict[str, Any] | None:
        """``QuantizedLayer.state_dict_entry``: the scheme and group size read from the tensors."""
        scale, shape = tensors.get(f"{name}.weight_scale"), tensors.get(f"{name}.weight_shape")
        if f"{name}.weight_packed" not in tensors or scale is None or shape is None:
            return None
        rows, cols = (int(v) for v in shape.tolist())
        scheme = "asymmetric" if f"{name}.weight_zero_point" in tensors else "symmetric"
        return {"kind": cls.float_type.__name__, "mode": Mode.WEIGHT_ONLY.value, "bits": 4, "scheme": scheme,
                "group_size": cols // scale.shape[1], "shape": [rows, cols]}  # fmt: skip

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
