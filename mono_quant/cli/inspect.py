"""``mono-quant inspect`` and ``mono-quant compare``: what a quantized file holds, and how close it is to float."""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mono_quant.cli.errors import UsageError
from mono_quant.io.float_checkpoint import read_state_dict, same_file

# -------------------------------------------------------------------------------------- inspect


def inspect_file(path: str | os.PathLike) -> dict[str, Any]:
    """The per-layer summary that ``mono-quant inspect --json`` prints (reads headers only).

    Example:
        >>> import tempfile, torch, mono_quant as mq
        >>> path = os.path.join(tempfile.mkdtemp(), "m.safetensors")
        >>> mq.save(mq.dynamic_quantize(torch.nn.Sequential(torch.nn.Linear(16, 4)))[0], path)
        >>> info = inspect_file(path)
        >>> info["layers"][0]["class"], info["layers"][0]["bytes"]
        ('Int8Linear', 96)
    """
    from mono_quant.io.load import read_header

    metadata, specs = read_header(path)
    nbytes = {name: math.prod(shape) * dtype.itemsize for name, (dtype, shape) in specs.items()}
    layers, owned = [], set()
    for name, entry in metadata["layers"].items():
        own = [k for k in specs if k.rpartition(".")[0] == name]
        owned.update(own)
        float_bytes = 4 * (math.prod(entry["shape"]) + (entry["shape"][0] if entry["bias"] else 0))
        layers.append({
            "name": name, "class": entry["class"], "kind": entry["kind"], "mode": entry["mode"],
            "bits": entry["bits"], "scheme": entry.get("scheme", entry.get("dtype", "")), "shape": entry["shape"],
            "bytes": sum(nbytes[k] for k in own), "float_bytes": float_bytes, "sqnr_db": entry.get("sqnr_db"),
        })  # fmt: skip
    other = sum(v for k, v in nbytes.items() if k not in owned)
    tensor_bytes = sum(nbytes.values())
    float_bytes = other + sum(row["float_bytes"] for row in layers)
    return {
        "file": str(path),
        "file_bytes": _file_bytes(Path(path)),
        "format_version": metadata["format_version"],
        "mono_quant_version": metadata.get("mono_quant_version"),
        "layers": layers,
        "other_tensors": len(specs) - len(owned),
        "other_bytes": other,
        "tensor_bytes": tensor_bytes,
        "float_bytes": float_bytes,
        "skipped": metadata.get("skipped", {}),
        "quantization_config": metadata.get("quantization_config"),
    }


def _file_bytes(path: Path) -> int:
    """The file's size; for a folder (``save_pretrained``, ``quantize_checkpoint``) its safetensors files'."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors")) if path.is_dir() else path.stat().st_size


def cmd_inspect(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    header = ("layer", "class", "mode", "bits", "scheme", "shape", "bytes", "SQNR dB")
    rows = [
        (r["name"], r["class"], r["mode"], r["bits"], r["scheme"], "x".join(map(str, r["shape"])), f"{r['bytes']:,}",
         "-" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}")
        for r in info["layers"]
    ]  # fmt: skip
    print(_table(header, rows))
    ratio = info["float_bytes"] / max(info["tensor_bytes"], 1)
    print(
        f"{len(rows)} quantized layers, {info['other_tensors']} other tensors ({info['other_bytes']:,} bytes); "
        f"tensors {info['tensor_bytes']:,} bytes vs {info['float_bytes']:,} in float32 ({ratio:.2f}x smaller); "
        f"file {info['file_bytes']:,} bytes, format v{info['format_version']}, mono-quant {info['mono_quant_version']}"
    )
    return 0


# -------------------------------------------------------------------------------------- compare


def compare_files(
    float_file: str | os.PathLike, quant_file: str | os.PathLike, key: str | None = None
) -> dict[str, Any]:
    """Per-layer weight SQNR of ``quant_file`` against ``float_file`` and the file size ratio.

    Example:
        >>> import tempfile, torch, mono_quant as mq
        >>> from safetensors.torch import save_file
        >>> model, folder = torch.nn.Sequential(torch.nn.Linear(64, 8)), tempfile.mkdtemp()
        >>> save_file(model.state_dict(), os.path.join(folder, "f.safetensors"))
        >>> mq.save(mq.dynamic_quantize(model)[0], os.path.join(folder, "q.safetensors"))
        >>> result = compare_files(os.path.join(folder, "f.safetensors"), os.path.join(folder, "q.safetensors"))
        >>> result["layers"][0]["sqnr_db"] > 35
        True
    """
    from mono_quant.errors import SerializationError
    from mono_quant.io.load import load
    from mono_quant.qparams import sqnr_db

    if same_file(float_file, quant_file):
        raise UsageError(f"FLOAT_FILE and QUANT_FILE are the same file ({quant_file}); pass the float original")
    reference = read_state_dict(float_file, key)
    restored, metadata = load(quant_file, dequantize=True)
    layers = []
    for name, entry in metadata["layers"].items():
        key = f"{name}.weight" if name else "weight"
        if key not in reference:
            raise SerializationError(f"{float_file} has no tensor {key!r} (layer {name!r} of {quant_file})")
        ref, approx = reference[key], restored[key]
        if ref.numel() != approx.numel():
            raise SerializationError(
                f"tensor {key!r} has shape {list(ref.shape)} in {float_file} but {entry['shape']} in {quant_file}"
            )
        sqnr = sqnr_db(ref.reshape(-1), approx.reshape(-1))
        layers.append({"name": name, "kind": entry["kind"], "mode": entry["mode"], "bits": entry["bits"],
                       "sqnr_db": sqnr if math.isfinite(sqnr) else None})  # fmt: skip
    float_bytes, quant_bytes = Path(float_file).stat().st_size, Path(quant_file).stat().st_size
    return {"layers": layers, "float_file_bytes": float_bytes, "quant_file_bytes": quant_bytes,
            "size_ratio": quant_bytes / float_bytes}  # fmt: skip


def cmd_compare(args: argparse.Namespace) -> int:
    result = compare_files(args.float_file, args.quant_file, args.key)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rows = [
        (r["name"], r["kind"], r["mode"], r["bits"], "inf" if r["sqnr_db"] is None else f"{r['sqnr_db']:.1f}")
        for r in result["layers"]
    ]
    print(_table(("layer", "kind", "mode", "bits", "weight SQNR dB"), rows))
    finite = [r["sqnr_db"] for r in result["layers"] if r["sqnr_db"] is not None]
    if finite:
        print(f"min weight SQNR {min(finite):.1f} dB over {len(rows)} layers")
    ratio = result["size_ratio"]
    print(
        f"size: {result['float_file_bytes']:,} -> {result['quant_file_bytes']:,} bytes "
        f"(ratio {ratio:.3f}, {1 / ratio:.2f}x smaller)"
    )
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text columns.

    Example:
        >>> print(_table(("a", "bb"), [("xyz", 1)]))
        a    bb
        ---  --
        xyz  1
    """
    cells = [tuple(map(str, header)), *[tuple(map(str, row)) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
