"""``QuantizationConfig``: one validated, immutable description of what to quantize and how.

Strings, enums and torch dtypes are all accepted for ``dtype``; everything is normalized to the
enums below at construction, so the rest of the library compares enums, never strings.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.config_file import read_options, short_repr
from mono_quant.errors import ConfigError


class QuantDtype(str, Enum):
    """Target precision of the quantized weights."""

    INT8 = "int8"
    INT4 = "int4"
    FP16 = "fp16"
    BF16 = "bf16"


class Mode(str, Enum):
    """How activations are treated. ``dynamic``/``static`` compute in int8; ``weight_only`` in float."""

    DYNAMIC = "dynamic"
    STATIC = "static"
    WEIGHT_ONLY = "weight_only"


class Scheme(str, Enum):
    SYMMETRIC = "symmetric"
    ASYMMETRIC = "asymmetric"


# int4 rounds each group onto 16 levels: a zero point keeps all 16 for a group whose values are not centred
# on 0 (MiniLM, 256 real sentences: embedding cosine 0.947 asymmetric vs 0.927 symmetric at group 128, 0.970 vs
# 0.950 at group 32; torchao's int4 weight-only measured 0.938 / 0.958 in the same run). int8 keeps symmetric
# weights: 255 levels lose little to an offset, and symmetric weights need no zero-point correction in the kernel.
DEFAULT_SCHEMES = {QuantDtype.INT8: Scheme.SYMMETRIC, QuantDtype.INT4: Scheme.ASYMMETRIC,
                   QuantDtype.FP16: Scheme.SYMMETRIC, QuantDtype.BF16: Scheme.SYMMETRIC}  # fmt: skip


class WeightAlgorithm(str, Enum):
    """How weights are rounded: to nearest (``rtn``), or from calibration data (``gptq``, ``awq``; int4 Linear)."""

    RTN = "rtn"
    GPTQ = "gptq"
    AWQ = "awq"


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


class ObserverKind(str, Enum):
    MINMAX = "minmax"
    MOVING_AVERAGE = "moving_average"
    HISTOGRAM = "histogram"


class HistogramMethod(str, Enum):
    PERCENTILE = "percentile"
    MSE = "mse"


_DTYPE_ALIASES: dict[Any, QuantDtype] = {
    torch.qint8: QuantDtype.INT8,
    torch.int8: QuantDtype.INT8,
    torch.quint4x2: QuantDtype.INT4,
    torch.float16: QuantDtype.FP16,
    torch.bfloat16: QuantDtype.BF16,
    "qint8": QuantDtype.INT8,
    "float16": QuantDtype.FP16,
    "half": QuantDtype.FP16,
    "bfloat16": QuantDtype.BF16,
}


def parse_enum(enum_type: type[Enum], value: Any, argument: str) -> Any:
    """Return ``value`` as a member of ``enum_type`` or raise a ``ConfigError`` naming ``argument``.

    Example:
        >>> parse_enum(Mode, "static", "mode")
        <Mode.STATIC: 'static'>
    """
    if isinstance(value, enum_type):
        return value
    choices = ", ".join(repr(m.value) for m in enum_type)
    if not isinstance(value, str):
        raise ConfigError(f"{argument}={short_repr(value)} is not supported; expected one of {choices}")
    try:
        return enum_type(value.lower())
    except ValueError:
        raise ConfigError(f"{argument}={short_repr(value)} is not supported; expected one of {choices}") from None


def parse_dtype(value: Any) -> QuantDtype:
    """Normalize a dtype name, enum or torch dtype (``torch.qint8`` is accepted as a name only).

    Example:
        >>> parse_dtype(torch.qint8), parse_dtype("fp16")
        (<QuantDtype.INT8: 'int8'>, <QuantDtype.FP16: 'fp16'>)
    """
    if isinstance(value, QuantDtype):
        return value
    key = value.lower() if isinstance(value, str) else value
    if isinstance(key, (str, torch.dtype)) and key in _DTYPE_ALIASES:
        return _DTYPE_ALIASES[key]
    return parse_enum(QuantDtype, value, "dtype")


@dataclasses.dataclass(frozen=True)
class QuantizationConfig:
    """What to quantize and how. Immutable; ``replace(**changes)`` makes a validated variant.

    Mode rules: ``int4`` is always weight-only (group-wise); ``fp16``/``bf16`` are casts and ignore
    ``mode``; ``static`` needs calibration data, of which at most ``calibration_batches`` (default 256,
    ``None`` for no limit) are used. ``granularity`` applies to int8 weights; int4 is always per-group
    with ``group_size``. ``scheme=None`` is the dtype's default (``DEFAULT_SCHEMES``: int4 asymmetric, else
    symmetric). ``algorithm="gptq"``/``"awq"`` fits int4 Linear weights to ``calibration_data``; ``smoothquant``
    (static int8), ``equalize`` and ``bias_correction`` are data-driven corrections (docs/algorithms.md).
    Each quantized layer's output is checked against float; a layer under ``min_output_sqnr_db`` (default per
    dtype: ``output_check.OUTPUT_FLOORS_DB``; ``float("-inf")`` never moves a layer) moves to the next
    precision (docs/kernels.md, "What is checked").

    Example:
        >>> cfg = QuantizationConfig(dtype="int8", mode="static", observer="histogram", exclude=("head",))
        >>> cfg.mode, cfg.observer
        (<Mode.STATIC: 'static'>, <ObserverKind.HISTOGRAM: 'histogram'>)
    """

    dtype: Any = QuantDtype.INT8
    mode: Any = Mode.DYNAMIC
    scheme: Any = None  # None: per dtype (DEFAULT_SCHEMES)
    granularity: Any = Granularity.PER_CHANNEL
    group_size: int = 128
    observer: Any = ObserverKind.MINMAX
    histogram_method: Any = HistogramMethod.PERCENTILE
    percentile: float = 99.99
    activation_scheme: Any = Scheme.ASYMMETRIC
    include: Sequence[str] | None = None
    exclude: Sequence[str] = ()
    layer_types: tuple[type[nn.Module], ...] | None = None  # None: every registered or weight-bearing layer
    min_numel: int = 0
    fold_batchnorm: bool = True
    calibration_batches: int | None = 256  # calibration stops after this many batches; None: no limit
    min_output_sqnr_db: float | None = None  # each layer's output floor against float; None: per dtype
    algorithm: Any = WeightAlgorithm.RTN  # gptq / awq: int4 Linear weights fitted to calibration data
    smoothquant: float | None = None  # static int8: migrate activation outliers into weights with this alpha
    equalize: bool = False  # cross-layer equalization of conv -> ReLU -> conv pairs (CNNs)
    bias_correction: bool | None = None  # remove each layer's mean output error from its bias; None: static only

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        dtype = parse_dtype(self.dtype)
        put("dtype", dtype)
        mode = parse_enum(Mode, self.mode, "mode")
        if dtype is QuantDtype.INT4:
            if mode is Mode.STATIC:
                raise ConfigError("mode='static' is not supported with dtype='int4'; int4 is weight-only")
            mode = Mode.WEIGHT_ONLY
        put("mode", mode)
        put("scheme", DEFAULT_SCHEMES[dtype] if self.scheme is None else parse_enum(Scheme, self.scheme, "scheme"))
        put("granularity", parse_enum(Granularity, self.granularity, "granularity"))
        put("observer", parse_enum(ObserverKind, self.observer, "observer"))
        put("histogram_method", parse_enum(HistogramMethod, self.histogram_method, "histogram_method"))
        put("activation_scheme", parse_enum(Scheme, self.activation_scheme, "activation_scheme"))
        if not isinstance(self.group_size, int) or self.group_size < 2 or self.group_size % 2:
            raise ConfigError(f"group_size={short_repr(self.group_size)} must be an even integer >= 2")
        percentile = self.percentile
        if isinstance(percentile, bool) or not isinstance(percentile, (int, float)) or not 50 < percentile <= 100:
            raise ConfigError(f"percentile={short_repr(percentile)} must be a number in (50, 100]")
        put("percentile", float(percentile))
        algorithm = parse_enum(WeightAlgorithm, self.algorithm, "algorithm")
        if algorithm is not WeightAlgorithm.RTN and dtype is not QuantDtype.INT4:
            raise ConfigError(
                f"algorithm={algorithm.value!r} fits int4 weights; use it with dtype='int4' (got {dtype.value!r})"
            )
        put("algorithm", algorithm)
        alpha = self.smoothquant
        if alpha is not None:
            if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
                raise ConfigError(f"smoothquant={short_repr(alpha)} must be None or a migration strength in (0, 1)")
            if mode is not Mode.STATIC or dtype is not QuantDtype.INT8:
                raise ConfigError("smoothquant= applies to dtype='int8', mode='static' (per-tensor activations)")
            put("smoothquant", float(alpha))
        if not isinstance(self.equalize, bool):
            raise ConfigError(f"equalize={short_repr(self.equalize)} must be True or False")
        if self.bias_correction is not None and not isinstance(self.bias_correction, bool):
            raise ConfigError(
                f"bias_correction={short_repr(self.bias_correction)} must be True, False or None (on in static mode)"
            )
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ConfigError(f"min_numel={short_repr(self.min_numel)} must be a non-negative integer")
        if not isinstance(self.fold_batchnorm, bool):
            raise ConfigError(f"fold_batchnorm={short_repr(self.fold_batchnorm)} must be True or False")
        batches = self.calibration_batches
        if batches is not None and (type(batches) is not int or batches < 1):
            raise ConfigError(
                f"calibration_batches={short_repr(batches)} must be a positive integer or None (no limit)"
            )
        floor = self.min_output_sqnr_db
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, int | float) or math.isnan(floor)):
            raise ConfigError(
                f"min_output_sqnr_db={short_repr(floor)} must be a number of dB or None (the per-dtype floor)"
            )
        put("include", _patterns(self.include, "include"))
        put("exclude", _patterns(self.exclude, "exclude") or ())
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
                raise ConfigError(
                    f"layer_types={short_repr(self.layer_types)} must be a non-empty tuple of nn.Module classes"
                )
            put("layer_types", types)

    @property
    def needs_model_run(self) -> list[str]:
        """The options set that run calibration data through a model (``[]``: tensors alone suffice).

        Example:
            >>> QuantizationConfig(dtype="int4", algorithm="gptq", equalize=True).needs_model_run
            ["algorithm='gptq'", 'equalize=True']
        """
        needs = [f"mode={self.mode.value!r}"] if self.mode is Mode.STATIC else []
        if self.algorithm is not WeightAlgorithm.RTN:
            needs.append(f"algorithm={self.algorithm.value!r}")
        needs += [f"{flag}=True" for flag in ("equalize", "bias_correction") if getattr(self, flag) is True]
        return needs

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], **overrides: Any) -> QuantizationConfig:
        r"""Read options from a TOML, YAML or JSON file; ``overrides`` win over the file, the file over defaults.

        The file holds the fields of this class at its top level (``layer_types`` excepted); an unknown key is
        a ``ConfigError`` naming the key and the file.

        Example:
            >>> import tempfile
            >>> path = Path(tempfile.mkdtemp()) / "quant.toml"
            >>> _ = path.write_text('dtype = "int4"\ngroup_size = 64\nexclude = ["head"]\n')
            >>> cfg = QuantizationConfig.from_file(path, group_size=32)
            >>> cfg.dtype, cfg.group_size, cfg.exclude
            (<QuantDtype.INT4: 'int4'>, 32, ('head',))
        """
        path = Path(path)
        data = read_options(path)
        allowed = {f.name for f in dataclasses.fields(cls)} - {"layer_types"}
        unknown = sorted(set(data) - allowed, key=str)
        if unknown:
            raise ConfigError(f"{path}: unknown option {short_repr(unknown[0])}; expected some of {sorted(allowed)}")
        try:
            return cls(**{**data, **overrides})
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except TypeError as err:  # an unknown keyword in overrides
            raise ConfigError(f"QuantizationConfig.from_file({os.fspath(path)!r}, ...): {err}") from None

    def replace(self, **changes: Any) -> QuantizationConfig:
        """Return a validated copy with ``changes`` applied; unknown names raise ``ConfigError``.

        Example:
            >>> QuantizationConfig().replace(dtype="int4").mode
            <Mode.WEIGHT_ONLY: 'weight_only'>
        """
        fields = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - fields)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; expected some of {sorted(fields)}")
        if "dtype" in changes and "scheme" not in changes and self.scheme is DEFAULT_SCHEMES[self.dtype]:
            changes["scheme"] = None  # a scheme that was the old dtype's default follows the new dtype's
        if "dtype" in changes and "algorithm" not in changes and parse_dtype(changes["dtype"]) is not QuantDtype.INT4:
            changes["algorithm"] = WeightAlgorithm.RTN  # gptq/awq fit int4 weights: an int8 rung rounds
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly view (enums as strings, layer types as class names).

        Example:
            >>> QuantizationConfig().to_dict()["dtype"]
            'int8'
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Enum):
                value = value.value
            elif f.name == "layer_types":
                value = None if value is None else [t.__name__ for t in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out


def _patterns(value: Any, argument: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Mapping) or not isinstance(value, Iterable) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{argument}={short_repr(value)} must be a glob pattern or a sequence of them")
    return tuple(value)
