"""``mono-quant export``: a mono-quant file as a Hugging Face directory (``--format hf``) or ONNX (``--format onnx``).

The file holds the quantized tensors; the architecture comes from ``--base``, the float model's transformers
folder (its ``config.json`` is enough: the model is built from the config, weights come from MODEL_FILE).
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

import torch

from mono_quant.errors import ConfigError
from mono_quant.io.float_checkpoint import same_file
from mono_quant.io.hf_export import save_pretrained
from mono_quant.io.load import load
from mono_quant.io.onnx import export_onnx

_HF_FILES = re.compile(r"config\.json|model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")  # save_pretrained's
EPILOG = """examples:
  mono-quant export minilm.int8.safetensors --base ./all-MiniLM-L6-v2 --format hf -o minilm-int8/
  mono-quant export minilm.int8.safetensors --base ./all-MiniLM-L6-v2 --format onnx -o minilm-int8.onnx
  mono-quant export model.int8.safetensors --base ./model --format hf --max-shard-size 500MB

The hf folder loads with transformers.AutoModel.from_pretrained (pip install compressed-tensors), the .onnx
file with onnxruntime; neither needs mono-quant."""


def add_export_parser(commands: Any, common: argparse.ArgumentParser, run: Any) -> None:
    """The ``export`` subcommand's arguments (``run`` handles it).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_export_parser(parser.add_subparsers(), argparse.ArgumentParser(add_help=False), print)
        >>> parser.parse_args(["export", "q.safetensors", "--base", "b", "--format", "onnx"]).opset
        17
    """
    e = commands.add_parser(
        "export",
        parents=[common],
        help="write a quantized file as a transformers directory or an ONNX model",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("model_file", metavar="MODEL_FILE", help="a mono-quant quantized .safetensors/.pt file")
    e.add_argument("--format", required=True, choices=("hf", "onnx"), help="hf: transformers folder; onnx: a file")
    e.add_argument("--base", required=True, metavar="DIR", help="the float model's transformers folder (config.json)")
    e.add_argument("-o", "--output", help="default MODEL_FILE without suffix + '-hf' or '.onnx'")
    e.add_argument("--max-shard-size", default="2GB", help="hf: shard above this size (default 2GB)")
    e.add_argument("--opset", type=int, default=17, help="onnx: opset (default 17, the minimum)")
    e.add_argument("--sequence-length", type=int, default=16, help="onnx: example input length (default 16)")
    e.set_defaults(run=run)


def check_output(source: Path, base: Path, output: Path, fmt: str) -> None:
    """Refuse an output that would replace the input file or the float model in ``base`` (before anything is read).

    Example:
        >>> try:
        ...     check_output(Path("q.safetensors"), Path("base"), Path("q.safetensors"), "onnx")
        ... except ValueError as err:
        ...     print(err)
        --output='q.safetensors' is the input file 'q.safetensors'; choose another output path
    """
    if same_file(source, output):
        raise ConfigError(f"--output={str(output)!r} is the input file {str(source)!r}; choose another output path")
    if fmt == "onnx" and output.suffix != ".onnx":
        raise ConfigError(f"--output={str(output)!r} must end in .onnx")
    if fmt == "hf" and same_file(base, output):
        raise ConfigError(
            f"--output={str(output)!r} is the --base folder: the export would replace the float model; "
            "choose another folder"
        )
    if fmt == "hf" and same_file(source.parent, output) and _HF_FILES.fullmatch(source.name):
        raise ConfigError(
            f"--output={str(output)!r} holds the input file {source.name!r}, which the export would replace; "
            "choose another folder"
        )


def run_export(args: argparse.Namespace) -> Path:
    """Build the model from ``--base``, load MODEL_FILE into it, write the export; returns the output path."""
    try:
        from transformers import AutoConfig, AutoModel
    except ImportError as err:
        raise ConfigError(f"export needs transformers (pip install 'mono-quant[export]'): {err}") from None
    if not os.path.isfile(os.path.join(args.base, "config.json")):
        raise ConfigError(f"--base={args.base!r} must be a folder holding the float model's config.json")
    if args.sequence_length < 1:
        raise ConfigError(f"--sequence-length must be a positive integer, got {args.sequence_length}")
    source = Path(args.model_file)
    if args.format == "hf":
        output = Path(args.output) if args.output else source.with_name(f"{source.stem}-hf")
    else:
        output = Path(args.output) if args.output else source.with_suffix(".onnx")
    check_output(source, Path(args.base), output, args.format)
    skeleton = AutoModel.from_config(AutoConfig.from_pretrained(args.base)).eval()
    q_model = load(source, skeleton)
    if args.format == "hf":
        return save_pretrained(q_model, output, max_shard_size=args.max_shard_size)
    ids = torch.ones(1, args.sequence_length, dtype=torch.long)
    return export_onnx(q_model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, output, opset=args.opset)
