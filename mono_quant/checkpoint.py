"""``quantize_checkpoint``: quantize a (sharded) safetensors checkpoint on disk, one tensor at a time.

No model code is needed: like ``quantize`` on a state_dict, every floating-point 2-D (Linear-like) or
4-D (Conv-like) ``*.weight`` tensor is a layer (with its ``*.bias``), filtered by ``include``/``exclude``
globs and ``min_numel``; each layer goes through ``quantize`` alone, so the tensors written are exactly
those ``quantize(state_dict)`` returns. Everything else (norms, buffers, integer tensors) is copied as is.

Memory: one layer's tensors are resident at a time (the source tensor is memory-mapped, the quantized
ones are appended to the output shard's spill file at once), so the peak is about twice the largest
tensor in float32 plus the interpreter. Output shards follow the source shards (one per source shard,
split further at ``max_shard_bytes``), each with the same header metadata as ``save_state_dict`` writes.
The output is built in a hidden temporary folder beside ``dst`` and renamed to ``dst`` only when
complete; a run killed midway leaves only that hidden folder, which the next run beside ``dst`` removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from mono_quant.config import Mode, QuantizationConfig
from mono_quant.errors import ConfigError, QuantizationError, SerializationError
from mono_quant.quantize import quantize
from mono_quant.report import LayerReport, QuantizationReport
from mono_quant.serialization import METADATA_KEY, _compressed_tensors_config, _metadata, _state_dict_layers
from mono_quant.shards import INDEX_SUFFIX, ShardWriter, SourceCheckpoint, open_source

_EXTRA_SUFFIXES = (".json", ".txt", ".model", ".tiktoken", ".jinja")  # tokenizer / generation files


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


@dataclasses.dataclass
class _Shard:
    """An output shard being written, with the header metadata of the layers it holds."""

    writer: ShardWriter
    source: Path
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    rows: list[LayerReport] = dataclasses.field(default_factory=list)
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


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
    if config.mode is Mode.STATIC:
        raise ConfigError("mode='static' needs activations from a model; quantize_checkpoint takes 'dynamic' or "
                          "'weight_only'")  # fmt: skip
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
        report, quantization_config = _quantize_into(source, tmp, config, max_shard_bytes, _display(progress))
        _write_config(source, tmp, quantization_config)
        if Path(src).is_dir() or source.index is not None:
            _copy_extras(source, tmp)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return CheckpointResult(dst, sorted(p.name for p in dst.iterdir()), report, time.perf_counter() - start)


def _quantize_into(
    source: SourceCheckpoint, out: Path, config: QuantizationConfig, max_shard_bytes: int | None, show: TextIO | None
) -> tuple[QuantizationReport, dict[str, Any]]:
    """Write the shards (and index) into ``out``; returns the report and the ``quantization_config``."""
    units = _units(source)
    meter = _Meter(show, len(source.tensors), sum(info.nbytes for info in source.tensors.values()))
    done: list[_Shard] = []
    shard: _Shard | None = None
    rows: list[LayerReport] = []
    skipped: dict[str, str] = {}
    layers: dict[str, dict[str, Any]] = {}
    for layer, names in units:
        origin = source.tensors[names[0]].shard
        tensors = {name: source.read(name) for name in names}
        if layer is None:
            result, produced = None, tensors
        else:
            result = _quantize_layer(layer, tensors, origin, config)
            produced = result.model
        size = sum(t.numel() * t.element_size() for t in produced.values())
        full = max_shard_bytes is not None and shard is not None and shard.writer.nbytes + size > max_shard_bytes
        if shard is None or shard.source != origin or (full and shard.writer.names):
            if shard is not None:
                done.append(_close(shard, config))
            shard = _Shard(ShardWriter(out / f"part-{len(done):05d}.safetensors"), origin)
        for name, tensor in produced.items():
            shard.writer.add(name, tensor)
        if result is not None:
            shape = {layer: tuple(tensors[f"{layer}.weight"].shape)}
            entries = _state_dict_layers(produced, config, result.report, shape)
            shard.layers.update(entries)
            layers.update(entries)
            shard.rows += result.report.layers
            shard.skipped.update(result.report.skipped)
            rows += result.report.layers
            skipped.update(result.report.skipped)
        meter.advance(len(names), sum(source.tensors[name].nbytes for name in names))
        del tensors, produced, result
        _trim()
    if shard is not None:
        done.append(_close(shard, config))
    meter.finish()
    _name_shards(source, out, done)
    report = QuantizationReport(rows, skipped, meter.total_bytes, sum(s.writer.nbytes for s in done))
    return report, _compressed_tensors_config(layers, config, report)


def _trim() -> None:
    """Hand freed heap memory back to the OS between layers (glibc keeps freed chunks < 32 MiB mapped)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _units(source: SourceCheckpoint) -> list[tuple[str | None, list[str]]]:
    """``(layer, [weight, bias])`` for each float 2-D/4-D ``*.weight``, ``(None, [name])`` for any other tensor."""
    infos = source.tensors
    layers = {
        name[: -len(".weight")]
        for name, info in infos.items()
        if name.endswith(".weight") and info.dtype.is_floating_point and len(info.shape) in (2, 4)
    }
    units: list[tuple[str | None, list[str]]] = []
    for name in infos:
        prefix, _, leaf = name.rpartition(".")
        if prefix in layers and leaf == "weight":
            units.append((prefix, [name, *([f"{prefix}.bias"] if f"{prefix}.bias" in infos else [])]))
        elif not (prefix in layers and leaf == "bias"):
            units.append((None, [name]))
    return units


def _quantize_layer(layer: str, tensors: dict[str, torch.Tensor], origin: Path, config: QuantizationConfig) -> Any:
    try:
        return quantize(tensors, config)
    except QuantizationError as err:
        raise type(err)(f"{origin}: cannot quantize tensor {layer + '.weight'!r}: {err}") from err


def _close(shard: _Shard, config: QuantizationConfig) -> _Shard:
    metadata = _metadata(shard.layers, config, QuantizationReport(shard.rows, shard.skipped), {})
    shard.writer.close({"format": "pt", METADATA_KEY: json.dumps(metadata, allow_nan=False)})
    return shard


def _name_shards(source: SourceCheckpoint, out: Path, shards: list[_Shard]) -> None:
    """Rename the parts to the source's naming; write the index unless the result is one file like the source."""
    if source.index is None and len(shards) == 1:
        final = out / source.shards[0].name
        shards[0].writer.path.rename(final)
        return
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, 1):
        name = f"{source.prefix}-{number:05d}-of-{len(shards):05d}.safetensors"
        shard.writer.path.rename(out / name)
        weight_map.update(dict.fromkeys(shard.writer.names, name))
    total = sum(shard.writer.nbytes for shard in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(out / f"{source.prefix}{INDEX_SUFFIX}", index)


def _write_config(source: SourceCheckpoint, out: Path, quantization_config: dict[str, Any]) -> None:
    """``config.json`` beside the source, with the whole checkpoint's ``quantization_config`` added."""
    path = source.root / "config.json"
    if not path.is_file():
        return
    try:
        document = json.loads(path.read_text())
    except ValueError as err:
        raise SerializationError(f"cannot read {path}: not valid JSON ({err})") from None
    if not isinstance(document, dict):
        raise SerializationError(f"cannot read {path}: expected a JSON object")
    document["quantization_config"] = quantization_config
    _write_json(out / "config.json", document)


def _copy_extras(source: SourceCheckpoint, out: Path) -> None:
    for path in sorted(source.root.iterdir()):
        keep = path.suffix in _EXTRA_SUFFIXES and not path.name.endswith(INDEX_SUFFIX) and path.name != "config.json"
        if keep and path.is_file():
            shutil.copyfile(path, out / path.name)


def _write_json(path: Path, document: Any) -> None:
    with open(path, "w") as handle:
        json.dump(document, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())


def _sweep_stale(dst: Path) -> None:
    """Remove temporary folders beside ``dst`` left by runs whose process is gone."""
    for path in dst.parent.glob(f".{dst.name}.*.tmp"):
        pid = path.name[len(dst.name) + 2 :].split(".")[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
