"""``mono-quant quantize | inspect | compare | export``: quantize a state_dict file, look inside a checkpoint,
compare, export (``cli_export.py``).

Exit codes: 0 success, 2 bad usage (argparse errors, invalid options, an output that is the input), 1 a
failed operation (unreadable or mismatched file, nothing to quantize, ...). Errors are one line on stderr
without terminal escape codes; ``--debug`` adds the traceback. Warnings (layers a requested option
could not apply to) are ``mono-quant: warning: ...`` lines on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from mono_quant.checkpoint_read import read_state_dict, same_file
from mono_quant.errors import ConfigError, QuantizationError

PROG = "mono-quant"
_OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


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
    print(f"{PROG}: error: {one_line(str(err)) or type(err).__name__}", file=sys.stderr)
    return code


def one_line(text: str, limit: int = 600) -> str:
    r"""``text`` without terminal escape codes, on one line, at most ``limit`` characters.

    Example:
        >>> one_line("\x1b[1mWeights only load failed.\x1b[0m\nRe-running")
        'Weights only load failed. Re-running'
    """
    text = " ".join(_ANSI.sub("", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    from mono_quant import __version__

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    parser = _Parser(prog=PROG, description="Post-training quantization for PyTorch checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    q = commands.add_parser("quantize", parents=[common], help="quantize a state_dict file or a checkpoint folder")
    q.add_argument(
        "model_file",
        metavar="MODEL_FILE",
        help="a state_dict (.pt/.safetensors/...), a folder of "
        "safetensors shards or its *.safetensors.index.json (output: a folder, default SRC.<dtype>)",
    )
    q.add_argument(
        "--key",
        help="the checkpoint entry holding the weights (default: the file itself, else "
        "'state_dict', 'model' or 'module')",
    )
    q.add_argument(
        "--convert",
        action="store_true",
        help="accept a mono-quant file: dequantize it, then quantize again (its error adds to the new one)",
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
    c.add_argument("--key", help="the entry of FLOAT_FILE holding the weights (as for quantize)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(run=_cmd_compare)

    from mono_quant.cli_export import add_export_parser

    add_export_parser(commands, common, _cmd_export)
    return parser


def _cmd_export(args: argparse.Namespace) -> int:
    from mono_quant.cli_export import run_export

    print(f"wrote {run_export(args)}")
    return 0


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
    if same_file(source, output):
        raise UsageError(f"--output={str(output)!r} is the input file {str(source)!r}; choose another output path")
    if checkpoint:
        from mono_quant.checkpoint import quantize_checkpoint

        result = quantize_checkpoint(source, output, config, progress=False if args.quiet else None)
        if not args.quiet:
            print(result)
        return 0
    state = read_state_dict(source, args.key, convert=args.convert)
    _check_include(state, args.include)
    progress = None if args.quiet else _progress_printer(sys.stderr)
    tensors, report, shapes = quantize_state_dict(state, config, progress)
    _check_report(report, config)
    save_state_dict(tensors, output, config=config, report=report, float_shapes=shapes)
    if not args.quiet:
        print(report)
        size, before = output.stat().st_size, source.stat().st_size
        print(f"wrote {output}: {size:,} bytes ({size / before:.1%} of {source.name}'s {before:,} bytes)")
    return 0


def _weight_names(state: dict[str, Any]) -> list[str]:
    return [
        key[: -len(".weight")]
        for key, value in state.items()
        if key.endswith(".weight") and value.is_floating_point() and value.dim() in (2, 4)
    ]


def _check_include(state: dict[str, Any], include: list[str] | None) -> None:
    """Every ``--include`` pattern must match some layer (a typo would otherwise quantize nothing)."""
    from mono_quant.selection import matches

    names = _weight_names(state)
    unmatched = [p for p in include or () if not any(matches(name, (p,)) for name in names)]
    if unmatched:
        raise UsageError(f"--include {unmatched[0]!r} matches no layer; the layers are {names[:8]}")


def _check_report(report: Any, config: Any) -> None:
    """Nothing quantized is an error; layers an explicit option could not apply to get a warning."""
    if not report.layers:
        reasons = sorted(set(report.skipped.values()))
        raise QuantizationError(f"no layer was quantized ({len(report.skipped)} skipped: {'; '.join(reasons[:3])})")
    group = [name for name, why in report.skipped.items() if "group_size" in why]
    if group:
        print(
            f"{PROG}: warning: --group-size={config.group_size} left {len(group)} layer(s) in float: "
            f"{report.skipped[group[0]]} ({group[0]})",
            file=sys.stderr,
        )


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

    names = _weight_names(state)
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
    from mono_quant.qparams import sqnr_db
    from mono_quant.serialization import load

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


def _cmd_compare(args: argparse.Namespace) -> int:
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
