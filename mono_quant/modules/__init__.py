"""Quantized layer classes and the registry that maps a float layer type to them.

Adding a layer type is one small file with a ``QuantizedLayer`` class and one line in ``REGISTRY``.
"""

from __future__ import annotations

from torch import nn

from mono_quant.config import QuantizationConfig
from mono_quant.modules.base import ActivationQParams, QuantizedLayer, tensor_bytes
from mono_quant.modules.half import HalfConv2d, HalfEmbedding, HalfLinear
from mono_quant.modules.int4_embedding import Int4Embedding
from mono_quant.modules.int4_linear import Int4Linear
from mono_quant.modules.int8_conv import Int8Conv2d
from mono_quant.modules.int8_embedding import Int8Embedding
from mono_quant.modules.int8_linear import Int8Linear

REGISTRY: dict[type[nn.Module], tuple[type[QuantizedLayer], ...]] = {
    nn.Linear: (Int8Linear, Int4Linear, HalfLinear),
    nn.Conv2d: (Int8Conv2d, HalfConv2d),
    nn.Embedding: (Int8Embedding, Int4Embedding, HalfEmbedding),
}

QUANTIZED_CLASSES: dict[str, type[QuantizedLayer]] = {
    cls.__name__: cls for classes in REGISTRY.values() for cls in classes
}


def quantized_class_for(module: nn.Module, config: QuantizationConfig) -> tuple[type[QuantizedLayer] | None, str]:
    """The class that quantizes ``module`` under ``config``, or ``None`` and the reason it is skipped.

    Only exact registered types match: a subclass (e.g. the ``out_proj`` of ``nn.MultiheadAttention``,
    whose parent reads its float weight directly) is left in float.

    Example:
        >>> quantized_class_for(nn.Linear(256, 16), QuantizationConfig(dtype="int4"))[0].__name__
        'Int4Linear'
        >>> quantized_class_for(nn.Conv2d(1, 1, 3), QuantizationConfig(dtype="int4"))
        (None, 'no int4 path for Conv2d')
    """
    candidates = REGISTRY.get(type(module))
    if candidates is None:
        return None, f"{type(module).__name__} is not a supported layer type"
    for cls in candidates:
        if config.dtype in cls.dtypes:
            reason = cls.unsupported_reason(module, config)
            return (None, reason) if reason else (cls, "")
    return None, f"no {config.dtype.value} path for {type(module).__name__}"


__all__ = [
    "REGISTRY",
    "QUANTIZED_CLASSES",
    "ActivationQParams",
    "QuantizedLayer",
    "HalfConv2d",
    "HalfEmbedding",
    "HalfLinear",
    "Int4Embedding",
    "Int4Linear",
    "Int8Conv2d",
    "Int8Embedding",
    "Int8Linear",
    "quantized_class_for",
    "tensor_bytes",
]
