"""Checking a kernel's output against an exact reference, on the first call with each new key.

Integer kernels differ by CPU (AMX, AVX-512 VNNI, AVX2) and by shape: oneDNN's AMX grouped convolution with 16
input channels per group returns noise, ``torch._int_mm`` with an inner dimension of 1 uninitialised memory.
So before a kernel serves a key (layer kind, shapes, batch bucket, device) it is run once beside a float64
reference computed from the same integer codes and weights, and kept only if every output lies within
``bound``: a 64th of the change one code step on every input would make (``scale * sum|w| / 64``). Float32
rounding of a correct kernel is far below that (about ``2**-17`` of it); a saturated or garbage sum is far
above. A failure is recorded (``failures()``), warned about once (``KernelCheckWarning``), and the layer uses
another candidate or its correct float path.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import torch

from mono_quant.errors import KernelCheckWarning

STEP_FRACTION = 1 / 64  # of one code step on every input: the tolerance of a correct kernel
CHECK_ROWS = 16  # rows of a call compared with the reference: enough to expose a wrong kernel
CHECK_IMAGES = 2  # images of a convolution's call compared likewise

_lock = threading.Lock()
_failures: list[KernelFailure] = []


@dataclasses.dataclass(frozen=True)
class KernelFailure:
    """A kernel that missed its reference on this machine: what, where, by how much."""

    key: str  # layer kind, shapes and batch bucket
    kernel: str
    max_error: float  # largest |out - reference|
    max_bound: float  # the bound at that element
    fallback: str  # the kernel (or "float") that serves instead

    def __str__(self) -> str:
        return (
            f"kernel {self.kernel!r} for {self.key} is off by {self.max_error:.3g} where a correct kernel is within "
            f"{self.max_bound:.3g}; {self.fallback!r} serves instead in this process"
        )


def within(out: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor) -> tuple[bool, float, float]:
    """``(ok, max_error, bound_there)``: whether every ``|out - reference| <= bound`` (NaN fails).

    Example:
        >>> within(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1], dtype=torch.float64), torch.tensor([0.2, 0.2]))
        (True, 0.1..., 0.2...)
        >>> within(torch.tensor([1.0, float("nan")]), torch.ones(2, dtype=torch.float64), torch.ones(2))[0]
        False
    """
    error = (out.double() - reference).abs()
    error = torch.where(torch.isnan(error), torch.full_like(error, float("inf")), error)
    excess = error - bound.double()
    worst = int(excess.flatten().argmax())
    bound_there = float(bound.double().expand_as(error).flatten()[worst])
    return bool(excess.max() <= 0), float(error.flatten()[worst]), bound_there


def record(failure: KernelFailure) -> None:
    """Keep ``failure`` for ``failures()`` and warn about it (once per key and kernel)."""
    with _lock:
        if any(f.key == failure.key and f.kernel == failure.kernel for f in _failures):
            return
        _failures.append(failure)
    warnings.warn(f"mono-quant: {failure}", KernelCheckWarning, stacklevel=3)


def failures() -> list[KernelFailure]:
    """Every kernel that failed its check in this process, oldest first.

    Example:
        >>> isinstance(failures(), list)
        True
    """
    with _lock:
        return list(_failures)


def matmul_reference(
    codes: torch.Tensor,
    zero: torch.Tensor | float,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``((codes - zero) @ weight.T) * scale + bias`` in float64 and its check bound, for the first rows.

    ``codes`` ``[M, K]`` integer activations, ``zero`` their zero point (a scalar or ``[M, 1]``), ``weight``
    int8 ``[N, K]`` (zero point removed by the caller if any), ``scale`` the combined scale broadcasting to
    ``[M, N]``. Only the first ``CHECK_ROWS`` rows are computed: compare them with the kernel's first rows.

    Example:
        >>> codes = torch.tensor([[130, 126]], dtype=torch.uint8); w = torch.tensor([[1, 2]], dtype=torch.int8)
        >>> ref, bound = matmul_reference(codes, 128, w, torch.tensor(0.5), None)
        >>> ref.item(), bound.item()  # (2 - 4) * 0.5; a 64th of 0.5 * (1 + 2)
        (-1.0, 0.0234375)
    """
    rows = codes[:CHECK_ROWS].double() - (zero[:CHECK_ROWS] if isinstance(zero, torch.Tensor) and zero.dim() else zero)
    w = weight.double()
    scale = scale[:CHECK_ROWS] if scale.dim() == 2 else scale
    reference = (rows @ w.t()) * scale.double()
    bound = (w.abs().sum(1) * scale.double()).abs() * STEP_FRACTION
    if bias is not None:
        reference = reference + bias.double()
        bound = bound + bias.double().abs() * 2.0**-20
    return reference, bound.expand_as(reference)


def conv_reference(
    codes: torch.Tensor,
    zero: float,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[list[int], list[int], list[int]],
    groups: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``conv2d(codes - zero, weight) * scale + bias`` in float64 and its check bound, for the first images.

    ``codes`` ``[N, C, H, W]`` integer activations; ``weight`` int8 ``[out, C/groups, kh, kw]``; ``scale``
    ``[out]`` (input scale times weight scale); ``geometry`` ``(stride, padding, dilation)``.

    Example:
        >>> codes = torch.full((1, 1, 3, 3), 130, dtype=torch.uint8); w = torch.ones(2, 1, 3, 3, dtype=torch.int8)
        >>> ref, bound = conv_reference(codes, 128, w, torch.ones(2), None, ([1, 1], [0, 0], [1, 1]), 1)
        >>> ref.flatten().tolist(), bound.flatten().tolist()  # 9 * 2; a 64th of 9
        ([18.0, 18.0], [0.140625, 0.140625])
    """
    images = codes[:CHECK_IMAGES].double() - zero
    w = weight.double()
    stride, padding, dilation = geometry
    reference = torch.nn.functional.conv2d(images, w, None, stride, padding, dilation, groups)
    per_channel = scale.double().reshape(1, -1, 1, 1)
    reference = reference * per_channel
    bound = (w.abs().sum((1, 2, 3)).reshape(1, -1, 1, 1) * per_channel).abs() * STEP_FRACTION
    if bias is not None:
        reference = reference + bias.double().reshape(1, -1, 1, 1)
        bound = bound + bias.double().abs().reshape(1, -1, 1, 1) * 2.0**-20
    return reference, bound.expand_as(reference)
