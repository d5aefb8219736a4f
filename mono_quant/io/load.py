"""Quantized checkpoints: ``save`` / ``load`` (``.safetensors`` or ``.pt``) and ``dequantize`` back to float.

File layout (DESIGN.md section 5): tensors keep the names and dtypes of the quantized modules'
``state_dict`` (compressed-tensors conventions); the safetensors header ``__metadata__`` holds
``{"format": "pt", "mono_quant": "<json>"}``. A ``.pt`` file is ``torch.save({"mono_quant": "<json>",
"tensors": {...}})``, which ``torch.load(..., weights_only=True)`` accepts. The JSON document has
``format``, ``format_version``, ``mono_quant_version``, ``quantization_config`` (compressed-tensors
style), ``config`` (the ``QuantizationConfig`` used, or ``null``), ``layers`` (module name -> the
module's ``metadata()`` plus ``class``, float weight ``shape``, ``bias`` and ``sqnr_db``) and ``skipped``.

Every tensor's dtype and shape is checked against the metadata (and against the given model) before
anything is loaded, so a bad file raises ``SerializationError`` and never half-loads a model.
"""

from __future__ import annotations

import contextlib
import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.copying import bake_parametrized_weights
from mono_quant.engine.dequantize import dequantize, dequantize_in_place, dequantize_tensors, meta_float_module
from mono_quant.errors import SerializationError
from mono_quant.graph.fused_graph import enable_fused_forward
from mono_quant.io.format import FORMAT_VERSION
from mono_quant.io.read import Spec, open_file, sniff
from mono_quant.io.save import save, save_state_dict
from mono_quant.io.validate import check_values
from mono_quant.modules import QUANTIZED_CLASSES, REGISTRY, QuantizedLayer
from mono_quant.modules.attach import Attachment, expected_keys, install, proxy_module
from mono_quant.modules.folded_batchnorm import fold_pairs

__all__ = ["FORMAT_VERSION", "dequantize", "load", "read_header", "save", "save_state_dict", "sniff"]

# ----------------------------------------------------------------------------------------- load


def load(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    dequantize: bool = False,
    map_location: str | torch.device = "cpu",
) -> nn.Module | tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a file written by ``save``.

    With ``model`` (a float model of the same architecture; its weights do not matter and it is not
    modified) returns a deep copy with the quantized layers rebuilt and every tensor loaded, or with
    ``dequantize=True`` a plain float model. Without ``model`` returns ``(state_dict, metadata)``:
    ``state_dict`` maps every tensor name in the file to a tensor with its stored dtype (or, with
    ``dequantize=True``, each quantized layer's tensors replaced by float32 ``<layer>.weight`` in the
    original shape and ``<layer>.bias``); ``metadata`` is the parsed JSON document (see the module
    docstring). Tensors are read into fresh, 64-byte aligned memory (no memory map: truncating or
    replacing the file afterwards cannot change or crash the result) and their values are checked
    (finite, positive scales) before anything is assigned. Tensors are put on ``map_location``.

    Example:
        >>> import tempfile, mono_quant as mq
        >>> float_model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> q, _ = mq.dynamic_quantize(float_model)
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> mq.save(q, path)
        >>> skeleton = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> x = torch.randn(3, 32)
        >>> torch.equal(load(path, model=skeleton)(x), q(x))
        True
        >>> type(load(path, model=skeleton, dequantize=True)[0]).__name__
        'Linear'
        >>> state_dict, metadata = load(path)
        >>> state_dict["0.weight"].dtype, metadata["format_version"]
        (torch.int8, 1)
    """
    path = Path(path)
    metadata, specs, read = open_file(path)
    if model is None:
        _check_against_metadata(path, metadata["layers"], specs)
        tensors = read(list(specs))
        check_values(path, metadata["layers"], tensors)
        if dequantize:
            tensors = dequantize_tensors(tensors, metadata["layers"])
        return {k: v.to(map_location) for k, v in tensors.items()}, metadata
    if not isinstance(model, nn.Module):
        raise SerializationError(f"cannot load {path} into {type(model).__name__}; expected a torch.nn.Module")
    q_model = _build_shells(path, _fold_like_file(path, model, metadata), metadata["layers"])
    buffers = _non_persistent_specs(path, q_model, metadata, specs)
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in q_model.state_dict().items()}
    unread = {name: specs[name] for name in metadata.get("non_persistent") or [] if name in specs}
    _check_specs(path, {k: v for k, v in specs.items() if k not in unread or k in buffers}, {**expected, **buffers},
                 "the given model")  # fmt: skip
    tensors = read(list(specs))
    check_values(path, metadata["layers"], tensors)
    q_model.load_state_dict({k: v for k, v in tensors.items() if k not in buffers}, strict=True, assign=True)
    for name in buffers:  # what a state_dict leaves out: a meta-device skeleton would have no values
        owner, _, attribute = name.rpartition(".")
        q_model.get_submodule(owner)._buffers[attribute] = tensors[name]
    _check_nothing_meta(path, q_model)
    if dequantize:
        q_model = dequantize_in_place(q_model)
    q_model = q_model.to(map_location).eval()
    enable_fused_forward(q_model)  # the same fused CPU conv graph as quantize installs (graph/fused_graph.py)
    return q_model


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Spec]]:
    """The parsed metadata and ``{tensor name: (dtype, shape)}`` of a file, without reading tensor data
    (for ``.safetensors``; a ``.pt`` file is memory-mapped). The tensors are checked against the metadata.

    Example:
        >>> import tempfile, mono_quant as mq
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> mq.save(mq.dynamic_quantize(nn.Sequential(nn.Linear(16, 4)))[0], path)
        >>> read_header(path)[1]["0.weight"]
        (torch.int8, (4, 16))
    """
    path = Path(path)
    metadata, specs, _ = open_file(path)
    _check_against_metadata(path, metadata["layers"], specs)
    return metadata, specs


def _shell(path: Path, name: str, float_module: nn.Module, entry: dict[str, Any]) -> nn.Module:
    try:
        with torch.device("meta") if _is_meta(float_module) else contextlib.nullcontext():
            return QUANTIZED_CLASSES[entry["class"]].from_metadata(float_module, entry)
    except Exception as err:
        raise SerializationError(f"cannot load {path}: layer {name!r} metadata is inconsistent ({err})") from None


def _is_meta(module: nn.Module | None) -> bool:
    return module is None or any(t.is_meta for t in module.parameters())


def _non_persistent_specs(
    path: Path, model: nn.Module, metadata: dict[str, Any], specs: dict[str, Spec]
) -> dict[str, Spec]:
    """The file's tensors that are non-persistent buffers of ``model`` (written by ``mq.save``, or kept by a
    checkpoint from a library version that saved them: transformers' ``embeddings.position_ids``), with the
    spec the model expects. The file's other non-persistent buffers are left unread: they are derived values
    (rotary frequencies, masks), not weights, so a skeleton without them loads."""
    found = {}
    for name in specs:
        owner, _, attribute = name.rpartition(".")
        try:
            module = model.get_submodule(owner)
        except AttributeError:
            continue
        if attribute in module._non_persistent_buffers_set:
            value = module._buffers.get(attribute)
            found[name] = specs[name] if value is None else (value.dtype, tuple(value.shape))
    return found


def _check_nothing_meta(path: Path, model: nn.Module) -> None:
    """A meta-device skeleton's tensors that the file did not fill would fail later as a raw torch error."""
    left = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if left is not None:
        raise SerializationError(
            f"cannot load {path}: tensor {left!r} of the given model is on the meta device and the file does not "
            "hold it (a buffer the model computes when built, such as rotary frequencies); build the model on "
            "the CPU, or write the file with mq.save(q_model), which stores such buffers"
        )


def _check_against_metadata(path: Path, layers: dict[str, dict[str, Any]], specs: dict[str, Spec]) -> None:
    """Each quantized layer's tensors must have exactly the dtypes and shapes its metadata implies."""
    for name, entry in layers.items():
        shell = _shell(path, name, meta_float_module(entry), entry)
        prefix = f"{name}." if name else ""
        names = expected_keys(shell, entry["attach"]["attribute"] if "attach" in entry else None)
        expected = {prefix + names[k]: (v.dtype, tuple(v.shape)) for k, v in shell.state_dict().items()}
        found = {k: v for k, v in specs.items() if k.rpartition(".")[0] == name}
        if "attach" in entry:  # the owner's other tensors (bias, ...) are checked against the model
            found = {k: v for k, v in found.items() if k in expected}
        _check_specs(path, found, expected, f"the metadata of layer {name!r}")


def _check_specs(path: Path, specs: dict[str, Spec], expected: dict[str, Spec], what: str) -> None:
    for key, (dtype, shape) in expected.items():
        if key not in specs:
            raise SerializationError(f"cannot load {path}: tensor {key!r} required by {what} is missing from the file")
        if specs[key] != (dtype, shape):
            found_dtype, found_shape = specs[key]
            raise SerializationError(
                f"cannot load {path}: tensor {key!r} is {_describe(found_dtype, found_shape)} in the file "
                f"but {what} expects {_describe(dtype, shape)}"
            )
    extra = next((key for key in specs if key not in expected), None)
    if extra is not None:
        raise SerializationError(f"cannot load {path}: tensor {extra!r} in the file has no place in {what}")


def _describe(dtype: torch.dtype, shape: tuple[int, ...]) -> str:
    return f"{str(dtype).removeprefix('torch.')} {list(shape)}"


def _fold_like_file(path: Path, model: nn.Module, metadata: dict[str, Any]) -> nn.Module:
    """``model`` with the BatchNorms that were folded before quantization folded the same way (a copy).

    The file's record of folded pairs decides (no detection: a fresh skeleton is in train mode and the
    pairs may have been proven on calibration data); the folded values do not matter (the conv tensors
    come from the file).
    """
    folded = metadata.get("folded_batchnorm") or {}
    if not folded:
        return model
    copied = copy.deepcopy(model)
    try:
        fold_pairs(copied, folded)
    except ValueError as err:
        raise SerializationError(f"cannot load {path}: the file folded BatchNorm {err}") from None
    return copied


def _build_shells(path: Path, model: nn.Module, layers: dict[str, dict[str, Any]]) -> nn.Module:
    """Deep-copy ``model`` with each quantized layer swapped for an empty shell; ``model`` is untouched.

    The float tensors of the replaced layers are not copied (they map to meta tensors in the copy).
    """
    originals = dict(model.named_modules())
    memo: dict[int, Any] = {}
    classes: dict[str, type[QuantizedLayer]] = {}
    for name, entry in layers.items():
        module = originals.get(name)
        if module is None:
            raise SerializationError(f"cannot load {path}: layer {name!r} is not in the given model")
        cls = classes[name] = _class_for(module, entry)
        if "attach" in entry:
            attribute = entry["attach"]["attribute"]
            if list(getattr(module, attribute, torch.empty(0)).shape) != entry["attach"]["shape"]:
                raise SerializationError(
                    f"cannot load {path}: layer {name!r} has no {attribute!r} of shape {entry['attach']['shape']} "
                    "in the given model"
                )
            tensor = getattr(module, attribute)
            memo[id(tensor)] = _meta_like(tensor)
            continue
        if type(module) is not cls.float_type:
            raise SerializationError(
                f"cannot load {path}: layer {name!r} is {type(module).__name__} in the given model "
                f"but {cls.float_type.__name__} in the file"
            )
        weight_shape = _first_weight_shape(module)
        if weight_shape != entry["shape"] and len(weight_shape) == len(entry["shape"]):
            raise SerializationError(
                f"cannot load {path}: layer {name!r} has weight shape {weight_shape} in the given model "
                f"but {entry['shape']} in the file"
            )
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            memo[id(tensor)] = copy.deepcopy(tensor, {}) if tensor.is_meta else _meta_like(tensor)
    q_model = copy.deepcopy(model, memo)
    bake_parametrized_weights(q_model)  # as quantize did: weight norm & co. became plain weights
    modules = dict(q_model.named_modules())
    for name, entry in layers.items():
        if "attach" in entry:
            attachment = Attachment(**{k: v for k, v in entry["attach"].items() if k != "shape"})
            proxy = proxy_module(modules[name], attachment)
            install(modules[name], attachment, _shell(path, name, proxy, {**entry, "class": classes[name].__name__}))
            continue
        shell = _shell(path, name, modules[name], {**entry, "class": classes[name].__name__})
        if not name:
            return shell
        q_model.set_submodule(name, shell)
    return q_model


def _first_weight_shape(module: nn.Module) -> list[int]:
    """The shape of ``weight``, or of the first of several matrices (``nn.LSTM``'s ``weight_ih_l0``)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = next((p for n, p in module.named_parameters(recurse=False) if n.startswith("weight_")), None)
    return [] if weight is None else list(weight.shape)


def _class_for(module: nn.Module, entry: dict[str, Any]) -> type[QuantizedLayer]:
    """The entry's class, or a class registered for ``module``'s type that loads the entry's tensors
    (``QuantizedLayer.loads_entry``: a bare state_dict's matrix quantized as a Linear fits an Embedding)."""
    cls = QUANTIZED_CLASSES[entry["class"]]
    if type(module) is cls.float_type:
        return cls
    return next((other for other in REGISTRY.get(type(module), ()) if other.loads_entry(entry, module)), cls)


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
