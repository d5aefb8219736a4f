"""Reading a mono-quant file's header, tensor specs and tensors, whatever its container.

``open_file`` parses the metadata and ``{name: (dtype, shape)}`` of a ``.safetensors`` or ``.pt`` file
without reading tensor data and returns a reader that loads tensors by name into fresh aligned memory;
tensors written once for several names (tied weights) are listed and read under every name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mono_quant.errors import SerializationError
from mono_quant.io.disk import read_safetensors
from mono_quant.io.format import FORMAT_VERSION, METADATA_KEY, ST_DTYPES
from mono_quant.io.hf_read import open_hf_dir
from mono_quant.io.validate import validate_metadata
from mono_quant.modules import QUANTIZED_CLASSES

Spec = tuple[torch.dtype, tuple[int, ...]]


def open_file(path: Path) -> tuple[dict[str, Any], dict[str, Spec], Callable[[list[str]], dict[str, torch.Tensor]]]:
    """Parse a file's metadata and tensor specs; the returned reader loads tensors by name."""
    if path.is_dir() and any(path.glob("*.safetensors*")):  # a save_pretrained folder

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
    if metadata.get("layout") == "compressed-tensors":  # one file of a quantize_checkpoint / save_pretrained folder

        return open_hf_dir(path, _parse_metadata)
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
