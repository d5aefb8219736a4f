"""The time loops of ``QuantizedLSTM``/``QuantizedGRU`` in ``dynamic`` mode: a bounded hidden state, fixed scales.

An LSTM's hidden state ``o * tanh(c)`` lies in (-1, 1) (without ``proj_size``) and a GRU's is a convex
combination of ``tanh(...)`` and the previous state, so ``|h_t| <= max(1, |h_0|)`` row by row. The hidden
state is therefore quantized with a scale fixed for the whole sequence (``bound / half``) instead of one
measured per row and step: no ``abs``/``amax``/``reciprocal`` per step, and the whole epilogue - the
``zero * rowsum(W)`` correction, both scales and every bias - folds into one tensor added per step.
One step is then: quantize ``h`` (2 ops), ``_int_mm`` into a preallocated ``int32`` buffer, one
``addcmul`` of the accumulator, its scales and the input gates, and the cell's in-place pointwise ops
(LSTM 6, GRU 4), ``h`` written straight into the output sequence. The LSTM runs one ``sigmoid`` over all
four gates: the cell gate uses ``tanh(x) = 2 * sigmoid(2x) - 1`` with its pre-activation doubled in the
folded terms.

Why a fixed scale (measured here, output SQNR against float, per-row dynamic -> fixed): LSTM/GRU 28->128
trained on Fashion-MNIST rows (hidden rows reach |h| ~0.9): 45.9 -> 45.1 / 46.5 -> 45.9 dB, under
``ONEDNN_MAX_CPU_ISA=AVX2`` (7-bit codes) 44.3 -> 42.5 / 44.5 -> 43.7 dB; random-weight layers 40->256,
whose hidden rows peak at |h| ~0.08 (LSTM) / ~0.2 (GRU), lose more: LSTM 46.7 -> 37.6, GRU 42.5 -> 40.7 dB.
oneDNN's ``qlinear_pointwise.binary`` (the input gates as a fused "sum" post-op, one call per step) was
measured too and is not used: 33-45 us per call at batch 1 and 45-90 us at batch 32 for the 256 -> 1024
matrix, against 4.5-6.7 us and 25-32 us for ``_int_mm``. The figures per layer are in ``recurrent``.
"""

from __future__ import annotations

import torch

from mono_quant import kernels


def lstm_terms(
    weight_step: torch.Tensor, offset: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(columns, step, folded_bias)`` for ``lstm_loop``: ``columns`` doubles the cell gate's pre-activation
    (``tanh(x) = 2 * sigmoid(2x) - 1``), ``step`` is the recurrent matrix's ``weight_step * columns`` (h's bound
    is 1), ``folded_bias = bias * columns - offset * step`` (``bias``: both biases summed, or ``None``).

    Example:
        >>> columns, step, folded = lstm_terms(torch.ones(4), torch.ones(4, dtype=torch.int32), None)
        >>> columns.tolist(), folded.tolist()
        ([1.0, 1.0, 2.0, 1.0], [-1.0, -1.0, -2.0, -1.0])
    """
    hidden = weight_step.shape[0] // 4
    columns = torch.ones_like(weight_step)
    columns[2 * hidden : 3 * hidden] = 2.0
    step = weight_step * columns
    folded = -(offset * step) if bias is None else torch.addcmul(bias * columns, offset, step, value=-1)
    return columns, step, folded


def lstm_loop(
    gates_in: torch.Tensor,
    first_gates: torch.Tensor,
    c: torch.Tensor,
    weight: torch.Tensor,
    step: torch.Tensor,
    reverse: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs an LSTM direction; returns ``(out [T, batch, hidden], c_last)``. ``h_last`` is ``out``'s last step.

    ``gates_in`` ``[T, batch, 4 * hidden]`` holds the input projections times ``columns`` plus ``folded_bias``
    (``lstm_terms``); ``first_gates`` what the first step adds to them (``h_0`` is not bounded: the caller
    quantizes it per row); ``weight`` the int8 ``[4 * hidden, hidden]`` recurrent matrix and ``step`` from
    ``lstm_terms``.

    Example:
        >>> w = torch.zeros(8, 2, dtype=torch.int8)
        >>> out, c = lstm_loop(torch.zeros(3, 1, 8), torch.zeros(1, 8), torch.zeros(1, 2), w, torch.ones(8), False)
        >>> out[-1], c  # i = f = o = 0.5, g = 0: c stays 0
        (tensor([[0., 0.]]), tensor([[0., 0.]]))
    """
    steps, batch, width = gates_in.shape
    hidden = width // 4
    fmt = kernels.input_format(gates_in.device)
    order = range(steps - 1, -1, -1) if reverse else range(steps)
    gates = gates_in[order[0]] + first_gates
    i, f, g, o = gates.split(hidden, 1)
    c = c.clone()
    out = gates_in.new_empty(steps, batch, hidden)
    codes, scratch = torch.empty(batch, hidden, dtype=fmt.dtype, device=c.device), torch.empty_like(c)
    acc, acc_float = torch.empty(batch, width, dtype=torch.int32, device=c.device), torch.empty_like(gates)
    tanh_c, rounding = torch.empty_like(c), kernels.rounding_offset(hidden, fmt.zero, c.device)
    inputs, outputs, weight_t = gates_in.unbind(0), out.unbind(0), weight.t()
    h = c  # first read at the second step, after the first one wrote it
    for index, t in enumerate(order):
        if index:
            kernels.quantize_fixed_scale(h, float(fmt.half), rounding, codes, scratch)
            acc_float.copy_(kernels.int_mm(codes, weight, acc, weight_t))  # addcmul would cast into a fresh tensor
            torch.addcmul(inputs[t], acc_float, step, out=gates)
        gates.sigmoid_()
        c.mul_(f).addcmul_(i, g, value=2.0).sub_(i)
        h = torch.mul(o, torch.tanh(c, out=tanh_c), out=outputs[t])
    return out, c


def gru_loop(
    gates_in: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    weight_step: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    reverse: bool,
) -> torch.Tensor:
    """Runs a GRU direction; returns ``out [T, batch, hidden]`` (its last step is ``h_last``).

    ``gates_in`` ``[T, batch, 3 * hidden]`` holds the input projections with their bias (overwritten), ``h``
    is ``h_0``; ``weight`` the int8 ``[3 * hidden, hidden]`` recurrent matrix with ``weight_step = scale / half``
    and ``offset = zero * rowsum(weight)``; ``bias`` the recurrent bias (``None`` without biases). Each row's
    scale is ``max(1, max |h_0|) / half``: a large ``h_0`` costs that row precision for the whole sequence.

    Example:
        >>> w = torch.zeros(6, 2, dtype=torch.int8)
        >>> zeros = torch.zeros(6, dtype=torch.int32)
        >>> gru_loop(torch.zeros(2, 1, 6), torch.ones(1, 2), w, torch.ones(6), zeros, None, reverse=False)[-1]
        tensor([[0.2500, 0.2500]])
    """
    steps, batch, width = gates_in.shape
    hidden = width // 3
    fmt = kernels.input_format(gates_in.device)
    bound = h.abs().amax(-1, keepdim=True).clamp_min_(1.0)
    step = bound * weight_step  # [batch, 3 * hidden]
    folded = step * -offset if bias is None else torch.addcmul(bias, step, offset, value=-1)
    gates_in[..., : 2 * hidden] += folded[:, : 2 * hidden]  # r, z: input and recurrent terms summed
    candidate_in = gates_in[..., 2 * hidden :].clone()  # n: the recurrent term is gated by r first
    gates_in[..., 2 * hidden :] = folded[:, 2 * hidden :]
    inverse = float(fmt.half) / bound
    gates_h = torch.empty(batch, width, device=h.device)
    rz, gate_n = gates_h[:, : 2 * hidden], gates_h[:, 2 * hidden :]
    r, z = rz.split(hidden, 1)
    out = gates_in.new_empty(steps, batch, hidden)
    codes, scratch = torch.empty(batch, hidden, dtype=fmt.dtype, device=h.device), torch.empty_like(h)
    acc, acc_float = torch.empty(batch, width, dtype=torch.int32, device=h.device), torch.empty_like(gates_h)
    n = torch.empty_like(h)
    rounding = kernels.rounding_offset(hidden, fmt.zero, h.device)
    inputs, candidates, outputs = gates_in.unbind(0), candidate_in.unbind(0), out.unbind(0)
    weight_t = weight.t()
    for t in range(steps - 1, -1, -1) if reverse else range(steps):
        kernels.quantize_fixed_scale(h, inverse, rounding, codes, scratch)
        acc_float.copy_(kernels.int_mm(codes, weight, acc, weight_t))  # addcmul would cast into a fresh tensor
        torch.addcmul(inputs[t], acc_float, step, out=gates_h)
        rz.sigmoid_()
        torch.addcmul(candidates[t], r, gate_n, out=n).tanh_()
        h = torch.lerp(n, h, z, out=outputs[t])
    return out
