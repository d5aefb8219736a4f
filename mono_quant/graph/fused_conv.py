"""The nodes of a fused CNN graph (``fused_graph.py``): a quantized convolution with its epilogue, and a quantizer.

``FusedConv`` runs one int8 ``nn.Conv2d`` (or subclass) as one oneDNN call: uint8 (or float) in; an
activation post-op (ReLU, ReLU6/Hardtanh, Hardswish, SiLU), a residual sum (float32 or uint8
accumulator) and a uint8 (or float) output. An exact ``nn.Conv2d`` calls the kernel directly with
everything prepared in ``__init__``. A subclass runs its own ``forward`` under ``_Route``, which
sends that forward's ``F.conv2d`` on its weight to the kernel and pads a uint8 input with its zero
point; whatever else touches the uint8 input sees it dequantized, and a forward that does anything
with the convolution's result after it (where a fused epilogue would be wrong) is rerun on floats
once and from then on.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from mono_quant import kernels
from mono_quant.kernels.numerics import uint8_high
from mono_quant.modules.base import FusedConvParams, QuantizedLayer
from mono_quant.modules.weight_calls import WEIGHT_CALLS, operand

Unary = tuple[str, list[float]]
_UNARY_FLOAT = {
    "none": lambda y, s: y,
    "relu": lambda y, s: torch.relu(y),
    "hardtanh": lambda y, s: y.clamp(s[0], s[1]),
    "hardswish": lambda y, s: F.hardswish(y),
    "swish": lambda y, s: F.silu(y),
}
_MAX_SHAPES = 8  # input shapes a convolution keeps a packed weight for (oneDNN's layout per shape)
_METADATA = {torch.Tensor.size, torch.Tensor.dim, torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__}


def fused_params(layer: QuantizedLayer) -> FusedConvParams:
    """What the fused graph needs of a fusable convolution's layer (``QuantizedLayer.fused_conv_params``)."""
    params = layer.fused_conv_params()
    if params is None:
        raise ValueError(f"{type(layer).__name__} layer cannot be fused (fused_conv_params() is None)")
    return params


def input_qparams(layer: QuantizedLayer) -> tuple[float, int] | None:
    """The static layer's uint8 input ``(scale, zero_point)`` in this CPU's codes, as Python numbers; ``None``
    in dynamic mode."""
    return fused_params(layer).input_qparams


def dequantize_uint8(q: torch.Tensor, qparams: tuple[float, int]) -> torch.Tensor:
    """``(q - zero_point) * scale`` as float32.

    Example:
        >>> dequantize_uint8(torch.tensor([0, 10], dtype=torch.uint8), (0.5, 2)).tolist()
        [-1.0, 4.0]
    """
    return (q.float() - qparams[1]) * qparams[0]


class FusedConv(nn.Module):
    """An int8 convolution with its epilogue: uint8 or float in; activation, residual sum; uint8 or float out.

    Example:
        >>> import mono_quant as mq
        >>> q = mq.quantize(nn.Sequential(nn.Conv2d(1, 4, 3)), mode="static",
        ...                 calibration_data=[torch.rand(2, 1, 8, 8)]).model
        >>> fused = FusedConv(q[0], ("relu", []))
        >>> fused(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 4, 6, 6])
    """

    def __init__(
        self,
        conv: nn.Conv2d,
        unary: Unary = ("none", []),
        out_qparams: tuple[float, int] | None = None,
        accum_qparams: tuple[float, int] | None = None,
    ) -> None:
        super().__init__()
        params = self.params = fused_params(conv.weight.layer)
        self.conv, self.unary, self.out_qparams, self.accum_qparams = [conv], unary, out_qparams, accum_qparams
        self.copy_accum = True  # the residual input is written to by oneDNN: copied unless private
        self.dynamic = params.input_qparams is None  # input scale from each call's min/max
        self.in_qparams = (1.0, 0) if params.input_qparams is None else params.input_qparams
        self._inv_scale = 1.0 / self.in_qparams[0]
        self.routed = type(conv) is not nn.Conv2d  # a subclass: its own forward, its conv2d routed here
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation))
        self.weight_scale, self.groups = params.weight_scale, conv.groups
        bias = conv.bias if conv.bias is not None else params.bias
        self.bias = None if bias is None else bias.detach().float()
        self._packs: dict[tuple[str, tuple[int, ...] | None], tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._by_shape: dict[torch.Size, tuple[torch.Tensor, torch.Tensor] | None] = {}  # the hot path's lookup
        self.routed_ok = True  # until a subclass's forward turns out to do more than pad + conv2d
        self.top = uint8_high()  # the largest uint8 code this CPU multiplies exactly

    def _pack(
        self, geometry: tuple[list[int], list[int], list[int]], shape: tuple[int, ...] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weight packed for this geometry and input shape (at most ``_MAX_SHAPES`` shapes, then a generic
        one), or ``None`` where oneDNN fails its check for it on this machine (the float path serves then)."""
        key = (repr(geometry), shape)
        if key not in self._packs:
            if shape is not None and len(self._packs) >= _MAX_SHAPES:
                return self._pack(geometry, None)
            packs = kernels.OneDNNConvWeight().get_conv(
                self.params.weight, self.params.kernel_size, self.weight_scale, torch.tensor(self.in_qparams[0]),
                torch.tensor(self.in_qparams[1]), geometry, self.groups, None if shape is None else list(shape),
            )  # fmt: skip
            self._packs[key] = packs if shape is None or self._exact(packs, geometry, shape) else None
        return self._packs[key]

    def _exact(self, packs: tuple[torch.Tensor, torch.Tensor], geometry: Any, shape: tuple[int, ...]) -> bool:
        """Whether oneDNN's convolution with this packing matches the exact reference on seeded random codes."""
        codes = torch.randint(0, self.top + 1, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        codes = codes.contiguous(memory_format=torch.channels_last)
        zero = self.top // 2
        out = kernels.onednn_conv2d_fused(codes, (1.0, zero), *packs[:1], self.weight_scale, packs[1], None,
                                          geometry, self.groups)  # fmt: skip
        weight = self.params.weight.reshape(self.params.weight.shape[0], -1, *self.params.kernel_size)
        check = kernels.check
        reference, bound = check.conv_reference(codes, zero, weight, self.weight_scale, None, geometry, self.groups)
        ok, error, limit = check.within(out[: reference.shape[0]], reference, bound)
        if not ok:
            label = f"int8_conv2d_fused {tuple(weight.shape)} groups={self.groups} input {shape}"
            check.record(check.KernelFailure(label, "onednn", error, limit, "im2col"))
        return ok

    def forward(self, x: torch.Tensor, accum: torch.Tensor | None = None) -> torch.Tensor:
        in_qparams = self.in_qparams
        if self.dynamic:
            x = x.contiguous(memory_format=torch.channels_last)
            in_qparams = kernels.dynamic_uint8_qparams(x, self.top)
            x = kernels.quantize_uint8_channels_last(x, 1.0 / in_qparams[0], in_qparams[1], self.top)
        elif x.dtype != torch.uint8:
            x = kernels.quantize_uint8_channels_last(x, self._inv_scale, in_qparams[1], self.top)
        pristine = accum  # a subclass's float path needs the accumulator as it was before oneDNN wrote to it
        if accum is not None and (
            self.copy_accum or self.routed or not accum.is_contiguous(memory_format=torch.channels_last)
        ):
            accum = accum.clone(memory_format=torch.channels_last)
        if not self.routed:
            packs = self._by_shape.get(x.shape, False)
            if packs is False:
                packs = self._pack(self.geometry, tuple(x.shape))
                if len(self._by_shape) < 4 * _MAX_SHAPES:
                    self._by_shape[x.shape] = packs
            if packs is None:  # oneDNN is wrong for this shape here
                return self.float_path(x, in_qparams, pristine)
            return self.run(x, in_qparams, packs[0], packs[1], self.geometry, accum)
        if self.routed_ok:
            route, out = _Route(self, x, in_qparams, accum), None
            with route:
                out = self.conv[0].forward(x)
            if route.ok and out is route.result:
                return out
            self.routed_ok = False  # the subclass does more than pad + conv2d: floats from now on
        return self.float_path(x, in_qparams, pristine)

    def run(
        self,
        x: torch.Tensor,
        in_qparams: tuple[float, int],
        packed: torch.Tensor,
        zero_points: torch.Tensor,
        geometry: tuple[list[int], list[int], list[int]],
        accum: torch.Tensor | None,
    ) -> torch.Tensor:
        """The kernel call on a uint8 channels-last ``x``."""
        return kernels.onednn_conv2d_fused(
            x, in_qparams, packed, self.weight_scale, zero_points, self.bias, geometry, self.groups, self.unary,
            accum, self.out_qparams, self.accum_qparams,
        )  # fmt: skip

    def float_path(self, x: torch.Tensor, in_qparams: tuple[float, int], accum: torch.Tensor | None) -> torch.Tensor:
        """The same result the unfused way: the module's own forward on floats, then the epilogue in float."""
        x = dequantize_uint8(x, in_qparams) if x.dtype == torch.uint8 else x
        out = self.conv[0](x)
        if accum is not None:
            out = out + (dequantize_uint8(accum, self.accum_qparams) if self.accum_qparams else accum)
        out = _UNARY_FLOAT[self.unary[0]](out, self.unary[1])
        if self.out_qparams is None:
            return out
        return kernels.quantize_uint8_channels_last(out, 1.0 / self.out_qparams[0], self.out_qparams[1])


class _Unroutable(Exception):
    """The subclass's forward used the convolution's result: the fused epilogue does not apply."""


class _Route(TorchFunctionMode):
    """Runs a conv subclass's ``forward`` on a uint8 input: its ``F.conv2d`` on the weight goes to ``FusedConv.run``."""

    def __init__(
        self, fused: FusedConv, x: torch.Tensor, in_qparams: tuple[float, int], accum: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.fused, self.in_qparams, self.accum = fused, in_qparams, accum
        self.inputs = [x]  # uint8 tensors holding the input (the input, padded copies)
        self.result: torch.Tensor | None = None
        self.ok = True

    def _held(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and any(value is t for t in self.inputs)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _METADATA:
            return func(*args, **kwargs)
        if self.result is not None and any(a is self.result for a in (*args, *kwargs.values())):
            self.ok = False  # used after the conv: the result must come from the float path
            raise _Unroutable
        if func is F.pad and self._held(args[0]) and self._zero_pad(args, kwargs):
            out = F.pad(args[0], args[1] if len(args) > 1 else kwargs["pad"], value=float(self.in_qparams[1]))
            self.inputs.append(out)
            return out
        weight_call = WEIGHT_CALLS.get(func)
        held = weight_call is not None and self._held(operand(args, kwargs, weight_call.input))
        if held and weight_call.kind == "conv2d" and self.result is None:
            call = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args, strict=False))
            call.update(kwargs)
            padding = call.get("padding", 0)
            if operand(args, kwargs, weight_call.weight) is self.fused.conv[0].weight and not isinstance(padding, str):
                geometry = ([*_pair(call.get("stride", 1))], [*_pair(padding)], [*_pair(call.get("dilation", 1))])
                x = args[0].contiguous(memory_format=torch.channels_last)
                packs = self.fused._pack(geometry, tuple(x.shape))
                if packs is None:  # oneDNN is wrong for this shape here: the float path serves
                    self.ok = False
                    raise _Unroutable
                packed, zero_points = packs
                self.result = self.fused.run(x, self.in_qparams, packed, zero_points, geometry, self.accum)
                return self.result
        args, kwargs = tree_map(self._dequantized, (args, kwargs))  # nested too (a list given to torch.cat)
        return func(*args, **kwargs)

    @staticmethod
    def _zero_pad(args: tuple, kwargs: dict) -> bool:
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value")
        return mode == "constant" and not value

    def _dequantized(self, value: Any) -> Any:
        return dequantize_uint8(value, self.in_qparams) if self._held(value) else value

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        super().__exit__(exc_type, exc, tb)
        return exc_type is _Unroutable  # swallowed: ``forward`` sees ``ok`` False and takes the float path


class Quantize(nn.Module):
    """Float -> uint8 channels-last at a static convolution's input scale (one node per value and scale)."""

    def __init__(self, qparams: tuple[float, int]) -> None:
        super().__init__()
        self.inv_scale, self.zero_point, self.top = 1.0 / qparams[0], qparams[1], uint8_high()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quantize_uint8_channels_last(x, self.inv_scale, self.zero_point, self.top)
