"""The callback's choices (enums) and the parsers that validate its constructor arguments.

Every error quotes the bad call, e.g. ``QuantizationCallback(max_drop=-0.1): max_drop must be ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from mono_quant.budget import FLOAT, parse_ladder
from mono_quant.config import QuantDtype, parse_dtype, parse_enum
from mono_quant.errors import ConfigError


class QuantMode(str, Enum):
    """``auto`` picks ``static`` when validation batches were observed, else ``dynamic``."""

    AUTO = "auto"
    DYNAMIC = "dynamic"
    STATIC = "static"
    WEIGHT_ONLY = "weight_only"


class QuantizeOn(str, Enum):
    """When a quantized file is produced: at the end of ``fit`` and/or beside every checkpoint."""

    FIT_END = "fit_end"
    CHECKPOINT = "checkpoint"


class OnViolation(str, Enum):
    """What a failed gate does: raise (nothing exported), warn (and export), warn and skip the export, or
    fall back: keep the most sensitive layers at higher precision until the budget is met."""

    RAISE = "raise"
    WARN = "warn"
    SKIP_EXPORT = "skip_export"
    FALLBACK = "fallback"


def default_fallback_ladder(dtype: QuantDtype | str) -> tuple[str, ...]:
    """The fallback ladder from ``dtype`` up to float: int4 passes through int8 on the way.

    Example:
        >>> default_fallback_ladder("int4"), default_fallback_ladder("int8"), default_fallback_ladder("bf16")
        (('int4', 'int8', 'float'), ('int8', 'float'), ('bf16', 'float'))
    """
    dtype = parse_dtype(dtype)
    if dtype is QuantDtype.INT4:
        return (QuantDtype.INT4.value, QuantDtype.INT8.value, FLOAT)
    return (dtype.value, FLOAT)


def bad_argument(argument: str, value: Any, problem: str) -> None:
    raise ConfigError(f"QuantizationCallback({argument}={value!r}): {argument} {problem}")


def checked(argument: str, value: Any, parse: Callable[[Any], Any]) -> Any:
    try:
        return parse(value)
    except ConfigError as err:
        raise ConfigError(f"QuantizationCallback({argument}={value!r}): {err}") from None


def parse_quantize_on(value: Any) -> tuple[QuantizeOn, ...]:
    items = [value] if isinstance(value, (str, QuantizeOn)) else value
    try:
        parsed = tuple(dict.fromkeys(parse_enum(QuantizeOn, item, "quantize_on") for item in items))
    except TypeError:
        bad_argument("quantize_on", value, "must be 'fit_end', 'checkpoint' or a tuple of them")
    except ConfigError as err:
        raise ConfigError(f"QuantizationCallback(quantize_on={value!r}): {err}") from None
    if not parsed:
        bad_argument("quantize_on", value, "must name at least one of 'fit_end', 'checkpoint'")
    return parsed


def parse_fallback_ladder(value: Any, dtype: QuantDtype) -> tuple[str, ...]:
    if value is None:
        return default_fallback_ladder(dtype)
    try:
        ladder = parse_ladder(tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else value)
    except ConfigError as err:
        raise ConfigError(f"QuantizationCallback(fallback_ladder={value!r}): {err}") from None
    if ladder[0] != dtype.value:
        bad_argument("fallback_ladder", value, f"must start at dtype={dtype.value!r}, the precision the gate tested")
    return ladder


def parse_metric(metric: Any) -> Any:
    if metric is None:
        return None
    from torchmetrics import Metric

    if isinstance(metric, type) and issubclass(metric, Metric):
        bad_argument(
            "metric", metric, "must be a Metric instance, e.g. MulticlassAccuracy(num_classes=10), not the class"
        )
    if not isinstance(metric, Metric):
        bad_argument("metric", metric, "must be a torchmetrics Metric, e.g. MulticlassAccuracy(num_classes=10)")
    if metric.higher_is_better is None:
        bad_argument("metric", metric, "must declare higher_is_better (True or False) so the drop has a direction")
    return metric
