"""The integer ONNX operators quantized classes build their export graph from (``QuantizedLayer.onnx_forward(ops,
x, bias)`` with ``ops`` an ``OnnxOps``), and the export-time forwards ``export_onnx`` installs.

Each operator is an ``autograd.Function`` whose ``symbolic`` emits the integer graph (opset 17); what the
built-in classes emit:

- int8 Linear, dynamic: per-row (token) symmetric activation quantization exactly as mono-quant computes it
  (``ReduceMax(Abs)``, ``Round``, ``+128`` to uint8), ``MatMulInteger`` (u8 x s8, ``a_zero_point=128``),
  ``Cast`` + ``Mul`` by row scale x channel scale, ``Add`` bias.
- int8 Linear, static: ``Round``/``Clip`` with the calibrated scale and zero point (uint8), ``MatMulInteger``,
  one ``Mul`` by the combined scale, ``Add`` bias.
- int8 Conv2d (dynamic or static): ``DynamicQuantizeLinear`` (per-tensor uint8, what mono-quant's CPU path does)
  or the calibrated uint8 quantization, ``ConvInteger`` (weight stored uint8 = int8 + 128 with
  ``w_zero_point=128``: ORT's ConvInteger takes uint8 weights only), ``Mul`` per channel, ``Add`` bias.
- int8 Embedding: ``Gather`` of the int8 table and of the row scales, ``Mul``.
- int8 weight-only Linear (and asymmetric-weight Linear): ``DequantizeLinear`` (per channel) on the int8
  ``[in, out]`` initializer, ``MatMul``; weight-only or asymmetric-weight convolutions: float ``Conv``.
Classes without ``onnx_forward`` (int4, fp16/bf16, plugin layers by default) are exported through their
``dequantize()`` (``float_forward``: float initializers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mono_quant.modules import QuantizedLayer

_UINT8, _FLOAT = 2, 1  # ONNX TensorProto data types


FLOAT_TWINS: dict[int, nn.Module] = {}  # id(layer) -> its dequantized float layer, during one export


def float_forward(self: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    twin = FLOAT_TWINS.get(id(self))
    if twin is None:  # a layer built while tracing (a conv at another geometry): dequantize it now
        twin = FLOAT_TWINS[id(self)] = self.dequantize().requires_grad_(False)
    out = twin(x)
    return out if bias is None else out + bias.reshape(-1, *([1] * (out.dim() - 2)))


def export_forward(self: QuantizedLayer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``bias`` is an attached conv owner's bias (``Int8Conv2d.fuses_bias``); the layer's own is then None."""
    return self.onnx_forward(OPS, x, bias)


class OnnxOps:
    """The integer ONNX operators a class's ``onnx_forward`` builds its graph from (each traced as one node
    group by its ``symbolic``). Weights are int8; ``weight_scale`` per output channel; ``input_qparams`` the
    layer's stored static ``(scale, int8 zero point)``, or ``None`` for dynamic activations.

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> from mono_quant.modules import Int8Linear
        >>> layer = Int8Linear.from_float(nn.Linear(8, 4), QuantizationConfig())
        >>> layer.onnx_forward(OPS, torch.randn(2, 8)).shape  # eager: the float value of the same graph
        torch.Size([2, 4])
    """

    @staticmethod
    def linear(
        x: torch.Tensor,
        w_t: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``x @ w_t`` (int8 ``[in, out]``) as ``MatMulInteger`` on per-row dynamic or static uint8 codes."""
        return _Linear.apply(x, w_t, weight_scale, bias, *_static(input_qparams, weight_scale))

    @staticmethod
    def weight_only_linear(
        x: torch.Tensor,
        w_t: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_zero_point: torch.Tensor | None,
        bias: torch.Tensor | None,
        dequantized: torch.Tensor,
    ) -> torch.Tensor:
        """``DequantizeLinear`` (per channel) on ``w_t`` and a float ``MatMul``; ``dequantized`` is the eager value."""
        return _WeightOnlyLinear.apply(x, w_t, weight_scale, weight_zero_point, bias, dequantized)

    @staticmethod
    def conv(
        x: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        input_qparams: tuple[torch.Tensor, torch.Tensor] | None,
        geometry: tuple[Any, Any, Any, int],
    ) -> torch.Tensor:
        """Static: ``QuantizeLinear``/``DequantizeLinear`` on the input and a per-channel ``DequantizeLinear`` on the
        int8 ``weight`` ``[out, in/groups, kh, kw]`` around a ``Conv``: the QDQ form ONNX Runtime fuses into
        ``QLinearConv`` where the next layer quantizes the output (digits ResNet batch 32: 0.55x the float session,
        against 2.0x as ``ConvInteger``). Dynamic: ``ConvInteger`` on ``DynamicQuantizeLinear`` codes.
        ``geometry``: stride, padding, dilation, groups."""
        if input_qparams is not None:  # static: the QDQ form ONNX Runtime fuses into QLinearConv
            scale, zero_point = input_qparams
            zero_u8 = (zero_point.to(torch.int16).reshape(()) + 128).to(torch.uint8)
            return _ConvQDQ.apply(x, weight, weight_scale.float(), bias, scale.float().reshape(()), zero_u8, geometry)
        unsigned = (weight.to(torch.int16) + 128).to(torch.uint8)  # ORT's ConvInteger: uint8 weights
        return _Conv.apply(x, unsigned, weight_scale, bias, *_static(input_qparams, weight_scale), geometry)

    @staticmethod
    def embedding(indices: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """``Gather`` of int8 rows and of their scales, ``Mul``."""
        return _Embedding.apply(indices, weight, weight_scale)

    @staticmethod
    def float_layer(layer: QuantizedLayer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's dequantized float module (float initializers), plus an owner's ``bias``."""
        return float_forward(layer, x, bias)


OPS = OnnxOps()


def _static(
    input_qparams: tuple[torch.Tensor, torch.Tensor] | None, weight_scale: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """``(1 / input scale, uint8 zero point as float, uint8 zero point, input scale x weight scales)``, or
    four ``None`` for dynamic activations."""
    if input_qparams is None:
        return None, None, None, None
    scale, zero_point = input_qparams
    zero_point = zero_point.to(torch.int16).reshape(()) + 128
    scale = scale.float().reshape(())
    return 1.0 / scale, zero_point.float(), zero_point.to(torch.uint8), scale * weight_scale


def _const(g: Any, value: Any) -> Any:
    return g.op("Constant", value_t=torch.as_tensor(value))


def _is_none(value: Any) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _quantize(g: Any, x: Any, inv_scale: Any, zero_point: Any, zero_point_u8: Any) -> tuple[Any, Any]:
    """uint8 activations ``(q, zero point)``: calibrated (static) or ``DynamicQuantizeLinear`` (``inv_scale`` None)."""
    if _is_none(inv_scale):
        q, scale, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        return q, zp, scale
    q = g.op("Add", g.op("Round", g.op("Mul", x, inv_scale)), zero_point)
    return g.op("Cast", g.op("Clip", q, _const(g, 0.0), _const(g, 255.0)), to_i=_UINT8), zero_point_u8, None


def _rescale(g: Any, acc: Any, scale: Any, bias: Any, cast: bool = True) -> Any:
    out = g.op("Mul", g.op("Cast", acc, to_i=_FLOAT) if cast else acc, scale)
    return out if _is_none(bias) else g.op("Add", out, bias)


class _Linear(torch.autograd.Function):
    """``x @ w_t`` with int8 ``w_t`` ``[in, out]``: dynamic per-row or static uint8 activations, ``MatMulInteger``."""

    @staticmethod
    def forward(ctx, x, w_t, w_scale, bias, inv_scale, zero_point, zero_point_u8, out_scale):  # type: ignore[override]
        out = x @ w_t.float() * w_scale
        return out if bias is None else out + bias

    @staticmethod
    def symbolic(g, x, w_t, w_scale, bias, inv_scale, zero_point, zero_point_u8, out_scale):  # type: ignore[override]
        if _is_none(inv_scale):  # mono-quant's per-row dynamic quantization, step by step
            row_max = g.op("Max", g.op("ReduceMax", g.op("Abs", x), axes_i=[-1], keepdims_i=1), _const(g, 1e-12))
            q = g.op("Round", g.op("Mul", x, g.op("Div", _const(g, 127.0), row_max)))
            q = g.op("Cast", g.op("Add", q, _const(g, 128.0)), to_i=_UINT8)
            acc = g.op("MatMulInteger", q, w_t, _const(g, torch.tensor(128, dtype=torch.uint8)))
            # the per-channel scale first: ORT fuses MatMulInteger-Cast-Mul(constant) into MatMulIntegerToFloat,
            # and (1.32) treats whatever that Mul multiplies by as a per-column scale, wrong for per-row scales
            out = _rescale(g, acc, g.op("Div", w_scale, _const(g, 127.0)), None)
            return _rescale(g, out, row_max, bias, cast=False)
        q, zp, _ = _quantize(g, x, inv_scale, zero_point, zero_point_u8)
        return _rescale(g, g.op("MatMulInteger", q, w_t, zp), out_scale, bias)


class _Conv(torch.autograd.Function):
    """``ConvInteger`` on uint8 activations (dynamic per tensor or static) and uint8 (+128) weights."""

    @staticmethod
    def forward(ctx, x, w_u8, w_scale, bias, inv_scale, zero_point, zero_point_u8, out_scale, geometry):  # type: ignore[override]
        weight = (w_u8.float() - 128) * w_scale.reshape(-1, 1, 1, 1)
        stride, padding, dilation, groups = geometry
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g, x, w_u8, w_scale, bias, inv_scale, zero_point, zero_point_u8, out_scale, geometry):  # type: ignore[override]
        stride, padding, dilation, groups = geometry
        q, zp, dynamic_scale = _quantize(g, x, inv_scale, zero_point, zero_point_u8)
        acc = g.op("ConvInteger", q, w_u8, zp, _const(g, torch.tensor(128, dtype=torch.uint8)),
                   strides_i=list(stride), pads_i=[*padding, *padding], dilations_i=list(dilation),
                   group_i=groups)  # fmt: skip
        scale = out_scale if dynamic_scale is None else g.op("Mul", dynamic_scale, w_scale)
        out = g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), g.op("Unsqueeze", scale, _const(g, [1, 2])))
        return out if _is_none(bias) else g.op("Add", out, g.op("Unsqueeze", bias, _const(g, [1, 2])))


class _ConvQDQ(torch.autograd.Function):
    """Static int8 convolution in QDQ form: ``DQ(Q(x)) * DQ(w)`` (per output channel) + bias."""

    @staticmethod
    def forward(ctx, x, weight, w_scale, bias, scale, zero_u8, geometry):  # type: ignore[override]
        codes = torch.clamp(torch.round(x / scale) + zero_u8.float(), 0, 255)
        stride, padding, dilation, groups = geometry
        w = weight.float() * w_scale.reshape(-1, 1, 1, 1)
        return torch.nn.functional.conv2d((codes - zero_u8.float()) * scale, w, bias, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g, x, weight, w_scale, bias, scale, zero_u8, geometry):  # type: ignore[override]
        stride, padding, dilation, groups = geometry
        x_dq = g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_u8), scale, zero_u8)
        zeros = _const(g, torch.zeros(w_scale.type().sizes()[0], dtype=torch.int8))
        w_dq = g.op("DequantizeLinear", weight, w_scale, zeros, axis_i=0)
        inputs = [x_dq, w_dq] if _is_none(bias) else [x_dq, w_dq, bias]
        return g.op("Conv", *inputs, strides_i=list(stride), pads_i=[*padding, *padding], dilations_i=list(dilation),
                    group_i=groups)  # fmt: skip


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weight, scale):  # type: ignore[override]
        return weight[indices].float() * scale[indices].unsqueeze(-1)

    @staticmethod
    def symbolic(g, indices, weight, scale):  # type: ignore[override]
        rows = g.op("Cast", g.op("Gather", weight, indices), to_i=_FLOAT)
        return g.op("Mul", rows, g.op("Unsqueeze", g.op("Gather", scale, indices), _const(g, [-1])))


class _WeightOnlyLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_t, w_scale, w_zero_point, bias, dequantized):  # type: ignore[override]
        out = x @ dequantized.t()
        return out if bias is None else out + bias

    @staticmethod
    def symbolic(g, x, w_t, w_scale, w_zero_point, bias, dequantized):  # type: ignore[override]
        args = [w_t, w_scale] if _is_none(w_zero_point) else [w_t, w_scale, w_zero_point]
        weight = g.op("DequantizeLinear", *args, axis_i=1)
        out = g.op("MatMul", x, weight)
        return out if _is_none(bias) else g.op("Add", out, bias)
