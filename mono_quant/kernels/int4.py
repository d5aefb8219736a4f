"""Group-wise int4 weight-only matmuls: ``_weight_int4pack_mm_for_cpu`` / ``_weight_int4pack_mm`` and packing."""

from __future__ import annotations

import torch

_INT4_INNER_K_TILES = 8
_INT4_ROW_MULTIPLE = 16


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
    x: torch.Tensor,
    packed: torch.Tensor,
    group_size: int,
    scales_and_zeros: torch.Tensor,
    out_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias)`` for an int4 group-wise weight packed by ``pack_int4``; output in x's dtype.

    The kernel runs on bfloat16 activations (float32 ones are 10-100x slower on CPU); the cast back and
    the bias are one op when the bias has x's dtype (small layers are dominated by per-op cost).

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
    if out.shape[1] != out_features:
        out = out[:, :out_features]
    if bias is not None and bias.dtype == x.dtype:
        return torch.add(out, bias)  # bfloat16 + float32 [N] -> float32 in one pass
    out = out.to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)
