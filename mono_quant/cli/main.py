"""``mono-quant quantize | inspect | compare | export``: quantize a state_dict file, look inside a checkpoint,
compare, export (``cli/export.py``).

Exit codes: 0 success, 2 bad usage (argparse errors, invalid options, an output that is the input), 1 a
failed operation (unreadable or mismatched file, nothing to quantize, ...). Errors are one line on stderr
without terminal escape codes; ``--debug`` adds the traceback. Warnings (layers a requested option
could not apply to) are ``mono-quant: warning: ...`` lines on stderr.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

from mono_quant.cli.errors import UsageError
from mono_quant.cli.export import add_export_parser, run_export
from mono_quant.cli.inspect import cmd_compare, cmd_inspect
from mono_quant.errors import ConfigError, QuantizationError
from mono_quant.io.float_checkpoint import read_state_dict, same_file
from mono_quant.modules.int4_weight import group_sizes

PROG = "mono-quant"
_OUTPUT_SUFFIXES = (".safetensors", ".pt", ".pth")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


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
    from mono_quant._version import __version__

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
    i.set_defaults(run=cmd_inspect)

    c = commands.add_parser("compare", parents=[common], help="weight SQNR and size of a quantized file vs float")
    c.add_argument("float_file", metavar="FLOAT_FILE")
    c.add_argument("quant_file", metavar="QUANT_FILE")
    c.add_argument("--key", help="the entry of FLOAT_FILE holding the weights (as for quantize)")
    c.add_argument("--json", action="store_true", help="machine-readable output")
    c.set_defaults(run=cmd_compare)


    add_export_parser(commands, common, _cmd_export)
    return parser


def _cmd_export(args: argparse.Namespace) -> int:

    print(f"wrote {run_export(args)}")
    return 0


# ------------------------------------------------------------------------------------- quantize


def _cmd_quantize(args: argparse.Namespace) -> int:
    from mono_quant.config import QuantizationConfig
    from mono_quant.io.load import save_state_dict

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
        from mono_quant.io.stream import quantize_checkpoint

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
    from mono_quant.engine.selection import matches

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
    if config.dtype.value != "int4":
        return
    int8 = [row.name for row in report.layers if row.bits == 8 and not row.kind.startswith("Conv")]
    why = f"no int4 group size of {group_sizes(config.group_size)} with a kernel divides their input width"
    if int8 and not any(row.bits == 4 for row in report.layers):
        raise QuantizationError(f"--group-size={config.group_size}: no layer takes int4 ({why}: {int8[:3]})")
    if int8:
        print(f"{PROG}: warning: --group-size={config.group_size}: {len(int8)} layer(s) took int8 ({why}): {int8[:3]}",
              file=sys.stderr)  # fmt: skip


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
    from mono_quant.engine.quantize import quantize
    from mono_quant.engine.report import QuantizationReport
    from mono_quant.modules import tensor_bytes

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
