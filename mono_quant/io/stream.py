"""``quantize_checkpoint``: quantize a (sharded) safetensors checkpoint on disk, one tensor at a time.

No model code is needed: like ``quantize`` on a state_dict, every float16/bfloat16/float32/float64 2-D
(Linear-like) ``*.weight`` tensor is a layer (with its ``*.bias``), filtered by ``include``/``exclude`` globs
and ``min_numel``; each layer goes through ``quantize`` alone. Everything else (norms, buffers, integer
tensors) is copied as is, and so are float weights that cannot be quantized, with the reason in the report's
``skipped``: 4-D (convolution) weights, which compressed-tensors has no layout for, other float dtypes
(float8) and empty weights. A tensor name with an empty part (``.weight``) is refused.

The output is the folder ``save_pretrained`` writes, by the same writer (``io/hf_write.py``): compressed-tensors
layouts, mono-quant's metadata for the whole folder in the first file, ``config.json`` with the
``quantization_config``; it loads with ``transformers.AutoModel.from_pretrained`` and with
``mq.load(dst, skeleton)``, and ``mono-quant inspect dst`` describes it.

Memory: one layer's tensors are resident at a time (the source tensor is memory-mapped, the quantized
ones are appended to the output shard's spill file at once), so the peak is about twice the largest
tensor in float32 plus the interpreter. Output shards follow the source shards (one per source shard,
split further at ``max_shard_bytes``). The output is built in a hidden temporary folder beside ``dst`` and
renamed to ``dst`` only when complete; a failed run removes it, a run killed midway leaves only that hidden
folder, which the next run beside ``dst`` removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import secrets
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

import torch

from mono_quant.config import QuantizationConfig
from mono_quant.engine.quantize import quantize
from mono_quant.engine.report import LayerReport, QuantizationReport
from mono_quant.errors import ConfigError, QuantizationError, SerializationError
from mono_quant.io.disk import process_alive
from mono_quant.io.hf_write import FolderWriter, as_embedding, embedding_layers, to_compressed_tensors
from mono_quant.io.save import file_metadata, state_dict_layers
from mono_quant.io.shards import INDEX_SUFFIX, SourceCheckpoint, TensorInfo, open_source

_EXTRA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")  # tokenizer / generation files
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_LAYER_KEYS = ("weight", "weight_scale", "weight_zero_point", "weight_packed", "weight_shape")


@dataclasses.dataclass
class CheckpointResult:
    """What ``quantize_checkpoint`` wrote: the folder, its files, the per-layer report and the throughput."""

    path: Path
    files: list[str]
    report: QuantizationReport
    seconds: float

    @property
    def read_mb_per_s(self) -> float:
        """Source tensor megabytes (10^6 bytes) read per second of the whole run."""
        return (self.report.model_bytes_before or 0) / 1e6 / max(self.seconds, 1e-9)

    def __str__(self) -> str:
        before, after = self.report.model_bytes_before or 0, self.report.model_bytes_after or 0
        return (
            f"{self.report}\nwrote {len(self.files)} files to {self.path}: tensors {before:,} -> {after:,} bytes "
            f"({after / max(before, 1):.1%}) in {self.seconds:.1f} s ({self.read_mb_per_s:.0f} MB/s read)"
        )


def quantize_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    config: QuantizationConfig | None = None,
    *,
    max_shard_bytes: int | None = None,
    progress: bool | None = None,
    **overrides: Any,
) -> CheckpointResult:
    """Quantize the safetensors checkpoint ``src`` (folder, ``*.safetensors.index.json`` or one file) into ``dst``.

    ``dst`` is a new (or empty) folder that gets the same layout: the shards and index (or the single
    file), ``config.json`` from beside the source with a compressed-tensors ``quantization_config``
    added, and the tokenizer/generation files of a source folder. ``progress`` (default: when stderr is
    a terminal) shows tensors done, bytes and ETA. Modes: ``dynamic`` and ``weight_only`` (``static``
    needs activations, hence a model: ``ConfigError``).

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> folder = Path(tempfile.mkdtemp())
        >>> (folder / "src").mkdir()
        >>> tensors = {"fc.weight": torch.randn(64, 64), "norm.weight": torch.ones(64)}
        >>> save_file(tensors, folder / "src" / "model.safetensors")
        >>> result = quantize_checkpoint(folder / "src", folder / "q", dtype="int8")
        >>> result.files, [row.name for row in result.report.layers]
        (['model.safetensors'], ['fc'])
    """
    config = (config or QuantizationConfig()).replace(**overrides) if overrides else (config or QuantizationConfig())
    if config.needs_model_run:
        raise ConfigError(
            f"{', '.join(config.needs_model_run)} need(s) a model to run calibration data through; "
            "quantize_checkpoint rounds tensors: mode 'dynamic'/'weight_only' with algorithm='rtn'"
        )
    if max_shard_bytes is not None and (not isinstance(max_shard_bytes, int) or max_shard_bytes < 1):
        raise ConfigError(f"max_shard_bytes={max_shard_bytes!r} must be a positive integer or None")
    source = open_source(src)
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise SerializationError(f"cannot write {dst}: directory {dst.parent} does not exist")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise SerializationError(f"cannot write {dst}: it already exists and is not an empty folder")
    _sweep_stale(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    start = time.perf_counter()
    try:
        report = _quantize_into(source, tmp, dst, config, max_shard_bytes, _display(progress))
        if Path(src).is_dir() or source.index is not None:
            _copy_extras(source, tmp)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CheckpointResult(dst, sorted(p.name for p in dst.iterdir()), report, time.perf_counter() - start)


def _quantize_into(
    source: SourceCheckpoint, out: Path, shown: Path, config: QuantizationConfig, max_shard_bytes: int | None,
    show: TextIO | None,
) -> QuantizationReport:
    """Write the folder (shards, index, ``config.json``) into ``out``; returns the report."""
    writer = FolderWriter(out, max_shard_bytes, shown=shown)
    meter = _Meter(show, len(source.tensors), sum(info.nbytes for info in source.tensors.values()))
    rows: list[LayerReport] = []
    skipped: dict[str, str] = {}
    layers: dict[str, dict[str, Any]] = {}
    origin: Path | None = None
    embeddings = _embeddings(source)
    for layer, names in _units(source, skipped):
        shard = source.tensors[names[0]].shard
        tensors = {name: source.read(name) for name in names}
        produced = tensors
        if layer is not None:
            result = _quantize_layer(layer, tensors, shard, config)
            produced = dict(result.model)
            shape = {layer: tuple(tensors[f"{layer}.weight"].shape)}
            entries = state_dict_layers(produced, config, result.report, shape)
            for name, entry in entries.items():  # the layout save_pretrained writes (one writer: io/hf_write.py)
                if name in embeddings:
                    as_embedding(entry)
                to_compressed_tensors(produced, {key: f"{name}.{key}" for key in _LAYER_KEYS}, entry)
            layers.update(entries)
            rows += result.report.layers
            skipped.update(result.report.skipped)
            del result
        writer.add(produced, new_shard=shard != origin)  # output shards follow the source's
        origin = shard
        meter.advance(len(names), sum(source.tensors[name].nbytes for name in names))
        del tensors, produced
        _trim()
    meter.finish()
    report = QuantizationReport(rows, skipped, meter.total_bytes, writer.nbytes)
    metadata = file_metadata(layers, config, report, {})
    model_config = _model_config(source)
    if model_config is not None:
        model_config["quantization_config"] = metadata["quantization_config"]
    single = source.shards[0].name if source.index is None else None
    writer.finish(metadata, model_config, single, source.prefix)
    return report


def _embeddings(source: SourceCheckpoint) -> set[str]:
    """The checkpoint's layers that are embeddings in the model of ``config.json`` (none without one)."""
    weights = [name.removesuffix(".weight") for name in source.tensors if name.endswith(".weight")]
    found = embedding_layers(source.root, weights)
    if found is None and (source.root / "config.json").is_file():
        warnings.warn(
            f"quantize_checkpoint: cannot build the model of {source.root / 'config.json'} to find its embeddings; "
            "they are recorded as Linear layers, which transformers cannot load (mq.load can)",
            stacklevel=3,
        )
    return found or set()


def _trim() -> None:
    """Hand freed heap memory back to the OS between layers (glibc keeps freed chunks < 32 MiB mapped)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _units(source: SourceCheckpoint, skipped: dict[str, str]) -> list[tuple[str | None, list[str]]]:
    """``(layer, [weight, bias])`` for each quantizable ``*.weight``, ``(None, [name])`` for any other tensor;
    float weights that cannot be quantized are copied as is, with the reason in ``skipped``."""
    infos = source.tensors
    for name, info in infos.items():
        if "" in name.split("."):
            raise SerializationError(
                f"{info.shard}: tensor {name!r} has an empty part in its name (a leading, trailing or double '.'), "
                "so no module of a model can hold it; rename it in the checkpoint"
            )
    layers = set()
    for name, info in infos.items():
        if name.endswith(".weight") and info.dtype.is_floating_point and len(info.shape) in (2, 4):
            reason = _unquantizable(info)
            if reason:
                skipped[name[: -len(".weight")]] = reason
            else:
                layers.add(name[: -len(".weight")])
    units: list[tuple[str | None, list[str]]] = []
    for name in infos:
        prefix, _, leaf = name.rpartition(".")
        if prefix in layers and leaf == "weight":
            units.append((prefix, [name, *([f"{prefix}.bias"] if f"{prefix}.bias" in infos else [])]))
        elif not (prefix in layers and leaf == "bias"):
            units.append((None, [name]))
    return units


def _unquantizable(info: TensorInfo) -> str:
    """Why a float 2-D/4-D weight is copied as is ("" when it is quantized)."""
    if info.dtype not in _FLOATS:
        return f"{str(info.dtype).removeprefix('torch.')} weight: not float16/bfloat16/float32/float64; copied as is"
    if not math.prod(info.shape):
        return f"weight of shape {list(info.shape)} holds no values; copied as is"
    if len(info.shape) == 4:
        return "convolution weight: the compressed-tensors format (as save_pretrained writes) has no layout for it"
    return ""


def _quantize_layer(layer: str, tensors: dict[str, torch.Tensor], origin: Path, config: QuantizationConfig) -> Any:
    try:
        return quantize(tensors, config)
    except QuantizationError as err:
        raise type(err)(f"{origin}: cannot quantize tensor {layer + '.weight'!r}: {err}") from err


def _model_config(source: SourceCheckpoint) -> dict[str, Any] | None:
    """``config.json`` beside the source (``None`` without one)."""
    path = source.root / "config.json"
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
    except ValueError as err:
        raise SerializationError(f"cannot read {path}: not valid JSON ({err})") from None
    if not isinstance(document, dict):
        raise SerializationError(f"cannot read {path}: expected a JSON object")
    return document


def _copy_extras(source: SourceCheckpoint, out: Path) -> None:
    for path in sorted(source.root.iterdir()):
        keep = path.suffix in _EXTRA_SUFFIXES and not path.name.endswith(INDEX_SUFFIX) and path.name != "config.json"
        if keep and path.is_file():
            shutil.copyfile(path, out / path.name)


def _sweep_stale(dst: Path) -> None:
    """Remove temporary folders beside ``dst`` left by runs whose process is gone."""
    for path in dst.parent.glob(f".{dst.name}.*.tmp"):
        pid = path.name[len(dst.name) + 2 :].split(".")[0]
        if path.is_dir() and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _display(progress: bool | None) -> TextIO | None:
    stream = sys.stderr
    enabled = stream.isatty() if progress is None else progress
    return stream if enabled else None


class _Meter:
    """One progress line (tensors, bytes, rate, ETA) redrawn in place at most ten times a second."""

    def __init__(self, stream: TextIO | None, total_tensors: int, total_bytes: int) -> None:
        self.stream, self.total_tensors, self.total_bytes = stream, total_tensors, total_bytes
        self.tensors = self.bytes = 0
        self.start = self.last = time.perf_counter()

    def advance(self, tensors: int, nbytes: int) -> None:
        self.tensors += tensors
        self.bytes += nbytes
        now = time.perf_counter()
        if self.stream is not None and (now - self.last >= 0.1 or self.tensors == self.total_tensors):
            self.last = now
            rate = self.bytes / max(now - self.start, 1e-9)
            eta = (self.total_bytes - self.bytes) / rate if rate else 0.0
            with contextlib.suppress(OSError):
                self.stream.write(
                    f"\rquantizing {self.tensors}/{self.total_tensors} tensors, {self.bytes / 1e9:.2f}/"
                    f"{self.total_bytes / 1e9:.2f} GB, {rate / 1e6:.0f} MB/s, ETA {eta:4.0f} s "
                )
                self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.write("\n")
                self.stream.flush()
