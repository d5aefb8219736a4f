"""``export_onnx``: a quantized model as ONNX with int8 weight initializers and integer operators that ONNX
Runtime's CPU provider runs as int8 kernels (MLAS u8 x s8 GEMM and convolution).

How: the model is traced by torch's TorchScript exporter (``dynamo=False``) while every quantized class's
``forward`` is an export-only function: its ``onnx_forward``, built from the integer operators of
``mono_quant.io.onnx_ops`` (whose ``symbolic`` emits the integer graph directly, so no dequantized weight ever
enters the file; static convolutions in the QDQ form ORT fuses into ``QLinearConv`` where mono-quant's fused
graph requantizes their outputs, ``onnx_epilogues``), or, for classes without one (int4, fp16/bf16, plugin
layers by default), the dequantized float layer, with a warning naming them. Zero pads in front of
quantized convolutions are then folded into them (``onnx_pads``), before the checks run on the final graph.
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
from mono_quant.io.onnx_epilogues import conv_epilogues
from mono_quant.io.onnx_ops import CONV_EPILOGUES, FLOAT_TWINS, export_forward, float_forward
from mono_quant.io.onnx_pads import fold_pads_into_convs
from mono_quant.modules import quantized_layers
from mono_quant.modules.base import implements, require

OPSET = 17


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
        with _export_forwards(q_model, list(layers.values())), warnings.catch_warnings(record=True) as recorded:
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
        return fold_pads_into_convs(buffer.getvalue()), tracer_lines(recorded)

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
def _export_forwards(model: nn.Module, layers: list[nn.Module]) -> Iterator[None]:
    """Swap the quantized classes' ``forward`` for the export form while tracing (restored afterwards): the
    integer graph for int8 classes, the dequantized float layer for the others; static convolutions that
    ``model``'s fused graph requantizes get their ``ConvEpilogue``."""
    classes = {type(layer) for layer in layers}
    saved = {cls: cls.__dict__.get("forward") for cls in classes}
    try:
        CONV_EPILOGUES.update(conv_epilogues(model))
        floats = [layer for layer in layers if not implements(layer, "onnx_forward")]
        FLOAT_TWINS.update({id(layer): layer.dequantize().requires_grad_(False) for layer in floats})
        for cls in classes:
            cls.forward = export_forward if implements(cls, "onnx_forward") else float_forward
        yield
    finally:
        FLOAT_TWINS.clear()
        CONV_EPILOGUES.clear()
        for cls, forward in saved.items():
            if forward is None:
                del cls.forward
            else:
                cls.forward = forward
