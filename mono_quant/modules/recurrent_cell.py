"""``QuantizedLSTMCell`` and ``QuantizedGRUCell``: one time step, batched ``[batch, input]`` or unbatched ``[input]``.

A cell sees one step per call, so both projections are per-step GEMMs (``recurrent_core``).
"""

from __future__ import annotations

import torch
from torch import nn

from mono_quant.modules.recurrent import gru_step
from mono_quant.modules.recurrent_core import QuantizedRecurrent
from mono_quant.modules.registry import register


class _QuantizedCell(QuantizedRecurrent):
    def _batched(self, input: torch.Tensor, states: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor]:
        x = input.float() if input.dim() == 2 else input.float().unsqueeze(0)
        out = [x]
        for state in states:
            if state is None:
                state = x.new_zeros(x.shape[0], self.hidden_size)
            out.append(state.float() if state.dim() == 2 else state.float().unsqueeze(0))
        return out

    def _input_gates(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(x, "weight_ih", self.bias_of("weight_ih"))


@register(nn.LSTMCell)
class QuantizedLSTMCell(_QuantizedCell):
    """Drop-in ``nn.LSTMCell`` with int8 matrices (``recurrent_core.choose_precisions``).

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> q = QuantizedLSTMCell.from_float(nn.LSTMCell(8, 16), QuantizationConfig())
        >>> h, c = q(torch.randn(3, 8))
        >>> h.shape, c.shape, q.weight_hh.dtype
        (torch.Size([3, 16]), torch.Size([3, 16]), torch.int8)
    """

    def forward(
        self, input: torch.Tensor, hx: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, h, c = self._batched(input, hx if hx is not None else (None, None))
        gates_in = self._input_gates(x)
        if self.bias:
            gates_in = gates_in + self.bias_hh
        gates = self.project(h, "weight_hh", gates_in)  # the input gates ride in as the fused "bias"
        hidden = self.hidden_size
        act = torch.sigmoid(gates)
        c = act[:, hidden : 2 * hidden] * c + act[:, :hidden] * torch.tanh(gates[:, 2 * hidden : 3 * hidden])
        h = act[:, 3 * hidden :] * torch.tanh(c)
        if input.dim() == 1:
            h, c = h.squeeze(0), c.squeeze(0)
        return h.to(input.dtype), c.to(input.dtype)


@register(nn.GRUCell)
class QuantizedGRUCell(_QuantizedCell):
    """Drop-in ``nn.GRUCell`` with int8 matrices (``recurrent_core.choose_precisions``).

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> q = QuantizedGRUCell.from_float(nn.GRUCell(8, 16), QuantizationConfig())
        >>> q(torch.randn(3, 8)).shape
        torch.Size([3, 16])
    """

    def forward(self, input: torch.Tensor, hx: torch.Tensor | None = None) -> torch.Tensor:
        x, h = self._batched(input, (hx,))
        gates_h = self.project(h, "weight_hh", self.bias_of("weight_hh"))
        h = gru_step(self._input_gates(x), gates_h, h, self.hidden_size)
        return (h if input.dim() == 2 else h.squeeze(0)).to(input.dtype)
