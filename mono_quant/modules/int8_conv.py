"""``Int8Conv2d``: int8 per-output-channel weights; a real int8 convolution.

On CPU (symmetric weights) static and dynamic modes run oneDNN's u8 x s8 convolution with rescale
and bias fused, on a packed weight built lazily from the stored one (a cache, never saved): static
with the calibrated input scale, dynamic with one asymmetric uint8 scale per call (the input's
min/max), which oneDNN takes at run time. Grouped and depthwise convolutions take the same path.
Everything else (weight-only mode, asymmetric weights, other devices, inside ``torch.compile``) uses
im2col: the input patches (``F.unfold``) form an ``[N*L, C*kh*kw]`` matrix that goes through the
shared int8 matrix multiply (``Int8Matmul``, one group at a time). The weight is stored flattened,
``[out, in/groups*kh*kw]`` int8. String padding and non-zero padding modes of an exact ``nn.Conv2d`` are
served through the weight-tensor path (``modules/weight_tensor.py``), which pads first.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant import kernels
from mono_quant.config import Mode, QuantDtype, QuantizationConfig, Scheme
from mono_quant.kernels import choice
from mono_quant.modules import compiled_ops
from mono_quant.modules.base import ActivationQParams, FusedConvParams, QuantizedLayer, copy_bias, meta_conv2d
from mono_quant.modules.int8_matmul import Int8Matmul, int8_state_dict_entry
from mono_quant.modules.registry import register
from mono_quant.qparams import quantize_weight


@register(nn.Conv2d)
class Int8Conv2d(Int8Matmul, QuantizedLayer):
    """Drop-in ``nn.Conv2d`` replacement (an ``Int8Matmul`` on im2col patches, not an ``Int8Linear``).

    Example:
        >>> conv = Int8Conv2d.from_float(nn.Conv2d(3, 8, 3, padding=1), QuantizationConfig())
        >>> conv(torch.randn(2, 3, 16, 16)).shape, conv.weight.shape
        (torch.Size([2, 8, 16, 16]), torch.Size([8, 27]))
    """

    dtypes = (QuantDtype.INT8,)
    bits = 8
    needs_calibration = True  # in static mode
    calibrates_output = True  # static: the output too (``set_output_qparams``)
    weight_ranks = (2, 4)

    @classmethod
    def meta_float_module(cls, entry: dict[str, Any]) -> nn.Module:
        return meta_conv2d(entry)

    swap_module = False
    fuses_bias = True  # forward(x, bias): a weight-tensor owner's bias goes into oneDNN's epilogue

    def __init__(self, conv: nn.Conv2d, mode: Mode, scheme: Scheme, scale_shape: tuple[int, ...]) -> None:
        super().__init__(conv.weight[0].numel(), conv.out_channels, conv.bias is not None, mode, scheme, scale_shape)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        self.groups = conv.groups
        self._geometry = (list(self.stride), list(self.padding), list(self.dilation))
        self._conv_kind = self._kind_label()
        self._onednn_conv = kernels.OneDNNConvWeight()
        self.register_buffer("output_scale", None)  # static: the calibrated output, where it was observed
        self.register_buffer("output_zero_point", None)

    def set_output_qparams(self, qparams: ActivationQParams | None) -> None:
        """Hold the calibrated output ``qparams`` (static mode only; ``None`` clears them), which the fused CPU
        graph uses to write this convolution's output as uint8 where nothing else calibrates it (a projection
        shortcut feeding a residual add).

        Example:
            >>> conv = Int8Conv2d.from_float(nn.Conv2d(1, 2, 3), QuantizationConfig(mode="static"),
            ...                              ActivationQParams(0.1, 0))
            >>> conv.set_output_qparams(ActivationQParams(0.2, -5))
            >>> conv.output_scale.item(), conv.output_zero_point.item(), conv.metadata()["output_qparams"]
            (0.20000000298023224, -5, True)
        """
        if qparams is None or self.mode is not Mode.STATIC:
            self.output_scale = self.output_zero_point = None
            return
        self.output_scale = qparams.scale.detach().float().reshape(()).to(self.weight.device)
        self.output_zero_point = qparams.zero_point.to(torch.int8).reshape(()).to(self.weight.device)

    def _kind_label(self) -> str:
        """The kernel-choice key's kind for this layer's convolutions (built once, not per call)."""
        return f"int8_conv2d_{self.mode.value} groups={self.groups} geometry={self._geometry}"

    def prepare(self) -> None:
        super().prepare()
        self._onednn_conv = kernels.OneDNNConvWeight()  # repacked on next use: weight or input scale changed
        compiled_ops.remember("conv", self)

    @classmethod
    def unsupported_reason(cls, module: nn.Module, config: QuantizationConfig) -> str | None:
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r} has no int8 path"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r} (string padding) has no int8 path"
        return None

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, config: QuantizationConfig, activation: ActivationQParams | None = None
    ) -> Int8Conv2d:
        weight = module.weight.detach().reshape(module.out_channels, -1)  # a view: no float copy
        qw = quantize_weight(weight, 8, config.scheme, config.granularity)
        layer = cls(module, config.mode, config.scheme, tuple(qw.scale.shape))
        layer.set_quantized(qw, copy_bias(module), activation)
        return layer

    @classmethod
    def from_metadata(cls, module: nn.Conv2d, metadata: dict[str, Any]) -> Int8Conv2d:
        scale_shape = tuple(metadata.get("scale_shape", (module.out_channels,)))
        layer = cls(module, Mode(metadata["mode"]), Scheme(metadata["scheme"]), scale_shape)
        if metadata.get("output_qparams") and layer.mode is Mode.STATIC:  # the file holds them: expect them
            layer.output_scale, layer.output_zero_point = torch.ones(()), torch.zeros((), dtype=torch.int8)
        return layer

    def with_geometry(self, stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> Int8Conv2d:
        """A layer sharing this one's int8 state but convolving with other stride/padding/dilation."""
        twin = copy.copy(self)  # shallow: same buffers; own geometry and kernel cache
        twin._buffers = dict(self._buffers)
        twin.stride, twin.padding, twin.dilation = tuple(stride), tuple(padding), tuple(dilation)
        twin._geometry = (list(twin.stride), list(twin.padding), list(twin.dilation))
        twin._conv_kind = twin._kind_label()
        twin._onednn_conv = kernels.OneDNNConvWeight()
        return twin

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The convolution, plus ``bias`` (the owning module's, for weight-tensor layers) fused where oneDNN runs.

        oneDNN serves where it passed its check for this shape on this machine (``kernels.check``: its AMX
        grouped convolution with 16 input channels per group returns noise); else im2col through the
        (checked) ``Int8Matmul`` path.
        """
        if not x.is_floating_point():
            raise RuntimeError(f"Int8Conv2d expects a floating-point input, got {x.dtype} (as nn.Conv2d)")
        if torch.compiler.is_compiling() and x.device.type == "cpu" and self.weight_zero_point is None:
            tensors, geometry = self.op_arguments()
            return torch.ops.mono_quant.int8_conv2d(x, *tensors, bias, geometry, self.mode.value)
        return self.eager_forward(x, bias)

    def op_arguments(self) -> tuple[tuple[torch.Tensor | None, ...], list[int]]:
        """``Int8Matmul.op_arguments`` and the geometry ``[in, out, kh, kw, stride, padding, dilation, groups]``."""
        geometry = [self.in_channels, self.out_channels, *self.kernel_size, *self.stride, *self.padding,
                    *self.dilation, self.groups]  # fmt: skip
        return super().op_arguments()[0], geometry

    def eager_forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``forward`` outside ``torch.compile`` (also what the compiled graph's op runs)."""
        onednn = self.mode is not Mode.WEIGHT_ONLY and self.weight_zero_point is None
        if onednn and kernels.use_onednn_conv(x):
            out = self._onednn_forward(x, bias)
            if out is not None:
                return out
        out = self._im2col_forward(x)
        return out if bias is None else out + bias.reshape(-1, 1, 1)

    def _onednn_forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """uint8 activations (channels-last: oneDNN's fast layout) against the packed int8 weight; ``None``
        where oneDNN failed its check for this shape."""
        x4 = x if x.dim() == 4 else x.unsqueeze(0)
        xf = x4 if x4.dtype == torch.float32 else x4.float()
        if self.mode is Mode.STATIC:
            x_scale, zero_point, inv_scale = self._input_scale_k, self._input_zero_k, self._input_inv_scale_k
        else:
            x_scale, zero_point, inv_scale = kernels.dynamic_uint8_params(xf, self._fmt.high)
        q = kernels.quantize_static_input(xf, inv_scale, zero_point, self._fmt)
        q = q.contiguous(memory_format=torch.channels_last)
        bias = self.bias if bias is None else (bias.float() if self.bias is None else self.bias + bias)

        def run(_: str) -> torch.Tensor:
            return kernels.onednn_conv2d(
                q, x_scale, zero_point, self._onednn_conv, self.weight, self.kernel_size, self._weight_scale_n,
                bias, self._geometry, self.groups,
            )  # fmt: skip

        def reference() -> tuple[torch.Tensor, torch.Tensor]:
            weight = self.weight.reshape(self.out_channels, -1, *self.kernel_size)
            scale = x_scale * self._weight_scale_n
            return kernels.check.conv_reference(q, float(zero_point), weight, scale, bias, self._geometry, self.groups)

        shape = (*self.weight.shape, *x4.shape[1:])  # the flat weight, then the input's [C, H, W]
        if choice.pick(self._conv_kind, shape, x4, ("onednn",), "onednn", run, reference, "im2col") != "onednn":
            return None
        out = run("onednn")
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if x.dim() == 4 else out.squeeze(0)

    def _im2col_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Any device and mode: ``F.unfold`` patches through the ``Int8Matmul`` path."""
        batched = x.dim() == 4
        x4 = x if batched else x.unsqueeze(0)
        out_h, out_w = (
            (size + 2 * pad - dil * (k - 1) - 1) // step + 1
            for size, pad, dil, k, step in zip(
                x4.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )
        cols = F.unfold(x4, self.kernel_size, self.dilation, self.padding, self.stride)  # [N, C*k*k, L]
        if self.groups == 1:
            out = super().forward(cols.transpose(1, 2))  # [N, L, out]
        else:
            out = torch.cat(
                [self._group(g).forward(c.transpose(1, 2)) for g, c in enumerate(cols.chunk(self.groups, dim=1))],
                dim=-1,
            )
        out = out.transpose(1, 2).reshape(x4.shape[0], self.out_channels, out_h, out_w)
        return out if batched else out.squeeze(0)

    def _group(self, index: int) -> Int8Matmul:
        """The ``Int8Matmul`` of one group's output channels (im2col path of grouped convolutions)."""
        rows = slice(index * self.out_channels // self.groups, (index + 1) * self.out_channels // self.groups)
        part = Int8Matmul(
            self.in_features,
            rows.stop - rows.start,
            self.bias is not None,
            self.mode,
            self.scheme,
            (rows.stop - rows.start,),
        )
        part.input_scale, part.input_zero_point = self.input_scale, self.input_zero_point
        part.weight, part.weight_scale = self.weight[rows], self.weight_scale.expand(self.out_channels)[rows]
        if self.weight_zero_point is not None:
            part.weight_zero_point = self.weight_zero_point.expand(self.out_channels)[rows]
        part.bias = None if self.bias is None else self.bias[rows]
        part.prepare()
        return part

    def metadata(self) -> dict[str, Any]:
        extra = {"output_qparams": True} if self.output_scale is not None else {}
        return {**self.int8_metadata("Conv2d"), "groups": self.groups, **extra}

    @classmethod
    def state_dict_entry(cls, tensors: Mapping[str, torch.Tensor], name: str, mode: str) -> dict[str, Any] | None:
        entry = int8_state_dict_entry(cls.float_type.__name__, tensors, name, mode)
        if entry is not None and entry["mode"] == "static" and f"{name}.output_scale" in tensors:
            entry["output_qparams"] = True
        return entry

    def fused_conv_params(self) -> FusedConvParams | None:
        """Symmetric static or dynamic weights on the CPU fuse; weight-only mode and asymmetric weights do not."""
        if self.mode is Mode.WEIGHT_ONLY or self.weight_zero_point is not None or self.weight.device.type != "cpu":
            return None
        static = None if self.mode is not Mode.STATIC else (float(self._input_scale_k), int(self._input_zero_k))
        out = None
        if static is not None and self.output_scale is not None:  # in this CPU's codes, as the input's
            out = self._fmt.static_qparams(float(self.output_scale), int(self.output_zero_point))
        return FusedConvParams(self.weight, self._weight_scale_n, self.bias, self.kernel_size, self.groups, static, out)

    def onnx_forward(self, ops: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """QDQ (static; requantized at the output where the fused graph does, ``OnnxOps.conv``) or ``ConvInteger``
        (dynamic); weight-only mode and asymmetric weights: a float ``Conv``. ``bias`` is an attached conv
        owner's (``fuses_bias``); the layer's own is then None."""
        if self.mode is Mode.WEIGHT_ONLY or self.weight_zero_point is not None:
            return ops.float_layer(self, x, bias)
        weight = self.weight.reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        geometry = (self.stride, self.padding, self.dilation, self.groups)
        layer_bias = self.bias if bias is None else bias
        epilogue = ops.conv_epilogue(self.weight)
        return ops.conv(x, weight, self._weight_scale_n, layer_bias, self.stored_input_qparams(), geometry, epilogue)

    def dequantized_weight(self) -> torch.Tensor:
        return (
            super().dequantized_weight().reshape(self.out_channels, self.in_channels // self.groups, *self.kernel_size)
        )

    def dequantize(self) -> nn.Conv2d:
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            bias=self.bias is not None,
            device=self.weight.device,
        )
        with torch.no_grad():
            conv.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, mode={self.mode.value}"
        )
