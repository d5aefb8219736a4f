"""Reading a ``save_pretrained`` / ``quantize_checkpoint`` folder (or one file of that layout) with ``mq.load``:
one format, two layouts.

The folder's first shard carries mono-quant's metadata document (as ``mq.save`` files do), whose layer entries
say how ``save_pretrained`` changed each layer's tensors for compressed-tensors; this module undoes it
(``[out, 1]`` scales back to ``[out]``, ``[1]`` input parameters back to scalars, a symmetric layer's absent
``input_zero_point`` back to 0, int4 values stored one per byte packed again), so the folder loads through the
same checks as a file. Layers written as float (``ignore``) load as float.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from mono_quant.errors import SerializationError
from mono_quant.io.disk import read_safetensors
from mono_quant.io.format import METADATA_KEY
from mono_quant.io.shards import open_source
from mono_quant.qparams import pack_int4_words

Spec = tuple[torch.dtype, tuple[int, ...]]


def open_hf_dir(
    path: Path, parse_metadata: Callable[[Path, Any], dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, Spec], Callable[[list[str]], dict[str, torch.Tensor]]]:
    """``(metadata, specs, read)`` of a ``save_pretrained`` folder (or single file) in mono-quant's file layout."""
    source = open_source(path)
    documents = []
    for shard in source.shards:  # the first file holds the whole document; folders written before: one per shard
        with safe_open(str(shard), framework="pt") as handle:
            text = (handle.metadata() or {}).get(METADATA_KEY)
        if text is not None:
            documents.append(parse_metadata(shard, text))
    metadata = documents[0] if documents else parse_metadata(path, None)
    for other in documents[1:]:
        metadata["layers"].update(other["layers"])
        metadata.setdefault("skipped", {}).update(other.get("skipped") or {})
    layers = metadata["layers"]
    raw = {name: (info.dtype, info.shape) for name, info in source.tensors.items()}
    specs = dict(raw)
    for name, entry in layers.items():
        _convert_specs(specs, f"{name}." if name else "", entry)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        tensors: dict[str, torch.Tensor] = {}
        for shard in source.shards:
            here = [n for n, info in source.tensors.items() if info.shard == shard]
            tensors.update(read_safetensors(shard, here, {n: raw[n][0] for n in here}))
        for name, entry in layers.items():
            _convert_tensors(path, tensors, f"{name}." if name else "", entry)
        return {name: tensors[name] for name in names}

    return metadata, specs, read


def _convert_specs(specs: dict[str, Spec], prefix: str, entry: dict[str, Any]) -> None:
    if entry.get("bits") == 4:
        if entry.get("storage_format") == "naive-quantized" and prefix + "weight" in specs:
            _, (rows, cols) = specs.pop(prefix + "weight")
            specs[prefix + "weight_packed"] = (torch.int32, (rows, cols // 8))
            specs[prefix + "weight_shape"] = (torch.int64, (2,))
        return
    if entry.get("bits") != 8:
        return
    for key in ("weight_scale", "weight_zero_point"):
        if prefix + key in specs:
            specs[prefix + key] = (specs[prefix + key][0], _scale_shape(entry))
    if entry.get("mode") == "static":
        specs[prefix + "input_scale"] = (torch.float32, ())
        specs[prefix + "input_zero_point"] = (torch.int8, ())


def _convert_tensors(path: Path, tensors: dict[str, torch.Tensor], prefix: str, entry: dict[str, Any]) -> None:
    if entry.get("bits") == 4:
        if entry.get("storage_format") == "naive-quantized" and prefix + "weight" in tensors:
            values = tensors.pop(prefix + "weight")
            if (
                values.dtype != torch.int8
                or values.dim() != 2
                or (values.numel() and not -8 <= values.min() <= values.max() <= 7)
            ):
                raise SerializationError(f"cannot load {path}: {prefix}weight must hold int8 values in [-8, 7]")
            tensors[prefix + "weight_packed"] = pack_int4_words(values)
            tensors[prefix + "weight_shape"] = torch.tensor(list(values.shape), dtype=torch.int64)
        return
    if entry.get("bits") != 8:
        return
    shape = _scale_shape(entry)
    for key in ("weight_scale", "weight_zero_point"):
        if prefix + key in tensors:
            tensors[prefix + key] = _reshaped(path, tensors[prefix + key], shape, prefix + key)
    if entry.get("mode") == "static" and prefix + "input_scale" in tensors:
        tensors[prefix + "input_scale"] = _reshaped(path, tensors[prefix + "input_scale"], (), prefix + "input_scale")
        zero_point = tensors.get(prefix + "input_zero_point", torch.zeros((), dtype=torch.int8))
        tensors[prefix + "input_zero_point"] = _reshaped(path, zero_point, (), prefix + "input_zero_point")


def _scale_shape(entry: dict[str, Any]) -> tuple[int, ...]:
    """The scale shape mono-quant keeps: the entry's ``scale_shape``, else one per row (int8 embeddings)."""
    shape = entry.get("scale_shape", entry.get("shape", [0])[:1])
    return tuple(int(v) for v in shape) if isinstance(shape, list) else ()


def _reshaped(path: Path, tensor: torch.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    if tensor.numel() != torch.Size(shape).numel():
        raise SerializationError(
            f"cannot load {path}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape}"
        )
    return tensor.reshape(shape)
