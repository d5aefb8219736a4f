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
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from mono_quant.copying import bake_parametrized_weights
from mono_quant.errors import SerializationError
from mono_quant.file_checks import check_values, validate_metadata
from mono_quant.file_io import read_safetensors
from mono_quant.file_write import FORMAT_VERSION, METADATA_KEY, save, save_state_dict
from mono_quant.fusion import fold_pairs
from mono_quant.modules import QUANTIZED_CLASSES, QuantizedLayer
from mono_quant.modules.attach import Attachment, attached_tensors, expected_keys, install, proxy_module

__all__ = ["FORMAT_VERSION", "dequantize", "load", "read_header", "save", "save_state_dict", "sniff"]

ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip

Spec = tuple[torch.dtype, tuple[int, ...]]


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
    metadata, specs, read = _open(path)
    if model is None:
        _check_against_metadata(path, metadata["layers"], specs)
        tensors = read(list(specs))
        check_values(path, metadata["layers"], tensors)
        if dequantize:
            tensors = _dequantize_tensors(tensors, metadata["layers"])
        return {k: v.to(map_location) for k, v in tensors.items()}, metadata
    if not isinstance(model, nn.Module):
        raise SerializationError(f"cannot load {path} into {type(model).__name__}; expected a torch.nn.Module")
    q_model = _build_shells(path, _fold_like_file(path, model, metadata), metadata["layers"])
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in q_model.state_dict().items()}
    _check_specs(path, specs, expected, "the given model")
    tensors = read(list(specs))
    check_values(path, metadata["layers"], tensors)
    q_model.load_state_dict(tensors, strict=True, assign=True)
    if dequantize:
        q_model = _dequantize_in_place(q_model)
    return q_model.to(map_location).eval()


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
    metadata, specs, _ = _open(path)
    _check_against_metadata(path, metadata["layers"], specs)
    return metadata, specs


def _open(path: Path) -> tuple[dict[str, Any], dict[str, Spec], Callable[[list[str]], dict[str, torch.Tensor]]]:
    """Parse a file's metadata and tensor specs; the returned reader loads tensors by name."""
    if path.is_dir() and any(path.glob("*.safetensors*")):  # a save_pretrained folder
        from mono_quant.hf_read import open_hf_dir

        return _with_ties(path, *open_hf_dir(path, _parse_metadata))
    if not path.is_file():
        raise SerializationError(f"cannot load {path}: no such file")
    try:
        kind = sniff(path)
        opened = _open_safetensors(path) if kind == "safetensors" else _open_torch(path, mmap=kind == "torch-zip")
        return _with_ties(path, *opened)
    except SerializationError:
        raise
    except Exception as err:  # safetensors/torch raise many types for corrupt input
        detail = " ".join(str(err).split()) or type(err).__name__
        message = f"cannot load {path}: not a readable checkpoint (truncated or corrupt?): {detail}"
        raise SerializationError(message) from err


def _with_ties(path: Path, metadata: dict[str, Any], specs: dict[str, Spec], read: Callable) -> tuple:
    """Tensors written once for several names (``metadata["tied"]``) listed and read under every name,
    each name getting the same tensor (tied again in memory)."""
    tied = metadata.get("tied") or {}
    missing = next((f"{name} -> {source}" for name, source in tied.items() if source not in specs), None)
    if missing is not None:
        raise SerializationError(f"cannot load {path}: tied tensor {missing} is not in the file")
    if not tied:
        return metadata, specs, read

    def read_tied(names: list[str]) -> dict[str, torch.Tensor]:
        tensors = read(sorted({tied.get(name, name) for name in names}))
        return {name: tensors[tied.get(name, name)] for name in names}

    return metadata, {**specs, **{name: specs[source] for name, source in tied.items()}}, read_tied


def sniff(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"torch-zip"`` (``torch.save``) or ``"torch-legacy"``, from the first bytes.

    A safetensors file starts with its header length (8 bytes, little endian) and then ``{``; anything
    that is not a torch file is treated as safetensors so that its reader reports what is wrong.

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> torch.save({"a": torch.zeros(1)}, path)
        >>> sniff(path)
        'torch-zip'
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
    size = os.path.getsize(path)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    return "torch-legacy" if head[:1] == b"\x80" else "safetensors"


def _open_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, Spec], Callable]:
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
        specs = {}
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
            piece = handle.get_slice(name)
            dtype = ST_DTYPES.get(piece.get_dtype())
            if dtype is None:
                found = piece.get_dtype()
                raise SerializationError(f"cannot load {path}: tensor {name!r} has unsupported dtype {found}")
            specs[name] = (dtype, tuple(piece.get_shape()))
    metadata = _parse_metadata(path, header.get(METADATA_KEY))

    dtypes = {name: dtype for name, (dtype, _) in specs.items()}
    return metadata, specs, lambda names: read_safetensors(path, names, dtypes)


def _open_torch(path: Path, mmap: bool) -> tuple[dict[str, Any], dict[str, Spec], Callable]:
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    tensors = obj.get("tensors") if isinstance(obj, dict) else None
    if not isinstance(tensors, dict) or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
        raise SerializationError(f"cannot load {path}: no mono-quant metadata (a plain torch checkpoint?)")
    metadata = _parse_metadata(path, obj.get(METADATA_KEY))
    specs = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
    return metadata, specs, lambda names: {name: tensors[name].clone() for name in names}


def _parse_metadata(path: Path, text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        raise SerializationError(
            f"cannot load {path}: no mono-quant metadata (a plain checkpoint? read it with safetensors/torch)"
        )
    try:
        metadata = json.loads(text)
    except ValueError as err:
        raise SerializationError(f"cannot load {path}: mono-quant metadata is not valid JSON ({err})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != "mono-quant":
        raise SerializationError(f"cannot load {path}: metadata is not a mono-quant document")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise SerializationError(f"cannot load {path}: format_version={version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise SerializationError(
            f"cannot load {path}: format_version={version} was written by a newer mono-quant "
            f"({metadata.get('mono_quant_version')}); this one reads up to {FORMAT_VERSION}: upgrade mono-quant"
        )
    layers = metadata.get("layers")
    if not isinstance(layers, dict):
        raise SerializationError(f"cannot load {path}: metadata has no 'layers' table")
    for name, entry in layers.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("class"), str)
            or entry["class"] not in QUANTIZED_CLASSES
        ):
            found = entry.get("class") if isinstance(entry, dict) else entry
            raise SerializationError(f"cannot load {path}: layer {name!r} has unknown class {found!r}")
        missing = [k for k in ("kind", "mode", "bits", "shape", "bias") if k not in entry]
        if missing:
            raise SerializationError(f"cannot load {path}: layer {name!r} metadata lacks {missing}")
    validate_metadata(path, metadata)
    return metadata


def _meta_float_module(entry: dict[str, Any]) -> nn.Module:
    """A float module on the meta device shaped per a layer entry (no memory, no init cost)."""
    shape, bias, kind = entry["shape"], bool(entry["bias"]), entry["kind"]
    if kind == "Conv2d":
        kernel = tuple(shape[2:]) if len(shape) == 4 else (1, 1)  # a flattened conv from a state_dict
        return nn.Conv2d(shape[1], shape[0], kernel, bias=bias, device="meta")
    if kind == "Embedding":
        return nn.Embedding(shape[0], shape[1], _weight=torch.empty(shape, device="meta"))  # skips a slow meta init
    return nn.Linear(shape[1], shape[0], bias=bias, device="meta")


def _shell(path: Path, name: str, float_module: nn.Module, entry: dict[str, Any]) -> nn.Module:
    try:
        with torch.device("meta") if _is_meta(float_module) else contextlib.nullcontext():
            return QUANTIZED_CLASSES[entry["class"]].from_metadata(float_module, entry)
    except Exception as err:
        raise SerializationError(f"cannot load {path}: layer {name!r} metadata is inconsistent ({err})") from None


def _is_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in module.parameters())


def _check_against_metadata(path: Path, layers: dict[str, dict[str, Any]], specs: dict[str, Spec]) -> None:
    """Each quantized layer's tensors must have exactly the dtypes and shapes its metadata implies."""
    for name, entry in layers.items():
        shell = _shell(path, name, _meta_float_module(entry), entry)
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
        weight_shape = list(module.weight.shape)
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
        parent, _, child = name.rpartition(".")
        setattr(q_model.get_submodule(parent), child, shell)
    return q_model


def _class_for(module: nn.Module, entry: dict[str, Any]) -> type[QuantizedLayer]:
    """The entry's class; a 2-D weight quantized from a bare state_dict as a Linear fits an Embedding
    too (same tensors) when it has no bias and symmetric per-row scales."""
    name = entry["class"]
    linear_like = type(module) is nn.Embedding and not entry["bias"] and entry.get("scheme", "symmetric") == "symmetric"
    if linear_like and name == "Int8Linear" and entry.get("scale_shape") == [module.num_embeddings]:
        name = "Int8Embedding"
    elif linear_like and name == "HalfLinear":
        name = "HalfEmbedding"
    elif type(module) is nn.Embedding and not entry["bias"] and name == "Int4Linear":
        name = "Int4Embedding"  # same tensors, either scheme
    return QUANTIZED_CLASSES[name]


def _meta_like(tensor: torch.Tensor) -> torch.Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


# ------------------------------------------------------------------------------------ dequantize


def dequantize(q_model: nn.Module) -> nn.Module:
    """A copy of ``q_model`` with every quantized layer replaced by a plain float32 ``nn.Linear``/
    ``nn.Conv2d``/``nn.Embedding`` holding the dequantized weight; ``q_model`` is not modified.

    Example:
        >>> import mono_quant as mq
        >>> q, _ = mq.dynamic_quantize(nn.Sequential(nn.Linear(16, 4)))
        >>> f = dequantize(q)
        >>> type(f[0]).__name__, torch.equal(f[0].weight, q[0].dequantized_weight())
        ('Linear', True)
    """
    if isinstance(q_model, QuantizedLayer):
        return q_model.dequantize()
    return _dequantize_in_place(copy.deepcopy(q_model))


def _dequantize_in_place(model: nn.Module) -> nn.Module:
    if isinstance(model, QuantizedLayer):
        return model.dequantize()
    for name, (attachment, tensor) in attached_tensors(model).items():
        module = model.get_submodule(name)
        del module._buffers[attachment.attribute]
        module.register_parameter(attachment.attribute, nn.Parameter(tensor.dequantize(), requires_grad=False))
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLayer):
            plain = module.dequantize().train(module.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, plain)
    return model


def _dequantize_tensors(tensors: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Replace each quantized layer's tensors by float32 ``weight`` (original shape) and ``bias``."""
    out = dict(tensors)
    for name, entry in layers.items():
        prefix = f"{name}." if name else ""
        attach = entry.get("attach")
        with torch.device("meta"):
            shell = QUANTIZED_CLASSES[entry["class"]].from_metadata(_meta_float_module(entry), entry)
        names = expected_keys(shell, attach["attribute"] if attach else None)
        own = {key: out.pop(prefix + names[key]) for key in shell.state_dict()}
        shell.load_state_dict(own, strict=True, assign=True)
        weight = shell.dequantized_weight().float()
        if attach:
            weight = weight.squeeze(-2) if attach["kind"] == "conv1d" else weight
            weight = weight.t() if attach["transposed"] else weight
            out[prefix + attach["attribute"]] = weight.reshape(attach["shape"])
            continue
        out[f"{prefix}weight"] = weight.reshape(entry["shape"])
        if "bias" in own:
            out[f"{prefix}bias"] = own["bias"].float()
    return out
