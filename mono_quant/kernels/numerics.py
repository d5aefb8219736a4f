"""What integer activations this machine's kernels multiply exactly, found by a probe once per process.

CPUs without VNNI (AVX2, AVX-512 without VNNI: laptops, AMD Zen 1-3, Skylake servers) multiply uint8 by int8
with ``vpmaddubsw``, which adds each pair of products into a saturating int16: ``255 * 127 * 2`` does not
fit, so full-range uint8 activations give wrong sums (measured here under ``ONEDNN_MAX_CPU_ISA=AVX2``:
14-20 dB output SQNR instead of 40), and int8 x int8 saturates the same way. 7-bit codes (0..127) never
overflow (``127 * 128 * 2 < 2**15``). So the first kernel call in a process multiplies a worst-case block
with each kernel family and keeps the widest code range that comes out exact: 0..255 on VNNI and AMX
CPUs, 0..127 elsewhere. ``Int8Input`` says how activations are coded for a device; layers derive their
kernel-side scales from it at build/load time, so the same file runs at full precision on a VNNI CPU and
exactly (one bit of activation precision less) on an older one.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

_FULL, _SEVEN_BIT = 255, 127
_PROBE_K = 64


@dataclasses.dataclass(frozen=True)
class Int8Input:
    """How float activations become integer codes for one device's kernels.

    ``dtype`` uint8 (CPU) or int8; codes lie in ``[low, high]``; symmetric (per-row) quantization maps
    ``[-max, max]`` onto ``zero - half .. zero + half``.

    Example:
        >>> fmt = Int8Input(torch.uint8, low=0, high=127)
        >>> fmt.zero, fmt.half, fmt.levels
        (64, 63, 127)
    """

    dtype: torch.dtype
    low: int
    high: int

    @property
    def zero(self) -> int:
        """The code of 0.0 in symmetric quantization (128 or 64 for uint8, 0 for int8)."""
        return (self.high + 1) // 2 if self.low == 0 else 0

    @property
    def half(self) -> int:
        """Codes on each side of ``zero`` in symmetric quantization (127 or 63)."""
        return self.high // 2 if self.low == 0 else self.high

    @property
    def levels(self) -> int:
        """``high - low``: the steps an asymmetric range is split into."""
        return self.high - self.low

    def static_qparams(self, scale: float, zero_point: int) -> tuple[float, int]:
        """A calibrated int8 ``(scale, zero_point)`` (codes -128..127) re-expressed in this format's codes.

        The same float range ``[scale * (-128 - zero_point), scale * (127 - zero_point)]`` spread over
        ``levels`` steps instead of 255.

        Example:
            >>> Int8Input(torch.uint8, 0, 255).static_qparams(0.5, -3)
            (0.5, 125)
            >>> scale, zero = Int8Input(torch.uint8, 0, 127).static_qparams(0.5, -3)
            >>> round(scale, 4), zero
            (1.0039, 62)
        """
        if self.low != 0:
            return scale, zero_point
        if self.high == _FULL:
            return scale, zero_point + 128
        ratio = _FULL / self.high
        return scale * ratio, min(max(round((zero_point + 128) / ratio), 0), self.high)


SIGNED = Int8Input(torch.int8, -128, 127)


def input_format(device: torch.device | str) -> Int8Input:
    """The activation coding the integer kernels use on ``device``: uint8 on CPU (0..255 or 0..127 by the
    probe), int8 elsewhere (CUDA's ``_int_mm`` takes int8 x int8).

    Example:
        >>> input_format("cpu").high in (127, 255), input_format("cpu").dtype
        (True, torch.uint8)
    """
    if torch.device(device).type != "cpu":
        return SIGNED
    return Int8Input(torch.uint8, 0, uint8_high())


def uint8_high() -> int:
    """The largest uint8 code every CPU kernel family multiplies exactly: 255 or 127.

    Example:
        >>> uint8_high() in (127, 255)
        True
    """
    return min(_exact_high("int_mm"), _exact_high("onednn_linear"), _exact_high("onednn_conv"))


def describe() -> str:
    """One line for reports and benchmarks: which activation codes this CPU's kernels take.

    Example:
        >>> describe().startswith("uint8 activations")
        True
    """
    high = uint8_high()
    why = "exact on this CPU" if high == _FULL else "7-bit: this CPU's u8 x s8 products saturate int16 (no VNNI)"
    return f"uint8 activations 0..{high} ({why})"


@functools.cache
def _exact_high(family: str) -> int:
    for high in (_FULL, _SEVEN_BIT):
        if _exact(family, high):
            return high
    return _SEVEN_BIT  # neither: the per-call checks (kernels.check) keep such a kernel out


def _exact(family: str, high: int) -> bool:
    """Whether ``family`` multiplies codes ``high`` by weights +-127 exactly (the worst case for int16 pairs).

    Every tensor is made on the CPU explicitly: the first call may come inside a ``torch.device("meta")`` block.
    """
    cpu = torch.device("cpu")
    weight = torch.full((16, _PROBE_K), 127, dtype=torch.int8, device=cpu)
    weight[1::2] = -127
    codes = torch.full((4, _PROBE_K), high, dtype=torch.uint8, device=cpu)
    ones, zero_points = torch.ones(16, device=cpu), torch.zeros(16, dtype=torch.int64, device=cpu)
    if family == "int_mm":
        out = torch._int_mm(codes, weight.t()).double()
    elif family == "onednn_linear":
        if not hasattr(torch.ops.onednn, "qlinear_prepack") or not torch.backends.mkldnn.is_available():
            return True
        packed = torch.ops.onednn.qlinear_prepack(weight, None)
        out = torch.ops.onednn.qlinear_pointwise(
            codes, 1.0, 0, packed, ones, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
        ).double()
    else:
        if not hasattr(torch.ops.onednn, "qconv_prepack") or not torch.backends.mkldnn.is_available():
            return True
        geometry = ([1, 1], [0, 0], [1, 1])
        packed = torch.ops.onednn.qconv_prepack(weight.reshape(16, _PROBE_K, 1, 1), ones, 1.0, 0, *geometry, 1, None)
        image = codes.reshape(4, _PROBE_K, 1, 1).contiguous(memory_format=torch.channels_last)
        out = torch.ops.onednn.qconv2d_pointwise(
            image, 1.0, 0, packed, ones, zero_points, None, *geometry, 1, 1.0, 0, torch.float32, "none", [], ""
        ).double().reshape(4, 16)
    signs = torch.tensor([1.0, -1.0], device=cpu).repeat(8)
    return bool(torch.equal(out, (high * _PROBE_K * 127.0 * signs).expand(4, 16)))
