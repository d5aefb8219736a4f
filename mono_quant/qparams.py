"""Pure functions: scales and zero points, quantize, dequantize, SQNR. No modules, no state.

Conventions (shared by every module and by the file format):
- int8 symmetric uses [-127, 127] (so ``-q`` never overflows); asymmetric uses [-128, 127].
- int4 values live in [-8, 7]; asymmetric int4 uses the whole range with a zero point.
- ``x ~= (q - zero_point) * scale``; symmetric means ``zero_point == 0`` (stored as ``None``).
"""

from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import torch

from mono_quant.config import Granularity, Scheme
from mono_quant.errors import ConfigError, QuantizationError

_EPS = torch.finfo(torch.float32).eps


class _ActivationFields(NamedTuple):
    scale: torch.Tensor  # float32 scalar
    zero_point: torch.Tensor  # int8 scalar (0 when symmetric)


class ActivationQParams(_ActivationFields):
    """Calibrated per-tensor int8 parameters of a layer's input: ``x ~= (q - zero_point) * scale``.

    Checked when made (also from numbers, also by ``_replace``): ``scale`` one finite positive number,
    ``zero_point`` one integer in [-128, 127]; anything else is a ``ConfigError`` naming the value.

    Example:
        >>> ActivationQParams(0.05, 3)
        ActivationQParams(scale=tensor(0.0500), zero_point=tensor(3, dtype=torch.int8))
        >>> ActivationQParams(float("nan"), 0)
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: input scale nan is not a finite positive number
    """

    __slots__ = ()

    def __new__(cls, scale: torch.Tensor | float, zero_point: torch.Tensor | int) -> ActivationQParams:
        for name, value in (("scale", scale), ("zero point", zero_point)):
            if isinstance(value, bool) or not isinstance(value, (torch.Tensor, int, float)):
                raise ConfigError(f"input {name} of type {type(value).__name__}: expected a number or a tensor")
        scale = torch.as_tensor(scale, dtype=torch.float32) if not isinstance(scale, torch.Tensor) else scale
        if scale.numel() != 1 or not scale.is_floating_point():
            raise ConfigError(f"input scale of shape {list(scale.shape)} ({scale.dtype}): expected one float")
        if not (math.isfinite(value := scale.item()) and value > 0):
            raise ConfigError(f"input scale {value} is not a finite positive number")
        point = torch.as_tensor(zero_point) if not isinstance(zero_point, torch.Tensor) else zero_point
        if point.numel() != 1 or point.is_complex() or not (-128 <= point.item() <= 127) or point.item() % 1:
            raise ConfigError(f"input zero point {point.tolist()} is not one integer in [-128, 127]")
        return super().__new__(cls, scale, point if point.dtype == torch.int8 else point.to(torch.int8))

    @classmethod
    def _make(cls, iterable: Any) -> ActivationQParams:  # what _replace calls: checked as well
        return cls(*iterable)


class QuantizedWeight(NamedTuple):
    """Integer data plus the parameters that map it back to float."""

    data: torch.Tensor  # int8, same shape as the float weight (int4 values are kept in int8 here)
    scale: torch.Tensor  # float32: [] per-tensor, [out] per-channel, [out, in/group] per-group
    zero_point: torch.Tensor | None  # int8, shaped like scale; None when symmetric


def int_range(bits: int, scheme: Scheme) -> tuple[int, int]:
    """The integer range used for ``bits`` under ``scheme``.

    Example:
        >>> int_range(8, Scheme.SYMMETRIC), int_range(4, Scheme.ASYMMETRIC)
        ((-127, 127), (-8, 7))
    """
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return (-high, high) if scheme is Scheme.SYMMETRIC and bits == 8 else (low, high)


def scale_zero_point(
    min_val: torch.Tensor, max_val: torch.Tensor, bits: int, scheme: Scheme
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point that map ``[min_val, max_val]`` (element-wise) onto the integer range.

    The range is widened to include 0 so that zero is exactly representable.

    Example:
        >>> s, z = scale_zero_point(torch.tensor(-1.0), torch.tensor(2.0), 8, Scheme.SYMMETRIC)
        >>> round(s.item() * 127, 4), z
        (2.0, None)
    """
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise QuantizationError("cannot compute a scale from a NaN or Inf range")
    low, high = int_range(bits, scheme)
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if scheme is Scheme.SYMMETRIC:
        scale = torch.maximum(-min_val, max_val) / high
        return scale.clamp_min(_EPS), None
    scale = ((max_val - min_val) / (high - low)).clamp_min(_EPS)
    zero_point = torch.clamp(torch.round(low - min_val / scale), low, high).to(torch.int8)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, scheme: Scheme
) -> torch.Tensor:
    """Round ``x / scale + zero_point`` into the integer range; returns int8 (also for int4 values).

    ``scale``/``zero_point`` must broadcast against ``x``.

    Example:
        >>> quantize(torch.tensor([0.5, -3.0]), torch.tensor(0.01), None, 8, Scheme.SYMMETRIC)
        tensor([  50, -127], dtype=torch.int8)
    """
    low, high = int_range(bits, scheme)
    q = x.float() * (1.0 / scale)  # the only full-size float temporary: everything after is in place
    q.round_()
    if zero_point is not None:
        q.add_(zero_point)
    return q.clamp_(low, high).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Float32 values ``(q - zero_point) * scale`` (scale/zero point broadcast against ``q``).

    Example:
        >>> dequantize(torch.tensor([50], dtype=torch.int8), torch.tensor(0.01), None)
        tensor([0.5000])
    """
    out = q.to(torch.float32, copy=True)
    if zero_point is not None:
        out.sub_(zero_point)
    return out.mul_(scale)


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features = weight.shape[0]
    flat = weight.reshape(out_features, -1)
    if flat.shape[1] % group_size:
        raise ConfigError(
            f"group_size={group_size} does not divide the layer's input size {flat.shape[1]} "
            f"(weight shape {tuple(weight.shape)}); choose a divisor"
        )
    return flat.reshape(out_features, flat.shape[1] // group_size, group_size)


def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    scheme: Scheme = Scheme.SYMMETRIC,
    granularity: Granularity = Granularity.PER_CHANNEL,
    group_size: int = 128,
) -> QuantizedWeight:
    """Quantize a weight whose first dimension is the output channel.

    Per-channel scales have shape ``[out]``, per-group ``[out, in/group]``, per-tensor ``[]``.

    Example:
        >>> w = torch.randn(4, 256)
        >>> qw = quantize_weight(w, 4, Scheme.ASYMMETRIC, Granularity.PER_GROUP, 128)
        >>> qw.data.shape, qw.scale.shape, qw.zero_point.shape
        (torch.Size([4, 256]), torch.Size([4, 2]), torch.Size([4, 2]))
    """
    w = weight.detach().float()
    if granularity is Granularity.PER_GROUP:
        grouped = _grouped(w, group_size)
        scale, zp = scale_zero_point(*_finite_range(grouped, -1), bits, scheme)
        q = quantize(grouped, scale[..., None], None if zp is None else zp[..., None], bits, scheme)
        return QuantizedWeight(q.reshape(weight.shape), scale, zp)
    if granularity is Granularity.PER_CHANNEL:
        scale, zp = scale_zero_point(*_finite_range(w.reshape(w.shape[0], -1), 1), bits, scheme)
        view = (-1,) + (1,) * (w.dim() - 1)
        q = quantize(w, scale.view(view), None if zp is None else zp.view(view), bits, scheme)
        return QuantizedWeight(q, scale, zp)
    scale, zp = scale_zero_point(*_finite_range(w, None), bits, scheme)
    return QuantizedWeight(quantize(w, scale, zp, bits, scheme), scale, zp)


def _finite_range(x: torch.Tensor, dim: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max along ``dim`` in one pass; NaN/Inf anywhere shows up in them (NaN propagates)."""
    low, high = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim)
    if not bool(torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise QuantizationError("weight contains NaN or Inf values")
    return low, high


def all_finite(x: torch.Tensor) -> bool:
    """Whether ``x`` has no NaN/Inf, in one reduction pass (cheaper than ``isfinite(x).all()``).

    Example:
        >>> all_finite(torch.tensor([1.0, 2.0])), all_finite(torch.tensor([1.0, float("nan")]))
        (True, False)
    """
    if x.numel() == 0:
        return True
    low, high = torch.aminmax(x.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def dequantize_weight(qw: QuantizedWeight) -> torch.Tensor:
    """Float32 weight back from a ``QuantizedWeight`` of any granularity.

    Example:
        >>> w = torch.randn(8, 16)
        >>> (dequantize_weight(quantize_weight(w, 8)) - w).abs().max() < 0.05
        tensor(True)
    """
    data, scale, zp = qw
    if scale.dim() == 2:  # per-group
        groups = scale.shape[1]
        grouped = data.reshape(data.shape[0], groups, -1)
        out = dequantize(grouped, scale[..., None], None if zp is None else zp[..., None])
        return out.reshape(data.shape)
    if scale.dim() == 1:
        view = (-1,) + (1,) * (data.dim() - 1)
        return dequantize(data, scale.view(view), None if zp is None else zp.view(view))
    return dequantize(data, scale, zp)


def sqnr_db(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10 log10(|ref|^2 / |ref - approx|^2)``.

    Returns ``inf`` when the two are identical.

    Example:
        >>> round(sqnr_db(torch.ones(4), torch.full((4,), 1.01)), 2)
        40.0
    """
    reference = reference.detach().float()
    noise = torch.linalg.vector_norm(reference - approximation.detach().float()).item()
    signal = torch.linalg.vector_norm(reference).item()
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 20 * math.log10(signal / noise)


def weight_sqnr_db(layer: str, reference: torch.Tensor, approximation: torch.Tensor) -> float:
    """SQNR of a layer's quantized weight, after checking that quantization gave finite values.

    ``approximation`` (float32, shaped like ``reference``) is overwritten with the noise. Finite weights
    can still quantize to Inf/NaN (an asymmetric range near ``float32`` max overflows its scale; fp16
    cannot hold 1e30 or 7e4): that raises ``QuantizationError`` naming ``layer``.

    Example:
        >>> w = torch.tensor([[1.0, 7e4]])
        >>> try:
        ...     weight_sqnr_db("fc", w, w.half().float())
        ... except QuantizationError as err:
        ...     print(str(err)[:62])
        layer 'fc': quantizing its weight gives non-finite values (inf
    """
    if not all_finite(approximation):
        bad = approximation[~torch.isfinite(approximation)][0].item()
        low, high = torch.aminmax(reference.detach().float())
        raise QuantizationError(
            f"layer {layer!r}: quantizing its weight gives non-finite values ({bad}) although the weight is finite "
            f"(range [{low.item():.4g}, {high.item():.4g}]): a scale overflowed or the values exceed the target "
            "type's range; exclude the layer, use a symmetric scheme or a wider dtype, or rescale the weight"
        )
    signal = torch.linalg.vector_norm(reference.float()).item()
    noise = torch.linalg.vector_norm(approximation.sub_(reference)).item()
    if noise == 0:
        return math.inf
    return 20 * math.log10(max(signal, 1e-30) / noise) if math.isfinite(noise) else -math.inf


def pack_int4_words(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values ``[N, K]`` (in [-8, 7]) into int32 words ``[N, K/8]``: eight values per word,
    least significant nibble first, each stored as ``q + 8`` (the compressed-tensors layout).

    Built from bytes (two nibbles each) viewed as little-endian int32 words: no 64-bit temporaries.

    Example:
        >>> w = pack_int4_words(torch.tensor([[-8, -7, 0, 0, 0, 0, 0, 7]]))
        >>> w.dtype, unpack_int4_words(w, 8).tolist()
        (torch.int32, [[-8, -7, 0, 0, 0, 0, 0, 7]])
    """
    rows, cols = q.shape
    if cols % 8:
        raise ConfigError(f"int4 packing needs the input size to be a multiple of 8, got {cols}")
    nibbles = (q.to(torch.int16) + 8).to(torch.uint8).reshape(rows, cols // 2, 2)
    packed_bytes = nibbles[..., 0] | (nibbles[..., 1] << 4)
    return _little_endian(packed_bytes.contiguous()).view(torch.int32)


def unpack_int4_words(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """Inverse of ``pack_int4_words``: int8 values in [-8, 7], shape ``[N, cols]``.

    Example:
        >>> unpack_int4_words(pack_int4_words(torch.full((2, 8), 3)), 8).unique().tolist()
        [3]
    """
    packed_bytes = _little_endian(packed.contiguous().view(torch.uint8))
    nibbles = torch.stack([packed_bytes & 0xF, packed_bytes >> 4], dim=-1)
    return nibbles.reshape(packed.shape[0], -1)[:, :cols].to(torch.int8) - 8


def _little_endian(packed_bytes: torch.Tensor) -> torch.Tensor:
    """Reorder bytes within each 4-byte word on big-endian hosts (a no-op on little-endian ones)."""
    if sys.byteorder == "little":
        return packed_bytes
    return packed_bytes.reshape(*packed_bytes.shape[:-1], -1, 4).flip(-1).reshape(packed_bytes.shape)
