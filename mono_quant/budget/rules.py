"""The accuracy budget's pure pieces: precision ladders, drops, which items and rungs come next, and the
small data helpers the search uses (scores from ``eval_fn``, slicing batches). No model is run here."""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from mono_quant.budget.report import FLOAT
from mono_quant.config import QuantDtype, QuantizationConfig, WeightAlgorithm, parse_dtype
from mono_quant.errors import ConfigError, QuantizationError

SENSITIVITY_POOL = 1024  # items read from the sensitivity data (whole batches)
SENSITIVITY_ITEMS = 128  # items of the pool on which layers are ranked
FLOAT_NAMES = frozenset({"float", "float32", "fp32"})
# int4 weights fitted to data (config.algorithm); "int4" itself rounds to nearest. A fitted rung sits between int4
# and int8: same bits as int4, a better fit; a ladder holds at most one of them.
FITTED_RUNGS = {"int4-gptq": WeightAlgorithm.GPTQ, "int4-awq": WeightAlgorithm.AWQ}
RUNG_BITS = {"int4": 4, "int4-gptq": 4.5, "int4-awq": 4.5, "int8": 8, "fp16": 16, "bf16": 16, FLOAT: 32}

EvalFn = Callable[[nn.Module], Any]


# ----------------------------------------------------------------------------- pure decisions


def parse_ladder(ladder: Sequence[Any]) -> tuple[str, ...]:
    """Normalize a precision ladder to rung names, lowest precision first; raise ``ConfigError`` if it is
    empty, has an unknown rung, no quantized rung, or is not strictly ordered by precision.

    Example:
        >>> parse_ladder(("INT4", torch.qint8, "fp32"))
        ('int4', 'int8', 'float')
        >>> parse_ladder(("int4", "int4-GPTQ", "int8", "float"))
        ('int4', 'int4-gptq', 'int8', 'float')
        >>> parse_ladder(("int8", "int4"))
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: ladder=('int8', 'int4') must go from lowest to highest precision ...
    """
    if isinstance(ladder, str) or not isinstance(ladder, Sequence):
        raise ConfigError(f"ladder={ladder!r} must be a sequence of precisions such as ('int4', 'int8', 'float')")
    if not ladder:
        raise ConfigError("ladder=() is empty; expected precisions such as ('int4', 'int8', 'float')")
    rungs = []
    for rung in ladder:
        if (isinstance(rung, str) and rung.lower() in FLOAT_NAMES) or rung is torch.float32:
            rungs.append(FLOAT)
            continue
        if isinstance(rung, str) and rung.lower() in FITTED_RUNGS:
            rungs.append(rung.lower())
            continue
        try:
            rungs.append(parse_dtype(rung).value)
        except ConfigError:
            raise ConfigError(
                f"ladder={tuple(ladder)!r} has unknown rung {rung!r}; expected some of 'int4', 'int4-gptq', "
                "'int4-awq', 'int8', 'fp16', 'bf16', 'float'"
            ) from None
    bits = [RUNG_BITS[r] for r in rungs]
    if any(a >= b for a, b in pairwise(bits)):
        raise ConfigError(
            f"ladder={tuple(rungs)!r} must go from lowest to highest precision with no rung repeated "
            "(int4 < int4-gptq/int4-awq < int8 < fp16/bf16 < float)"
        )
    if rungs == [FLOAT]:
        raise ConfigError("ladder=('float',) has no quantized rung; add e.g. 'int8' before 'float'")
    return tuple(rungs)


def rung_of(config: QuantizationConfig) -> str:
    """The ladder rung ``config`` quantizes at: its dtype, or ``"int4-gptq"``/``"int4-awq"`` for fitted int4.

    Example:
        >>> rung_of(QuantizationConfig(dtype="int4", algorithm="gptq")), rung_of(QuantizationConfig())
        ('int4-gptq', 'int8')
    """
    if config.dtype is QuantDtype.INT4 and config.algorithm is not WeightAlgorithm.RTN:
        return f"int4-{config.algorithm.value}"
    return config.dtype.value


def rung_dtype(rung: str) -> tuple[QuantDtype, WeightAlgorithm]:
    """The dtype and weight algorithm of a (parsed) quantized rung.

    Example:
        >>> rung_dtype("int4-gptq")
        (<QuantDtype.INT4: 'int4'>, <WeightAlgorithm.GPTQ: 'gptq'>)
    """
    if rung in FITTED_RUNGS:
        return QuantDtype.INT4, FITTED_RUNGS[rung]
    return QuantDtype(rung), WeightAlgorithm.RTN


def accuracy_drop(
    float_score: float, score: float, *, higher_is_better: bool = True, drop_type: str = "absolute"
) -> float:
    """How much worse ``score`` is than ``float_score`` (negative when better); ``"relative"`` divides by
    ``|float_score|``.

    Example:
        >>> round(accuracy_drop(0.95, 0.94), 6), round(accuracy_drop(0.5, 0.6, higher_is_better=False), 6)
        (0.01, 0.1)
        >>> round(accuracy_drop(0.8, 0.76, drop_type="relative"), 6)
        0.05
    """
    drop = float_score - score if higher_is_better else score - float_score
    if drop_type == "relative":
        if float_score == 0:
            raise QuantizationError("drop_type='relative' is undefined when the float score is 0; use 'absolute'")
        drop /= abs(float_score)
    return drop


def pick_items(errors: Sequence[float], drops: Sequence[float] | None, count: int) -> list[int]:
    """Indices of the ``count`` items to rank layers on: largest per-item score drop first (when known),
    then largest output error; ties keep the pool order.

    Example:
        >>> pick_items([0.1, 0.5, 0.2, 0.0], None, 2)
        [1, 2]
        >>> pick_items([0.1, 0.5, 0.2, 0.0], [1.0, 0.0, 0.0, 1.0], 2)
        [0, 3]
    """
    keys = [(-(drops[i] if drops is not None else 0.0), -errors[i], i) for i in range(len(errors))]
    return [key[2] for key in sorted(keys)[:count]]


def next_rung(rungs: Sequence[str], current: str) -> str | None:
    """The rung above ``current`` on a layer's ladder, or ``None`` at the top.

    Example:
        >>> next_rung(("int4", "int8", "float"), "int4"), next_rung(("int8", "float"), "float")
        ('int8', None)
    """
    index = rungs.index(current)
    return rungs[index + 1] if index + 1 < len(rungs) else None


def parse_score(value: Any, what: str) -> tuple[float, torch.Tensor | None]:
    """``eval_fn``'s result as ``(score, per_item_scores or None)``; raises naming ``eval_fn``."""
    per_item = None
    score = value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise QuantizationError(
                f"eval_fn returned a tuple of {len(value)} items for the {what} model; expected a number or "
                "(score, per_item_scores)"
            )
        score, per_item = value
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        score = score.item()
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        raise QuantizationError(
            f"eval_fn returned {type(score).__name__} {str(score)[:60]!r} for the {what} model; expected a number "
            "(or (score, per_item_scores))"
        )
    score = float(score)
    if not math.isfinite(score):
        raise QuantizationError(f"eval_fn returned {score} for the {what} model; expected a finite number")
    if per_item is not None:
        try:
            per_item = torch.as_tensor(per_item).detach().cpu().to(torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as err:
            raise QuantizationError(
                f"eval_fn returned per_item_scores of type {type(per_item).__name__} for the {what} model; expected "
                "a sequence or tensor of numbers"
            ) from err
    return score, per_item


def glob_literal(name: str) -> str:
    """A glob pattern that matches exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = batch_size(value)
        if size is not None:
            return size
    return None


def take(batch: Any, rows: torch.Tensor, size: int) -> Any:
    """The rows ``rows`` of every tensor in ``batch`` whose first dimension is ``size``."""
    if isinstance(batch, torch.Tensor):
        return batch[rows.to(batch.device)] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: take(v, rows, size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(take(v, rows, size) for v in batch)
    return batch
