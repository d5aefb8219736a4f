"""``compare``: how close a quantized model's outputs are to the float model's on real inputs."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from mono_quant.calibration import ForwardFn, default_forward, iterate_batches
from mono_quant.copying import eval_mode
from mono_quant.errors import CalibrationError


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    """Output agreement over all batches: SQNR (dB), mean/min cosine per output row, max abs error."""

    sqnr_db: float
    cosine_mean: float
    cosine_min: float
    max_abs_error: float
    batches: int

    def __str__(self) -> str:
        return (
            f"output SQNR {self.sqnr_db:.1f} dB, cosine mean {self.cosine_mean:.5f} "
            f"(min {self.cosine_min:.5f}), max abs error {self.max_abs_error:.4g} over {self.batches} batches"
        )


def output_tensor(output: Any) -> torch.Tensor:
    """The main tensor of a model's output: the tensor itself, a dict's (or ``ModelOutput``'s) first value,
    a tuple's first item.

    Example:
        >>> output_tensor({"logits": torch.ones(2), "loss": torch.zeros(())}).shape
        torch.Size([2])
    """
    if isinstance(output, dict):  # also transformers' ModelOutput: the first field (last_hidden_state, logits)
        output = next(iter(output.values()), None)
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise CalibrationError(f"cannot compare model outputs of type {type(output).__name__}; pass forward_fn")


@torch.inference_mode()
def compare(
    float_model: nn.Module, quantized_model: nn.Module, data: Any, forward_fn: ForwardFn | None = None
) -> FidelityReport:
    """Run both models on ``data`` (same formats as calibration data) and measure agreement.

    Example:
        >>> import mono_quant as mq
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> q, _ = mq.dynamic_quantize(model)
        >>> compare(model, q, [torch.randn(16, 32)]).cosine_min > 0.99
        True
    """
    feed = forward_fn or default_forward
    signal = noise = 0.0
    cosines: list[torch.Tensor] = []
    max_error, batches = 0.0, 0
    with eval_mode(float_model), eval_mode(quantized_model):
        for batch in iterate_batches(data):
            ref = output_tensor(feed(float_model, batch)).float()
            out = output_tensor(feed(quantized_model, batch)).float().to(ref.device)
            diff = ref - out
            signal += ref.pow(2).sum().item()
            noise += diff.pow(2).sum().item()
            max_error = max(max_error, diff.abs().max().item())
            rows = ref.reshape(ref.shape[0], -1) if ref.dim() > 1 else ref.reshape(1, -1)
            cosines.append(torch.cosine_similarity(rows, out.reshape(rows.shape), dim=-1).cpu())
            batches += 1
    if not batches:
        raise CalibrationError("data is empty; compare needs at least one batch")
    cos = torch.cat(cosines)
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    return FidelityReport(sqnr, cos.mean().item(), cos.min().item(), max_error, batches)
