"""``QuantizedLayer``: the contract every quantized module class fulfils.

A class declares which float type and dtypes it covers, says why it cannot take a given module
(``unsupported_reason``), builds itself from a float module (``from_float``) or as an empty shell
to load a file into (``from_metadata``), and converts back (``dequantize``). Its ``state_dict`` uses
the file-format tensor names (``weight``, ``weight_scale``, ``weight_packed``, ``input_scale``...).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mono_quant.config import QuantDtype, QuantizationConfig
from mono_quant.qparams import ActivationQParams


class QuantizedLayer:
    """Mixin for quantized modules; see the module docstring for the contract."""

    float_type: ClassVar[type[nn.Module]]  # set by ``@register(float_type)``
    dtypes: ClassVar[tuple[QuantDtype, ...]]
    bits: ClassVar[int]  # what files record for the layer
    # exact float modules are replaced by this class; when False, they keep their class and get a
    # QuantizedTensor weight backed by it (convolutions: models read ``conv.weight.dtype``, as ViT does)
    swap_module: ClassVar[bool] = True
    weight_ranks: ClassVar[tuple[int, ...]] = (2,)  # ranks a file may record for the float weight's shape
    needs_calibration: ClassVar[bool] = False  # whether static mode calibrates this layer's input

    @classmethod
    def unsupported_reason(cls, module: nn.Module, config: QuantizationConfig) -> str | None:
        """Why ``module`` cannot become this class under ``config`` (``None`` when it can)."""
        return None

    @classmethod
    def from_float(
        cls, module: nn.Module, config: QuantizationConfig, activation: ActivationQParams | None = None
    ) -> QuantizedLayer:
        raise NotImplementedError

    @classmethod
    def meta_float_module(cls, entry: dict[str, Any]) -> nn.Module | None:
        """A float module on the meta device shaped per a file's layer entry (for checks and loads without
        a model), or ``None`` when ``from_metadata`` needs none. The default is a 2-D ``[out, in]`` Linear."""
        shape = entry["shape"]
        if len(shape) != 2:
            return None
        return nn.Linear(shape[1], shape[0], bias=bool(entry["bias"]), device="meta")

    @classmethod
    def from_metadata(cls, module: nn.Module, metadata: dict[str, Any]) -> QuantizedLayer:
        """An instance shaped like ``module`` per ``metadata``, ready for ``load_state_dict``."""
        raise NotImplementedError

    def metadata(self) -> dict[str, Any]:
        """JSON-able description stored per layer in files (kind, mode, bits, scheme, ...)."""
        raise NotImplementedError

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as float32 values, shaped like the float module's weight."""
        raise NotImplementedError

    def dequantize(self) -> nn.Module:
        """A plain float module (``nn.Linear``/``nn.Conv2d``/``nn.Embedding``) with the dequantized weight."""
        raise NotImplementedError


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    """Total storage bytes of the given tensors (``None`` counts 0).

    Example:
        >>> tensor_bytes(torch.zeros(4, dtype=torch.int8), None, torch.zeros(2))
        12
    """
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def float_weight(module: nn.Module) -> torch.Tensor | None:
    """What a float layer multiplies by: its ``weight``, or for layers holding several matrices (``nn.LSTM``:
    ``weight_ih_l0``, ``weight_hh_l0`` ...) all of them flattened into one vector; ``None`` when it has none.

    Example:
        >>> float_weight(nn.Linear(3, 2)).shape, float_weight(nn.GRUCell(3, 2)).shape, float_weight(nn.ReLU())
        (torch.Size([2, 3]), torch.Size([30]), None)
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.detach()
    matrices = [p.detach().reshape(-1) for n, p in module.named_parameters(recurse=False) if n.startswith("weight_")]
    return torch.cat(matrices) if matrices else None


def copy_bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach().float().clone()


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` (``[out, in]``) and ``bias``, on the weight's device.

    Example:
        >>> float_linear(torch.ones(2, 3), None).weight.shape
        torch.Size([2, 3])
    """
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def meta_conv2d(entry: dict[str, Any]) -> nn.Conv2d:
    """``QuantizedLayer.meta_float_module`` for convolution classes (a flattened state_dict conv is 1x1).

    Example:
        >>> meta_conv2d({"shape": [8, 3, 3, 3], "bias": True}).kernel_size
        (3, 3)
    """
    shape = entry["shape"]
    kernel = tuple(shape[2:]) if len(shape) == 4 else (1, 1)
    groups = entry.get("groups", 1)
    return nn.Conv2d(shape[1] * groups, shape[0], kernel, groups=groups, bias=bool(entry["bias"]), device="meta")


def meta_embedding(entry: dict[str, Any]) -> nn.Embedding:
    """``QuantizedLayer.meta_float_module`` for embedding classes.

    Example:
        >>> meta_embedding({"shape": [10, 4], "bias": False}).num_embeddings
        10
    """
    shape = entry["shape"]
    return nn.Embedding(shape[0], shape[1], _weight=torch.empty(shape, device="meta"))  # skips a slow meta init
