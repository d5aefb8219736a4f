"""The integer ONNX operators quantized classes build their export graph from (``QuantizedLayer.onnx_forward(ops,
x, bias)`` with ``ops`` an ``OnnxOps``), and the export-time forwards ``export_onnx`` installs.

Each operator is an ``autograd.Function`` whose ``symbolic`` emits the integer graph (opset 17); what the
built-in classes emit:

- int8 Linear, dynamic: per-row (token) symmetric activation quantization exactly as mono-quant computes it
  (``ReduceMax(Abs)``, ``Round``, ``+128`` to uint8), ``MatMulInteger`` (u8 x s8, ``a_zero_point=128``),
  ``Cast`` + ``Mul`` by row scale x channel scale, ``Add`` bias.
- int8 Linear, static: ``Round``/``Clip`` with the calibrated scale and zero point (uint8), ``MatMulInteger``,
  one ``Mul`` by the combined scale, ``Add`` bias.
- int8 Conv2d, dynamic: ``DynamicQuantizeLinear`` (per-tensor uint8, what mono-quant's CPU path does),
  ``ConvInteger`` (weight stored uint8 = int8 + 128 with ``w_zero_point=128``: ORT's ConvInteger takes uint8
  weights only), ``Mul`` per channel, ``Add`` bias.
- int8 Conv2d, static: QDQ (``OnnxOps.conv``): ``QuantizeLinear``/``DequantizeLinear`` on the input (calibrated
  uint8); where mono-quant's fused graph requantizes the output (``onnx_epilogues``), a per-channel
  ``DequantizeLinear`` int8 weight, the activation and an output ``QuantizeLinear``/``DequantizeLinear`` at the
  next convolutions' input scale, which ORT fuses into ``QLinearConv``; elsewhere ``Identity``/``Cast``/``Mul``
  on the int8 weight, which ORT folds for its float NCHWc ``Conv``. Zero pads a conv subclass applies in its
  ``forward`` are folded into ``Conv`` (``onnx_pads``). Measured in ORT 1.32, batch 32, 2 threads, int8 session
  latency over the float session's (``benchmarks/deploy_results.md``, one round-robin run): digits ResNet 1.64x
  (every static conv a DQ-weight float conv but the 3 ``QLinearConv``) -> 1.00-1.09x (4 ``QLinearConv``, 5 NCHWc
  float convs) -> 0.60x with residual operands quantized (``onnx_epilogues``); EfficientNet-Lite0 1.55x (39
  ``QLinearConv`` behind 17 float ``Pad``) -> 0.82-0.99x -> 0.52x. Convs before pooling or a head stay float.
Classes without ``onnx_forward`` (int4, fp16/bf16, plugin layers by default) are exported through their
``dequantize()`` (``float_forward``: float initializers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mono_quant.io.onnx_epilogues import ConvEpilogue
from mono_quant.modules import QuantizedLayer

_UINT8, _FLOAT = 2, 1  # ONNX TensorProto data types


FLOAT_TWINS: dict[int, nn.Module] = {}  # id(layer) -> its dequantized float layer, during one export
CONV_EPILOGUES: dict[int, ConvEpilogue] = {}  # id(int8 weight) -> its output requantization, during one export


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
        epilogue: ConvEpilogue | None = None,
    ) -> torch.Tensor:
        """Static: ``QuantizeLinear``/``DequantizeLinear`` on the input around a ``Conv``, and by ``epilogue``:

        - requantized output (``out_qparams``): a per-channel ``DequantizeLinear`` on the int8 ``weight``
          ``[out, in/groups, kh, kw]``, the activation, ``QuantizeLinear``/``DequantizeLinear``: one ``QLinearConv``;
        - float output (``out_qparams`` None): ``Identity`` + ``Cast`` + ``Mul`` on the int8 weight, which ONNX
          Runtime folds into a float initializer for its NCHWc float convolution (a ``DequantizeLinear`` weight
          it keeps, and convolves in plain NCHW, 3x slower);
        - no plan (``None``: the model does not trace): the per-channel ``DequantizeLinear`` weight, which ONNX
          Runtime fuses where a ``QuantizeLinear`` follows (a float weight there it requantizes per tensor).

        Dynamic: ``ConvInteger`` on ``DynamicQuantizeLinear`` codes. ``geometry``: stride, padding, dilation, groups."""
        if input_qparams is not None:
            in_scale, in_zero = _uint8_qparams(input_qparams)
            if epilogue is not None and epilogue.out_qparams is None:
                return _ConvFloatWeight.apply(x, weight, weight_scale.float(), bias, in_scale, in_zero, geometry)
            unary, out_scale, out_zero = ("none", []), None, None
            if epilogue is not None:
                unary, (out_scale, out_zero) = epilogue.unary, _uint8_qparams(epilogue.out_qparams)
            return _ConvQDQ.apply(x, weight, weight_scale.float(), bias, in_scale, in_zero, geometry, unary,
                                  out_scale, out_zero)  # fmt: skip
        unsigned = (weight.to(torch.int16) + 128).to(torch.uint8)  # ORT's ConvInteger: uint8 weights
        return _DynamicConv.apply(x, unsigned, weight_scale, bias, geometry)

    @staticmethod
    def conv_epilogue(weight: torch.Tensor) -> ConvEpilogue | None:
        """The requantizing epilogue ``export_onnx`` found for the static convolution with this int8 ``weight``."""
        return CONV_EPILOGUES.get(id(weight))

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


def _uint8_qparams(qparams: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored int8 ``(scale, zero point)`` as the 0-d float scale and uint8 zero point of the same range."""
    scale, zero_point = qparams
    return scale.float().reshape(()), (zero_point.to(torch.int16).reshape(()) + 128).to(torch.uint8)


def _const(g: Any, value: Any) -> Any:
    return g.op("Constant", value_t=torch.as_tensor(value))


def _is_none(value: Any) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def _quantize(g: Any, x: Any, inv_scale: Any, zero_point: Any) -> Any:
    """Calibrated uint8 codes of ``x`` (``Round``, ``Clip``: mono-quant's own rounding)."""
    q = g.op("Add", g.op("Round", g.op("Mul", x, inv_scale)), zero_point)
    return g.op("Cast", g.op("Clip", q, _const(g, 0.0), _const(g, 255.0)), to_i=_UINT8)


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
        q = _quantize(g, x, inv_scale, zero_point)
        return _rescale(g, g.op("MatMulInteger", q, w_t, zero_point_u8), out_scale, bias)


class _DynamicConv(torch.autograd.Function):
    """``ConvInteger`` on ``DynamicQuantizeLinear`` (per-tensor uint8) codes and uint8 (+128) weights."""

    @staticmethod
    def forward(ctx, x, w_u8, w_scale, bias, geometry):  # type: ignore[override]
        weight = (w_u8.float() - 128) * w_scale.reshape(-1, 1, 1, 1)
        stride, padding, dilation, groups = geometry
        return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def symbolic(g, x, w_u8, w_scale, bias, geometry):  # type: ignore[override]
        stride, padding, dilation, groups = geometry
        q, scale, zp = g.op("DynamicQuantizeLinear", x, outputs=3)
        acc = g.op("ConvInteger", q, w_u8, zp, _const(g, torch.tensor(128, dtype=torch.uint8)),
                   strides_i=list(stride), pads_i=[*padding, *padding], dilations_i=list(dilation),
                   group_i=groups)  # fmt: skip
        scale = g.op("Unsqueeze", g.op("Mul", scale, w_scale), _const(g, [1, 2]))
        out = g.op("Mul", g.op("Cast", acc, to_i=_FLOAT), scale)
        return out if _is_none(bias) else g.op("Add", out, g.op("Unsqueeze", bias, _const(g, [1, 2])))


def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_u8: torch.Tensor) -> torch.Tensor:
    """``DequantizeLinear(QuantizeLinear(x))`` at uint8 ``(scale, zero point)`` (round half to even, as ONNX)."""
    codes = torch.clamp(torch.round(x / scale) + zero_u8.float(), 0, 255)
    return (codes - zero_u8.float()) * scale


def _qdq(g: Any, x: Any, scale: Any, zero_u8: Any) -> Any:
    return g.op("DequantizeLinear", g.op("QuantizeLinear", x, scale, zero_u8), scale, zero_u8)


def _float_conv(g: Any, x: Any, weight: Any, bias: Any, geometry: tuple[Any, Any, Any, int]) -> Any:
    stride, padding, dilation, groups = geometry
    inputs = [x, weight] if _is_none(bias) else [x, weight, bias]
    return g.op("Conv", *inputs, strides_i=list(stride), pads_i=[*padding, *padding], dilations_i=list(dilation),
                group_i=groups)  # fmt: skip


def _conv2d(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor, bias: Any, geometry: Any) -> torch.Tensor:
    stride, padding, dilation, groups = geometry
    w = weight.float() * w_scale.reshape(-1, 1, 1, 1)
    return torch.nn.functional.conv2d(x, w, bias, stride, padding, dilation, groups)


class _ConvQDQ(torch.autograd.Function):
    """Static int8 convolution in QDQ form, ``DQ(Q(x)) * DQ(w)`` (per output channel) + bias, then the activation
    and ``Q``/``DQ`` at ``out_scale`` when given (ONNX Runtime: one ``QLinearConv``)."""

    @staticmethod
    def forward(ctx, x, weight, w_scale, bias, scale, zero_u8, geometry, unary, out_scale, out_zero_u8):  # type: ignore[override]
        out = _conv2d(_fake_quantize(x, scale, zero_u8), weight, w_scale, bias, geometry)
        if unary[0] == "relu":
            out = torch.relu(out)
        elif unary[0] == "hardtanh":
            out = out.clamp(*unary[1])
        return out if out_scale is None else _fake_quantize(out, out_scale, out_zero_u8)

    @staticmethod
    def symbolic(g, x, weight, w_scale, bias, scale, zero_u8, geometry, unary, out_scale, out_zero_u8):  # type: ignore[override]
        zeros = _const(g, torch.zeros(w_scale.type().sizes()[0], dtype=torch.int8))
        w_dq = g.op("DequantizeLinear", weight, w_scale, zeros, axis_i=0)
        out = _float_conv(g, _qdq(g, x, scale, zero_u8), w_dq, bias, geometry)
        if unary[0] == "relu":
            out = g.op("Relu", out)
        elif unary[0] == "hardtanh":
            out = g.op("Clip", out, _const(g, float(unary[1][0])), _const(g, float(unary[1][1])))
        return out if _is_none(out_scale) else _qdq(g, out, out_scale, out_zero_u8)


class _ConvFloatWeight(torch.autograd.Function):
    """Static int8 convolution with a float output: ``DQ(Q(x))`` convolved with ``Cast(w) * scale``, which ONNX
    Runtime constant-folds into a float weight (the int8 weight stays what the file stores)."""

    @staticmethod
    def forward(ctx, x, weight, w_scale, bias, scale, zero_u8, geometry):  # type: ignore[override]
        return _conv2d(_fake_quantize(x, scale, zero_u8), weight, w_scale, bias, geometry)

    @staticmethod
    def symbolic(g, x, weight, w_scale, bias, scale, zero_u8, geometry):  # type: ignore[override]
        # Identity: torch's exporter would fold Cast(initializer) into a float initializer in the file itself
        w_int = g.op("Cast", g.op("Identity", weight), to_i=_FLOAT)
        w_float = g.op("Mul", w_int, g.op("Unsqueeze", w_scale, _const(g, [1, 2, 3])))
        return _float_conv(g, _qdq(g, x, scale, zero_u8), w_float, bias, geometry)


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
