"""The one writer of a compressed-tensors folder: ``save_pretrained`` and ``quantize_checkpoint`` both write with it.

A folder holds ``model.safetensors`` (or ``<prefix>-0000K-of-0000N.safetensors`` shards and
``<prefix>.safetensors.index.json``) and ``config.json`` with the ``quantization_config``. Quantized layers are
stored in compressed-tensors layouts (``to_compressed_tensors``); the first file's header also carries
mono-quant's metadata document for the whole folder, marked ``"layout": "compressed-tensors"``, from which
``mq.load`` undoes the layout (``io/hf_read.py``).

``FolderWriter`` streams: each tensor is appended to a spill file as it comes (``ShardWriter``: memory holds one
tensor, not a shard); the shards are assembled when the whole folder is known, under temporary names, and
renamed into place. Every file is a new file renamed over its name: a symlink there (the Hugging Face cache
links ``snapshots/<rev>/model.safetensors`` to a shared blob) is replaced, never written through.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from mono_quant.errors import SerializationError
from mono_quant.io.disk import atomic_write, describe_os_error, sweep_stale_temps, temp_name
from mono_quant.io.format import METADATA_KEY, ST_DTYPES
from mono_quant.io.shards import INDEX_SUFFIX
from mono_quant.modules import class_for_kind
from mono_quant.qparams import unpack_int4_words

LAYOUT = "compressed-tensors"  # metadata["layout"] of files written here
_ST_NAMES = {dtype: name for name, dtype in ST_DTYPES.items()}
_COPY_CHUNK = 8 << 20


def to_compressed_tensors(tensors: dict[str, torch.Tensor], own: Mapping[str, str], entry: dict[str, Any]) -> None:
    """Reshape one quantized layer's tensors (``own``: state key -> tensor name) to the compressed-tensors layout.

    int8: ``weight_scale``/``weight_zero_point`` ``[out]`` -> ``[out, 1]`` (per tensor ``[1]``), static input
    parameters -> ``[1]`` (a zero ``input_zero_point`` is left out). int4 asymmetric or Embedding: the values one
    per int8 (``naive-quantized``, recorded in ``entry["storage_format"]``); transformers 5.x + compressed-tensors
    0.20 load neither packed group zero points nor packed embeddings. A static convolution's calibrated output
    parameters (mono-quant's fused CPU graph only) have no compressed-tensors field: they are left out.

    Example:
        >>> tensors = {"fc.weight": torch.zeros(4, 8, dtype=torch.int8), "fc.weight_scale": torch.ones(4)}
        >>> to_compressed_tensors(tensors, {"weight_scale": "fc.weight_scale"}, {"bits": 8})
        >>> tuple(tensors["fc.weight_scale"].shape)
        (4, 1)
    """
    for key in ("output_scale", "output_zero_point"):
        tensors.pop(own.get(key, ""), None)
    entry.pop("output_qparams", None)
    if entry["bits"] == 4:
        if entry.get("scheme") == "asymmetric" or entry["kind"] == "Embedding":
            packed = tensors.pop(own["weight_packed"])
            shape = [int(v) for v in tensors.pop(own["weight_shape"]).tolist()]
            tensors[own["weight_packed"].removesuffix("_packed")] = unpack_int4_words(packed, shape[1])
            entry["storage_format"] = "naive-quantized"
        return
    for key in ("weight_scale", "weight_zero_point"):
        if own.get(key) in tensors:
            value = tensors[own[key]]
            tensors[own[key]] = value.reshape(-1, 1) if value.dim() == 1 else value.reshape(1)
    if own.get("input_scale") in tensors:
        tensors[own["input_scale"]] = tensors[own["input_scale"]].reshape(1)
        zero_point = tensors.pop(own["input_zero_point"]).reshape(1)
        entry["activation_symmetric"] = not bool(zero_point.any())
        if zero_point.any():
            tensors[own["input_zero_point"]] = zero_point


def embedding_layers(folder: Path, layers: Iterable[str]) -> set[str] | None:
    """Which of ``layers`` (checkpoint names) are ``nn.Embedding`` modules of the transformers model that
    ``folder/config.json`` describes (built on the meta device: no memory, no weights); a name may carry the
    checkpoint's own prefix (``model.embed_tokens``). ``None`` when there is no such model to build.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "config.json").write_text('{"model_type": "bert", "architectures": ["BertModel"]}')
        >>> embedding_layers(folder, ["embeddings.word_embeddings", "pooler.dense"])
        {'embeddings.word_embeddings'}
    """
    if not (folder / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(folder)
        architecture = getattr(transformers, (config.architectures or [""])[0], None)
        with torch.device("meta"):
            model = architecture(config) if architecture is not None else transformers.AutoModel.from_config(config)
    except Exception:  # no transformers, custom code, a config it cannot build: unknown
        return None
    found = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)]
    return {layer for layer in layers for name in found if layer == name or layer.endswith(f".{name}")}


def as_embedding(entry: dict[str, Any]) -> None:
    """Record a layer quantized from a state_dict as the model's embedding, as ``save_pretrained`` does:
    weight-only (its input is token ids), the embedding class where one holds these tensors.

    Example:
        >>> entry = {"class": "Int8Linear", "kind": "Linear", "mode": "dynamic", "bits": 8, "scheme": "symmetric"}
        >>> as_embedding(entry); entry["class"], entry["mode"]
        ('Int8Embedding', 'weight_only')
    """
    entry["mode"] = "weight_only"
    cls = class_for_kind("Embedding", entry["bits"])
    if cls is not None and (entry["bits"] == 4 or entry.get("scheme") == "symmetric"):
        entry.update({"class": cls.__name__, "kind": "Embedding"})
        entry.pop("scale_shape", None)


class ShardWriter:
    """Streams tensors into one safetensors file; ``close(metadata)`` writes header and data.

    Tensors go to spill files beside ``path`` (one per alignment, so every tensor stays aligned to its
    element size); ``close`` writes the header followed by the spills.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "s.safetensors"
        >>> writer = ShardWriter(path)
        >>> writer.add("a", torch.arange(3, dtype=torch.int8)); writer.add("b", torch.ones(2))
        >>> writer.close({"format": "pt"})
        >>> from safetensors.torch import load_file
        >>> load_file(path)["a"].tolist(), writer.nbytes
        ([0, 1, 2], 11)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.nbytes = 0
        self.names: list[str] = []
        self._entries: dict[int, list[tuple[str, str, list[int], int]]] = {}
        self._spills: dict[int, Path] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` (any device/layout; written as contiguous CPU bytes)."""
        kind = _ST_NAMES.get(tensor.dtype)
        if kind is None:
            raise SerializationError(f"cannot write tensor {name!r} to {self.path}: dtype {tensor.dtype} unsupported")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        align = tensor.dtype.itemsize
        spill = self._spills.setdefault(align, self.path.with_name(f"{self.path.name}.{align}.spill"))
        append(spill, data.numpy().data)
        self._entries.setdefault(align, []).append((name, kind, list(tensor.shape), data.numel()))
        self.names.append(name)
        self.nbytes += data.numel()

    def close(self, metadata: dict[str, str]) -> None:
        """Write the file: header (padded to 8 bytes), then the spills, largest alignment first."""
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        order = sorted(self._entries, reverse=True)
        for align in order:
            for name, kind, shape, size in self._entries[align]:
                header[name] = {"dtype": kind, "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with open(self.path, "wb") as out:
            out.write(len(text).to_bytes(8, "little"))
            out.write(text)
            for align in order:
                with open(self._spills[align], "rb") as spill:
                    shutil.copyfileobj(spill, out, _COPY_CHUNK)
                self._spills[align].unlink()
            out.flush()
            os.fsync(out.fileno())

    def discard(self) -> None:
        """Remove the spills and the (partial) file."""
        for path in (*self._spills.values(), self.path):
            with contextlib.suppress(OSError):
                path.unlink()


def append(path: Path, data: memoryview) -> None:
    """Append ``data`` to the file ``path`` (the one place spill bytes are written)."""
    with open(path, "ab") as handle:
        handle.write(data)


class FolderWriter:
    """Streams tensors into the shards of a compressed-tensors folder ``out``; ``finish`` writes the folder.

    ``add(tensors)`` keeps a group (a layer's weight, scales and bias) in one shard; a new shard starts when
    the group would pass ``max_shard_bytes`` or when ``new_shard=True``. Any failure removes what was
    written so far and raises ``SerializationError`` naming ``shown`` (default ``out``).

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp())
        >>> writer = FolderWriter(out)
        >>> writer.add({"fc.weight": torch.zeros(2, 2)})
        >>> writer.finish({"format": "mono-quant", "layers": {}}, {"model_type": "bert"}, "model.safetensors")
        ['model.safetensors', 'config.json']
    """

    def __init__(self, out: Path, max_shard_bytes: int | None = None, *, shown: Path | None = None) -> None:
        self.out, self.limit, self.shown = out, max_shard_bytes, shown or out
        self.shards: list[ShardWriter] = []
        sweep_stale_temps(out)

    @property
    def nbytes(self) -> int:
        """Tensor bytes written so far."""
        return sum(shard.nbytes for shard in self.shards)

    def add(self, tensors: Mapping[str, torch.Tensor], *, new_shard: bool = False) -> None:
        """Append a group of tensors to the current shard, or to a new one (``new_shard``, or it would pass the
        limit)."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        current = self.shards[-1] if self.shards else None
        full = current is not None and self.limit is not None and current.nbytes + size > self.limit
        if current is None or ((new_shard or full) and current.names):
            self.shards.append(ShardWriter(temp_name(self.out / f"part-{len(self.shards):05d}.safetensors")))
        with self._cleanup_on_error():
            for name, tensor in tensors.items():
                self.shards[-1].add(name, tensor)

    def finish(
        self, metadata: dict[str, Any], config: dict[str, Any] | None, single_name: str | None, prefix: str = "model"
    ) -> list[str]:
        """Write the shards (the first with ``metadata``), the index unless one shard is named ``single_name``,
        and ``config.json`` (when given); remove weight files of an earlier write that these do not replace.
        Returns the names written."""
        text = json.dumps({**metadata, "layout": LAYOUT}, allow_nan=False)
        count = len(self.shards)
        if count == 1 and single_name is not None:
            names = [single_name]
        else:
            names = [f"{prefix}-{k:05d}-of-{count:05d}.safetensors" for k in range(1, count + 1)]
        with self._cleanup_on_error():
            for number, shard in enumerate(self.shards):
                shard.close({"format": "pt", **({METADATA_KEY: text} if number == 0 else {})})
            for name, shard in zip(names, self.shards, strict=True):
                os.replace(shard.path, self.out / name)  # a symlink named ``name`` is replaced, not followed
        written = list(names)
        if len(names) > 1 or single_name is None:
            weight_map = {key: name for name, shard in zip(names, self.shards, strict=True) for key in shard.names}
            index = {"metadata": {"total_size": self.nbytes}, "weight_map": dict(sorted(weight_map.items()))}
            written.append(self._write_json(f"{prefix}{INDEX_SUFFIX}", index))
        if config is not None:
            written.append(self._write_json("config.json", config))
        pattern = re.compile(re.escape(prefix) + r"(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")
        for stale in self.out.iterdir():  # weights of an earlier write would shadow or confuse these
            if pattern.fullmatch(stale.name) and stale.name not in written:
                stale.unlink()
        return written

    def _write_json(self, name: str, document: Any) -> str:
        text = json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(self.out / name, lambda tmp: Path(tmp).write_text(text), follow_links=False)
        return name

    @contextlib.contextmanager
    def _cleanup_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException as err:
            for shard in self.shards:
                shard.discard()
            if isinstance(err, OSError):
                raise SerializationError(
                    f"cannot write {self.shown}: {describe_os_error(err)}; its partial files were removed"
                ) from err
            raise
