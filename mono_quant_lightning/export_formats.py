"""The extra artifacts ``export_formats`` asks for beside the fit-end file: ``"onnx"`` (``model.quant.onnx``,
traced on the forward input of the first validation batch) and ``"hf"`` (``model.quant.hf/``, a transformers
directory of the first submodule that is a transformers model)."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn

import mono_quant as mq
from mono_quant_lightning.batches import iterate, val_loaders
from mono_quant_lightning.evaluation import StepRunner
from mono_quant_lightning.messages import info, warn

FORMATS = ("safetensors", "onnx", "hf")


def parse_export_formats(value: Iterable[str] | str) -> tuple[str, ...]:
    """``export_formats`` as a tuple of known formats that includes ``"safetensors"`` (the fit-end file).

    Example:
        >>> parse_export_formats(("safetensors", "onnx")), parse_export_formats("safetensors")
        (('safetensors', 'onnx'), ('safetensors',))
    """
    formats = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else None
    if formats is None or any(f not in FORMATS for f in formats) or "safetensors" not in formats:
        raise mq.ConfigError(
            f"QuantizationCallback(export_formats={value!r}): expected a tuple of {FORMATS} that includes "
            "'safetensors' (the fit-end file the other formats are written beside)"
        )
    return tuple(dict.fromkeys(formats))


def onnx_path(path: Path) -> Path:
    """``model.quant.onnx`` beside ``model.quant.safetensors``.

    Example:
        >>> onnx_path(Path("out/model.quant.safetensors")).as_posix(), hf_path(Path("model.quant.safetensors")).name
        ('out/model.quant.onnx', 'model.quant.hf')
    """
    return path.with_suffix(".onnx")


def hf_path(path: Path) -> Path:
    return path.with_suffix(".hf")


def write_extras(
    q_module: nn.Module, path: Path, formats: tuple[str, ...], trainer: Trainer, verbose: bool = True
) -> tuple[Path, ...]:
    """Write each extra format beside ``path``; the paths written. One that cannot be written is a warning (the
    fit-end file is already there)."""
    written = []
    for fmt, target in (("onnx", onnx_path(path)), ("hf", hf_path(path))):
        if fmt not in formats:
            continue
        try:
            (_write_onnx if fmt == "onnx" else _write_hf)(q_module, target, trainer)
        except (mq.QuantizationError, RuntimeError, ValueError, TypeError) as err:
            warn(f"export_formats: could not write {target.name}: {err}")
            continue
        info(f"exported {target}", verbose)
        written.append(target)
    return tuple(written)


def remove_extras(path: Path) -> None:
    """Remove the extras of an earlier run (a failed gate leaves none behind).

    Example:
        >>> remove_extras(Path("no/such/model.quant.safetensors"))
    """
    onnx_path(path).unlink(missing_ok=True)
    if (hf_path(path) / "config.json").is_file():
        shutil.rmtree(hf_path(path))


def _write_hf(q_module: nn.Module, target: Path, trainer: Trainer) -> None:
    model = next(
        (m for m in q_module.modules() if callable(getattr(getattr(m, "config", None), "to_dict", None))), None
    )
    if model is None:
        raise mq.ConfigError("'hf' needs a transformers model (a submodule with a .config) inside the LightningModule")
    mq.save_pretrained(model, target)


def _write_onnx(q_module: nn.Module, target: Path, trainer: Trainer) -> None:
    args, kwargs = first_forward_input(q_module, trainer)
    if args and kwargs:
        raise mq.ConfigError("'onnx' takes a forward input of positional or of keyword tensors, not both")
    mq.export_onnx(q_module, kwargs or tuple(args), target)


def first_forward_input(module: nn.Module, trainer: Trainer) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` of the first ``forward`` call the module's ``validation_step`` makes on the first
    validation batch (what ONNX is traced on)."""
    batch = next((b for _, _, b in iterate(val_loaders(trainer), 1)), None)
    if batch is None or not isinstance(module, LightningModule):
        raise mq.ConfigError("'onnx' needs a validation batch to trace the forward on")
    seen: list[tuple[tuple, dict]] = []

    def record(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not seen:
            seen.append((tuple(args), dict(kwargs)))

    hook = module.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with StepRunner(module, trainer, n_loaders=1) as runner:
            runner.step(batch, 0, 0)
    finally:
        hook.remove()
    if not seen or not all(isinstance(t, torch.Tensor) for t in [*seen[0][0], *seen[0][1].values()]):
        raise mq.ConfigError("'onnx' needs validation_step to call forward with tensors")
    return seen[0]
