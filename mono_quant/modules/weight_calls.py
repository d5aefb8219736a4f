"""The one table of torch functions that multiply an input by a layer's weight.

Static calibration observes these calls' inputs (``engine/calibration.py``), a ``QuantizedTensor`` routes
them to its quantized layer (``weight_tensor.py``), and the fused CNN graph sends a conv subclass's own
convolution to its kernel (``graph/fused_conv.py``): all three read this table.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F


class WeightCall(NamedTuple):
    """How a function takes its operands: the product's kind, and the positions (and names) of weight and input."""

    kind: str  # "linear" (x @ W.T), "addmm" (bias + x @ W), "matmul" (x @ W), "conv1d", "conv2d", "embedding"
    weight: tuple[int, str]
    input: tuple[int, str]


_LINEAR = WeightCall("linear", (1, "weight"), (0, "input"))
_ADDMM = WeightCall("addmm", (2, "mat2"), (1, "mat1"))
_MATMUL = WeightCall("matmul", (1, "other"), (0, "input"))
WEIGHT_CALLS: dict[Any, WeightCall] = {
    F.linear: _LINEAR,
    torch.addmm: _ADDMM,
    torch.Tensor.addmm: _ADDMM,
    torch.matmul: _MATMUL,
    torch.mm: _MATMUL,
    torch.Tensor.matmul: _MATMUL,
    torch.Tensor.__matmul__: _MATMUL,
    torch.Tensor.mm: _MATMUL,
    F.conv1d: WeightCall("conv1d", (1, "weight"), (0, "input")),
    F.conv2d: WeightCall("conv2d", (1, "weight"), (0, "input")),
    F.embedding: WeightCall("embedding", (1, "weight"), (0, "input")),
}


def operand(args: tuple, kwargs: dict, where: tuple[int, str]) -> Any:
    """The operand at ``where`` (position, keyword name) of a call.

    Example:
        >>> x, w = torch.ones(2, 3), torch.ones(4, 3)
        >>> call = WEIGHT_CALLS[F.linear]
        >>> operand((x,), {"weight": w}, call.weight) is w, operand((x, w), {}, call.input) is x
        (True, True)
    """
    index, name = where
    return args[index] if len(args) > index else kwargs.get(name)
