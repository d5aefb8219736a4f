"""``QuantizedLSTM`` and ``QuantizedGRU``: stacked, bidirectional, ``batch_first`` and (LSTM) ``proj_size``.

Per layer and direction the input projection of every time step runs as one GEMM over ``[T * batch,
input]`` with its epilogue (scales, both biases) in the accumulator's memory; the recurrent ``[batch,
hidden]`` GEMM runs per step. In ``dynamic`` mode the step loop is ``recurrent_steps``: the hidden state
is bounded, so it is quantized with a scale fixed per sequence and one ``addcmul`` per step applies the
scales, the offset correction, the biases and the input gates. ``weight_only`` mode, ``proj_size`` (its
hidden state is not bounded) and calls that autograd records run the per-row dynamic step (``project``).
Packed sequences are refused with a ``TypeError`` that says how to pass them instead.

Measured (``benchmarks/recurrent.py``, 40 -> 256, 2 layers, sequence 100, this project's AMX/VNNI CPU,
ratio to float ``nn.LSTM``/``nn.GRU``, dynamic mode before -> after the fixed-scale loop, 2 threads): LSTM
batch 1 6.8x -> 2.2x, batch 32 3.5x -> 0.98x; GRU batch 1 3.7x -> 1.0x, batch 32 2.2x -> 0.83x (1 thread:
LSTM 1.3x / 0.93x, GRU 0.76x / 0.70x). Batch 1 LSTM stays above float: float runs the whole step in one
oneDNN call (~11-15 us), ours is 11 eager ops (``_int_mm`` ~4.7 us, each pointwise op ~0.7-1.3 us, plus
Python per op; ``torch.profiler``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from mono_quant import kernels
from mono_quant.config import Mode
from mono_quant.modules.recurrent_core import QuantizedRecurrent
from mono_quant.modules.recurrent_steps import gru_loop, lstm_loop, lstm_terms
from mono_quant.modules.registry import register

_RNN_HYPER = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


class _QuantizedStack(QuantizedRecurrent):
    """The layer/direction loop shared by LSTM and GRU; subclasses run one direction (``_direction``)."""

    def _run(self, input: Any, states: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the output sequence and the final states, each ``[layers * directions, batch, size]``."""
        if isinstance(input, PackedSequence):
            raise TypeError(
                f"{type(self).__name__} does not take a PackedSequence; pass the padded tensor "
                "(torch.nn.utils.rnn.pad_packed_sequence) or keep this layer float with exclude="
            )
        batched = input.dim() == 3
        x = input if batched else input.unsqueeze(1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        x = x.float()
        directions = 2 if self.bidirectional else 1
        finals: list[list[torch.Tensor]] = [[] for _ in states]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                start = [state[index] if batched else state[index].unsqueeze(0) for state in states]
                out, last = self._direction(x, suffix, start, reverse=bool(direction))
                outputs.append(out)
                for final, value in zip(finals, last, strict=True):
                    final.append(value)
            x = outputs[0] if directions == 1 else torch.cat(outputs, -1)
        if self.batch_first and batched:
            x = x.transpose(0, 1)
        stacked = [torch.stack(final) for final in finals]
        if not batched:
            x, stacked = x.squeeze(1), [state.squeeze(1) for state in stacked]
        return x.to(input.dtype), [state.to(input.dtype) for state in stacked]

    def _zeros(self, input: torch.Tensor, size: int) -> torch.Tensor:
        batched = input.dim() == 3
        batch = (input.shape[0] if self.batch_first else input.shape[1]) if batched else 1
        directions = 2 if self.bidirectional else 1
        shape = (self.num_layers * directions, batch, size) if batched else (self.num_layers * directions, size)
        return torch.zeros(shape, dtype=torch.float32, device=input.device)

    def _input_gates(
        self, x: torch.Tensor, suffix: str, bias: torch.Tensor | None, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The input projection of all ``T`` steps at once, ``[T, batch, gates * hidden]``: ``(x @ W.T) * columns
        + bias`` (``recurrent_core.project``)."""
        steps, batch, size = x.shape
        return self.project(x.reshape(steps * batch, size), "weight_ih" + suffix, bias, columns).view(steps, batch, -1)

    def _fixed_scale_loop(self, recurrent: str, tensors: list[torch.Tensor]) -> bool:
        """Whether ``recurrent_steps`` runs this direction: dynamic mode, an int8 recurrent matrix, and in-place
        writes allowed (not while tracing, nor while autograd records ``tensors``)."""
        int8 = getattr(self, recurrent).dtype == torch.int8
        return self.mode is Mode.DYNAMIC and int8 and kernels.writable_in_place(*tensors)


@register(nn.LSTM)
class QuantizedLSTM(_QuantizedStack):
    """Drop-in ``nn.LSTM`` with int8 matrices (``recurrent_core.choose_precisions``).

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True, proj_size=4)
        >>> q = QuantizedLSTM.from_float(lstm, QuantizationConfig())
        >>> out, (h, c) = q(torch.randn(3, 5, 8))
        >>> out.shape, h.shape, c.shape
        (torch.Size([3, 5, 8]), torch.Size([4, 3, 4]), torch.Size([4, 3, 16]))
    """

    hyper_names = (*_RNN_HYPER, "proj_size")

    def forward(
        self, input: Any, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if hx is None and not isinstance(input, PackedSequence):
            hx = (self._zeros(input, self.proj_size or self.hidden_size), self._zeros(input, self.hidden_size))
        output, (h, c) = self._run(input, [hx[0].float(), hx[1].float()] if hx is not None else [])
        return output, (h, c)

    def _direction(
        self, x: torch.Tensor, suffix: str, start: list[torch.Tensor], reverse: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, c = start
        hidden, recurrent, projection = self.hidden_size, "weight_hh" + suffix, "weight_hr" + suffix
        biases = self.bias_of("weight_ih" + suffix) + self.bias_of(recurrent) if self.bias else None
        if not self.proj_size and self._fixed_scale_loop(recurrent, [x, h, c]):  # |h| < 1 after the first step
            weight, weight_step, offset = self.int8_terms(recurrent)
            columns, step, folded_bias = lstm_terms(weight_step, offset, biases)
            gates_in = self._input_gates(x, suffix, folded_bias, columns)
            first_gates = self.project(h, recurrent, offset * step, columns)  # un-does the folded offset once
            out, c = lstm_loop(gates_in, first_gates, c, weight, step, reverse)
            return out, [out[0] if reverse else out[-1], c]
        gates_in = self._input_gates(x, suffix, biases)  # the recurrent bias added once instead of once per step
        out = x.new_empty(x.shape[0], x.shape[1], h.shape[-1])
        for t in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
            gates = self.project(h, recurrent, gates_in[t])
            act = torch.sigmoid(gates)
            c = act[:, hidden : 2 * hidden] * c + act[:, :hidden] * torch.tanh(gates[:, 2 * hidden : 3 * hidden])
            h = act[:, 3 * hidden :] * torch.tanh(c)
            if self.proj_size:
                h = self.project(h, projection, None)
            out[t] = h
        return out, [h, c]


@register(nn.GRU)
class QuantizedGRU(_QuantizedStack):
    """Drop-in ``nn.GRU`` with int8 matrices (``recurrent_core.choose_precisions``).

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> q = QuantizedGRU.from_float(nn.GRU(8, 16, num_layers=2), QuantizationConfig())
        >>> out, h = q(torch.randn(5, 3, 8))
        >>> out.shape, h.shape
        (torch.Size([5, 3, 16]), torch.Size([2, 3, 16]))
    """

    hyper_names = _RNN_HYPER

    def forward(self, input: Any, hx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if hx is None and not isinstance(input, PackedSequence):
            hx = self._zeros(input, self.hidden_size)
        output, (h,) = self._run(input, [hx.float()] if hx is not None else [])
        return output, h

    def _direction(
        self, x: torch.Tensor, suffix: str, start: list[torch.Tensor], reverse: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        gates_in = self._input_gates(x, suffix, self.bias_of("weight_ih" + suffix))
        (h,) = start
        hidden, recurrent = self.hidden_size, "weight_hh" + suffix
        bias = self.bias_of(recurrent)
        if self._fixed_scale_loop(recurrent, [x, h]):
            out = gru_loop(gates_in, h, *self.int8_terms(recurrent), bias, reverse)
            return out, [out[0] if reverse else out[-1]]
        out = x.new_empty(x.shape[0], x.shape[1], hidden)
        for t in range(x.shape[0] - 1, -1, -1) if reverse else range(x.shape[0]):
            h = gru_step(gates_in[t], self.project(h, recurrent, bias), h, hidden)
            out[t] = h
        return out, [h]


def gru_step(gates_in: torch.Tensor, gates_h: torch.Tensor, h: torch.Tensor, hidden: int) -> torch.Tensor:
    """One GRU update from the input and recurrent projections (biases included), torch's gate order r, z, n.

    Example:
        >>> gru_step(torch.zeros(1, 6), torch.zeros(1, 6), torch.ones(1, 2), 2)
        tensor([[0.5000, 0.5000]])
    """
    rz = torch.sigmoid(gates_in[:, : 2 * hidden] + gates_h[:, : 2 * hidden])
    n = torch.tanh(gates_in[:, 2 * hidden :] + rz[:, :hidden] * gates_h[:, 2 * hidden :])
    return torch.lerp(n, h, rz[:, hidden:])
