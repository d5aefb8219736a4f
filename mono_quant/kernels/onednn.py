"""oneDNN's quantized linear and convolution (``torch.ops.onednn``): packed-weight caches, the fused
epilogues (bias, ReLU, residual sum, uint8 output) and the rules for when they serve a call."""

from __future__ import annotations

import torch

from mono_quant.kernels.int8 import aligned, writable_in_place

_ONEDNN_MIN_ROWS = 2  # fixed rule: oneDNN from 2 rows for large weights, from 65 rows for small ones
_ONEDNN_SMALL_WEIGHT_MIN_ROWS = 65
_ONEDNN_LARGE_WEIGHT = 1 << 20  # elements (a 1024 x 1024 layer)
_HAS_ONEDNN = hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()
_HAS_ONEDNN_CONV = hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()


class OneDNNWeight:
    """oneDNN's packed copy of an int8 ``[N, K]`` weight, built on first use on CPU.

    A cache, not state: ``deepcopy`` and pickling give an empty one, and it is never saved or moved.
    While it exists the layer holds its int8 weight twice (the plain copy serves batch 1, other
    devices and the file format).
    """

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None
        self.zero_points: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> OneDNNWeight:
        return type(self)()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def get(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed is None:
            self.packed = torch.ops.onednn.qlinear_prepack(weight, None)
            self.zero_points = torch.zeros(weight.shape[0], dtype=torch.int64)
        return self.packed, self.zero_points


class OneDNNConvWeight(OneDNNWeight):
    """oneDNN's packed copy of an int8 convolution weight, built on first use on CPU.

    A cache like ``OneDNNWeight``: never saved, copied or moved.
    """

    def get_conv(
        self,
        weight: torch.Tensor,
        kernel_size: tuple[int, int],
        weight_scale: torch.Tensor,
        x_scale: torch.Tensor,
        x_zero_point: torch.Tensor,
        geometry: tuple[list[int], list[int], list[int]],
        groups: int = 1,
        x_shape: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed weight and its (zero) zero points; ``weight`` is the flat int8 ``[out, in*kh*kw]``.

        With ``x_shape`` (the input's ``[N, C, H, W]``) oneDNN packs in the layout its kernel for that
        shape reads, instead of reordering the weight on each call (measured here at batch 1: a 3x3
        depthwise conv on 96x56x56 74 us faster, a 1x1 conv on 32x112x112 80 us faster).
        """
        if self.packed is None:
            out_channels = weight.shape[0]
            weight4 = aligned(weight).reshape(out_channels, -1, *kernel_size)
            self.packed = torch.ops.onednn.qconv_prepack(
                weight4, weight_scale, float(x_scale), int(x_zero_point), *geometry, groups, x_shape
            )
            self.zero_points = torch.zeros(out_channels, dtype=torch.int64)
        return self.packed, self.zero_points


def use_onednn_conv(x: torch.Tensor) -> bool:
    """Whether ``onednn_conv2d`` serves this input: a CPU tensor, op available, not inside ``torch.compile``.

    Measured here (2 threads, 3x3 convs of 32-128 channels on 16x16-4x4 maps): oneDNN's u8 x s8
    convolution is 2-3x faster than float ``nn.Conv2d`` at batch 32 and 1-4x at batch 1, while
    im2col + an int8 matmul is 4-20x slower than float at batch 32, so CPU always takes oneDNN.

    Example:
        >>> use_onednn_conv(torch.zeros(1, 3, 8, 8)) == _HAS_ONEDNN_CONV
        True
    """
    if torch.compiler.is_compiling():  # same reason as use_onednn: inductor wants the packed weight as a constant
        return False
    return _HAS_ONEDNN_CONV and x.device.type == "cpu"


def onednn_conv2d(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    weight: OneDNNConvWeight,
    int8_weight: torch.Tensor,
    kernel_size: tuple[int, int],
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[list[int], list[int], list[int]],
    groups: int = 1,
) -> torch.Tensor:
    """``conv2d((q - x_zero_point) * x_scale, int8_weight * weight_scale) + bias`` in one oneDNN call, float32 out.

    ``q`` is uint8 ``[N, C, H, W]`` (channels-last is fastest; the output has ``q``'s memory format);
    ``x_scale``/``x_zero_point`` may change from call to call (oneDNN takes them at run time; measured:
    a weight packed for one scale gives exact results for another); ``int8_weight`` is flat
    ``[out, C/groups*kh*kw]``; ``geometry`` is ``(stride, padding, dilation)``.

    Example:
        >>> w = torch.ones(4, 2 * 3 * 3, dtype=torch.int8)
        >>> q = torch.full((1, 2, 5, 5), 130, dtype=torch.uint8)
        >>> out = onednn_conv2d(q, torch.tensor(0.5), torch.tensor(128), OneDNNConvWeight(), w, (3, 3),
        ...                     torch.ones(4), None, ([1, 1], [0, 0], [1, 1]))
        >>> out.shape, out[0, 0, 0, 0].item()
        (torch.Size([1, 4, 3, 3]), 18.0)
    """
    packed, zero_points = weight.get_conv(
        int8_weight, kernel_size, weight_scale, x_scale, x_zero_point, geometry, groups
    )
    return torch.ops.onednn.qconv2d_pointwise(
        q, float(x_scale), int(x_zero_point), packed, weight_scale, zero_points, bias, *geometry, groups,
        1.0, 0, torch.float32, "none", [], "",
    )  # fmt: skip


def onednn_conv2d_fused(
    q: torch.Tensor,
    x_qparams: tuple[float, int],
    packed: torch.Tensor,
    weight_scale: torch.Tensor,
    zero_points: torch.Tensor,
    bias: torch.Tensor | None,
    geometry: tuple[list[int], list[int], list[int]],
    groups: int,
    unary: tuple[str, list[float]] = ("none", []),
    accum: torch.Tensor | None = None,
    out_qparams: tuple[float, int] | None = None,
    accum_qparams: tuple[float, int] | None = None,
) -> torch.Tensor:
    """One oneDNN convolution with its epilogue fused: ``unary(conv(q) + bias (+ accum))``.

    ``q`` is uint8 (channels-last) with ``x_qparams = (scale, zero_point)``; ``packed``/``zero_points``
    come from ``OneDNNConvWeight.get_conv``; ``unary`` is a oneDNN post-op and its scalars
    (``("relu", [])``, ``("hardtanh", [0.0, 6.0])`` for ReLU6). ``accum`` (the output's shape, channels-last)
    is added by oneDNN's "sum" post-op before ``unary`` (oneDNN takes only ReLU after a sum) and is written
    into. A float32 ``accum`` gives a float32 output; a uint8 one (``accum_qparams = (scale, zero_point)``)
    keeps the residual add in uint8 and needs ``out_qparams``. ``out_qparams = (scale, zero_point)`` gives a
    uint8 output requantized inside the kernel (the next quantized convolution's input), else float32.

    Example:
        >>> w, cache = torch.ones(4, 2 * 3 * 3, dtype=torch.int8), OneDNNConvWeight()
        >>> geo = ([1, 1], [0, 0], [1, 1])
        >>> packed, zps = cache.get_conv(w, (3, 3), torch.ones(4), torch.tensor(0.5), torch.tensor(128), geo)
        >>> q = torch.full((1, 2, 5, 5), 130, dtype=torch.uint8)
        >>> out = onednn_conv2d_fused(q, (0.5, 128), packed, torch.ones(4), zps, None, geo, 1, ("relu", []),
        ...                           out_qparams=(0.5, 0))
        >>> out.dtype, out[0, 0, 0, 0].item()
        (torch.uint8, 36)
        >>> acc = torch.full((1, 4, 3, 3), 10, dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
        >>> out = onednn_conv2d_fused(q, (0.5, 128), packed, torch.ones(4), zps, None, geo, 1, ("relu", []),
        ...                           acc, (0.5, 0), (0.5, 0))
        >>> out.dtype, out[0, 0, 0, 0].item()  # (18 + 10 * 0.5) / 0.5
        (torch.uint8, 46)
    """
    x_scale, x_zero_point = x_qparams
    out_scale, out_zero_point = out_qparams or (1.0, 0)
    out_dtype = None if out_qparams else torch.float32
    if accum is not None:
        accum_scale, accum_zero_point = accum_qparams or (1.0, 0)
        return torch.ops.onednn.qconv2d_pointwise.binary(
            q, x_scale, x_zero_point, packed, weight_scale, zero_points, accum, bias, *geometry, groups,
            out_scale, out_zero_point, out_dtype, accum_scale, accum_zero_point, "sum", 1.0, unary[0], unary[1], "",
        )  # fmt: skip
    return torch.ops.onednn.qconv2d_pointwise(
        q, x_scale, x_zero_point, packed, weight_scale, zero_points, bias, *geometry, groups,
        out_scale, out_zero_point, out_dtype, unary[0], unary[1], "",
    )  # fmt: skip


def quantize_uint8_channels_last(x: torch.Tensor, inv_scale: float, zero_point: int, top: int = 255) -> torch.Tensor:
    """``clamp(round(x * inv_scale) + zero_point, 0, top)`` as uint8 in channels-last (oneDNN's fast layout).

    Rounds half up (``+ 0.5`` then truncation: one pass fewer than ``round``), so exact ties may differ by
    one step from ``quantize_static_input``.

    Example:
        >>> quantize_uint8_channels_last(torch.tensor([[[[0.0, 1.0, 30.0, -9.0]]]]), 10.0, 3).flatten().tolist()
        [3, 13, 255, 0]
    """
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    return torch.mul(x, inv_scale).add_(zero_point + 0.5).clamp_(0.0, float(top)).to(torch.uint8)


def use_onednn(x: torch.Tensor) -> bool:
    """Whether ``onednn_linear``/``onednn_linear_dynamic`` can serve this 2-D input: CPU, op available.

    Which of oneDNN and ``_int_mm`` serves a call is chosen by measurement (``kernels.choice``); with
    the choice fixed, batch 1 takes ``_int_mm`` (oneDNN's per-call setup dominates: ~1.5x slower at
    batch 1 on a 1024x4096 layer here) and larger batches oneDNN (``benchmarks/linear_kernels.py``).
    Inside ``torch.compile`` and ``torch.jit.trace`` the ``_int_mm`` path is used instead (the tracer
    cannot record oneDNN's op: "unsupported input list type").

    Example:
        >>> use_onednn(torch.zeros(4, 8)) == _HAS_ONEDNN
        True
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing():  # inductor wants the packed weight as a constant
        return False
    return _HAS_ONEDNN and x.device.type == "cpu" and x.shape[-1] > 1


def onednn_default(rows: int, weight_numel: int) -> bool:
    """The fixed rule (no measurement) between oneDNN and ``_int_mm`` for a linear call.

    ``_int_mm`` for one row; from 2 rows oneDNN for weights of ``_ONEDNN_LARGE_WEIGHT`` elements or more
    (MLP 1024-4096 layers: 1.3x faster at 8 rows) but ``_int_mm`` up to 64 rows for smaller ones
    (MiniLM's 384 x 384 .. 384 x 1536 layers: oneDNN's per-call cost loses 1.1-1.4x there), oneDNN above
    (``benchmarks/linear_kernels.py``, 1 thread on this project's AVX-512 VNNI CPU).

    Example:
        >>> onednn_default(1, 4096 * 1024), onednn_default(8, 4096 * 1024), onednn_default(8, 384 * 384)
        (False, True, False)
        >>> onednn_default(65, 384 * 384)
        True
    """
    if rows < _ONEDNN_MIN_ROWS:
        return False
    return weight_numel >= _ONEDNN_LARGE_WEIGHT or rows >= _ONEDNN_SMALL_WEIGHT_MIN_ROWS


def onednn_linear(
    q: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    weight: OneDNNWeight,
    int8_weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``((q - x_zero_point) * x_scale) @ (int8_weight * weight_scale[:, None]).T + bias`` in one oneDNN call.

    ``q`` is uint8 ``[M, K]``; ``x_scale`` a float scalar tensor, ``x_zero_point`` an int32 scalar tensor.

    Example:
        >>> w = torch.ones(16, 32, dtype=torch.int8)
        >>> q = torch.full((2, 32), 130, dtype=torch.uint8)
        >>> out = onednn_linear(q, torch.tensor(0.5), torch.tensor(128, dtype=torch.int32), OneDNNWeight(), w,
        ...                     torch.ones(16), None)
        >>> out[0, 0].item()
        32.0
    """
    packed, zero_points = weight.get(int8_weight)
    return torch.ops.onednn.qlinear_pointwise.tensor(
        q, x_scale, x_zero_point, packed, weight_scale, zero_points, bias, 1.0, 0, torch.float32, "none", [], ""
    )


def onednn_linear_dynamic(
    q: torch.Tensor,
    row_max: torch.Tensor,
    weight: OneDNNWeight,
    int8_weight: torch.Tensor,
    weight_scale_step: torch.Tensor,
    bias: torch.Tensor | None,
    zero: int = 128,
) -> torch.Tensor:
    """Dynamic (per-row scale) linear on oneDNN: ``((q - zero) * row_max) @ (int8_weight * weight_scale_step).T + b``.

    ``q`` is uint8 ``[M, K]`` from ``quantize_per_row`` (codes around ``zero``). oneDNN takes one activation
    scale per call, so it runs with scale 1 and zero point ``zero`` (the offset's correction and the weight
    scales happen inside the kernel, float32 out) and the row scales follow in one fused op.

    Example:
        >>> w = torch.ones(16, 32, dtype=torch.int8)
        >>> q = torch.full((2, 32), 130, dtype=torch.uint8)
        >>> out = onednn_linear_dynamic(q, torch.tensor([[1.0], [0.5]]), OneDNNWeight(), w, torch.ones(16), None)
        >>> out[:, 0].tolist()
        [64.0, 32.0]
    """
    packed, zero_points = weight.get(int8_weight)
    out = torch.ops.onednn.qlinear_pointwise(
        q, 1.0, zero, packed, weight_scale_step, zero_points, None, 1.0, 0, torch.float32, "none", [], ""
    )
    if bias is None:
        return out.mul_(row_max)
    in_place = writable_in_place(row_max, bias)  # in place: no freshly faulted pages
    return torch.addcmul(bias, out, row_max, out=out) if in_place else torch.addcmul(bias, out, row_max)
