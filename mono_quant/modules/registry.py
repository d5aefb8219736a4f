"""The one table of layer kinds: which quantized class serves which float layer type.

A quantized class registers itself where it is defined, with ``@register(float_type)``; quantize,
report, save, load, dequantize and the CLI all ask this registry, so a new layer kind is one file.
Classes registered for the same float type are tried in registration order; the first whose
``dtypes`` include the config's dtype serves it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

from torch import nn

from mono_quant.config import QuantDtype, QuantizationConfig
from mono_quant.config_file import short_repr
from mono_quant.errors import ConfigError
from mono_quant.modules.base import QuantizedLayer, float_weight

REGISTRY: dict[type[nn.Module], list[type[QuantizedLayer]]] = {}
QUANTIZED_CLASSES: dict[str, type[QuantizedLayer]] = {}


def register(float_type: type[nn.Module]) -> Callable[[type[QuantizedLayer]], type[QuantizedLayer]]:
    """Class decorator: the decorated ``QuantizedLayer`` quantizes modules of exactly ``float_type``.

    Exact modules of ``float_type`` are replaced by the class; subclasses and other modules that use
    a weight the same way get a quantized weight tensor backed by it (see ``modules/attach.py``).
    ``float_type`` must be an ``nn.Module`` class with a weight (``weight`` or ``weight_*``). Files record
    layer classes by name, so a name is one class: registering a class again (a cell re-run, a module
    reloaded: same module and qualified name) replaces it for quantize and load alike, and a different
    class with a registered class's name is refused.

    Example:
        >>> import torch
        >>> class MyLayer(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(3))
        >>> @register(MyLayer)
        ... class QuantizedMyLayer(nn.Module, QuantizedLayer):
        ...     dtypes = ()
        >>> QUANTIZED_CLASSES["QuantizedMyLayer"].float_type is MyLayer
        True
        >>> _ = REGISTRY.pop(MyLayer), QUANTIZED_CLASSES.pop("QuantizedMyLayer")  # keep the doctest clean
        >>> try:
        ...     register(nn.ReLU)
        ... except ConfigError as err:
        ...     print(err)  # doctest: +ELLIPSIS
        register(float_type=ReLU): ReLU has no weight ...
    """
    _check_float_type(float_type)

    def decorate(cls: type[QuantizedLayer]) -> type[QuantizedLayer]:
        if not (isinstance(cls, type) and issubclass(cls, QuantizedLayer) and issubclass(cls, nn.Module)):
            raise ConfigError(
                f"@register({float_type.__name__}) on {short_repr(cls)}: expected a class deriving from nn.Module "
                "and mono_quant.QuantizedLayer"
            )
        old = QUANTIZED_CLASSES.get(cls.__name__)
        if old is not None and _qualified_name(old) != _qualified_name(cls):
            raise ConfigError(
                f"@register({float_type.__name__}) on {_qualified_name(cls)}: a different class named "
                f"{cls.__name__!r} is registered already ({_qualified_name(old)}); files record layer classes by "
                "name, so give yours another name"
            )
        old_type = getattr(old, "float_type", None)
        if (
            old_type is not None
            and old_type is not float_type
            and _qualified_name(old_type) != _qualified_name(float_type)
        ):
            raise ConfigError(
                f"@register({float_type.__name__}) on {cls.__name__}: it is registered for {old_type.__name__} "
                "already; one quantized class serves one float type"
            )
        cls.float_type = float_type
        if old is not None:
            _unregister(old, float_type, cls)
        if cls not in REGISTRY.setdefault(float_type, []):
            REGISTRY[float_type].append(cls)
        QUANTIZED_CLASSES[cls.__name__] = cls
        return cls

    return decorate


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _unregister(old: type[QuantizedLayer], float_type: type[nn.Module], new: type[QuantizedLayer]) -> None:
    """Take ``old`` (a previous definition of ``new``) out of the table; ``new`` takes its place in the order
    of ``float_type``'s classes when it registers for the same type."""
    for registered_type, classes in list(REGISTRY.items()):
        if old in classes:
            if registered_type is float_type:
                classes[classes.index(old)] = new
            else:
                classes.remove(old)
        if not classes:
            del REGISTRY[registered_type]


def _check_float_type(float_type: object) -> None:
    """A ``ConfigError`` naming the argument unless ``float_type`` is an ``nn.Module`` class that has a weight."""
    if not (isinstance(float_type, type) and issubclass(float_type, nn.Module)):
        raise ConfigError(
            f"register(float_type={short_repr(float_type)}): expected an nn.Module subclass (the float layer type, "
            "e.g. nn.Linear or your own layer class)"
        )
    if _declares_weight(float_type) is False:
        name = float_type.__name__
        raise ConfigError(
            f"register(float_type={name}): {name} has no weight (no `weight` or `weight_*` attribute in its class "
            "or its __init__); only layers that multiply by a weight can be quantized"
        )


def _declares_weight(float_type: type[nn.Module]) -> bool | None:
    """Whether the class's annotations or the source of its ``__init__`` methods name a weight (what
    ``float_weight`` reads: ``weight``, ``weight_*``); ``None`` when a source cannot be read (classes made by
    ``exec``), so only a class whose every ``__init__`` is readable is refused.

    Example:
        >>> _declares_weight(nn.Linear), _declares_weight(nn.LSTMCell), _declares_weight(nn.ReLU)
        (True, True, False)
    """
    known = True
    for klass in float_type.__mro__:
        if klass in (nn.Module, object):
            continue
        if any(name.startswith("weight") for name in vars(klass).get("__annotations__", {})):
            return True
        init = vars(klass).get("__init__")
        if init is None:
            continue
        try:
            file = inspect.getsourcefile(init)
            source = inspect.getsource(init) if file and os.path.isabs(file) and os.path.isfile(file) else None
        except (OSError, TypeError):
            source = None
        if source is None:
            known = False
        elif "weight" in source:
            return True
    return False if known else None


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
    if float_weight(module) is None:
        return None, f"{type(module).__name__} has no weight to quantize"
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
    return config.replace(dtype=cls.dtypes[0], mode="dynamic", smoothquant=None)


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
