"""Quantized layer classes, each registering itself with ``@register(float_type)`` (``registry.py``).

Adding a layer type is one small file with a ``QuantizedLayer`` class decorated with ``@register``;
import it before quantizing (the built-in ones are imported here).
"""

from __future__ import annotations

from mono_quant.modules.attach import quantized_layers
from mono_quant.modules.base import ActivationQParams, QuantizedLayer, tensor_bytes
from mono_quant.modules.half import HalfConv2d, HalfEmbedding, HalfLinear
from mono_quant.modules.int4_embedding import Int4Embedding
from mono_quant.modules.int4_linear import Int4Linear
from mono_quant.modules.int8_conv import Int8Conv2d
from mono_quant.modules.int8_embedding import Int8Embedding
from mono_quant.modules.int8_linear import Int8Linear
from mono_quant.modules.recurrent import QuantizedGRU, QuantizedLSTM
from mono_quant.modules.recurrent_cell import QuantizedGRUCell, QuantizedLSTMCell
from mono_quant.modules.registry import (
    QUANTIZED_CLASSES,
    REGISTRY,
    class_for_kind,
    quantized_class_for,
    register,
    swapped_types,
)
from mono_quant.modules.weight_tensor import QuantizedTensor

__all__ = [
    "QUANTIZED_CLASSES",
    "REGISTRY",
    "ActivationQParams",
    "HalfConv2d",
    "HalfEmbedding",
    "HalfLinear",
    "Int4Embedding",
    "Int4Linear",
    "Int8Conv2d",
    "Int8Embedding",
    "Int8Linear",
    "QuantizedGRU",
    "QuantizedGRUCell",
    "QuantizedLSTM",
    "QuantizedLSTMCell",
    "QuantizedLayer",
    "QuantizedTensor",
    "class_for_kind",
    "quantized_class_for",
    "quantized_layers",
    "register",
    "swapped_types",
    "tensor_bytes",
]
