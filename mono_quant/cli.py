"""``mono-quant quantize | inspect | compare``: quantize a state_dict file, look inside a checkpoint, compare.

Exit codes: 0 success, 2 bad usage (argparse errors, invalid options), 1 a failed operation (unreadable
or mismatched file, ...). Errors are one line on stderr; ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

PROG = "mono-quant"
_OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth")


class UsageError(Exception):
    """Bad command-line usage found after parsing (exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script passes it to ``sys.exit``).

    Example:
        >>> main(["inspect", "/nonexistent.safetensors"])
        1
    """
    parser = _parser()
    args = parser.parse_args(argv)
    from mono_quant.errors import ConfigError

    try:
        return args.run(args)
    except (UsageError, ConfigError) as err:
        return _fail(args, err, 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 1
    except Exception as err:
        return _fail(args, err, 1)


def _fail(args: argparse.Namespace, err: Exception, code: int) -> int:
    if args.debug:
        traceback.print_exc()
    message = " ".join(str(err).split()) or type(err).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = argparse.ArgumentParser(prog=PROG, description="Post-training quantization for PyTorch checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = commands.add_parser("quantize", parents=[common], help="quantize a state_dict file or a checkpoint folder")
    q.add_argument(
        "model_file",
        metavar="MODEL_FILE",
        help="a state_dict (.pt/.safetensors/...), a folder of "
        "safetensors shards or its *.safetensors.index.json (output: a folder, default SRC.<dtype>)",
    )
    q.add_argument("-o", "--output", help="output file (.safetensors or .pt); default MODEL_FILE.<dtype>.safetensors")
    q.add_argument("--config", metavar="FILE", help="options from a .toml/.yaml/.json file; flags given here win")
    q.add_argument("--dtype", choices=("int8", "int4", "fp16", "bf16"), help="default int8")
    q.add_argument("--mode", choices=("dynamic", "weight_only"), help="default dynamic (static needs a model)")
    q.add_argument("--scheme", choices=("symmetric", "asymmetric"), help="default symmetric")
    q.add_argument("--granularity", choices=("per_channel", "per_tensor"), help="default per_channel")
    q.add_argument("--group-size", type=int, help="int4 group size (default 128)")
    q.add_argument("--include", action="append", metavar="GLOB", help="only layers matching (repeatable)")
    q.add_argument("--exclude", action="append", metavar="GLOB", help="skip matching layers")
    q.add_argument("--min-numel", type=int, help="skip layers with fewer weights (default 0)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress or summary")
    q.set_defaults(run=_cmd_quantize)

    i = commands.add_parser("inspect", parents=[common], help="per-layer table of a mono-quant checkpoint")
    i.add_argument("file", metavar="FILE")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(run=_cmd_inspect)

    c = commands.add_parser("compare", parents=[common], help="weight SQNR and size of a quantized file vs float")
    c.add_argument("float_file", metavar="FLOAT_FILE")
    c.add_argument("quant_file", metavar="QUANT_FILE")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(run=_cmd_compare)
    return parser


# ------------------------------------------------------------------------------------- quantize


def _cmd_quantize(args: argparse.Namespace) -> int:
    from mono_quant.config import QuantizationConfig
    from mono_quant.serialization import save_state_dict

    names = ("dtype", "mode", "scheme", "granularity", "group_size", "include", "exclude", "min_numel")
    given = {name: getattr(args, name) for name in names if getattr(args, name) is not None}  # flags > file > defaults
    config = QuantizationConfig.from_file(args.config, **given) if args.config else QuantizationConfig(**given)
    source = Path(args.model_file)
    checkpoint = source.is_dir() or source.name.endswith(".safetensors.index.json")  # -> quantize_checkpoint
    dtype = config.dtype.value
    output = Path(args.output) if args.output else source.with_name(f"{source.stem}.{dtype}.safetensors")
    if checkpoint and not args.output:
        folder = (source if source.is_dir() else source.parent).resolve()
        output = folder.with_name(f"{folder.name}.{dtype}")
    if not checkpoint and output.suffix not in _OUTPUT_SUFFIXES:
        raise UsageError(f"--output={str(output)!r} must end in .safetensors, .pt or .pth")
    if checkpoint:
        from mono_quant.checkpoint import quantize_checkpoint

        result = quantize_checkpoint(source, output, config, progress=False if args.quiet else None)
        if not args.quiet:
            print(result)
        return 0
    state = read_state_dict(source)
    progress = None if args.quiet else _progress_printer(sys.stderr)
    tensors, report, shapes = quantize_state_dict(state, config, progress)
    save_state_dict(tensors, output, config=config, report=report, float_shapes=shapes)
    if not args.quiet:
        print(report)
        size, before = output.stat().st_size, source.stat().st_size
        print(f"wrote {output}: {size:,} bytes ({size / before:.1%} of {source.name}'s {before:,} bytes)")
    return 0


def quantize_state_dict(
    state: dict[str, Any], config: Any, progress: Callable[[int, int, str], None] | None = None
) -> tuple[dict[str, Any], Any, dict[str, tuple[int, ...]]]:
    """Quantize a state_dict layer by layer (for progress); returns tensors, report and float weight shapes.

    Example:
        >>> import torch
        >>> from mono_quant.config import QuantizationConfig
        >>> out, report, shapes = quantize_state_dict({"fc.weight": torch.randn(4, 8)}, QuantizationConfig())
        >>> out["fc.weight"].dtype, shapes
        (torch.int8, {'fc': (4, 8)})
    """
    from mono_quant.modules import tensor_bytes
    from mono_quant.quantize import quantize
    from mono_quant.report import QuantizationReport

    names = [
        key[: -len(".weight")]
        for key, value in state.items()
        if key.endswith(".weight") and value.is_floating_point() and value.dim() in (2, 4)
    ]
    out, rows, skipped, used = {}, [], {}, set()
    for index, name in enumerate(names, 1):
        if progress is not None:
            progress(index, len(names), name)
        chunk = {key: state[key] for key in (f"{name}.weight", f"{name}.bias") if key in state}
        result = quantize(chunk, config)
        rows += result.report.layers
        skipped.update(result.report.skipped)
        out.update(result.model)
        used.update(chunk)
    out.update({key: value for key, value in state.items() if key not in used})
    report = QuantizationReport(rows, skipped, tensor_bytes(*state.values()), tensor_bytes(*out.values()))
    shapes = {row.name: tuple(state[f"{row.name}.weight"].shape) for row in rows}
    return out, report, shapes


def _progress_printer(stream: TextIO) -> Callable[[int, int, str], None] | None:
    """A one-line ``[i/n] layer`` counter redrawn in place, only when ``stream`` is a terminal."""
    if not stream.isatty():
        return None

    def show(index: int, total: int, name: str) -> None:
        width = 30
        filled = width * index // total
        end = "\n" if index == total else ""
        stream.write(f"\rquantizing [{'#' * filled}{'.' * (width - filled)}] {index}/{total} {name[:40]:<40}{end}")
        stream.flush()

    return show


def read_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """A plain state_dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``); a
    Lightning-style ``{"state_dict": {...}}`` is unwrapped.

    Example:
        >>> import tempfile, torch
        >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> torch.save({"fc.weight": torch.ones(2, 2)}, path)
        >>> list(read_state_dict(path))
        ['fc.weight']
    """
    import torch
    from safetensors.torch import load_file

    from mono_quant.errors import SerializationError
    from mono_quant.serialization import sniff

    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"cannot read {path}: no such file")
    try:
        if sniff(path) != "safetensors":
            obj = torch.load(path, map_location="cpu", weights_only=True)
        else:
            obj = load_file(str(path))
    except Exception as err:
        raise SerializationError(f"cannot read {path}: {' '.join(str(err).split())}") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise SerializationError(f"cannot read {path}: holds a {type(obj).__name__}, not a state_dict")
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        raise SerializationError(f"cannot read {path}: entry {bad!r} is not a tensor; expected a state_dict")
    return obj


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
    from mono_quant.serialization import read_header

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
        "file_bytes": Path(path).stat().st_size,
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


def _cmd_inspect(args: argparse.Namespace) -> int:
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


def compare_files(float_file: str | os.PathLike, quant_file: str | os.PathLike) -> dict[str, Any]:
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
    from mono_quant.qparams import sqnr_db
    from mono_quant.serialization import load

    reference = read_state_dict(float_file)
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


def _cmd_compare(args: argparse.Namespace) -> int:
    result = compare_files(args.float_file, args.quant_file)
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
