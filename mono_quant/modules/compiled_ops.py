"""``mono_quant::int8_matmul``, ``mono_quant::int8_codes_matmul`` and ``mono_quant::int8_conv2d``: an int8 layer
call (or, for dynamic matmuls, its product of already quantized codes) as one registered op, so ``torch.compile``
keeps it whole.

Inside a compiled graph each op is opaque: dynamo does not trace into the checked kernel choice or oneDNN's
packed weight cache, the graph does not break, and at run time the op runs the layer's eager path (oneDNN's
u8 x s8 kernels where they passed their check, ``_int_mm`` or im2col otherwise). Traced instead, the int8 path
lost to eager everywhere but MiniLM (an MLP 1024-4096-1024 at batch 1: 4.3x float compiled, 1.0x eager; inductor
copies the transposed weight for ``_int_mm``). A dynamic matmul's per-row quantization is the exception: it is
traced (inductor fuses its ~8 eager ops into one kernel) and only the product of the codes is opaque.

Every tensor the result depends on is an argument, so nothing is baked into a cached graph: an op finds the
layer that owns ``weight`` (registered when the layer is prepared), and where a compiled graph hands it other
tensors (inductor's freezing, a graph loaded from the cache) it builds a layer from them once and keeps it for
those tensors.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from mono_quant.config import Mode, Scheme

_LAYERS: dict[tuple[str, int], weakref.ref] = {}  # (op, id(int8 weight)) -> the layer holding it
_BUILT: dict[tuple[str, int], nn.Module] = {}  # layers built from a compiled graph's tensors (one per weight)
MAX_BUILT = 512  # more layers than that in compiled graphs holding their own tensors: the oldest are rebuilt


def remember(op: str, layer: nn.Module) -> None:
    """Let ``op`` find ``layer`` from its int8 weight (called whenever the layer's tensors change)."""
    _LAYERS[(op, id(layer.weight))] = weakref.ref(layer)


@torch.library.custom_op("mono_quant::int8_matmul", mutates_args=())
def int8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    input_zero_point: torch.Tensor | None,
    mode: str,
) -> torch.Tensor:
    """``Int8Matmul.forward`` of the layer these tensors make up, for a float32 ``x`` ``[rows, in]``."""
    tensors = (weight_scale, weight_zero_point, bias, input_scale, input_zero_point)
    return _matmul_layer(weight, tensors, mode).eager_matmul(x).contiguous()


@int8_matmul.register_fake
def _(x, weight, weight_scale, weight_zero_point, bias, input_scale, input_zero_point, mode):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("mono_quant::int8_codes_matmul", mutates_args=())
def int8_codes_matmul(
    q: torch.Tensor,
    row_max: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    input_scale: torch.Tensor | None,
    input_zero_point: torch.Tensor | None,
) -> torch.Tensor:
    """``Int8Matmul.codes_matmul`` of the dynamic layer these tensors make up, for per-row codes ``q`` ``[rows, in]``
    and their ``row_max`` ``[rows, 1]`` (quantized in traced ops, which inductor fuses)."""
    tensors = (weight_scale, weight_zero_point, bias, input_scale, input_zero_point)
    return _matmul_layer(weight, tensors, "dynamic").codes_matmul(q, row_max).contiguous()


@int8_codes_matmul.register_fake
def _(q, row_max, weight, weight_scale, weight_zero_point, bias, input_scale, input_zero_point):
    return row_max.new_empty(q.shape[0], weight.shape[0])


@torch.library.custom_op("mono_quant::int8_conv2d", mutates_args=())
def int8_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero_point: torch.Tensor | None,
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
    tensors = (weight_scale, weight_zero_point, layer_bias, input_scale, input_zero_point)
    layer = _find("conv", weight, geometry, tensors)
    if layer is None:
        layer = _build_conv(weight, tensors, geometry, mode)
    out = layer.eager_forward(x, owner_bias)
    return out.contiguous(memory_format=torch.channels_last) if out.dim() == 4 else out.contiguous()


@int8_conv2d.register_fake
def _(x, weight, weight_scale, weight_zero_point, layer_bias, input_scale, input_zero_point, owner_bias, geometry,
      mode):  # fmt: skip
    _, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, _groups = geometry
    height = (x.shape[-2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    width = (x.shape[-1] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if x.dim() == 3:
        return x.new_empty(out_channels, height, width)
    shape = (x.shape[0], out_channels, height, width)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)


def _find(op: str, weight: torch.Tensor, geometry: list[int], tensors: tuple) -> nn.Module | None:
    """The registered layer holding exactly these tensors with this geometry, else ``None``."""
    ref = _LAYERS.get((op, id(weight))) or _BUILT_REFS.get((op, id(weight)))
    layer = ref() if ref is not None else None
    if layer is None or layer.weight is not weight:
        return None
    held, held_geometry = layer.op_arguments()
    same = all(
        a is b or (a is not None and b is not None and a.data_ptr() == b.data_ptr() and a.shape == b.shape)
        for a, b in zip(tensors, held[1:], strict=True)
    )
    return layer if same and held_geometry == geometry else None


def _matmul_layer(weight: torch.Tensor, tensors: tuple, mode: str) -> nn.Module:
    """The registered ``Int8Matmul`` holding exactly these tensors, else one built from them (and kept)."""
    layer = _find("matmul", weight, [], tensors)
    return layer if layer is not None else _build_matmul(weight, tensors, mode)


def _build_matmul(weight: torch.Tensor, tensors: tuple, mode: str) -> nn.Module:
    from mono_quant.modules.int8_matmul import Int8Matmul  # the op is defined before the class that calls it

    weight_scale, weight_zero_point, bias, input_scale, input_zero_point = tensors
    scheme = Scheme.SYMMETRIC if weight_zero_point is None else Scheme.ASYMMETRIC
    layer = Int8Matmul(weight.shape[1], weight.shape[0], bias is not None, Mode(mode), scheme,
                       tuple(weight_scale.shape))  # fmt: skip
    layer.weight, layer.weight_scale, layer.bias = weight, weight_scale, bias
    layer.weight_zero_point = weight_zero_point
    if input_scale is not None:
        layer.input_scale, layer.input_zero_point = input_scale.reshape(()), input_zero_point.reshape(())
    layer.prepare()
    return _keep("matmul", weight, layer)


def _keep(op: str, weight: torch.Tensor, layer: nn.Module) -> nn.Module:
    """Keep ``layer`` for the compiled graph's tensors: the ``MAX_BUILT`` most recently built (it holds them)."""
    key = (op, id(weight))
    _BUILT[key] = layer
    _BUILT_REFS[key] = weakref.ref(layer)
    while len(_BUILT) > MAX_BUILT:
        _BUILT.pop(next(iter(_BUILT)))
    return layer


_BUILT_REFS: dict[tuple[str, int], weakref.ref] = {}


def _build_conv(weight: torch.Tensor, tensors: tuple, geometry: list[int], mode: str) -> nn.Module:
    from mono_quant.modules.int8_conv import Int8Conv2d  # the op is defined before the class that calls it

    weight_scale, _zero_point, bias, input_scale, input_zero_point = tensors  # symmetric weights only
    in_channels, out_channels, kh, kw, sh, sw, ph, pw, dh, dw, groups = geometry
    float_conv = nn.Conv2d(in_channels, out_channels, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups,
                           bias=bias is not None, device="meta")  # fmt: skip
    layer = Int8Conv2d(float_conv, Mode(mode), Scheme.SYMMETRIC, tuple(weight_scale.shape))
    layer.weight, layer.weight_scale, layer.bias = weight, weight_scale, bias
    if input_scale is not None:
        layer.input_scale, layer.input_zero_point = input_scale.reshape(()), input_zero_point.reshape(())
    layer.prepare()
    return _keep("conv", weight, layer)
