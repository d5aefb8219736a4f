"""``export_onnx``: a quantized model as ONNX with int8 weight initializers and integer operators that ONNX
Runtime's CPU provider runs as int8 kernels (MLAS u8 x s8 GEMM and convolution).

How: the model is traced by torch's TorchScript exporter (``dynamo=False``) while every int8 layer's
``forward`` is an export-only function whose ``symbolic`` emits the integer graph directly, so no dequantized
weight ever enters the file and ORT needs no QDQ fusion to find the int8 path. Per layer kind (opset 17):

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
Each class builds its own graph from these operators (``QuantizedLayer.onnx_forward(ops, x, bias)`` with
``ops`` an ``OnnxOps``); classes without one (int4, fp16/bf16, plugin layers by default) are exported through
their ``dequantize()`` (float initializers), with a warning naming them.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.copying import eval_mode
from mono_quant.errors import ConfigError, SerializationError
from mono_quant.io.disk import atomic_write
from mono_quant.io.onnx_checks import checked_export, tracer_lines
from mono_quant.modules import QuantizedLayer, quantized_layers
from mono_quant.modules.base import implements, require

OPSET = 17
_UINT8, _FLOAT = 2, 1  # ONNX TensorProto data types


def export_onnx(
    q_model: nn.Module,
    example_inputs: Any,
    path: str | os.PathLike,
    *,
    opset: int = OPSET,
    input_names: Sequence[str] | None = None,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Write ``q_model`` to ``path`` as ONNX (int8 initializers, integer operators; see the module docstring).

    ``example_inputs`` is one forward input: a tensor, a tuple of positional tensors, or a dict of keyword
    tensors (a tokenizer's output). By default every input's first axis is a dynamic ``batch`` and, for
    inputs with more than one axis whose second axis is not the channel axis of an image, the second a
    dynamic ``sequence`` (2-D integer inputs such as token ids); pass ``dynamic_axes`` to choose. ``opset``
    must be at least 17. Returns ``path``.

    The trace is checked before anything is written (``mono_quant.io.onnx_checks``): ONNX Runtime must give
    q_model's outputs on inputs of other values, and on inputs resized along each dynamic axis; a default axis
    that fails is fixed at the example's size with a warning naming it, an axis given in ``dynamic_axes``
    that fails, or a Python branch on tensor values the trace froze, is a ``SerializationError`` naming it.

    Example:
        >>> import tempfile, mono_quant as mq
        >>> q, _ = mq.dynamic_quantize(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)))
        >>> out = export_onnx(q, torch.randn(2, 16), os.path.join(tempfile.mkdtemp(), "m.onnx"))
        >>> import onnx
        >>> sorted({n.op_type for n in onnx.load(out).graph.node} & {"MatMulInteger", "MatMul"})
        ['MatMulInteger']
    """
    if not isinstance(q_model, nn.Module):
        raise ConfigError(f"export_onnx: q_model must be a torch.nn.Module, got {type(q_model).__name__}")
    if not isinstance(opset, int) or isinstance(opset, bool) or opset < OPSET:
        raise ConfigError(f"export_onnx: opset must be an integer >= {OPSET}, got {opset!r}")
    args, kwargs, names = _inputs(example_inputs, input_names)
    axes = dynamic_axes if dynamic_axes is not None else _default_axes(names, [*args, *kwargs.values()])
    layers = quantized_layers(q_model)
    fallback = [name for name, layer in layers.items() if not implements(layer, "onnx_forward")]
    for name in fallback:  # a clear error now, not a tracer's error later
        if not implements(layers[name], "dequantize"):
            require(layers[name], "onnx_forward", f"export_onnx: layer {name!r} (and it has no dequantize() either)")
    if fallback:
        warnings.warn(
            f"export_onnx: {len(fallback)} layer(s) have no ONNX integer form (int4, fp16/bf16) and are exported "
            f"with float weights: {', '.join(fallback[:8])}{' ...' if len(fallback) > 8 else ''}",
            stacklevel=2,
        )
    tensors = [*args, *kwargs.values()]
    wrapper = _Positional(q_model, list(kwargs))

    def export(chosen_axes: dict[str, dict[int, str]]) -> tuple[bytes, list[str]]:
        buffer = io.BytesIO()
        with _export_forwards(list(layers.values())), warnings.catch_warnings(record=True) as recorded:
            warnings.simplefilter("always")
            torch.onnx.export(
                wrapper,
                tuple(tensors),
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=wrapper.output_names(tensors),
                dynamic_axes=chosen_axes,
                do_constant_folding=True,
            )
        return buffer.getvalue(), tracer_lines(recorded)

    def eager(inputs: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            return wrapper(*inputs)

    try:
        with eval_mode(q_model):  # every submodule's own mode comes back afterwards
            wrapper.eval()  # torch's exporter gives the wrapper its mode back after each trace, recursively
            data = checked_export(export, eager, tensors, names, axes, axes_given=dynamic_axes is not None)
    except SerializationError:
        raise
    except Exception as err:
        raise SerializationError(f"export_onnx: cannot trace q_model to ONNX: {type(err).__name__}: {err}") from err
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    return Path(path)


def _inputs(example: Any, input_names: Sequence[str] | None) -> tuple[list[torch.Tensor], dict, list[str]]:
    if isinstance(example, torch.Tensor):
        args, kwargs = [example], {}
    elif isinstance(example, (tuple, list)) and example and all(isinstance(t, torch.Tensor) for t in example):
        args, kwargs = list(example), {}
    elif isinstance(example, dict) and example and all(isinstance(t, torch.Tensor) for t in example.values()):
        args, kwargs = [], dict(example)
    else:
        raise ConfigError(
            "export_onnx: example_inputs must be a tensor, a non-empty tuple of tensors or a dict of tensors, "
            f"got {type(example).__name__}"
        )
    names = list(input_names) if input_names is not None else (list(kwargs) or [f"input_{i}" for i in range(len(args))])
    if len(names) != len(args) + len(kwargs):
        raise ConfigError(f"export_onnx: input_names has {len(names)} names for {len(args) + len(kwargs)} inputs")
    return args, kwargs, names


def _default_axes(names: list[str], tensors: list[torch.Tensor]) -> dict[str, dict[int, str]]:
    axes = {}
    for name, tensor in zip(names, tensors, strict=True):
        dims = {0: "batch"} if tensor.dim() else {}
        if (tensor.dim() == 2 and not tensor.is_floating_point()) or tensor.dim() == 3:
            dims[1] = "sequence"  # token ids / masks, or [batch, sequence, features]
        axes[name] = dims
    return axes


class _Positional(nn.Module):
    """``model`` called with positional tensors (keyword inputs by name), returning a flat tuple of tensors."""

    def __init__(self, model: nn.Module, keywords: list[str]) -> None:
        super().__init__()
        self.model, self.keywords = model, keywords

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_flat(self._call(tensors)).values())

    def _call(self, tensors: Sequence[torch.Tensor]) -> Any:
        if self.keywords:
            return self.model(**dict(zip(self.keywords, tensors, strict=True)))
        return self.model(*tensors)

    def output_names(self, tensors: list[torch.Tensor]) -> list[str]:
        with torch.no_grad():
            return list(_flat(self._call(tensors)))


def _flat(out: Any, prefix: str = "output") -> dict[str, torch.Tensor]:
    """Tensors in ``out`` (a tensor, tuple/list, dict or transformers ``ModelOutput``) by a readable name."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    if isinstance(out, dict):  # ModelOutput is a dict of its non-None fields
        items = out.items()
        named = True
    elif isinstance(out, (tuple, list)):
        items, named = enumerate(out), False
    else:
        return {}
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        name = str(key) if named and prefix == "output" else f"{prefix}_{key}"
        flat.update(_flat(value, name))
    return flat


@contextlib.contextmanager
def _export_forwards(layers: list[nn.Module]) -> Iterator[None]:
    """Swap the quantized classes' ``forward`` for the export form while tracing (restored afterwards): the
    integer graph for int8 classes, the dequantized float layer for the others."""
    classes = {type(layer) for layer in layers}
    saved = {cls: cls.__dict__.get("forward") for cls in classes}
    try:
        floats = [layer for layer in layers if not implements(layer, "onnx_forward")]
        _FLOAT_TWINS.update({id(layer): layer.dequantize().requires_grad_(False) for layer in floats})
        for cls in classes:
            cls.forward = _export_forward if implements(cls, "onnx_forward") else _float_forward
        yield
    finally:
        _FLOAT_TWINS.clear()
        for cls, forward in saved.items():
            if forward is None:
                del cls.forward
            else:
                cls.forward = forward


_FLOAT_TWINS: dict[int, nn.Module] = {}  # id(layer) -> its dequantized float layer, during one export


def _float_forward(self: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    twin = _FLOAT_TWINS.get(id(self))
    if twin is None:  # a layer built while tracing (a conv at another geometry): dequantize it now
        twin = _FLOAT_TWINS[id(self)] = self.dequantize().requires_grad_(False)
    out = twin(x)
    return out if bias is None else out + bias.reshape(-1, *([1] * (out.dim() - 2)))


def _export_forward(self: QuantizedLayer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
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
        """``ConvInteger`` with int8 ``weight`` ``[out, in/groups, kh, kw]``; ``geometry``: stride, padding,
        dilation, groups."""
        unsigned = (weight.to(torch.int16) + 128).to(torch.uint8)  # ORT's ConvInteger: uint8 weights
        return _Conv.apply(x, unsigned, weight_scale, bias, *_static(input_qparams, weight_scale), geometry)

    @staticmethod
    def embedding(indices: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
        """``Gather`` of int8 rows and of their scales, ``Mul``."""
        return _Embedding.apply(indices, weight, weight_scale)

    @staticmethod
    def float_layer(layer: QuantizedLayer, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's dequantized float module (float initializers), plus an owner's ``bias``."""
        return _float_forward(layer, x, bias)


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
