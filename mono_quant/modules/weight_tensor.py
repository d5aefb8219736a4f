"""``QuantizedTensor``: a quantized weight that stands in for a float weight inside any module.

Module swapping only reaches exact ``nn.Linear``/``nn.Conv2d``/``nn.Embedding``. Real models multiply
by their weights in many other ways: subclasses with their own ``forward`` (same-padding convs),
parents that read a child's weight (``nn.MultiheadAttention.out_proj``), transformers' ``Conv1D``
(``torch.addmm(bias, x, weight)`` with ``weight`` stored ``[in, out]``), ``nn.Conv1d``. For those the
*weight tensor* is replaced (torchao's design): a tensor subclass with the float weight's shape and
dtype whose ``__torch_function__`` sends ``F.linear``, ``addmm``/``matmul``, ``F.conv1d``/``F.conv2d``
and ``F.embedding`` to a registered quantized layer (so every mode and kernel of the swap path serves
here too) and dequantizes for any other op, so the module's own ``forward`` keeps working.

The owning module gets a state_dict hook so files hold the same tensors as for a swapped layer
(``<m>.weight`` int8, ``<m>.weight_scale``, ...), and a load hook that fills the layer back.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant.kernels.tensors import ATEN_DETACH, wrapper_tensor
from mono_quant.modules.weight_calls import WEIGHT_CALLS, operand

_TRANSPOSE_FUNCS = {torch.t, torch.Tensor.t, torch.Tensor.T.__get__, torch.Tensor.mT.__get__}
_MOVE_FUNCS = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.float, torch.Tensor.half,
               torch.Tensor.bfloat16, torch.Tensor.double}  # fmt: skip
_SELF_FUNCS = {torch.Tensor.detach, torch.Tensor.detach_, torch.Tensor.requires_grad_, torch.Tensor.data.__get__,
               torch.Tensor.contiguous}  # fmt: skip


class QuantizedTensor(torch.Tensor):
    """A weight whose values live in ``layer`` (a registered ``QuantizedLayer`` without bias).

    ``kind`` is how the owner uses it: ``"linear"`` (``[out, in]``; ``transposed`` when the owner
    stores ``[in, out]``), ``"conv1d"``, ``"conv2d"`` or ``"embedding"``.

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> from mono_quant.modules.int8_linear import Int8Linear
        >>> w = torch.randn(8, 16)
        >>> layer = Int8Linear.from_float(nn.Linear(16, 8, bias=False).requires_grad_(False), QuantizationConfig())
        >>> qt = QuantizedTensor(layer, "linear", w.shape, w.dtype)
        >>> F.linear(torch.randn(2, 16), qt).shape, qt.shape, qt.dtype
        (torch.Size([2, 8]), torch.Size([8, 16]), torch.float32)
    """

    layer: nn.Module
    kind: str
    transposed: bool

    @staticmethod
    def __new__(cls, layer: nn.Module, kind: str, shape: torch.Size, dtype: torch.dtype, transposed: bool = False):
        device = next(iter(layer.buffers()), torch.empty(0)).device
        return wrapper_tensor(cls, shape, dtype, device)

    def __init__(
        self, layer: nn.Module, kind: str, shape: torch.Size, dtype: torch.dtype, transposed: bool = False
    ) -> None:
        self.layer, self.kind, self.transposed = layer, kind, transposed
        self._geometries: dict[tuple, nn.Module] = {}
        self._flip: QuantizedTensor | None = None  # the transposed view, made once (``x @ weight.T`` per forward)

    def __repr__(self) -> str:
        return f"QuantizedTensor({type(self.layer).__name__}, kind={self.kind}, shape={list(self.shape)})"

    def dequantize(self) -> torch.Tensor:
        """The float values, shaped and typed like the weight this tensor replaced."""
        weight = self.layer.dequantized_weight()
        if self.kind == "conv1d":
            weight = weight.squeeze(-2)
        weight = weight.t() if self.transposed else weight
        return weight.reshape(self.shape).to(self.dtype)

    def _flipped(self) -> QuantizedTensor:
        if self._flip is None:
            shape = torch.Size(reversed(self.shape))
            self._flip = QuantizedTensor(self.layer, self.kind, shape, self.dtype, not self.transposed)
            self._flip._flip = self
        return self._flip

    def __deepcopy__(self, memo: dict) -> QuantizedTensor:
        return QuantizedTensor(copy.deepcopy(self.layer, memo), self.kind, self.shape, self.dtype, self.transposed)

    def __reduce_ex__(self, protocol: int) -> Any:
        return QuantizedTensor, (self.layer, self.kind, self.shape, self.dtype, self.transposed)

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = _route(func, args, kwargs)
        if result is not NotImplemented:
            return result
        if getattr(func, "__name__", "") == "__get__" or func in (torch.Tensor.size, torch.Tensor.dim):
            return super().__torch_function__(func, types, args, kwargs)  # metadata: shape, dtype, device...
        plain_args, plain_kwargs = _plain(args), _plain(kwargs)
        return func(*plain_args, **plain_kwargs)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func is ATEN_DETACH:
            return args[0]
        plain_args, plain_kwargs = _plain(args), _plain(kwargs or {})
        return func(*plain_args, **plain_kwargs)


def _plain(value: Any) -> Any:
    """``value`` with every ``QuantizedTensor`` inside (tuples, lists, dicts) replaced by its float values."""
    if isinstance(value, QuantizedTensor):
        return value.dequantize()
    if isinstance(value, (tuple, list)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _route(func: Any, args: tuple, kwargs: dict) -> Any:
    """The quantized computation for ``func(*args)`` where it has one, else ``NotImplemented``."""
    if func in _SELF_FUNCS or (func is torch.Tensor.copy_ and args[1] is args[0]):
        return args[0]
    if func in _TRANSPOSE_FUNCS or (func in (torch.transpose, torch.Tensor.transpose) and len(args[0].shape) == 2):
        return args[0]._flipped() if isinstance(args[0], QuantizedTensor) else NotImplemented
    if func in _MOVE_FUNCS:
        return _moved(func, args, kwargs)
    call = WEIGHT_CALLS.get(func)
    if call is None:
        return NotImplemented
    weight, x = operand(args, kwargs, call.weight), operand(args, kwargs, call.input)
    if call.kind == "linear":
        if isinstance(weight, QuantizedTensor) and weight.kind == "linear" and not weight.transposed:
            return _with_bias(weight.layer(x), _arg(args, kwargs, 2, "bias"))
    elif call.kind == "addmm":
        if _right_operand(weight) and kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1:
            return _with_bias(weight.layer(x), _arg(args, kwargs, 0, "input"))
    elif call.kind == "matmul":
        if _right_operand(weight) and not isinstance(x, QuantizedTensor):
            return weight.layer(x)
    elif call.kind in ("conv1d", "conv2d"):
        if isinstance(weight, QuantizedTensor) and weight.kind == call.kind:
            return _conv(weight, args, kwargs)
    else:  # embedding
        plain = all(kwargs.get(k) in (None, False) for k in ("max_norm", "sparse")) and len(args) <= 2
        if isinstance(weight, QuantizedTensor) and weight.kind == "embedding" and plain:
            return weight.layer(x)
    return NotImplemented


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _right_operand(weight: Any) -> bool:
    """``x @ weight`` is the layer's product when the weight is an ``[in, out]`` view of a linear layer."""
    return isinstance(weight, QuantizedTensor) and weight.kind == "linear" and weight.transposed


def _with_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


def _moved(func: Any, args: tuple, kwargs: dict) -> QuantizedTensor:
    tensor: QuantizedTensor = args[0]
    probe = func(torch.empty(0, dtype=tensor.dtype, device=tensor.device), *args[1:], **kwargs)
    layer = tensor.layer if probe.device == tensor.device else copy.deepcopy(tensor.layer).to(probe.device)
    return QuantizedTensor(layer, tensor.kind, tensor.shape, probe.dtype, tensor.transposed)


def _conv(weight: QuantizedTensor, args: tuple, kwargs: dict) -> torch.Tensor:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    call = dict(zip(names, args, strict=False)) | kwargs
    x, bias, groups = call["input"], call.get("bias"), call.get("groups", 1)
    if groups != weight.layer.groups:
        return F.__dict__[weight.kind](x, weight.dequantize(), bias, *[call.get(n, 1) for n in names[3:6]], groups)
    dims = 1 if weight.kind == "conv1d" else 2
    stride, padding, dilation = (_tuple(call.get(n, d), dims) for n, d in (("stride", 1), ("padding", 0),
                                                                            ("dilation", 1)))  # fmt: skip
    if isinstance(padding, str):
        x, padding = _explicit_padding(x, padding, weight, dilation, dims)
    if dims == 1:
        x = x.unsqueeze(-2)
        stride, padding, dilation = (1, *stride), (0, *padding), (1, *dilation)
    key = (stride, padding, dilation)
    layer = weight.layer
    if key != (layer.stride, layer.padding, layer.dilation):
        layer = weight._geometries.get(key) or weight._geometries.setdefault(key, layer.with_geometry(*key))
    if getattr(layer, "fuses_bias", False):  # added inside the kernel's epilogue (Int8Conv2d)
        out = layer(x, bias=bias)
    else:
        out = _with_bias(layer(x), None if bias is None else bias.reshape(-1, 1, 1))
    return out.squeeze(-2) if dims == 1 else out


def _tuple(value: Any, dims: int) -> Any:
    if isinstance(value, str):
        return value
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * dims


def _explicit_padding(
    x: torch.Tensor, padding: str, weight: QuantizedTensor, dilation: tuple[int, ...], dims: int
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``padding="valid"|"same"`` as numbers; an uneven "same" pad is applied to ``x`` first (as torch does)."""
    if padding == "valid":
        return x, (0,) * dims
    kernel = weight.shape[2:]
    totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
    pads = []
    for total in reversed(totals):  # F.pad lists the last dimension first
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads), (0,) * dims


def quantized_tensor_of(module: nn.Module, attribute: str = "weight") -> QuantizedTensor | None:
    """The ``QuantizedTensor`` standing in for ``module.<attribute>``, if there is one.

    Example:
        >>> quantized_tensor_of(nn.Linear(2, 2)) is None
        True
    """
    value = getattr(module, attribute, None)
    return value if isinstance(value, QuantizedTensor) else None
