"""``Int8Matmul``: the int8 state and matrix-multiply kernels that ``Int8Linear`` and ``Int8Conv2d`` share
(the convolution runs its im2col path through them); int8 per-channel weights; dynamic, static or
weight-only activations.

- dynamic: each input row (token) gets its own 8-bit scale at run time (uint8 on CPU, for VNNI's
  u8 x s8; 7-bit codes on CPUs whose u8 x s8 products saturate, see ``kernels.numerics``). Per-row
  scales keep transformers accurate (MiniLM embeddings: cosine 0.997 against float; one per-tensor
  scale for the batch gave 0.981) and make results independent of the batch. Two
  kernels: ``_int_mm`` with a three-op epilogue, or oneDNN's packed u8 x s8 with activation scale 1 and
  zero point 128 (64 for 7-bit codes) and the row scales applied after.
- static: the input is quantized with the calibrated per-tensor scale and zero point; oneDNN's u8 x s8
  kernel with rescale and bias fused, or ``_int_mm`` with every weight-side term (combined scale,
  zero-point correction folded into the bias) computed once.
- weight_only: float activations against int8 weights with the packed int8 kernel (bfloat16 inside).
On CPU with symmetric weights ``kernels.choice`` picks ``_int_mm`` or oneDNN per (shape, batch bucket) by
checking both against an exact reference and measuring them once (fixed mode: ``kernels.onednn_default``);
a kernel that fails its check is never used, and when none passes the layer computes in float. Asymmetric weights, other
devices, tracing and ``torch.compile`` always take ``_int_mm`` (oneDNN takes symmetric weights only).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mono_quant import kernels
from mono_quant.config import Mode, Scheme
from mono_quant.kernels import choice
from mono_quant.modules import compiled_ops
from mono_quant.qparams import ActivationQParams, QuantizedWeight, dequantize_weight

_KERNELS = ("int_mm", "onednn")  # candidates for symmetric weights on CPU; the rest always take _int_mm


class Int8Matmul(nn.Module):
    """int8 weights ``[out, in]`` with float scales, static input parameters and every derived kernel term;
    ``forward`` multiplies a float ``[N, in]`` input by the weight. Not a layer kind (not registered): the
    helper ``Int8Linear`` and ``Int8Conv2d`` both hold their int8 state and kernels through.

    Example:
        >>> from mono_quant.qparams import quantize_weight
        >>> part = Int8Matmul(8, 4, False, Mode.DYNAMIC, Scheme.SYMMETRIC, (4,))
        >>> part.set_quantized(quantize_weight(torch.randn(4, 8), 8, Scheme.SYMMETRIC), None, None)
        >>> part(torch.randn(3, 8)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, mode: Mode, scheme: Scheme, scale_shape: tuple[int, ...]
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.mode, self.scheme = mode, scheme
        self._shape, self._symmetric = (out_features, in_features), scheme is not Scheme.ASYMMETRIC
        self._choice_kind = f"int8_linear_{mode.value}" + ("" if self._symmetric else "_asymmetric")
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(scale_shape))
        asymmetric = scheme is Scheme.ASYMMETRIC
        self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=torch.int8) if asymmetric else None)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        static = mode is Mode.STATIC
        self.register_buffer("input_scale", torch.ones(()) if static else None)
        self.register_buffer("input_zero_point", torch.zeros((), dtype=torch.int8) if static else None)
        derived = (
            "_weight_scale_n",
            "_weight_scale_step",
            "_zero_offset",
            "_rounding_offset",
            "_input_scale_k",
            "_input_zero_k",
            "_input_inv_scale_k",
            "_out_scale",
            "_out_bias",
            "_static_offset",
            "_weight_zp_scaled",
            "_prepared_weight",
        )
        for name in derived:
            self.register_buffer(name, None, persistent=False)
        self._fmt = kernels.input_format("cpu")
        self._onednn = kernels.OneDNNWeight()
        self.register_load_state_dict_post_hook(lambda module, keys: module.prepare())

    def set_quantized(
        self, qw: QuantizedWeight, bias: torch.Tensor | None, activation: ActivationQParams | None
    ) -> None:
        """Hold ``qw`` (and the calibrated ``activation`` in static mode), then prepare the kernel terms."""
        self.weight, self.weight_scale = qw.data, qw.scale
        if self.scheme is Scheme.ASYMMETRIC:
            self.weight_zero_point = qw.zero_point
        self.bias = bias
        if self.mode is Mode.STATIC:
            if activation is None:
                raise ValueError(f"{type(self).__name__} in static mode needs calibrated activation parameters")
            self.input_scale = activation.scale.float().reshape(())
            self.input_zero_point = activation.zero_point.to(torch.int8).reshape(())
        self.prepare()

    def prepare(self) -> None:
        """Compute every weight-side term once (never per forward), for this device's activation codes."""
        compiled_ops.remember("matmul", self)
        self._onednn = kernels.OneDNNWeight()
        fmt = self._fmt = kernels.input_format(self.weight.device)
        out_scale = self.weight_scale.float().expand(self.out_features).contiguous()
        self._weight_scale_n = out_scale
        self._weight_scale_step = out_scale / fmt.half
        int_colsum = kernels.row_sums(self.weight)
        # codes around ``fmt.zero`` add zero * colsum(weight) to every output: removed with this constant
        self._zero_offset = fmt.zero * int_colsum
        self._rounding_offset = kernels.rounding_offset(self.in_features, fmt.zero, self.weight.device)
        zp = None if self.weight_zero_point is None else self.weight_zero_point.float().expand(self.out_features)
        self._weight_zp_scaled = None if zp is None else zp * out_scale
        self._prepared_weight = None
        if self.mode is Mode.WEIGHT_ONLY:
            self._prepared_weight = kernels.prepare_int8_weight_only(self.weight)
        if self.mode is not Mode.STATIC:
            return
        # static: out = s_x * s_w * (sum (q_x - z_x)(q_w - z_w)) + b, expanded so only q_x . q_w and
        # (for asymmetric weights) rowsum(q_x) depend on the input; s_x, z_x in this device's codes
        scale, zero = fmt.static_qparams(float(self.input_scale), int(self.input_zero_point))
        # one-element, not 0-d: inductor writes 0-d constants into its generated code, and a cached graph
        # (freezing, same architecture) then serves one model's input scale to another
        self._input_scale_k = torch.tensor([scale], device=self.weight.device)
        self._input_zero_k = torch.tensor([zero], dtype=torch.int32, device=self.weight.device)
        self._input_inv_scale_k = 1.0 / self._input_scale_k
        combined = self._input_scale_k * out_scale
        self._static_offset = zero * int_colsum  # exact: symmetric weights' correction
        correction = -float(zero) * int_colsum.float()
        if zp is not None:
            correction = correction + self.in_features * zero * zp
        bias = torch.zeros_like(combined) if self.bias is None else self.bias.float()
        self._out_scale = combined.contiguous()
        self._out_bias = (bias + combined * correction).contiguous()
        self._weight_zp_scaled = None if zp is None else zp * combined

    def _apply(self, fn: Any, recurse: bool = True) -> Int8Matmul:
        out = super()._apply(fn, recurse)
        moved = not self.weight.is_meta and self._fmt != kernels.input_format(self.weight.device)
        if moved:  # another device's activation codes
            self.prepare()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the hot path: keep Python work and op count minimal (batch 1 is dominated by per-op overhead)
        if not x.is_floating_point():
            raise RuntimeError(f"{type(self).__name__} expects a floating-point input, got {x.dtype} (as nn.Linear)")
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if torch.compiler.is_compiling() and x2.device.type == "cpu":
            out = self._compiled_matmul(x2)
        else:
            out = self.eager_matmul(x2)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def eager_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 ``[rows, in]`` product outside ``torch.compile`` (also what the compiled graph's op runs)."""
        return self._weight_only_forward(x) if self.mode is Mode.WEIGHT_ONLY else self._run(self._kernel(x), x)

    def _compiled_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Under ``torch.compile``: dynamic mode quantizes in traced ops (inductor fuses them into one kernel) and
        multiplies the codes in one registered op; other modes run the whole eager call as one registered op."""
        arguments = self.op_arguments()[0]
        if self.mode is not Mode.DYNAMIC:
            return torch.ops.mono_quant.int8_matmul(x, *arguments, self.mode.value)
        q, row_max = kernels.quantize_per_row(x, self._fmt, self._rounding_offset)
        return torch.ops.mono_quant.int8_codes_matmul(q, row_max, *arguments)

    def codes_matmul(self, q: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
        """The dynamic product of per-row codes ``q`` (from ``kernels.quantize_per_row``): what the compiled op runs.

        Example:
            >>> from mono_quant.qparams import quantize_weight
            >>> part = Int8Matmul(8, 4, False, Mode.DYNAMIC, Scheme.SYMMETRIC, (4,))
            >>> part.set_quantized(quantize_weight(torch.randn(4, 8), 8, Scheme.SYMMETRIC), None, None)
            >>> x = torch.randn(3, 8)
            >>> q, row_max = kernels.quantize_per_row(x, part._fmt)
            >>> torch.allclose(part.codes_matmul(q, row_max), part(x))
            True
        """
        candidates = _KERNELS if self._symmetric and kernels.use_onednn(q) else _KERNELS[:1]
        onednn_first = len(candidates) > 1 and kernels.onednn_default(q.shape[0], self.weight.numel())
        default = "onednn" if onednn_first else "int_mm"
        kernel = choice.pick(
            self._choice_kind + "_codes", self._shape, q, candidates, default,
            lambda name: self._dynamic_product(name, q, row_max),
            lambda: self._reference_codes(q, self._fmt.zero, row_max / self._fmt.half),
        )  # fmt: skip
        if kernel == choice.FALLBACK:  # no integer kernel passed its check on this machine
            dequantized = (q.float() - self._fmt.zero) * (row_max / self._fmt.half)
            return F.linear(dequantized, self.dequantized_weight(), self.bias)
        return self._dynamic_product(kernel, q, row_max)

    def op_arguments(self) -> tuple[tuple[torch.Tensor | None, ...], list[int]]:
        """What ``compiled_ops`` takes: ``(weight, weight_scale, weight_zero_point, bias, input scale, input zero
        point)`` (the input parameters one-element, never 0-d: inductor writes 0-d constants into cached code) and
        the geometry (none for a matmul)."""
        stored = self.stored_input_qparams()
        scale, zero = (None, None) if stored is None else (stored[0].reshape(1), stored[1].reshape(1))
        return (self.weight, self.weight_scale, self.weight_zero_point, self.bias, scale, zero), []

    def _kernel(self, x: torch.Tensor) -> str:
        """``"onednn"``, ``"int_mm"`` or ``"float"`` for this call: checked against an exact reference and
        measured once per shape and batch bucket (see ``choice``)."""
        candidates = _KERNELS if self._symmetric and kernels.use_onednn(x) else _KERNELS[:1]
        onednn_first = len(candidates) > 1 and kernels.onednn_default(x.shape[0], self.weight.numel())
        default = "onednn" if onednn_first else "int_mm"
        return choice.pick(
            self._choice_kind, self._shape, x, candidates, default, lambda name: self._run(name, x),
            lambda: self._reference(x),
        )

    def _codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """``(codes, zero, scale)``: the integer input of this call, its zero point and scale (per row or one)."""
        if self.mode is Mode.DYNAMIC:
            q, row_max = kernels.quantize_per_row(x, self._fmt, self._rounding_offset)
            return q, self._fmt.zero, row_max / self._fmt.half
        q = kernels.quantize_static_input(x, self._input_inv_scale_k, self._input_zero_k, self._fmt)
        return q, self._input_zero_k.double(), self._input_scale_k

    def _reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact (float64) output of this call's first rows from its integer codes, and the check's bound."""
        return self._reference_codes(*self._codes(x))

    def _reference_codes(
        self, q: torch.Tensor, zero: torch.Tensor | float, scale: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_reference`` from the codes ``q``, their zero point and their scale (one, or one per row)."""
        weight = self.weight
        if self.weight_zero_point is not None:
            weight = weight.int() - self.weight_zero_point.int().reshape(-1, 1)
        return kernels.check.matmul_reference(q, zero, weight, scale * self._weight_scale_n, self.bias)

    def _run(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        if kernel == choice.FALLBACK:  # no integer kernel passed its check on this machine
            return F.linear(x, self.dequantized_weight(), self.bias)
        if self.mode is Mode.DYNAMIC:
            return self._dynamic_forward(kernel, x)
        q, _, _ = self._codes(x)
        if kernel == "onednn":  # uint8 codes against oneDNN's packed weight, rescale and bias fused
            return kernels.onednn_linear(
                q, self._input_scale_k, self._input_zero_k, self._onednn, self.weight, self._weight_scale_n, self.bias
            )
        if self._symmetric:  # oneDNN's order of operations: the same bits whichever kernel serves
            acc, scale = kernels.int_mm(q, self.weight), self._input_scale_k
            return kernels.static_rescale(acc, self._static_offset, scale, self._weight_scale_n, self.bias)
        out = kernels.rescale(kernels.int_mm(q, self.weight), self._out_scale, self._out_bias)
        return out - q.sum(-1, keepdim=True, dtype=torch.int32) * self._weight_zp_scaled

    def _dynamic_forward(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        """Per-row (token) scales at run time; uint8 codes on CPU (VNNI's u8 x s8; 7-bit without VNNI)."""
        q, row_max = kernels.quantize_per_row(x, self._fmt, self._rounding_offset)
        return self._dynamic_product(kernel, q, row_max)

    def _dynamic_product(self, kernel: str, q: torch.Tensor, row_max: torch.Tensor) -> torch.Tensor:
        fmt = self._fmt
        if kernel == "onednn":
            scale = self._weight_scale_step
            return kernels.onednn_linear_dynamic(q, row_max, self._onednn, self.weight, scale, self.bias, fmt.zero)
        acc = kernels.int_mm(q, self.weight)
        if self.weight_zero_point is not None:  # sum of the signed codes times each row's weight zero point
            signed_sums = q.sum(-1, keepdim=True, dtype=torch.int32) - self.in_features * fmt.zero
            acc = acc - signed_sums * self.weight_zero_point.int().reshape(1, -1)
        offset = self._zero_offset if fmt.zero else None
        return kernels.dynamic_rescale(acc, offset, row_max, self._weight_scale_step, self.bias)

    def _weight_only_forward(self, x: torch.Tensor) -> torch.Tensor:
        out = kernels.int8_weight_only_mm(x, self._prepared_weight, self._weight_scale_n)
        if self._weight_zp_scaled is not None:
            out = out - x.sum(-1, keepdim=True) * self._weight_zp_scaled
        return out if self.bias is None else out + self.bias

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_weight(QuantizedWeight(self.weight, self.weight_scale, self.weight_zero_point))

    def int8_metadata(self, kind: str) -> dict[str, Any]:
        """The file entry's fields for int8 weights of layer kind ``kind``."""
        return {
            "kind": kind,
            "mode": self.mode.value,
            "bits": 8,
            "scheme": self.scheme.value,
            "scale_shape": list(self.weight_scale.shape),
        }

    def stored_input_qparams(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(input scale, input zero point)`` as stored, or ``None`` outside static mode."""
        return (self.input_scale, self.input_zero_point) if self.mode is Mode.STATIC else None


def int8_state_dict_entry(
    kind: str, tensors: Mapping[str, torch.Tensor], name: str, mode: str
) -> dict[str, Any] | None:
    """``QuantizedLayer.state_dict_entry`` for int8 weights (``weight``, ``weight_scale`` ...) of kind ``kind``.

    Example:
        >>> tensors = {"fc.weight": torch.zeros(4, 8, dtype=torch.int8), "fc.weight_scale": torch.ones(4)}
        >>> int8_state_dict_entry("Linear", tensors, "fc", "dynamic")
        {'kind': 'Linear', 'mode': 'dynamic', 'bits': 8, 'scheme': 'symmetric', 'scale_shape': [4], 'shape': [4, 8]}
    """
    weight, scale = tensors.get(f"{name}.weight"), tensors.get(f"{name}.weight_scale")
    if weight is None or scale is None:
        return None
    return {
        "kind": kind,
        "mode": "static" if f"{name}.input_scale" in tensors else mode,
        "bits": 8,
        "scheme": "asymmetric" if f"{name}.weight_zero_point" in tensors else "symmetric",
        "scale_shape": list(scale.shape),
        "shape": list(weight.shape),
    }
