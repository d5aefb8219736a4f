"""Safetensors checkpoints on disk, one tensor at a time: the source layout (the writer is ``io/hf_write.py``).

The Hugging Face layout is ``<prefix>-0000K-of-0000N.safetensors`` shards plus
``<prefix>.safetensors.index.json`` (``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}``);
a small checkpoint is one ``*.safetensors`` file. ``open_source`` validates the index against every
shard's header (no tensor data is read); ``SourceCheckpoint.read`` returns one tensor backed by the
file's memory map (its pages count as resident only while the tensor lives).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from mono_quant.errors import SerializationError
from mono_quant.io.format import ST_DTYPES

INDEX_SUFFIX = ".safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where a source tensor lives and what it is, from the shard header."""

    shard: Path
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class SourceCheckpoint:
    """A validated source: its folder, index file (``None`` for a single file), shards and tensors.

    ``tensors`` is ordered shard by shard, then by name.
    """

    root: Path
    index: Path | None
    shards: tuple[Path, ...]
    tensors: dict[str, TensorInfo]

    @property
    def prefix(self) -> str:
        """``model`` for ``model.safetensors.index.json`` or ``model.safetensors``."""
        name = self.index.name if self.index is not None else self.shards[0].name
        return name.removesuffix(INDEX_SUFFIX).removesuffix(".safetensors")

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name``, memory-mapped from its shard (copy-on-write: the file is never modified)."""
        info = self.tensors[name]
        try:
            with safe_open(str(info.shard), framework="pt") as handle:
                return handle.get_tensor(name)
        except Exception as err:
            detail = " ".join(str(err).split()) or type(err).__name__
            raise SerializationError(f"cannot read tensor {name!r} from {info.shard}: {detail}") from err


def open_source(src: str | os.PathLike) -> SourceCheckpoint:
    """Resolve ``src`` (a folder, an ``*.safetensors.index.json`` or one ``*.safetensors`` file) and check it.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> folder = Path(tempfile.mkdtemp())
        >>> save_file({"fc.weight": torch.zeros(2, 4)}, folder / "model.safetensors")
        >>> source = open_source(folder)
        >>> source.prefix, source.index, source.tensors["fc.weight"].shape
        ('model', None, (2, 4))
    """
    path = Path(src)
    if path.is_dir():
        indexes = sorted(path.glob(f"*{INDEX_SUFFIX}"))
        files = sorted(path.glob("*.safetensors"))
        if len(indexes) > 1:
            raise SerializationError(f"cannot read {path}: several index files {[p.name for p in indexes]}")
        if indexes:
            return _from_index(indexes[0])
        if len(files) != 1:
            found = [p.name for p in files] or "none"
            raise SerializationError(
                f"cannot read {path}: expected one *.safetensors file or an *{INDEX_SUFFIX}; found {found}"
            )
        return _from_files(path, None, {files[0]: None})
    if path.name.endswith(INDEX_SUFFIX):
        return _from_index(path)
    if path.suffix == ".safetensors":
        return _from_files(path.parent, None, {path: None})
    raise SerializationError(f"cannot read {path}: expected a folder, an *{INDEX_SUFFIX} or a *.safetensors file")


def _from_index(index: Path) -> SourceCheckpoint:
    if not index.is_file():
        raise SerializationError(f"cannot read {index}: no such file")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise SerializationError(
            f"cannot read {index}: not a safetensors index ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SerializationError(f"cannot read {index}: 'weight_map' must map tensor names to shard files")
    shards: dict[Path, list[str]] = {}
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file:
            raise SerializationError(f"cannot read {index}: tensor {name!r} maps to {file!r}, not a file name")
        shards.setdefault(index.parent / file, []).append(name)
    return _from_files(index.parent, index, shards)


def _from_files(root: Path, index: Path | None, shards: dict[Path, list[str] | None]) -> SourceCheckpoint:
    """Read every shard header; with an index, its map and the headers must agree exactly."""
    tensors: dict[str, TensorInfo] = {}
    for shard, expected in sorted(shards.items()):
        if not shard.is_file():
            what = f" (holds {expected[0]!r} per {index.name})" if expected and index is not None else ""
            raise SerializationError(f"cannot read {root}: shard {shard.name}{what} is missing")
        found = _header(shard)
        if expected is not None:
            missing = sorted(set(expected) - set(found))
            extra = sorted(set(found) - set(expected))
            if missing:
                raise SerializationError(f"{index}: tensor {missing[0]!r} is not in its shard {shard}")
            if extra:
                raise SerializationError(f"{index}: tensor {extra[0]!r} of {shard} is missing from the weight_map")
        tensors.update(sorted(found.items()))
    if not tensors:
        raise SerializationError(f"cannot read {root}: the checkpoint holds no tensors")
    return SourceCheckpoint(root, index, tuple(sorted(shards)), tensors)


def _header(shard: Path) -> dict[str, TensorInfo]:
    try:
        with safe_open(str(shard), framework="pt") as handle:
            out = {}
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                piece = handle.get_slice(name)
                dtype = ST_DTYPES.get(piece.get_dtype())
                if dtype is None:
                    raise SerializationError(f"{shard}: tensor {name!r} has unsupported dtype {piece.get_dtype()}")
                out[name] = TensorInfo(shard, dtype, tuple(piece.get_shape()))
            return out
    except SerializationError:
        raise
    except Exception as err:  # safetensors raises several types for corrupt input
        detail = " ".join(str(err).split()) or type(err).__name__
        raise SerializationError(f"cannot read {shard}: not a readable safetensors file ({detail})") from err
