"""``compare``: how close a quantized model's outputs are to the float model's on real inputs."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.batches import ForwardFn, default_forward, iterate_batches
from mono_quant.copying import eval_mode
from mono_quant.errors import CalibrationError


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    """Output agreement over all batches: SQNR (dB), mean/min cosine per output row, max abs error.

    ``masked_by`` names what excluded padding positions (``"attention_mask"`` of dict batches, or ``"mask_fn"``)
    and ``masked_batches`` how many batches it applied to; ``None`` and 0 when every position counted.
    """

    sqnr_db: float
    cosine_mean: float
    cosine_min: float
    max_abs_error: float
    batches: int
    masked_by: str | None = None
    masked_batches: int = 0

    def __str__(self) -> str:
        text = (
            f"output SQNR {self.sqnr_db:.1f} dB, cosine mean {self.cosine_mean:.5f} "
            f"(min {self.cosine_min:.5f}), max abs error {self.max_abs_error:.4g} over {self.batches} batches"
        )
        if self.masked_by:
            share = "" if self.masked_batches == self.batches else f" in {self.masked_batches} of them"
            text += f", padding masked by {self.masked_by}{share}"
        return text


MaskFn = Callable[[Any], Any]


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
    float_model: nn.Module,
    quantized_model: nn.Module,
    data: Any,
    forward_fn: ForwardFn | None = None,
    mask_fn: MaskFn | None = None,
    reference: Callable[[int, Any], torch.Tensor | None] | None = None,
) -> FidelityReport:
    """Run both models on ``data`` (same formats as calibration data) and measure agreement.

    ``reference(index, batch)``, where given, supplies the float model's output of a batch it already knows
    (``None``: run the float model), e.g. outputs kept from a validation epoch.

    Positions a batch marks as padding do not count: the ``attention_mask`` of dict batches (transformers'
    tokenizer output), or ``mask_fn(batch)``, a 0/1 or boolean tensor shaped like the output's leading
    dimensions (``[batch, sequence]``), is applied wherever it matches the output; the report says so
    (``masked_by``). An ``attention_mask`` that does not match the output (pooled outputs, logits) is ignored;
    a ``mask_fn`` mask that does not match is a ``CalibrationError``.

    Example:
        >>> import mono_quant as mq
        >>> model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
        >>> q, _ = mq.dynamic_quantize(model)
        >>> compare(model, q, [torch.randn(16, 32)]).cosine_min > 0.99
        True
        >>> batch = (torch.randn(2, 5, 32), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]))
        >>> compare(model, q, [batch], mask_fn=lambda b: b[1]).masked_by
        'mask_fn'
    """
    feed = forward_fn or default_forward
    signal = noise = 0.0
    cosines: list[torch.Tensor] = []
    max_error, batches, masked = 0.0, 0, 0
    with eval_mode(float_model), eval_mode(quantized_model):
        for batch in iterate_batches(data):
            known = reference(batches, batch) if reference is not None else None
            ref = (known if known is not None else output_tensor(feed(float_model, batch))).float()
            out = output_tensor(feed(quantized_model, batch)).float().to(ref.device)
            rows_kept = None
            keep = _positions(batch, mask_fn, ref.shape, batches)
            if keep is not None:
                keep = keep.to(ref.device)
                ref, out = torch.where(keep, ref, 0.0), torch.where(keep, out, 0.0)
                rows_kept = keep.reshape(keep.shape[0], -1).any(-1)
                masked += 1
            diff = ref - out
            signal += ref.pow(2).sum().item()
            noise += diff.pow(2).sum().item()
            max_error = max(max_error, diff.abs().max().item())
            rows = ref.reshape(ref.shape[0], -1) if ref.dim() > 1 else ref.reshape(1, -1)
            cosine = torch.cosine_similarity(rows, out.reshape(rows.shape), dim=-1)
            cosines.append((cosine if rows_kept is None else cosine[rows_kept]).cpu())
            batches += 1
    if not batches:
        raise CalibrationError("data is empty; compare needs at least one batch")
    cos = torch.cat(cosines)
    sqnr = math.inf if noise == 0 else 10 * math.log10(max(signal, 1e-30) / noise)
    source = ("mask_fn" if mask_fn is not None else "attention_mask") if masked else None
    return FidelityReport(sqnr, cos.mean().item(), cos.min().item(), max_error, batches, source, masked)


def _positions(batch: Any, mask_fn: MaskFn | None, shape: torch.Size, index: int) -> torch.Tensor | None:
    """A boolean tensor broadcastable to an output of ``shape`` (True: the position counts), or ``None``.

    Example:
        >>> _positions({"attention_mask": torch.tensor([[1, 0]])}, None, torch.Size([1, 2, 4]), 0).shape
        torch.Size([1, 2, 1])
        >>> _positions({"attention_mask": torch.tensor([[1, 0]])}, None, torch.Size([1, 3]), 0) is None  # logits
        True
    """
    if mask_fn is not None:
        mask = mask_fn(batch)
    elif isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
    else:
        return None
    if mask is None and mask_fn is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() == 0 or tuple(shape[: mask.dim()]) != tuple(mask.shape):
        if mask_fn is None:
            return None  # an attention mask that does not index this output (pooled outputs, logits)
        described = f"shape {list(mask.shape)}" if isinstance(mask, torch.Tensor) else f"a {type(mask).__name__}"
        raise CalibrationError(
            f"mask_fn returned {described} for batch {index}, whose output has shape {list(shape)}; expected a "
            "tensor shaped like the output's leading dimensions (e.g. [batch, sequence])"
        )
    keep = mask != 0
    return keep.reshape(*keep.shape, *([1] * (len(shape) - keep.dim())))
