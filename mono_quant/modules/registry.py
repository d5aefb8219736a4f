"""The one table of layer kinds: which quantized class serves which float layer type.

A quantized class registers itself where it is defined, with ``@register(float_type)``; quantize,
report, save, load, dequantize and the CLI all ask this registry, so a new layer kind is one file.
Classes registered for the same float type are tried in registration order; the first whose
``dtypes`` include the config's dtype serves it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mono_quant.config import QuantDtype, QuantizationConfig
from mono_quant.modules.base import QuantizedLayer

REGISTRY: dict[type[nn.Module], list[type[QuantizedLayer]]] = {}
QUANTIZED_CLASSES: dict[str, type[QuantizedLayer]] = {}


def register(float_type: type[nn.Module]) -> Callable[[type[QuantizedLayer]], type[QuantizedLayer]]:
    """Class decorator: the decorated ``QuantizedLayer`` quantizes modules of exactly ``float_type``.

    Exact modules of ``float_type`` are replaced by the class; subclasses and other modules that use
    a weight the same way get a quantized weight tensor backed by it (see ``modules/attach.py``).

    Example:
        >>> class MyLayer(nn.Module):
        ...     pass
        >>> @register(MyLayer)
        ... class QuantizedMyLayer(nn.Module, QuantizedLayer):
        ...     dtypes = ()
        >>> QUANTIZED_CLASSES["QuantizedMyLayer"].float_type is MyLayer
        True
        >>> _ = REGISTRY.pop(MyLayer), QUANTIZED_CLASSES.pop("QuantizedMyLayer")  # keep the doctest clean
    """

    def decorate(cls: type[QuantizedLayer]) -> type[QuantizedLayer]:
        if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
            raise TypeError(f"register(float_type={float_type!r}): expected an nn.Module subclass")
        if not issubclass(cls, QuantizedLayer):
            raise TypeError(f"@register({float_type.__name__}) on {cls.__name__}: expected a QuantizedLayer subclass")
        cls.float_type = float_type
        REGISTRY.setdefault(float_type, []).append(cls)
        QUANTIZED_CLASSES[cls.__name__] = cls
        return cls

    return decorate


def swapped_types() -> tuple[type[nn.Module], ...]:
    """The float types whose exact instances are replaced by a registered quantized module.

    Example:
        >>> nn.Linear in swapped_types(), nn.Conv2d in swapped_types()
        (True, False)
    """
    return tuple(t for t, classes in REGISTRY.items() if all(cls.swap_module for cls in classes))


def quantized_class_for(module: nn.Module, config: QuantizationConfig) -> tuple[type[QuantizedLayer] | None, str]:
    """The class that quantizes ``module`` under ``config``, or ``None`` and the reason it is skipped.

    Only exact registered types match (``modules/attach.py`` turns other layers into an exact proxy).

    Example:
        >>> quantized_class_for(nn.Linear(256, 16), QuantizationConfig(dtype="int4"))[0].__name__
        'Int4Linear'
        >>> quantized_class_for(nn.Conv2d(1, 1, 3), QuantizationConfig(dtype="int4"))[0].__name__  # int8 instead
        'Int8Conv2d'
        >>> quantized_class_for(nn.Conv2d(1, 1, 3), QuantizationConfig(dtype="fp16"))[0].__name__
        'HalfConv2d'
        >>> quantized_class_for(nn.Linear(48, 16), QuantizationConfig(dtype="int4"))[0].__name__  # no group fits
        'Int8Linear'

    """
    candidates = REGISTRY.get(type(module))
    if candidates is None:
        return None, f"{type(module).__name__} is not a supported layer type"
    reason = f"no {config.dtype.value} path for {type(module).__name__}"
    for cls in candidates:
        if config.dtype in cls.dtypes:
            reason = cls.unsupported_reason(module, config) or ""
            if not reason:
                return cls, ""
            break
    if config.dtype is QuantDtype.INT4 and any(INT4_FALLBACK in cls.dtypes for cls in candidates):
        fallback, why = quantized_class_for(module, config.replace(dtype=INT4_FALLBACK, mode="dynamic"))
        return (fallback, "") if fallback is not None else (None, f"{reason}; int8: {why}")
    return None, reason


INT4_FALLBACK = QuantDtype.INT8  # layers int4 cannot take (convolutions, widths no group divides) take int8 dynamic


def layer_config(config: QuantizationConfig, cls: type[QuantizedLayer]) -> QuantizationConfig:
    """``config`` as ``cls`` applies it: int4 requests on layers int4 cannot take (convolutions, widths no int4
    group divides) run int8 dynamic, rather than float.

    Example:
        >>> from mono_quant.modules import Int8Conv2d
        >>> layer_config(QuantizationConfig(dtype="int4"), Int8Conv2d).mode.value
        'dynamic'
    """
    if config.dtype in cls.dtypes:
        return config
    return config.replace(dtype=cls.dtypes[0], mode="dynamic")


def class_for_kind(kind: str, bits: int) -> type[QuantizedLayer] | None:
    """The registered class whose files record ``kind`` (e.g. ``"Linear"``) at ``bits`` bits.

    Example:
        >>> class_for_kind("Conv2d", 8).__name__
        'Int8Conv2d'
    """
    for classes in REGISTRY.values():
        for cls in classes:
            if cls.float_type.__name__ == kind and cls.bits == bits:
                return cls
    return None
