"""``mono_quant::int8_conv2d``: an ``Int8Conv2d`` call as one registered op, so ``torch.compile`` keeps it whole.

Inside a compiled graph the op is opaque: dynamo does not trace into the checked kernel choice or oneDNN's packed
weight cache, the graph does not break, and at run time the op runs the layer's eager path (oneDNN's u8 x s8
convolution where it passed its check, im2col otherwise). Every tensor the result depends on is an argument,
so nothing is baked into a cached graph: the op finds the layer that owns ``weight`` (registered at build time),
and where a compiled graph hands it other tensors (inductor's freezing, a graph loaded from the cache) it builds
a layer from them once and keeps it for those tensors.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from mono_quant.config import Mode, Scheme

_LAYERS: dict[int, weakref.ref] = {}  # id(int8 weight) -> the layer holding it


def remember(layer: nn.Module) -> None:
    """Let the op find ``layer`` from its int8 weight (called whenever the layer's tensors change)."""
    _LAYERS[id(layer.weight)] = weakref.ref(layer)


@torch.library.custom_op("mono_quant::int8_conv2d", mutates_args=())
def int8_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    layer_bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    input_zero_point: torch.Tensor | None,
    owner_bias: torch.Tensor | None,
    geometry: list[int],
    mode: str,
) -> torch.Tensor:
    """``Int8Conv2d.forward(x, owner_bias)`` of the layer these tensors make up. ``geometry`` is ``[in_channels,
    out_channels, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, groups]``; the output is
    channels-last for 4-D inputs (what the fake implementation promises the compiler)."""
    layer = _find(weight, geometry, weight_scale, layer_bias, input_scale, input_zero_point)
    if layer is None:
        layer = _build(weight, weight_scale, layer_bias, input_scale, input_zero_point, geometry, mode)
    out = layer.eager_forward(x, owner_bias)
    return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out.contiguous()


@int8_conv2d.register_fake
def _(x, weight, weight_scale, layer_bias, input_scale, input_zero_point, owner_bias, geometry, mode):
    _, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, _groups = geometry
    height = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if x.dim() == 3:
        return x.new_empty(out_channels, height, width)
    shape = (x.shape[0], out_channels, height, width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _find(weight: torch.Tensor, geometry: list[int], *others: torch.Tensor | None) -> nn.Module | None:
    """The registered layer holding exactly these tensors with this geometry, else ``None``."""
    ref = _LAYERS.get(id(weight))
    layer = ref() if ref is not None else None
    if layer is None or layer.weight is not weight or layer.op_arguments()[1] != geometry:
        return None
    held = layer.op_arguments()[0]
    same = all(
        a is b or (a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape)
        for a, b in zip(others, held[1:], strict=True)
    )
    return layer if same else None


def _build(
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    input_zero_point: torch.Tensor | None,
    geometry: list[int],
    mode: str,
) -> nn.Module:
    from mono_quant.modules.int8_conv import Int8Conv2d  # the op is defined before the class that calls it

    in_channels, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry
    float_conv = nn.Conv2d(in_channels, out_channels, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups,
                           bias=bias is not None, device="meta")  # fmt: skip
    layer = Int8Conv2d(float_conv, Mode(mode), Scheme.SYMMETRIC, tuple(weight_scale.shape))
    layer.weight, layer.weight_scale, layer.bias = weight, weight_scale, bias
    if input_scale is not None:
        layer.input_scale, layer.input_zero_point = input_scale.reshape(()), input_zero_point.reshape(())
    layer.prepare()
    _BUILT[id(weight)] = layer  # one per distinct weight a compiled graph holds (bounded by the graphs built)
    return layer


_BUILT: dict[int, nn.Module] = {}
