"""The callback's choices (enums) and the parsers that validate its constructor arguments.

Every error quotes the bad call, e.g. ``QuantizationCallback(max_drop=-0.1): max_drop must be ...``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum
from typing import Any

from mono_quant import FLOAT, ConfigError, ObserverKind, QuantDtype, parse_dtype, parse_enum, parse_ladder


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


class MonitorMode(str, Enum):
    """The direction of ``monitor``: ``max`` (higher is better, e.g. accuracy) or ``min`` (e.g. a loss)."""

    MAX = "max"
    MIN = "min"


def parse_monitor(monitor: Any, monitor_mode: Any, metric: Any) -> tuple[str | None, MonitorMode | None]:
    """Validate ``monitor`` / ``monitor_mode`` (and that ``metric`` is not also given).

    Example:
        >>> parse_monitor("val_acc", "max", None)
        ('val_acc', <MonitorMode.MAX: 'max'>)
        >>> parse_monitor(None, "max", None)
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: QuantizationCallback(monitor_mode='max'): monitor_mode needs monitor='...'
    """
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        bad_argument("monitor", monitor, "must be the name of a value validation_step logs, e.g. 'val_acc'")
    if monitor is not None and metric is not None:
        bad_argument("monitor", monitor, "and metric= are alternatives; gate on one of them")
    mode = None if monitor_mode is None else checked("monitor_mode", monitor_mode, _parse_mode)
    if mode is not None and monitor is None:
        bad_argument("monitor_mode", monitor_mode, "needs monitor='...'")
    return monitor, mode


def _parse_mode(value: Any) -> MonitorMode:
    return parse_enum(MonitorMode, value, "monitor_mode")


def parse_config(config: Any) -> Any:
    """``config`` must be a ``mono_quant.QuantizationConfig`` (or ``None``).

    Example:
        >>> parse_config({"dtype": "int4"})
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: QuantizationCallback(config={'dtype': 'int4'}): config must be a ...
    """
    from mono_quant import QuantizationConfig

    if config is not None and not isinstance(config, QuantizationConfig):
        bad_argument("config", config, "must be a mono_quant.QuantizationConfig(...) (or QuantizationConfig.from_file)")
    return config


def base_config(config: Any, dtype: Any, mode: Any, observer: Any, include: Any, exclude: Any) -> tuple[Any, QuantMode]:
    """The callback's ``QuantizationConfig`` and mode: explicit arguments > ``config`` > defaults (int8, auto).

    The config's mode is static when the callback calibrates (int8 auto/static); ``mode`` is resolved per export.

    Example:
        >>> from mono_quant import QuantizationConfig
        >>> cfg, mode = base_config(QuantizationConfig(dtype="int4", group_size=32), None, None, None, None, None)
        >>> cfg.group_size, mode
        (32, <QuantMode.WEIGHT_ONLY: 'weight_only'>)
        >>> base_config(None, None, None, None, None, None)[1]
        <QuantMode.AUTO: 'auto'>
    """
    from mono_quant import QuantizationConfig

    config = parse_config(config)
    changes: dict[str, Any] = {}
    if dtype is not None:
        changes["dtype"] = checked("dtype", dtype, parse_dtype)
    if observer is not None:
        changes["observer"] = checked("observer", observer, lambda v: parse_enum(ObserverKind, v, "observer"))
    for argument, patterns in (("include", include), ("exclude", exclude)):
        if patterns is not None and not isinstance(patterns, (str, Iterable)):
            bad_argument(argument, patterns, "must be a glob pattern or a sequence of them")
        if patterns is not None:
            changes[argument] = patterns
    if mode is None:
        mode = QuantMode.AUTO if config is None else QuantMode(config.mode.value)
    parsed = checked("mode", mode, lambda v: parse_enum(QuantMode, v, "mode"))
    calibrates = parse_dtype(changes.get("dtype", config.dtype if config else "int8")) is QuantDtype.INT8 and (
        parsed in (QuantMode.AUTO, QuantMode.STATIC)
    )
    changes["mode"] = "static" if calibrates else "dynamic" if parsed is QuantMode.AUTO else parsed.value
    return checked("mode", mode, lambda _: (config or QuantizationConfig()).replace(**changes)), parsed


def parse_arguments(**arguments: Any) -> dict[str, Any]:
    """Validate every ``QuantizationCallback`` argument; the parsed values, by attribute name.

    Example:
        >>> parsed = parse_arguments(dtype="int4", max_drop=0.02)
        >>> parsed["config"].dtype, parsed["max_drop"], parsed["fallback_ladder"]
        (<QuantDtype.INT4: 'int4'>, 0.02, ('int4', 'int8', 'float'))
    """
    from pathlib import Path

    a = {
        "dtype": None,
        "mode": None,
        "config": None,
        "monitor": None,
        "monitor_mode": None,
        "metric": None,
        "max_drop": 0.01,
        "drop_type": "absolute",
        "on_violation": "raise",
        "fallback_ladder": None,
        "quantize_on": ("fit_end",),
        "export_dir": None,
        "export_formats": ("safetensors",),
        "observer": None,
        "include": None,
        "exclude": None,
        "calibration_batches": 32,
        "calibration_dataloader": None,
        "batch_fn": None,
        "verbose": True,
        **arguments,
    }
    out: dict[str, Any] = {}
    out["config"], out["mode"] = base_config(
        a["config"], a["dtype"], a["mode"], a["observer"], a["include"], a["exclude"]
    )
    batches = a["calibration_batches"]
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        bad_argument("calibration_batches", batches, "must be an integer >= 1")
    out["calibration_batches"] = batches
    out["quantize_on"] = parse_quantize_on(a["quantize_on"])
    out["metric"] = parse_metric(a["metric"])
    out["monitor"], out["monitor_mode"] = parse_monitor(a["monitor"], a["monitor_mode"], out["metric"])
    max_drop = a["max_drop"]
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < float("inf"):
        bad_argument("max_drop", max_drop, "must be a finite number >= 0")
    out["max_drop"] = float(max_drop)
    from mono_quant_lightning.gate import DropType

    out["drop_type"] = checked("drop_type", a["drop_type"], lambda v: parse_enum(DropType, v, "drop_type"))
    violation = checked("on_violation", a["on_violation"], lambda v: parse_enum(OnViolation, v, "on_violation"))
    out["on_violation"] = violation
    if violation is OnViolation.FALLBACK and out["metric"] is None and out["monitor"] is None:
        bad_argument("on_violation", a["on_violation"], "needs monitor='...' or metric=... to score")
    if a["fallback_ladder"] is not None and violation is not OnViolation.FALLBACK:
        bad_argument("fallback_ladder", a["fallback_ladder"], "is only used with on_violation='fallback'")
    out["fallback_ladder"] = parse_fallback_ladder(a["fallback_ladder"], out["config"].dtype)
    if a["batch_fn"] is not None and not callable(a["batch_fn"]):
        bad_argument("batch_fn", a["batch_fn"], "must be a callable batch -> (inputs, target)")
    loader = a["calibration_dataloader"]
    if loader is not None and not isinstance(loader, Iterable):
        bad_argument("calibration_dataloader", loader, "must be an iterable of batches (e.g. a DataLoader)")
    out["calibration_dataloader"], out["batch_fn"], out["verbose"] = loader, a["batch_fn"], bool(a["verbose"])
    out["export_dir"] = None if a["export_dir"] is None else Path(a["export_dir"])
    from mono_quant_lightning.export_formats import parse_export_formats

    out["export_formats"] = parse_export_formats(a["export_formats"])
    return out
