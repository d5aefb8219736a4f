"""int8 activation quantization and integer matmuls: ``torch._int_mm`` (u8/s8 x s8 -> s32), the packed
int8 weight-only kernel, and the small pieces around them (row sums, fused rescale, aligned weights).

Measured on this project's CPU (2 threads, 1024x4096 layer): ``_int_mm`` with the int8 weight kept
``[out, in]`` and passed transposed is ~3x faster at batch 1 than with a contiguous ``[in, out]``
copy; the weight-only kernel is only fast with bfloat16 activations (float32 inputs are 10-60x slower),
so it runs in bfloat16 and casts back.
"""

from __future__ import annotations

import torch

from mono_quant.kernels.numerics import Int8Input

_CUDA_INT_MM_MIN_ROWS = 17  # torch._int_mm on CUDA requires M > 16
_INT8_PACK_K_MULTIPLE = 16  # _weight_int8pack_mm segfaults on CPU otherwise (torch 2.13)
_HALF_DTYPES = (torch.bfloat16, torch.float16)
_ROUNDING_MAGIC = 12582912.0  # 1.5 * 2**23
_SPLIT_MAX_MIN_NUMEL = 65536  # from here amax + amin beats abs + amax (one write fewer, two ops more)
_CPU_INT_MM_MIN_K = 2  # torch._int_mm on CPU returns uninitialised memory for an inner dimension of 1 (torch 2.13)


def rounding_offset(columns: int, zero: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``[columns]`` float32 constant ``quantize_per_row`` adds: ``1.5 * 2**23 + zero`` (the code of 0.0).

    Adding ``1.5 * 2**23`` to a float32 of magnitude below ``2**22`` rounds it to the nearest integer
    (half to even: the spacing of float32 there is 1) and leaves that integer in the low mantissa bits,
    so the bits read as int32 and narrowed give the 8-bit value without a float -> int conversion.

    Example:
        >>> rounding_offset(2, zero=128)
        tensor([12583040., 12583040.])
    """
    return torch.full((columns,), _ROUNDING_MAGIC + zero, device=device)


def quantize_per_row(
    x: torch.Tensor, fmt: Int8Input, offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization of each row of a 2-D float tensor into ``fmt``'s codes.

    Returns ``(q, row_max)`` with ``x ~= (q - fmt.zero) * row_max / fmt.half`` (rounded half to even): on
    CPU uint8 codes around 128 (the u8 x s8 form that VNNI CPUs run fastest: 1.3-1.7x at batch 8-64 on this
    project's CPU; the ``zero * colsum(weight)`` it adds is removed with a per-weight constant), or 7-bit
    codes around 64 where the CPU's products would saturate (``numerics``); int8 around 0 elsewhere. No
    clamp is needed since ``|x / row_max| <= 1``. ``offset`` is ``rounding_offset(K, fmt.zero)`` (pass it to
    save building it per call).

    Three passes over ``x``: the row maximum (``abs`` + ``amax`` for small inputs, ``amax`` and ``amin``
    for large ones, which skip writing ``|x|``), one fused multiply-add of the rounding offset, and a
    narrowing of the float's bits read as int32 (2-3x faster than torch's float -> uint8 cast here).

    Example:
        >>> from mono_quant.kernels.numerics import SIGNED
        >>> q, row_max = quantize_per_row(torch.tensor([[0.5, -1.0]]), SIGNED)
        >>> q.tolist(), row_max.item()
        ([[64, -127]], 1.0)
        >>> quantize_per_row(torch.tensor([[0.5, -1.0]]), Int8Input(torch.uint8, 0, 255))[0].tolist()
        [[192, 1]]
        >>> quantize_per_row(torch.tensor([[0.5, -1.0]]), Int8Input(torch.uint8, 0, 127))[0].tolist()  # 7-bit codes
        [[96, 1]]
    """
    if x.numel() >= _SPLIT_MAX_MIN_NUMEL:
        row_max = torch.maximum(x.amax(-1, keepdim=True), x.amin(-1, keepdim=True).neg_()).clamp_min_(1e-12)
    else:
        row_max = x.abs().amax(-1, keepdim=True).clamp_min_(1e-12)
    if torch.jit.is_tracing():  # the tracer mis-records view(dtype): round and cast instead (same values)
        return torch.mul(x, fmt.half / row_max).round_().add_(float(fmt.zero)).to(fmt.dtype), row_max
    inverse = row_max.reciprocal().mul_(float(fmt.half))  # half / row_max goes through Tensor.__rdiv__ in Python
    if offset is None:
        offset = rounding_offset(x.shape[-1], fmt.zero, x.device)
    return torch.addcmul(offset, x, inverse).view(torch.int32).to(fmt.dtype), row_max


def quantize_fixed_scale(
    x: torch.Tensor, inverse: torch.Tensor | float, offset: torch.Tensor, codes: torch.Tensor, scratch: torch.Tensor
) -> torch.Tensor:
    """``quantize_per_row`` with a known scale: ``codes = round(x * inverse) + zero``, written into ``codes``.

    For inputs with a known bound (a recurrent layer's hidden state): ``inverse`` is ``half / bound`` (a
    number or a ``[M, 1]`` tensor) and ``|x| <= bound``, so no clamp is needed. ``offset`` is
    ``rounding_offset(K, zero)``; ``scratch`` a float32 tensor of ``x``'s shape. Two ops, no allocation.

    Example:
        >>> codes, scratch = torch.empty(1, 2, dtype=torch.uint8), torch.empty(1, 2)
        >>> quantize_fixed_scale(torch.tensor([[0.5, -1.0]]), 127.0, rounding_offset(2, 128), codes, scratch)
        tensor([[192,   1]], dtype=torch.uint8)
    """
    if isinstance(inverse, torch.Tensor):
        torch.addcmul(offset, x, inverse, out=scratch)
    else:
        torch.add(offset, x, alpha=inverse, out=scratch)
    return codes.copy_(scratch.view(torch.int32))


def dynamic_rescale(
    acc: torch.Tensor,
    offset: torch.Tensor | None,
    row_max: torch.Tensor,
    weight_scale_step: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(acc - offset) * weight_scale_step * row_max + bias``: a dynamic ``_int_mm``'s epilogue, float32 out.

    ``acc`` int32 ``[M, N]`` (overwritten); ``offset`` int32 ``[N]`` is ``zero * rowsum(weight)`` for uint8
    activations (``None`` for int8 ones); ``row_max`` ``[M, 1]``; ``weight_scale_step`` ``[N]`` is the weight
    scale divided by the activation format's ``half``. The exact
    integer subtraction first, then the two scales in the order oneDNN applies them: the result is
    bit-identical to ``onednn_linear_dynamic``, so the kernel choice never changes an output. Every step
    writes into ``acc``'s own memory (read as float32 after the subtraction; each element is read before
    it is written): a fresh multi-MB output costs more in page faults than the arithmetic (4x at 480 x 1536).

    Example:
        >>> acc = torch.tensor([[130, 132]], dtype=torch.int32)
        >>> dynamic_rescale(acc, torch.tensor([128, 128], dtype=torch.int32), torch.tensor([[2.0]]),
        ...                 torch.tensor([1.0, 0.5]), torch.ones(2))
        tensor([[5., 5.]])
    """
    in_place = writable_in_place(row_max, bias)
    if offset is not None:
        acc = acc.sub_(offset) if in_place else acc - offset
    if not in_place:  # plain ops: fresh outputs
        out = torch.mul(acc, weight_scale_step)
        return out * row_max if bias is None else torch.addcmul(bias, out, row_max)
    out = torch.mul(acc, weight_scale_step, out=acc.view(torch.float32))
    return out.mul_(row_max) if bias is None else torch.addcmul(bias, out, row_max, out=out)


def static_rescale(
    acc: torch.Tensor,
    offset: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``(acc - offset) * x_scale * weight_scale + bias``: a static ``_int_mm``'s epilogue, float32 out.

    ``acc`` int32 ``[M, N]`` (overwritten), ``offset`` int32 ``[N]`` (``zero_point * rowsum(weight)``),
    ``x_scale`` a scalar tensor, ``weight_scale`` ``[N]``. The exact integer correction first, then the
    scales and the bias one at a time in oneDNN's order: bit-identical to ``onednn_linear``, so the kernel
    choice never changes an output (a fused multiply-add here would differ in the last bit).

    Example:
        >>> acc = torch.tensor([[14, 16]], dtype=torch.int32)
        >>> static_rescale(acc, torch.tensor([10, 12], dtype=torch.int32), torch.tensor(0.5), torch.ones(2), None)
        tensor([[2., 2.]])
    """
    if not writable_in_place(x_scale, weight_scale, bias):  # plain ops: fresh outputs
        out = (acc - offset) * x_scale * weight_scale
        return out if bias is None else out + bias
    acc.sub_(offset)
    out = torch.mul(acc, x_scale, out=acc.view(torch.float32)).mul_(weight_scale)
    return out if bias is None else out.add_(bias)


def writable_in_place(*tensors: torch.Tensor | None) -> bool:
    """Whether an epilogue may write into its matmul's output with ``out=``: not while tracing (the tracer
    mis-records ``view(dtype)``) and not when autograd tracks one of ``tensors`` (it refuses ``out=``).

    Example:
        >>> writable_in_place(torch.ones(2), None), writable_in_place(torch.ones(2, requires_grad=True))
        (True, False)
    """
    if torch.jit.is_tracing():
        return False
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def quantize_static_input(
    x: torch.Tensor, inv_scale: torch.Tensor | float, zero_point: torch.Tensor | int, fmt: Int8Input
) -> torch.Tensor:
    """Static quantization with a scale (given as its inverse) and zero point in ``fmt``'s codes.

    Example:
        >>> from mono_quant.kernels.numerics import SIGNED
        >>> quantize_static_input(torch.tensor([0.0, 1.0, 20.0]), torch.tensor(10.0), torch.tensor(-5.0), SIGNED)
        tensor([ -5,   5, 127], dtype=torch.int8)
    """
    return torch.round(x * inv_scale).add_(zero_point).clamp_(fmt.low, fmt.high).to(fmt.dtype)


def dynamic_uint8_params(x: torch.Tensor, top: int = 255) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scale, zero_point, 1 / scale)`` mapping ``x``'s range (widened to include 0) onto uint8 [0, top].

    Example:
        >>> [round(v.item(), 4) for v in dynamic_uint8_params(torch.tensor([0.0, 2.55]))]
        [0.01, 0.0, 100.0]
    """
    low, high = torch.aminmax(x)
    low, high = low.clamp(max=0), high.clamp(min=0)
    scale = ((high - low) / top).clamp_min(1e-12)
    zero_point = torch.round(-low / scale).clamp(0, top) + 0.0  # + 0.0: no -0.0
    return scale, zero_point, 1.0 / scale


def dynamic_uint8_qparams(x: torch.Tensor, top: int = 255) -> tuple[float, int]:
    """``dynamic_uint8_params`` as Python numbers ``(scale, zero_point)`` (one sync; oneDNN takes scalars).

    Example:
        >>> scale, zero_point = dynamic_uint8_qparams(torch.tensor([-1.0, 1.55]))
        >>> round(scale, 6), zero_point
        (0.01, 100)
    """
    low, high = (v.item() for v in torch.aminmax(x))
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / top, 1e-12)
    return scale, int(min(max(round(-low / scale), 0), top))


def int_mm(
    a: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, weight_t: torch.Tensor | None = None
) -> torch.Tensor:
    """``a @ weight.T`` for int8 ``a [M, K]`` (or uint8 on CPU) and int8 ``weight [N, K]``, accumulated in int32.

    CUDA needs ``M > 16`` and ``K, N`` multiples of 8: small ``M`` is zero-padded; other shapes
    (devices without the op, and ``K = 1`` on CPU, where ``torch._int_mm`` returns uninitialised memory)
    fall back to a float matmul of the integer values, which is exact while ``K * 255 * 128 < 2**24``
    and within float32 rounding beyond. ``out`` (int32 ``[M, N]``) receives the result on CPU without a
    fresh allocation (a recurrent step's 128 KB output at batch 32 is an mmap and page faults otherwise);
    ``weight_t`` is ``weight.t()``, made once by a caller that multiplies in a loop (1.5 us per call at batch 1).

    Example:
        >>> a = torch.tensor([[1, 2]], dtype=torch.int8); w = torch.tensor([[3, 4], [-1, 0]], dtype=torch.int8)
        >>> int_mm(a, w)
        tensor([[11, -1]], dtype=torch.int32)
        >>> int_mm(a, w, out=torch.empty(1, 2, dtype=torch.int32))
        tensor([[11, -1]], dtype=torch.int32)
    """
    rows = a.shape[0]
    if a.device.type == "cpu" and a.shape[1] >= _CPU_INT_MM_MIN_K:
        weight_t = weight.t() if weight_t is None else weight_t
        return torch._int_mm(a, weight_t, out=out) if out is not None else torch._int_mm(a, weight_t)
    if out is not None:
        return out.copy_(int_mm(a, weight))
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


def aligned(t: torch.Tensor, alignment: int = 64) -> torch.Tensor:
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
    return aligned(weight)


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
