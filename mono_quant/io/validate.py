"""Validation of what a file claims, before anything is built or assigned.

``validate_metadata`` checks every value of the JSON document (types, known classes, kinds, modes,
bits, shapes that can exist); ``check_values`` checks the numbers in the tensors (finite, positive
scales; zero points in range; int4 shapes that match). Both raise ``SerializationError`` naming the
file, the layer or tensor, and the offending value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mono_quant.config import Mode, QuantDtype, Scheme
from mono_quant.errors import SerializationError
from mono_quant.modules import QUANTIZED_CLASSES
from mono_quant.qparams import all_finite

_MODES = {m.value for m in Mode}
_SCHEMES = {s.value for s in Scheme}
_HALF = {QuantDtype.FP16.value, QuantDtype.BF16.value}
_POSITIVE = ("weight_scale", "input_scale")


def checked_shape(value: object, *, minimum: int = 0) -> tuple[int, ...] | None:
    """``value`` as a shape (a list of ints >= ``minimum`` small enough to allocate), else ``None``.

    Example:
        >>> checked_shape([64, 32]), checked_shape("64x32"), checked_shape([-64, 32]), checked_shape([2**70, 32])
        ((64, 32), None, None, None)
    """
    if not isinstance(value, (list, tuple)) or not all(type(v) is int and minimum <= v < 2**40 for v in value):
        return None
    return tuple(value) if math.prod(value) < 2**48 else None


_ATTACH_KINDS = frozenset({"linear", "conv1d", "conv2d", "embedding"})


def validate_metadata(path: Path, metadata: dict[str, Any]) -> None:
    """Every per-layer entry and top-level table of a parsed mono-quant document is well formed.

    Example:
        >>> doc = {"layers": {"fc": {"class": "Int8Linear", "kind": "Linear", "mode": "dynamic", "bits": 8,
        ...        "scheme": "symmetric", "shape": "64x32", "bias": True}}}
        >>> try:
        ...     validate_metadata(Path("m.safetensors"), doc)
        ... except SerializationError as err:
        ...     print(err)
        cannot load m.safetensors: layer 'fc' has shape='64x32'; expected a list of 2 positive integers
    """
    for name, entry in metadata["layers"].items():
        _validate_layer(path, name, entry)
    folded = metadata.get("folded_batchnorm")
    if folded is not None and not (isinstance(folded, dict) and all(isinstance(v, str) for v in folded.values())):
        raise SerializationError(
            f"cannot load {path}: folded_batchnorm={folded!r}; expected a table of BatchNorm name -> conv name"
        )
    buffers = metadata.get("non_persistent")
    if buffers is not None and not (isinstance(buffers, list) and all(isinstance(v, str) for v in buffers)):
        raise SerializationError(f"cannot load {path}: non_persistent={buffers!r}; expected a list of buffer names")
    tied = metadata.get("tied")
    if tied is not None and not (isinstance(tied, dict) and all(isinstance(v, str) for v in tied.values())):
        raise SerializationError(f"cannot load {path}: tied={tied!r}; expected a table of tensor name -> tensor name")
    skipped = metadata.get("skipped")
    if skipped is not None and not (isinstance(skipped, dict) and all(isinstance(v, str) for v in skipped.values())):
        raise SerializationError(f"cannot load {path}: skipped={skipped!r}; expected a table of layer name -> reason")
    for key in ("config", "quantization_config"):
        if metadata.get(key) is not None and not isinstance(metadata[key], dict):
            raise SerializationError(f"cannot load {path}: {key}={metadata[key]!r}; expected a table or null")


def _validate_layer(path: Path, name: str, entry: dict[str, Any]) -> None:
    def bad(key: str, expected: str) -> SerializationError:
        return SerializationError(
            f"cannot load {path}: layer {name!r} has {key}={entry.get(key)!r}; expected {expected}"
        )

    cls = QUANTIZED_CLASSES[entry["class"]]
    kind = cls.float_type.__name__
    if entry["kind"] != kind:
        raise bad("kind", f"{kind!r} for class {entry['class']}")
    bits = [cls.bits]
    if type(entry["bits"]) is not int or entry["bits"] not in bits:
        raise bad("bits", f"one of {bits} for class {entry['class']}")
    if entry["mode"] not in _MODES:
        raise bad("mode", f"one of {sorted(_MODES)}")
    if type(entry["bias"]) is not bool:
        raise bad("bias", "true or false")
    ranks = cls.weight_ranks
    shape = checked_shape(entry["shape"], minimum=1)
    if shape is None or len(shape) not in ranks:
        raise bad("shape", f"a list of {' or '.join(map(str, ranks))} positive integers")
    try:  # the class reads its own arguments from the entry (recurrent layers: their constructor arguments)
        cls.meta_float_module(entry)
    except (TypeError, ValueError, KeyError, RuntimeError) as err:
        raise SerializationError(f"cannot load {path}: layer {name!r}: {err}") from None
    if entry["bits"] == 16:
        if entry.get("dtype") not in _HALF:
            raise bad("dtype", f"one of {sorted(_HALF)}")
        return
    if entry.get("scheme") not in _SCHEMES:
        raise bad("scheme", f"one of {sorted(_SCHEMES)}")
    if type(entry.get("output_qparams", False)) is not bool:  # true: the file holds output_scale/_zero_point
        raise bad("output_qparams", "true or false (whether the layer stores a calibrated output scale)")
    if "scale_shape" in entry and checked_shape(entry["scale_shape"], minimum=1) is None:
        raise bad("scale_shape", "a list of positive integers")
    if entry["bits"] == 4 and not (type(entry.get("group_size")) is int and entry["group_size"] > 0):
        raise bad("group_size", "a positive integer")
    sqnr = entry.get("sqnr_db")
    if sqnr is not None and (type(sqnr) not in (int, float) or math.isnan(sqnr)):
        raise bad("sqnr_db", "a number or null")
    attach = entry.get("attach")
    if attach is not None and not (
        isinstance(attach, dict)
        and isinstance(attach.get("attribute"), str)
        and attach.get("attribute").isidentifier()
        and attach.get("kind") in _ATTACH_KINDS
        and type(attach.get("transposed")) is bool
        and checked_shape(attach.get("shape"), minimum=1) is not None
    ):
        raise bad("attach", f"a table of attribute, kind (one of {sorted(_ATTACH_KINDS)}), transposed and shape")


def check_values(path: Path, layers: dict[str, dict[str, Any]], tensors: dict[str, torch.Tensor]) -> None:
    """The numbers in each quantized layer's tensors are usable: finite positive scales, finite float
    values, int4 zero points in [-8, 7] and a ``weight_shape`` equal to the layer's shape.

    Example:
        >>> layers = {"fc": {"shape": [2, 8], "bits": 8}}
        >>> try:
        ...     check_values(Path("m.pt"), layers, {"fc.weight_scale": torch.tensor([0.1, float("nan")])})
        ... except SerializationError as err:
        ...     print(err)
        cannot load m.pt: tensor 'fc.weight_scale' holds nan; scales must be finite and > 0
    """
    for name, entry in layers.items():
        prefix = f"{name}." if name else ""
        for key, tensor in tensors.items():
            if key.rpartition(".")[0] == name:
                _check_tensor(path, key, key[len(prefix) :], tensor, entry)


def _check_tensor(path: Path, key: str, local: str, tensor: torch.Tensor, entry: dict[str, Any]) -> None:
    if local in _POSITIVE or local.endswith("_scale"):
        _check_positive(path, key, tensor)
    elif tensor.is_floating_point():
        _check_finite(path, key, tensor)
    elif local == "weight_zero_point" and entry["bits"] == 4 and tensor.numel():
        low, high = int(tensor.min()), int(tensor.max())
        if low < -8 or high > 7:
            value = low if low < -8 else high
            raise SerializationError(
                f"cannot load {path}: tensor {key!r} holds {value}; int4 zero points lie in [-8, 7]"
            )
    elif local == "weight_shape" and tensor.tolist() != list(entry["shape"]):
        found = tensor.tolist()
        raise SerializationError(
            f"cannot load {path}: tensor {key!r} holds {found} but the layer's shape is {entry['shape']}"
        )


def _check_positive(path: Path, key: str, tensor: torch.Tensor) -> None:
    values = tensor.detach().float().reshape(-1)
    bad = values[~(torch.isfinite(values) & (values > 0))]
    if bad.numel():
        raise SerializationError(
            f"cannot load {path}: tensor {key!r} holds {bad[0].item()}; scales must be finite and > 0"
        )


def _check_finite(path: Path, key: str, tensor: torch.Tensor) -> None:
    if all_finite(tensor):
        return
    values = tensor.detach().reshape(-1)
    bad = values[~torch.isfinite(values)]
    if bad.numel():
        raise SerializationError(f"cannot load {path}: tensor {key!r} holds {bad[0].item()}; expected finite values")
