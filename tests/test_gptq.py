"""GPTQ against a small reference written from the paper's update rule, and against round-to-nearest."""

from __future__ import annotations

import pytest
import torch

from mono_quant.algorithms.gptq import gptq_quantize
from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.config import Granularity, Scheme
from mono_quant.qparams import dequantize, dequantize_weight, quantize, quantize_weight, scale_zero_point


def reference_gptq(w: torch.Tensor, h: torch.Tensor, group: int, scheme: Scheme, damp: float = 0.01) -> torch.Tensor:
    """Frantar et al. 2023, eq. 2-3 as written (no Cholesky, no blocks): round column q, move the error onto the
    remaining columns with ``-(w_q - quant(w_q)) / [H^-1]_qq * (H^-1)_{:,q}``, then drop q from ``H^-1`` by
    Gaussian elimination. Returns the dequantized weight."""
    w = w.double().clone()
    h = h.double().clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.inv(h)
    out = torch.empty_like(w)
    for q in range(w.shape[1]):
        if q % group == 0:
            values = w[:, q : q + group]
            scale, zero = scale_zero_point(values.amin(1), values.amax(1), 4, scheme)
        rounded = dequantize(quantize(w[:, q], scale, zero, 4, scheme), scale, zero).double()
        out[:, q] = rounded
        error = (w[:, q] - rounded) / hinv[q, q]
        w -= error[:, None] * hinv[q][None, :]
        hinv -= hinv[:, q : q + 1] @ hinv[q : q + 1, :] / hinv[q, q]
    return out


def _layer(seed: int, rows: int = 24, cols: int = 96, samples: int = 400) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)  # correlated features
    x = torch.randn(samples, cols, generator=generator) @ mixing * torch.rand(cols, generator=generator) * 3
    return torch.randn(rows, cols, generator=generator), x


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("scheme", [Scheme.SYMMETRIC, Scheme.ASYMMETRIC])
def test_gptq_matches_the_papers_update_and_beats_round_to_nearest(seed: int, scheme: Scheme) -> None:
    w, x = _layer(seed)
    stats = InputStatistics(w.shape[1])
    stats.update(x)
    fitted = gptq_quantize(w, stats.hessian(), 4, scheme, 32)
    ours = dequantize_weight(fitted)
    reference = reference_gptq(w, stats.hessian(), 32, scheme)
    # two float64 orderings of the same math: a value at a rounding tie may land on the other code
    assert (ours.double() - reference).abs().gt(1e-4).float().mean() < 0.01
    rtn = dequantize_weight(quantize_weight(w, 4, scheme, Granularity.PER_GROUP, 32))
    error = lambda approx: torch.linalg.norm(x @ (approx.float() - w).T).item()  # noqa: E731
    assert error(ours) < 0.9 * error(rtn)
    assert fitted.data.abs().max() <= 8 and fitted.scale.shape == (24, 3)


def test_act_order_keeps_the_group_layout_and_lowers_the_error() -> None:
    w, x = _layer(7)
    stats = InputStatistics(w.shape[1])
    stats.update(x)
    static = quantize_weight(w, 4, Scheme.ASYMMETRIC, Granularity.PER_GROUP, 32)
    ordered = gptq_quantize(w, stats.hessian(), 4, Scheme.ASYMMETRIC, 32, static_groups=static, act_order=True)
    assert torch.equal(ordered.scale, static.scale) and torch.equal(ordered.zero_point, static.zero_point)
    error = lambda qw: torch.linalg.norm(x @ (dequantize_weight(qw) - w).T).item()  # noqa: E731
    assert error(ordered) < 0.9 * error(static)


def test_a_feature_the_data_never_sets_keeps_its_rounded_weight() -> None:
    w, x = _layer(3)
    x[:, 5] = 0.0
    stats = InputStatistics(w.shape[1])
    stats.update(x)
    fitted = gptq_quantize(w, stats.hessian(), 4, Scheme.ASYMMETRIC, 32)
    values = dequantize_weight(fitted)
    assert torch.isfinite(values).all()
    # rounded to the nearest step of its group, not pushed by the other columns' errors (it never reaches the output)
    assert ((values[:, 5] - w[:, 5]).abs() <= fitted.scale[:, 0] / 2 + 1e-6).all()
