"""The callback's options: ``CallbackOptions``, a frozen dataclass built and validated
from the constructor arguments, the only place the defaults live.

Every error quotes the bad call, e.g. ``QuantizationCallback(max_drop=-0.1): max_drop must be ...``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from mono_quant import (
    FLOAT,
    ConfigError,
    ObserverKind,
    QuantDtype,
    QuantizationConfig,
    WeightAlgorithm,
    parse_dtype,
    parse_enum,
    parse_ladder,
)
from mono_quant.budget.rules import FITTED_RUNGS, rung_of
from mono_quant_lightning.batches import BatchFn
from mono_quant_lightning.choices import MonitorMode, OnViolation, QuantizeOn, QuantMode
from mono_quant_lightning.export_formats import parse_export_formats
from mono_quant_lightning.gate import DropType


def default_fallback_ladder(dtype: QuantDtype | str | QuantizationConfig) -> tuple[str, ...]:
    """The fallback ladder from ``dtype`` (or a config's rung, e.g. ``"int4-gptq"``) up to float: int4 passes
    through int8 on the way.

    Example:
        >>> default_fallback_ladder("int4"), default_fallback_ladder("int8"), default_fallback_ladder("bf16")
        (('int4', 'int8', 'float'), ('int8', 'float'), ('bf16', 'float'))
        >>> default_fallback_ladder(QuantizationConfig(dtype="int4", algorithm="gptq"))
        ('int4-gptq', 'int8', 'float')
    """
    rung = rung_of(dtype) if isinstance(dtype, QuantizationConfig) else parse_dtype(dtype).value
    if rung.startswith(QuantDtype.INT4.value):
        return (rung, QuantDtype.INT8.value, FLOAT)
    return (rung, FLOAT)


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


def parse_fallback_ladder(value: Any, config: QuantizationConfig) -> tuple[str, ...]:
    """The fallback ladder: from ``config``'s rung up (default), or ``value`` checked to start there.

    Example:
        >>> parse_fallback_ladder(("int4", "int4-gptq", "int8"), QuantizationConfig(dtype="int4"))
        ('int4', 'int4-gptq', 'int8')
        >>> parse_fallback_ladder(("int4", "int8"), QuantizationConfig(dtype="int4", algorithm="awq"))
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: QuantizationCallback(fallback_ladder=('int4', 'int8')): fallback_ladder must \
start at 'int4-awq' (dtype='int4', algorithm='awq'), the precision the gate tested
    """
    if value is None:
        return default_fallback_ladder(config)
    try:
        ladder = parse_ladder(tuple(value) if isinstance(value, Iterable) and not isinstance(value, str) else value)
    except ConfigError as err:
        raise ConfigError(f"QuantizationCallback(fallback_ladder={value!r}): {err}") from None
    rung = rung_of(config)
    if ladder[0] != rung:
        start = f"dtype={rung!r}" if rung == config.dtype.value else (
            f"{rung!r} (dtype={config.dtype.value!r}, algorithm={config.algorithm.value!r})"
        )  # fmt: skip
        bad_argument("fallback_ladder", value, f"must start at {start}, the precision the gate tested")
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
        mode = CallbackOptions.mode if config is None else QuantMode(config.mode.value)
    parsed = checked("mode", mode, lambda v: parse_enum(QuantMode, v, "mode"))
    calibrates = parse_dtype(changes.get("dtype", config.dtype if config else "int8")) is QuantDtype.INT8 and (
        parsed in (QuantMode.AUTO, QuantMode.STATIC)
    )
    changes["mode"] = "static" if calibrates else "dynamic" if parsed is QuantMode.AUTO else parsed.value
    return checked("mode", mode, lambda _: (config or QuantizationConfig()).replace(**changes)), parsed


@dataclasses.dataclass(frozen=True)
class CallbackOptions:
    """What ``QuantizationCallback`` was asked to do, validated: the one place its defaults live.

    ``from_arguments`` builds it from the constructor's arguments (``dtype``, ``mode``, ``observer``, ``include``
    and ``exclude`` go into ``config``); the constructor's defaults are this class's.

    Example:
        >>> options = CallbackOptions.from_arguments(dtype="int4", max_drop=0.02)
        >>> options.dtype, options.max_drop, options.fallback_ladder, options.calibrates
        (<QuantDtype.INT4: 'int4'>, 0.02, ('int4', 'int8', 'float'), False)
        >>> CallbackOptions.on_violation, CallbackOptions.quantize_on
        (<OnViolation.RAISE: 'raise'>, (<QuantizeOn.FIT_END: 'fit_end'>,))
        >>> options.max_drop = 0.5
        Traceback (most recent call last):
        ...
        dataclasses.FrozenInstanceError: cannot assign to field 'max_drop'
    """

    config: QuantizationConfig
    mode: QuantMode = QuantMode.AUTO
    monitor: str | None = None
    monitor_mode: MonitorMode | None = None
    metric: Any = None
    max_drop: float = 0.01
    drop_type: DropType = DropType.ABSOLUTE
    on_violation: OnViolation = OnViolation.RAISE
    fallback_ladder: tuple[str, ...] = ()
    quantize_on: tuple[QuantizeOn, ...] = (QuantizeOn.FIT_END,)
    export_dir: Path | None = None
    export_formats: tuple[str, ...] = ("safetensors",)
    calibration_batches: int = 32
    calibration_dataloader: Iterable[Any] | None = None
    batch_fn: BatchFn | None = None
    verbose: bool = True

    @property
    def dtype(self) -> QuantDtype:
        return self.config.dtype

    @property
    def calibrates(self) -> bool:
        """Whether activation statistics are collected (int8 with mode auto/static)."""
        return self.dtype is QuantDtype.INT8 and self.mode in (QuantMode.AUTO, QuantMode.STATIC)

    @property
    def fits(self) -> bool:
        """Whether input statistics are collected: int4 weights fitted to data (``config.algorithm`` ``"gptq"`` or
        ``"awq"``, or a fitted rung such as ``"int4-gptq"`` on the fallback ladder)."""
        fitted_rung = self.on_violation is OnViolation.FALLBACK and any(r in FITTED_RUNGS for r in self.fallback_ladder)
        return self.config.algorithm is not WeightAlgorithm.RTN or fitted_rung

    @property
    def gated(self) -> bool:
        """Whether fit end scores float and quantized models (``monitor`` or ``metric``)."""
        return self.monitor is not None or self.metric is not None

    @classmethod
    def from_arguments(
        cls,
        *,
        dtype: Any = None,
        mode: Any = None,
        config: Any = None,
        observer: Any = None,
        include: Any = None,
        exclude: Any = None,
        fallback_ladder: Any = None,
        **options: Any,
    ) -> CallbackOptions:
        """Validate the constructor's arguments; each error quotes the bad one (``QuantizationCallback(x=...)``).

        Example:
            >>> CallbackOptions.from_arguments(max_drop=-0.1)
            Traceback (most recent call last):
            ...
            mono_quant.errors.ConfigError: QuantizationCallback(max_drop=-0.1): max_drop must be a finite number >= 0
        """
        unknown = sorted(set(options) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"QuantizationCallback got unexpected argument(s) {unknown}")
        a = {field.name: getattr(cls, field.name) for field in dataclasses.fields(cls) if field.name != "config"}
        a.update(options)
        parsed_config, parsed_mode = base_config(config, dtype, mode, observer, include, exclude)
        metric = parse_metric(a["metric"])
        monitor, monitor_mode = parse_monitor(a["monitor"], a["monitor_mode"], metric)
        violation = checked("on_violation", a["on_violation"], lambda v: parse_enum(OnViolation, v, "on_violation"))
        if violation is OnViolation.FALLBACK and metric is None and monitor is None:
            bad_argument("on_violation", a["on_violation"], "needs monitor='...' or metric=... to score")
        if fallback_ladder is not None and violation is not OnViolation.FALLBACK:
            bad_argument("fallback_ladder", fallback_ladder, "is only used with on_violation='fallback'")
        return cls(
            config=parsed_config,
            mode=parsed_mode,
            monitor=monitor,
            monitor_mode=monitor_mode,
            metric=metric,
            max_drop=_parse_max_drop(a["max_drop"]),
            drop_type=checked("drop_type", a["drop_type"], lambda v: parse_enum(DropType, v, "drop_type")),
            on_violation=violation,
            fallback_ladder=parse_fallback_ladder(fallback_ladder, parsed_config),
            quantize_on=parse_quantize_on(a["quantize_on"]),
            export_dir=None if a["export_dir"] is None else Path(a["export_dir"]),
            export_formats=parse_export_formats(a["export_formats"]),
            calibration_batches=_parse_calibration_batches(a["calibration_batches"]),
            calibration_dataloader=_parse_loader(a["calibration_dataloader"]),
            batch_fn=_parse_batch_fn(a["batch_fn"]),
            verbose=bool(a["verbose"]),
        )


def _parse_max_drop(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        bad_argument("max_drop", value, "must be a finite number >= 0")
    return float(value)


def _parse_calibration_batches(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        bad_argument("calibration_batches", value, "must be an integer >= 1")
    return value


def _parse_loader(value: Any) -> Iterable[Any] | None:
    if value is not None and not isinstance(value, Iterable):
        bad_argument("calibration_dataloader", value, "must be an iterable of batches (e.g. a DataLoader)")
    return value


def _parse_batch_fn(value: Any) -> BatchFn | None:
    if value is not None and not callable(value):
        bad_argument("batch_fn", value, "must be a callable batch -> (inputs, target)")
    return value
