"""``QuantizedLayer``: the contract every quantized module class fulfils, the one place a layer kind's
knowledge lives (quantize, report, save, load, dequantize, HF and ONNX export and the fused CNN graph ask the
class; no other module keeps a table of kinds or reads a layer's private attributes).

Required (the defaults raise; callers ask through ``require`` so a missing one is a ``ConfigError`` naming it):
``dtypes``, ``bits``, ``from_float``, ``from_metadata`` (an empty shell to load a file into), ``metadata``
(the file entry), ``dequantized_weight`` and ``dequantize``. Optional, with their defaults:

- ``float_shape()``: the float weight shape files record (default: read from the layer's public geometry,
  else ``dequantized_weight()``'s shape); ``meta_float_module``, ``weight_ranks``, ``swap_module``,
  ``needs_calibration``, ``unsupported_reason``; ``prepare()`` recomputes derived state after tensors are
  replaced (default: nothing).
- ``state_dict_entry(tensors, name, mode)``: the file entry of a layer quantized from a bare state_dict,
  read from its tensors (default: such a layer cannot be saved from a state_dict); ``loads_entry(entry,
  module)``: whether the class loads an entry written for another class into ``module`` (default False).
- ``hf_exportable``: the state_dict is a compressed-tensors layout ``save_pretrained`` writes (default
  False: written as float weights from ``dequantize``/``dequantized_weight``).
- ``onnx_forward(ops, x, bias)``: the forward traced by ``export_onnx``, built from ``ops`` (integer ONNX
  operators, see ``mono_quant.io.onnx_ops.OnnxOps``); default: none, the layer is exported through ``dequantize``.
- ``fused_conv_params()``: what the fused CNN graph needs (``FusedConvParams``), or ``None`` (the default)
  where the layer cannot be fused.
- ``from_quantized(module, config, weight)`` (classmethod): the layer holding a ``QuantizedWeight`` fitted
  elsewhere (GPTQ, AWQ: ``engine.weight_fitting``); a class without it is rounded to nearest under every
  ``algorithm``.

Its ``state_dict`` uses the file-format tensor names (``weight``, ``weight_scale``, ``weight_packed``,
``input_scale``...).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from mono_quant.config import QuantDtype, QuantizationConfig
from mono_quant.errors import ConfigError
from mono_quant.qparams import ActivationQParams


@dataclass(frozen=True)
class FusedConvParams:
    """What the fused CNN graph (``mono_quant.graph``) needs of an int8 convolution.

    ``weight``: int8 ``[out, in/groups * kh * kw]`` (symmetric); ``weight_scale``: float32 ``[out]``;
    ``input_qparams``: the static uint8 input ``(scale, zero_point)`` in this CPU's codes, ``None`` in
    dynamic mode (each call's min/max); ``output_qparams``: the calibrated output ``(scale, zero_point)`` in
    the same codes, ``None`` where the output was not calibrated.
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    kernel_size: tuple[int, int]
    groups: int
    input_qparams: tuple[float, int] | None
    output_qparams: tuple[float, int] | None = None


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
    hf_exportable: ClassVar[bool] = False  # the state_dict is a compressed-tensors layout (save_pretrained)

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

    @classmethod
    def state_dict_entry(cls, tensors: Mapping[str, torch.Tensor], name: str, mode: str) -> dict[str, Any] | None:
        """The file entry (``metadata()`` plus the stored weight ``shape``) of layer ``name`` quantized from a
        bare state_dict, read from its ``tensors`` (``mode``: the config's, for int8 without ``input_scale``);
        ``None`` when they are missing."""
        raise NotImplementedError

    @classmethod
    def loads_entry(cls, entry: dict[str, Any], module: nn.Module) -> bool:
        """Whether a file entry written for another class (same tensors) loads into ``module`` as this class."""
        return False

    def metadata(self) -> dict[str, Any]:
        """JSON-able description stored per layer in files (kind, mode, bits, scheme, ...)."""
        raise NotImplementedError

    def float_shape(self) -> list[int]:
        """The float weight's shape, as files record it."""
        if hasattr(self, "kernel_size") and hasattr(self, "out_channels"):
            return [self.out_channels, self.in_channels, *self.kernel_size]
        if hasattr(self, "in_features"):
            return [self.out_features, self.in_features]
        if hasattr(self, "num_embeddings"):
            return [self.num_embeddings, self.embedding_dim]
        return list(require(self, "dequantized_weight", "cannot record the float shape").shape)

    def prepare(self) -> None:
        """Recompute derived (never saved) state from the tensors, after they were replaced."""

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as float32 values, shaped like the float module's weight."""
        raise NotImplementedError

    def dequantize(self) -> nn.Module:
        """A plain float module (``nn.Linear``/``nn.Conv2d``/``nn.Embedding``) with the dequantized weight."""
        raise NotImplementedError

    def onnx_forward(self, ops: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The forward ``export_onnx`` traces, built from ``ops``' integer operators."""
        raise NotImplementedError

    def fused_conv_params(self) -> FusedConvParams | None:
        """What the fused CNN graph needs, or ``None`` where this layer cannot be fused."""
        return None


_WHY = {
    "dequantize": "it returns the float module from the quantized one",
    "dequantized_weight": "it returns the float weight from the quantized one",
    "state_dict_entry": "it reads a layer's file entry from a bare state_dict's tensors",
    "onnx_forward": "it builds the layer's ONNX graph",
}


def implements(layer: QuantizedLayer | type[QuantizedLayer], method: str) -> bool:
    """Whether ``layer``'s class overrides ``QuantizedLayer.<method>`` (optional parts of the contract).

    Example:
        >>> from mono_quant.modules import Int4Linear, Int8Linear
        >>> implements(Int8Linear, "onnx_forward"), implements(Int4Linear, "onnx_forward")
        (True, False)
    """
    cls = layer if isinstance(layer, type) else type(layer)
    owner = next((klass for klass in cls.__mro__ if method in vars(klass)), None)  # classmethods: by definition
    return owner is not None and owner is not QuantizedLayer


def require(layer: QuantizedLayer | type[QuantizedLayer], method: str, action: str, *args: Any) -> Any:
    """``layer.<method>(*args)``; a class that does not implement it gets a ``ConfigError`` naming it and
    ``action`` (what needed it).

    Example:
        >>> class Bare(QuantizedLayer):
        ...     pass
        >>> try:
        ...     require(Bare(), "dequantize", "cannot dequantize layer 'fc'")
        ... except ConfigError as err:
        ...     print(err)  # doctest: +ELLIPSIS
        cannot dequantize layer 'fc': Bare does not implement dequantize(), which a registered ...
    """
    cls = layer if isinstance(layer, type) else type(layer)
    if not implements(cls, method):
        why = _WHY.get(method, "see mono_quant.modules.base")
        raise ConfigError(
            f"{action}: {cls.__name__} does not implement {method}(), which a registered quantized class needs "
            f"for this ({why})"
        )
    return getattr(layer, method)(*args)


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
