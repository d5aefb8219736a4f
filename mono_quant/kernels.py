"""The only place that calls private torch ops (``_int_mm``, int4/int8 packed matmuls).

Every function here has a plain-torch fallback for shapes or devices the private op does not cover,
so the rest of the library never needs to know which kernel ran.

Measured on this project's CPU (2 threads, 1024x4096 layer): ``_int_mm`` with the int8 weight kept
``[out, in]`` and passed transposed is ~3x faster at batch 1 than with a contiguous ``[in, out]``
copy; the int4/int8 weight-only kernels are only fast with bfloat16 activations (float32 inputs are
10-60x slower), so they run in bfloat16 and cast back.
"""

from __future__ import annotations

import torch

_CUDA_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA requires M > 16
_INT4_INNER_K_TILES = 8
_ONEDNN_MIN_ROWS = 2
_HAS_ONEDNN = hasattr(torch.ops.onednn, "qlinear_pointwise") and torch.backends.mkldnn.is_available()
_HAS_ONEDNN_CONV = hasattr(torch.ops.onednn, "qconv2d_pointwise") and torch.backends.mkldnn.is_available()
_INT4_ROW_MULTIPLE = 16
_INT8_PACK_K_MULTIPLE = 16  # _weight_int8pack_mm segfaults on CPU otherwise (torch 2.13)
_HALF_DTYPES = (torch.bfloat16, torch.float16)


def quantize_per_row(x: torch.Tensor, unsigned: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric 8-bit quantization of each row of a 2-D float tensor.

    Returns ``(q, row_max)`` with ``x ~= q * row_max / 127``: ``q`` int8 ``[M, K]``, or with ``unsigned``
    uint8 holding ``q + 128`` (the u8 x s8 form that VNNI CPUs run fastest: 1.3-1.7x at batch 8-64 on
    this project's CPU; the ``128 * colsum(weight)`` it adds is removed with a per-weight constant).
    No clamp to the 8-bit range is needed since ``|x / row_max| <= 1``.

    Example:
        >>> q, row_max = quantize_per_row(torch.tensor([[0.5, -1.0]]))
        >>> q.tolist(), row_max.item(), quantize_per_row(torch.tensor([[0.5, -1.0]]), unsigned=True)[0].tolist()
        ([[64, -127]], 1.0, [[192, 1]])
    """
    row_max = x.abs().amax(-1, keepdim=True).clamp_min_(1e-12)  # ~9x faster than vector_norm(inf) on big M
    q = torch.mul(x, 127.0 / row_max).round_()
    if unsigned:
        return q.add_(128).to(torch.uint8), row_max
    return q.to(torch.int8), row_max


def quantize_static_input(
    x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor, unsigned: bool = False
) -> torch.Tensor:
    """Static quantization with a calibrated scale (given as its inverse) and zero point.

    int8 in [-128, 127]; with ``unsigned`` uint8 in [0, 255] (pass the zero point shifted by 128).

    Example:
        >>> quantize_static_input(torch.tensor([0.0, 1.0, 20.0]), torch.tensor(10.0), torch.tensor(-5.0))
        tensor([ -5,   5, 127], dtype=torch.int8)
    """
    low, high, dtype = (0, 255, torch.uint8) if unsigned else (-128, 127, torch.int8)
    return torch.round(x * inv_scale).add_(zero_point).clamp_(low, high).to(dtype)


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed weight and its (zero) zero points; ``weight`` is the flat int8 ``[out, in*kh*kw]``."""
        if self.packed is None:
            out_channels = weight.shape[0]
            weight4 = _aligned(weight).reshape(out_channels, -1, *kernel_size)
            self.packed = torch.ops.onednn.qconv_prepack(
                weight4, weight_scale, float(x_scale), int(x_zero_point), *geometry, groups, None
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
    relu: bool = False,
    accum: torch.Tensor | None = None,
    out_qparams: tuple[float, int] | None = None,
) -> torch.Tensor:
    """One oneDNN convolution with its epilogue fused: ``relu?(conv(q) + bias (+ accum))``.

    ``q`` is uint8 (channels-last) with ``x_qparams = (scale, zero_point)``; ``packed``/``zero_points``
    come from ``OneDNNConvWeight.get_conv``. With ``accum`` (float32, the output's shape) the residual
    add is oneDNN's "sum" post-op and ``relu`` applies after it; the output is then float32. Without
    ``accum``, ``out_qparams = (scale, zero_point)`` gives a uint8 output requantized inside the kernel
    (the next quantized convolution's input), else float32.

    Example:
        >>> w, cache = torch.ones(4, 2 * 3 * 3, dtype=torch.int8), OneDNNConvWeight()
        >>> geo = ([1, 1], [0, 0], [1, 1])
        >>> packed, zps = cache.get_conv(w, (3, 3), torch.ones(4), torch.tensor(0.5), torch.tensor(128), geo)
        >>> q = torch.full((1, 2, 5, 5), 130, dtype=torch.uint8)
        >>> out = onednn_conv2d_fused(q, (0.5, 128), packed, torch.ones(4), zps, None, geo, 1, relu=True,
        ...                           out_qparams=(0.5, 0))
        >>> out.dtype, out[0, 0, 0, 0].item()
        (torch.uint8, 36)
    """
    x_scale, x_zero_point = x_qparams
    unary = "relu" if relu else "none"
    if accum is not None:
        return torch.ops.onednn.qconv2d_pointwise.binary(
            q, x_scale, x_zero_point, packed, weight_scale, zero_points, accum, bias, *geometry, groups,
            1.0, 0, torch.float32, 1.0, 0, "sum", 1.0, unary, [], "",
        )  # fmt: skip
    out_scale, out_zero_point = out_qparams or (1.0, 0)
    return torch.ops.onednn.qconv2d_pointwise(
        q, x_scale, x_zero_point, packed, weight_scale, zero_points, bias, *geometry, groups,
        out_scale, out_zero_point, None if out_qparams else torch.float32, unary, [], "",
    )  # fmt: skip


def quantize_uint8_channels_last(x: torch.Tensor, inv_scale: float, zero_point: int) -> torch.Tensor:
    """``clamp(round(x * inv_scale) + zero_point, 0, 255)`` as uint8 in channels-last (oneDNN's fast layout).

    Rounds half up (``+ 0.5`` then truncation: one pass fewer than ``round``), so exact ties may differ by
    one step from ``quantize_static_input``.

    Example:
        >>> quantize_uint8_channels_last(torch.tensor([[[[0.0, 1.0, 30.0, -9.0]]]]), 10.0, 3).flatten().tolist()
        [3, 13, 255, 0]
    """
    x = x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    return torch.mul(x, inv_scale).add_(zero_point + 0.5).clamp_(0.0, 255.0).to(torch.uint8)


def dynamic_uint8_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, zero_point, 1 / scale)`` mapping ``x``'s range (widened to include 0) onto uint8 [0, 255].

    Example:
        >>> [round(v.item(), 4) for v in dynamic_uint8_params(torch.tensor([0.0, 2.55]))]
        [0.01, 0.0, 100.0]
    """
    low, high = torch.aminmax(x)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / 255).clamp_min(1e-12)
    zero_point = torch.round(-low / scale).clamp(0, 255) + 0.0  # + 0.0: no -0.0
    return scale, zero_point, 1.0 / scale


def dynamic_uint8_qparams(x: torch.Tensor) -> tuple[float, int]:
    """``dynamic_uint8_params`` as Python numbers ``(scale, zero_point)`` (one sync; oneDNN takes scalars).

    Example:
        >>> scale, zero_point = dynamic_uint8_qparams(torch.tensor([-1.0, 1.55]))
        >>> round(scale, 6), zero_point
        (0.01, 100)
    """
    low, high = (v.item() for v in torch.aminmax(x))
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255, 1e-12)
    return scale, int(min(max(round(-low / scale), 0), 255))


def use_onednn(x: torch.Tensor) -> bool:
    """Whether ``onednn_linear`` serves this 2-D input: CPU, more than one row, op available.

    Measured here (1024x4096 layer, 2 threads): at batch 1 ``_int_mm`` with per-row scales is
    ~1.5x faster than oneDNN (whose per-call setup dominates); from batch 8 oneDNN's u8 x s8
    kernel with its fused rescale is 1.2-2x faster than ``_int_mm``. Inside ``torch.compile`` the
    ``_int_mm`` path is used instead.

    Example:
        >>> use_onednn(torch.zeros(1, 8)), use_onednn(torch.zeros(4, 8)) == _HAS_ONEDNN
        (False, True)
    """
    if torch.compiler.is_compiling():  # inductor's lowering of this op wants the packed weight as a constant
        return False
    return _HAS_ONEDNN and x.device.type == "cpu" and x.shape[0] >= _ONEDNN_MIN_ROWS


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


def int_mm(a: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``a @ weight.T`` for int8 ``a [M, K]`` (or uint8 on CPU) and int8 ``weight [N, K]``, accumulated in int32.

    CUDA needs ``M > 16`` and ``K, N`` multiples of 8: small ``M`` is zero-padded; other shapes
    (and devices without the op) fall back to a float matmul of the integer values, which is exact
    while ``K * 127 * 128 < 2**24`` and within float32 rounding beyond.

    Example:
        >>> a = torch.tensor([[1, 2]], dtype=torch.int8); w = torch.tensor([[3, 4], [-1, 0]], dtype=torch.int8)
        >>> int_mm(a, w)
        tensor([[11, -1]], dtype=torch.int32)
    """
    rows = a.shape[0]
    if a.device.type == "cpu":
        return torch._int_mm(a, weight.t())
    if a.device.type == "cuda" and a.shape[1] % 8 == 0 and weight.shape[0] % 8 == 0:
        if rows < _CUDA_INT_MM_MIN_ROWS:
            padded = a.new_zeros((32, a.shape[1]))
            padded[:rows] = a
            return torch._int_mm(padded, weight.t())[:rows]
        return torch._int_mm(a, weight.t())
    return torch.round(a.float() @ weight.float().t()).to(torch.int32)


def row_sums(weight: torch.Tensor) -> torch.Tensor:
    """Exact int32 sums of each row of an int8 ``[N, K]`` weight, as one integer GEMV with a ones vector
    (torch's int8 ``sum`` is ~5-10x slower: 23 ms for a 4096x4096 weight here).

    Example:
        >>> row_sums(torch.tensor([[1, -2, 3], [127, 127, -1]], dtype=torch.int8))
        tensor([  2, 253], dtype=torch.int32)
    """
    ones = torch.ones((1, weight.shape[1]), dtype=torch.int8, device=weight.device)
    return int_mm(ones, weight)[0]


def rescale(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``acc * scale + bias`` in one fused op (``scale`` broadcasts to ``acc``), float32 out.

    Example:
        >>> rescale(torch.tensor([[2, 4]], dtype=torch.int32), torch.tensor([0.5, 0.25]), torch.ones(2))
        tensor([[2., 2.]])
    """
    if bias is None:
        return acc * scale
    return torch.addcmul(bias, acc, scale)


def _aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """A contiguous tensor whose storage starts on an ``alignment``-byte boundary.

    safetensors hands out tensors that may be only 8-byte aligned; ``_weight_int8pack_mm`` crashes
    on those for batch > 1, so weights are realigned once (never per call).
    """
    t = t.contiguous()
    return t if t.data_ptr() % alignment == 0 else t.clone()


def prepare_int8_weight_only(weight: torch.Tensor) -> torch.Tensor:
    """The int8 ``[N, K]`` weight as the weight-only kernel needs it (contiguous, aligned).

    Example:
        >>> prepare_int8_weight_only(torch.zeros(4, 8, dtype=torch.int8)).is_contiguous()
        True
    """
    return _aligned(weight)


def int8_weight_only_mm(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (weight * scale[:, None]).T`` without materializing the float weight; output in x's dtype.

    ``weight`` must come from ``prepare_int8_weight_only``. Runs in bfloat16 on CPU (the fast path).

    Example:
        >>> w = prepare_int8_weight_only(torch.ones(8, 16, dtype=torch.int8))
        >>> int8_weight_only_mm(torch.ones(2, 16), w, torch.full((8,), 0.5))[0, 0]
        tensor(8.)
    """
    compute = torch.bfloat16 if x.device.type == "cpu" or x.dtype not in _HALF_DTYPES else x.dtype
    x16, scale16 = x.to(compute), scale.to(compute)
    if weight.shape[1] % _INT8_PACK_K_MULTIPLE == 0:
        try:
            return torch._weight_int8pack_mm(x16, weight, scale16).to(x.dtype)
        except (RuntimeError, NotImplementedError):  # a device/dtype without the kernel
            pass
    # the CPU kernel crashes for K not a multiple of 16: cast the weight (small layers, missing kernels only)
    return ((x16 @ weight.to(compute).t()) * scale16).to(x.dtype)


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    extra = -t.shape[0] % multiple
    return t if not extra else torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit values ``[N, K]`` (0..15, any int dtype) for ``int4_mm`` on their device.

    The kernels need ``N`` to be a multiple of 16: rows are zero-padded here and the padded outputs
    are sliced off in ``int4_mm``.

    Example:
        >>> pack_int4(torch.zeros(8, 64, dtype=torch.int32)).dtype
        torch.uint8
    """
    values = _pad_rows(values.to(torch.int32), _INT4_ROW_MULTIPLE)
    if values.device.type == "cpu":
        return torch._convert_weight_to_int4pack_for_cpu(values.contiguous(), _INT4_INNER_K_TILES)
    nibbles = values.to(torch.uint8)
    byte_packed = (nibbles[:, ::2] << 4 | nibbles[:, 1::2]).contiguous()
    return torch._convert_weight_to_int4pack(byte_packed, _INT4_INNER_K_TILES)


def int4_scales_and_zeros(scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """The ``[K/group, N, 2]`` bfloat16 (scale, offset) table the int4 kernels take.

    Our convention ``w = (q - zp) * s`` with ``q`` in [-8, 7] is the kernels' ``(u - 8) * s + z``
    with ``u = q + 8`` and ``z = -zp * s``.

    Example:
        >>> int4_scales_and_zeros(torch.ones(16, 2), None).shape
        torch.Size([2, 16, 2])
    """
    zeros = torch.zeros_like(scale) if zero_point is None else -zero_point.float() * scale
    table = _pad_rows(torch.stack([scale, zeros], dim=-1), _INT4_ROW_MULTIPLE)
    return table.transpose(0, 1).to(torch.bfloat16).contiguous()


def int4_mm(
    x: torch.Tensor, packed: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor, out_features: int
) -> torch.Tensor:
    """``x [M, K] @ W.T`` for an int4 group-wise weight packed by ``pack_int4``; output in x's dtype.

    Example:
        >>> q = torch.full((8, 128), 9)  # u = 9 -> q = 1
        >>> sz = int4_scales_and_zeros(torch.full((8, 1), 0.5), None)
        >>> int4_mm(torch.ones(1, 128), pack_int4(q), 128, sz, 8)[0, 0]
        tensor(64.)
    """
    x16 = x.to(torch.bfloat16)
    if x.device.type == "cpu":
        out = torch._weight_int4pack_mm_for_cpu(x16, packed, group_size, scales_and_zeros)
    else:
        out = torch._weight_int4pack_mm(x16, packed, group_size, scales_and_zeros)
    return out[:, :out_features].to(x.dtype)
