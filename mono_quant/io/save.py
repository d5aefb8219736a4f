"""Writing quantized checkpoints: ``save`` / ``save_state_dict`` build the metadata document (see
``mono_quant.io.load``) and write ``.safetensors`` or ``.pt`` atomically (``file_io.atomic_write``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from mono_quant._version import __version__
from mono_quant.config import QuantizationConfig
from mono_quant.errors import SerializationError
from mono_quant.io.disk import atomic_write
from mono_quant.io.format import FORMAT_VERSION, METADATA_KEY, TORCH_SUFFIXES
from mono_quant.modules import QuantizedLayer, class_for_kind
from mono_quant.modules.attach import attached_tensors
from mono_quant.modules.base import require
from mono_quant.modules.folded_batchnorm import FoldedBatchNorm

if TYPE_CHECKING:  # the file format reads reports; it does not depend on the engine that makes them
    from mono_quant.engine.report import QuantizationReport



def save(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    config: QuantizationConfig | None = None,
    report: QuantizationReport | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Write a quantized model (or the state_dict ``quantize`` returns for a state_dict, or the whole
    ``QuantizationResult`` with its config and report) to ``path``.

    The format follows the suffix: ``.safetensors``, or ``.pt``/``.pth``. The write is atomic: a
    temporary file in the same directory is renamed over ``path`` only once complete, with the mode a
    plain ``open`` gives. ``config`` and ``report`` (per-layer SQNR, skipped layers) are stored in the
    metadata when given; ``extra_metadata`` (a dict of JSON values, e.g. a caller's gate result) is stored
    in the metadata document under ``"extra"``, so a caller never rewrites the file to add its own record.

    Example:
        >>> import tempfile, mono_quant as mq
        >>> q, _ = mq.dynamic_quantize(nn.Sequential(nn.Linear(32, 8)))
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> save(q, path, extra_metadata={"run": {"passed": True}})
        >>> metadata = mq.load(path)[1]
        >>> metadata["layers"]["0"]["class"], metadata["extra"]
        ('Int8Linear', {'run': {'passed': True}})
        >>> save(q, path, extra_metadata={"score": float("nan")})
        Traceback (most recent call last):
        ...
        mono_quant.errors.SerializationError: cannot save to ...: extra_metadata={'score': nan} is not JSON ...
    """
    if _is_result(model_or_state_dict):  # a QuantizationResult: its model, with its config and report
        result = model_or_state_dict
        config, report = config or result.config, report or result.report
        save(result.model, path, config=config, report=report, extra_metadata=extra_metadata)
        return
    if isinstance(model_or_state_dict, nn.Module):
        layers = model_layers(model_or_state_dict)
        folded = {name: m.into for name, m in model_or_state_dict.named_modules() if isinstance(m, FoldedBatchNorm)}
        buffers = non_persistent_buffers(model_or_state_dict)  # so a meta-device skeleton loads complete
        tensors = {**model_or_state_dict.state_dict(), **buffers}
        _write(path, tensors, layers, config, report, folded, list(buffers), extra_metadata)
    elif isinstance(model_or_state_dict, Mapping):
        save_state_dict(model_or_state_dict, path, config=config, report=report, extra_metadata=extra_metadata)
    else:
        raise SerializationError(
            f"cannot save {type(model_or_state_dict).__name__} to {os.fspath(path)}; "
            "expected a torch.nn.Module or a state_dict"
        )


def _is_result(value: Any) -> bool:
    """Whether ``value`` is a ``QuantizationResult`` (told by its fields: the file format does not import the
    engine that makes them)."""
    return all(hasattr(value, field) for field in ("model", "report", "config", "skipped"))


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    config: QuantizationConfig | None = None,
    report: QuantizationReport | None = None,
    float_shapes: Mapping[str, tuple[int, ...]] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> None:
    """Save a quantized state_dict; quantized layers are recognized from ``report`` or tensor names.

    ``float_shapes`` (layer name -> original float weight shape) restores the 4-D shape of Conv2d
    layers, which a quantized state_dict only holds flattened. Int8 layers without ``input_scale``
    are recorded with ``config.mode`` (``dynamic`` when no config is given). ``extra_metadata`` as in ``save``.

    Example:
        >>> import tempfile, mono_quant as mq
        >>> result = mq.quantize({"fc.weight": torch.randn(8, 32)}, dtype="int4", group_size=32)
        >>> path = os.path.join(tempfile.mkdtemp(), "sd.pt")
        >>> save_state_dict(result.model, path, config=result.config, report=result.report)
        >>> mq.load(path)[1]["layers"]["fc"]["bits"]
        4
    """
    bad = next((k for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise SerializationError(f"cannot save to {os.fspath(path)}: entry {bad!r} is not a named tensor")
    layers = state_dict_layers(state_dict, config, report, float_shapes or {})
    _write(path, state_dict, layers, config, report, extra_metadata=extra_metadata)


def _has_bias(module: nn.Module) -> bool:
    bias = getattr(module, "bias", None)
    return bias is True or isinstance(bias, torch.Tensor)  # recurrent layers hold a flag


def model_layers(model: nn.Module) -> dict[str, dict[str, Any]]:
    layers = {
        name: {
            "class": type(module).__name__,
            **module.metadata(),
            "shape": module.float_shape(),
            "bias": _has_bias(module),
        }
        for name, module in model.named_modules()
        if isinstance(module, QuantizedLayer)
    }
    for name, (attachment, tensor) in attached_tensors(model).items():
        layer = tensor.layer
        entry = {"class": type(layer).__name__, **layer.metadata(), "shape": layer.float_shape(), "bias": False}
        layers[name] = {**entry, "attach": {**attachment.to_dict(), "shape": list(tensor.shape)}}
    return layers


def state_dict_layers(
    tensors: Mapping[str, torch.Tensor],
    config: QuantizationConfig | None,
    report: QuantizationReport | None,
    float_shapes: Mapping[str, tuple[int, ...]],
) -> dict[str, dict[str, Any]]:
    if report is not None:
        kinds = {row.name: (row.kind, row.bits) for row in report.layers}
    else:  # without a report only integer layers are recognizable (by their scale tensors)
        kinds = {}
        for key in tensors:
            if key.endswith(".weight_scale"):
                name = key[: -len(".weight_scale")]
                kinds[name] = ("Linear", 4 if f"{name}.weight_packed" in tensors else 8)
    mode = config.mode.value if config is not None else "dynamic"
    layers = {}
    for name, (kind, bits) in kinds.items():
        cls = class_for_kind(kind, bits)
        action = f"cannot save layer {name!r} from a state_dict"
        found = None if cls is None else require(cls, "state_dict_entry", action, tensors, name, mode)
        if found is None:
            raise SerializationError(f"layer {name!r} ({kind}, {bits} bits) has no matching tensors in the state_dict")
        shape = found.pop("shape")
        entry = {"class": cls.__name__, **found}
        entry["shape"] = list(float_shapes.get(name, shape))
        entry["bias"] = f"{name}.bias" in tensors
        layers[name] = entry
    return layers


def _json_document(path: Path, extra: Any) -> dict[str, Any]:
    """``extra_metadata`` as a JSON object, or a ``SerializationError`` naming it (written before any byte)."""
    problem = "is not a dict with string keys"
    if isinstance(extra, Mapping) and all(isinstance(key, str) for key in extra):
        try:
            return json.loads(json.dumps(dict(extra), allow_nan=False))
        except (TypeError, ValueError):
            problem = "is not JSON (strings, finite numbers, booleans, None, lists and dicts only)"
    raise SerializationError(f"cannot save to {path}: extra_metadata={extra!r} {problem}")


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def file_metadata(
    layers: dict[str, dict[str, Any]],
    config: QuantizationConfig | None,
    report: QuantizationReport | None,
    folded: dict[str, str],
    tied: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The JSON document stored under ``METADATA_KEY``: format version, layers, config, skips, folds, ties.

    Example:
        >>> file_metadata({}, None, None, {}, {"head.weight": "emb.weight"})["tied"]
        {'head.weight': 'emb.weight'}
    """
    if report is not None:
        for row in report.layers:
            if row.name in layers:
                layers[row.name]["sqnr_db"] = _finite(row.sqnr_db)
    return {
        "format": "mono-quant",
        "format_version": FORMAT_VERSION,
        "mono_quant_version": __version__,
        "quantization_config": compressed_tensors_config(layers, config, report),
        "config": None if config is None else config.to_dict(),
        "layers": layers,
        "skipped": {} if report is None else dict(report.skipped),
        "folded_batchnorm": folded,  # BatchNorm name -> the conv it was folded into
        "tied": tied or {},  # tensor name -> the name it is stored under (one tensor in memory)
    }


def non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's non-persistent buffers (left out of ``state_dict``) by full name, except the derived
    caches of quantized layers (recomputed on load).

    Example:
        >>> m = nn.Module()
        >>> m.register_buffer("inv_freq", torch.ones(2), persistent=False)
        >>> list(non_persistent_buffers(m))
        ['inv_freq']
    """
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLayer):
            continue
        for buffer_name in module._non_persistent_buffers_set:
            value = module._buffers.get(buffer_name)
            if isinstance(value, torch.Tensor) and not value.is_meta:
                found[f"{name}.{buffer_name}" if name else buffer_name] = value
    return found


def untie(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``tensors`` with every tensor that is the same memory as an earlier one left out, and the map
    from each left-out name to the name it is stored under.

    Example:
        >>> shared = torch.ones(2)
        >>> untie({"emb.weight": shared, "head.weight": shared, "b": torch.ones(2)})[1]
        {'head.weight': 'emb.weight'}
    """
    kept: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in tensors.items():
        key = (tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride(), tensor.device)
        if tensor.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        kept[name] = tensor
    return kept, tied


def compressed_tensors_config(
    layers: dict[str, dict[str, Any]], config: QuantizationConfig | None, report: QuantizationReport | None
) -> dict[str, Any]:
    """A compressed-tensors style ``quantization_config``: one config group per distinct scheme."""
    act_symmetric = config is not None and config.activation_scheme.value == "symmetric"
    groups: dict[str, dict[str, Any]] = {}
    for name, entry in layers.items():
        bits, mode = entry["bits"], entry["mode"]
        if bits == 16:
            weights = {"num_bits": 16, "type": "float", "dtype": entry["dtype"], "strategy": "tensor"}
            fmt, acts = "float-quantized", None
        else:
            per_group = bits == 4
            strategy = "group" if per_group else ("channel" if len(entry.get("scale_shape", [1])) == 1 else "tensor")
            weights = {"num_bits": bits, "type": "int", "symmetric": entry["scheme"] == "symmetric",
                       "strategy": strategy, "group_size": entry.get("group_size"), "dynamic": False}  # fmt: skip
            acts = None
            if mode == "dynamic":
                acts = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
            elif mode == "static":
                symmetric = entry.get("activation_symmetric", act_symmetric)
                acts = {"num_bits": 8, "type": "int", "symmetric": symmetric, "strategy": "tensor",
                        "dynamic": False}  # fmt: skip
            fmt = "pack-quantized" if per_group else ("int-quantized" if acts else "naive-quantized")
            fmt = entry.get("storage_format", fmt)  # save_pretrained: int4 kept unpacked in int8 where needed
        key = json.dumps([weights, acts, fmt], sort_keys=True)
        group = groups.setdefault(key, {"targets": [], "weights": weights, "input_activations": acts,
                                        "output_activations": None, "format": fmt})  # fmt: skip
        group["targets"].append(name)
    formats = {g["format"] for g in groups.values()}
    return {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": {f"group_{i}": group for i, group in enumerate(groups.values())},
        "ignore": [] if report is None else sorted(report.skipped),
    }


def plain_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, one storage per tensor (safetensors refuses shared storage)."""
    out, seen = {}, set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        storage = value.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != value.numel() * value.element_size():
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[key] = value
    return out


def _write(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    layers: dict[str, dict[str, Any]],
    config: QuantizationConfig | None,
    report: QuantizationReport | None,
    folded: dict[str, str] | None = None,
    non_persistent: list[str] | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
) -> None:
    path = Path(path)
    if path.suffix not in (".safetensors", *TORCH_SUFFIXES):
        raise SerializationError(f"cannot save to {path}: unknown extension; expected .safetensors, .pt or .pth")
    tensors, tied = untie(tensors)
    metadata = file_metadata(layers, config, report, folded or {}, tied)
    metadata["non_persistent"] = non_persistent or []  # buffers a state_dict leaves out (rotary inv_freq...)
    if extra_metadata is not None:
        metadata["extra"] = _json_document(path, extra_metadata)
    text = json.dumps(metadata, allow_nan=False)
    plain = plain_tensors(tensors)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(plain, tmp, metadata={"format": "pt", METADATA_KEY: text}))
    else:
        atomic_write(path, lambda tmp: torch.save({METADATA_KEY: text, "tensors": plain}, tmp))
