"""Where the fit-end file goes and how it is written: the quantized model with the gate result in its metadata
(``mono_quant.save(..., extra_metadata=)``: one atomic write that follows the umask), and its per-layer report as
a text file beside it (``model.quant.report.txt``)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

from lightning.pytorch import Trainer
from safetensors import safe_open

import mono_quant as mq
from mono_quant.io.format import METADATA_KEY
from mono_quant_lightning.gate import GateDecision

EXPORT_NAME = "model.quant.safetensors"
GATE_KEY = "mono_quant_lightning.gate"


def export_path(trainer: Trainer, export_dir: Path | None) -> Path:
    """``export_dir``, else the first ``ModelCheckpoint``'s ``dirpath``, else ``default_root_dir``; + the file name.

    Example:
        >>> import lightning as L
        >>> export_path(L.Trainer(logger=False, enable_progress_bar=False), Path("out")).as_posix()
        'out/model.quant.safetensors'
    """
    if export_dir is not None:
        directory = export_dir
    elif trainer.checkpoint_callback is not None and trainer.checkpoint_callback.dirpath:
        directory = Path(trainer.checkpoint_callback.dirpath)
    else:
        directory = Path(trainer.default_root_dir)
    return directory / EXPORT_NAME


def report_path(path: Path) -> Path:
    """The text report beside an export.

    Example:
        >>> report_path(Path("ckpts/model.quant.safetensors")).name
        'model.quant.report.txt'
    """
    return path.with_name(path.name.removesuffix(".safetensors") + ".report.txt")


def check_export_dir(export_dir: Path) -> None:
    """Raise a ``ConfigError`` now if files could not be written into ``export_dir`` (a file, or not writable).

    Example:
        >>> import tempfile
        >>> file = Path(tempfile.mkdtemp()) / "f"; _ = file.write_text("x")
        >>> check_export_dir(file)
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: QuantizationCallback(export_dir=...): export_dir is a file, not a directory
    """
    existing = export_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if existing == export_dir and not existing.is_dir():
        problem = "is a file, not a directory"
    elif not existing.is_dir():
        problem = f"cannot be created: {existing} is a file"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"is not writable ({existing} does not allow writing)"
    if problem:
        raise mq.ConfigError(f"QuantizationCallback(export_dir={os.fspath(export_dir)!r}): export_dir {problem}")


def write(
    result: mq.QuantizationResult, path: Path, gate: dict[str, object] | None = None, report: bool = True
) -> None:
    """Save ``result`` atomically to ``path`` with ``gate`` in its metadata, and write the text report.

    Example:
        >>> import tempfile
        >>> from torch import nn
        >>> from mono_quant_lightning.gate import decide
        >>> result = mq.quantize(nn.Sequential(nn.Linear(32, 8)), mode="dynamic")
        >>> path = Path(tempfile.mkdtemp()) / "out" / EXPORT_NAME
        >>> write(result, path, gate_record(decide(0.9, 0.5, 0.01), "val_acc"))
        >>> read_gate(path)["drop"], report_path(path).is_file()
        (0.4, True)
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    mq.save(result, path, extra_metadata=None if gate is None else {GATE_KEY: gate})
    if report:
        report_path(path).write_text(f"{result.report}\n")


def gate_record(decision: GateDecision, metric: str) -> dict[str, object]:
    """What an export records about its gate: metric, float, quantized, drop, max_drop, passed, reason.

    JSON has no NaN or infinity: a score or drop that is not finite is recorded as ``None`` (the reason says why).

    Example:
        >>> from mono_quant_lightning.gate import decide
        >>> gate_record(decide(0.9, 0.5, 0.01), "val_acc")["passed"]
        False
        >>> record = gate_record(decide(0.9, float("nan"), 0.01), "val_acc")
        >>> record["quantized"], record["reason"]
        (None, 'quantized score is NaN')
    """
    fields = dataclasses.asdict(decision)
    return {
        "metric": metric,
        "float": _finite(fields["float_score"]),
        "quantized": _finite(fields["quantized_score"]),
        "drop": _finite(fields["drop"]),
        "max_drop": fields["max_drop"],
        "passed": fields["passed"],
        "reason": fields["reason"],
    }


def read_gate(path: str | os.PathLike[str]) -> dict[str, object] | None:
    """The gate record of an export (``None`` when it has none); files of earlier versions kept it in the
    safetensors header beside the metadata document, and still read.

    Example:
        >>> read_gate(Path(mq.__file__).parent / "missing.safetensors") is None
        True
    """
    if not Path(path).is_file():
        return None
    with safe_open(os.fspath(path), framework="pt") as handle:
        header = handle.metadata() or {}
    extra = json.loads(header.get(METADATA_KEY, "{}")).get("extra") or {}
    if GATE_KEY in extra:
        return extra[GATE_KEY]
    return json.loads(header[GATE_KEY]) if GATE_KEY in header else None


def remove(path: Path) -> bool:
    """Remove an export and its report; whether there was an export.

    Example:
        >>> remove(Path("no/such/model.quant.safetensors"))
        False
    """
    existed = path.is_file()
    path.unlink(missing_ok=True)
    report_path(path).unlink(missing_ok=True)
    return existed


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None
