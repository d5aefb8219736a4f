"""Checks that an ONNX trace means what the eager model computes (used by ``export_onnx``).

A trace records one path through ``forward``: Python decisions taken on tensor values (``if x.sum() > 0``)
or sizes (a loop over ``x.shape[1]``) are frozen into the file. So after tracing, ONNX Runtime runs the
file on inputs of other values (floats reflected in their range, integers rolled) and, per dynamic axis
name, on inputs resized along those axes, and compares with the eager model:

- an axis whose resized run differs (or fails) is not dynamic: a default axis is fixed at the example's
  size (and the export redone) with a warning naming it; an axis the caller asked for is a ``SerializationError``;
- a run on other values that differs, or a resized run that differs while torch warned of a Python decision
  on tensor values in the model's own code, is a ``SerializationError`` naming the warnings' source lines;
- torch's tracer warnings from code outside torch and transformers are re-issued as one warning naming
  each line even when the checks pass (other values may still take another branch); those from torch and
  transformers (shape checks) are covered by the axis checks.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mono_quant.errors import SerializationError
from mono_quant.qparams import sqnr_db

MIN_SQNR_DB = 25.0  # ORT vs mono-quant's eager int8 kernels agree to > 35 dB; another branch or length: < 10
MARGIN_DB = 10.0  # below the example's own agreement (float-weight layers: ~20 dB) by this much: another path
_LIBRARY_DIRS = tuple(os.path.dirname(m.__file__) for m in (torch,))  # transformers added when importable

Axes = dict[str, dict[int, str]]
EAGER_REFUSES = "q_model itself does not take that size"  # a default axis that is not one: fixed without a word


def tracer_lines(recorded: Sequence[warnings.WarningMessage]) -> list[str]:
    """``file:line: message`` of each distinct ``TracerWarning`` among ``recorded``.

    Example:
        >>> w = warnings.WarningMessage(torch.jit.TracerWarning("Converting a tensor to a Python boolean"),
        ...                             torch.jit.TracerWarning, "model.py", 12)
        >>> tracer_lines([w, w])
        ['model.py:12: Converting a tensor to a Python boolean']
    """
    lines = []
    for w in recorded:
        if issubclass(w.category, torch.jit.TracerWarning):
            text = f"{w.filename}:{w.lineno}: {str(w.message).split('. ')[0]}"
            if text not in lines:
                lines.append(text)
    return lines


def _in_libraries(line: str) -> bool:
    dirs = list(_LIBRARY_DIRS)
    try:
        import transformers

        dirs.append(os.path.dirname(transformers.__file__))
    except ImportError:
        pass
    return any(line.startswith(d + os.sep) for d in dirs)


def checked_export(
    export: Callable[[Axes], tuple[bytes, list[str]]],
    eager: Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]],
    tensors: list[torch.Tensor],
    names: list[str],
    axes: Axes,
    axes_given: bool,
) -> bytes:
    """The ONNX bytes of ``export(axes)`` after the checks in the module docstring (axes may be narrowed)."""
    data, traced = export(axes)
    try:
        import onnxruntime
    except ImportError:
        warnings.warn("export_onnx: onnxruntime is not installed, so the trace is not checked", stacklevel=3)
        _warn_user_lines(traced)
        return data
    session = _runner(onnxruntime, names)(data)
    floor = min(MIN_SQNR_DB, _agreement(session, eager, tensors) - MARGIN_DB)
    problem = _differs(session, eager, [_other_values(t) for t in tensors], floor)
    if problem:
        where = "; ".join(traced) or "no tracer warning; a decision taken on tensor values while tracing"
        raise SerializationError(
            f"export_onnx: the traced graph gives other outputs than q_model on inputs of other values ({problem}): "
            f"the trace froze a Python decision at {where}; write it with tensor operations (torch.where) "
            "or export the branch you need"
        )
    fixed, original = [], axes
    for axis_name in sorted({name for dims in axes.values() for name in dims.values()}):
        problem = _differs(session, eager, _resized(tensors, names, axes, axis_name), floor)
        if not problem:
            continue
        members = [f"axis {a} of {n!r}" for n, dims in axes.items() for a, name in dims.items() if name == axis_name]
        if axes_given:
            raise SerializationError(
                f"export_onnx: dynamic_axes {axis_name!r} ({', '.join(members)}) does not hold: at another size "
                f"the traced graph {problem}; the trace fixed that size (a Python loop or a shape-dependent branch)"
            )
        if problem != EAGER_REFUSES:
            fixed.append(f"{', '.join(members)} ({axis_name!r}): {problem}")
        axes = {n: {a: name for a, name in dims.items() if name != axis_name} for n, dims in axes.items()}
    user = [line for line in traced if not _in_libraries(line)]
    if fixed and user:  # evidence that the decision the trace froze changes the outputs
        raise SerializationError(
            f"export_onnx: the traced graph gives other outputs than q_model on other inputs ({'; '.join(fixed)}): "
            f"the trace froze a Python decision at {'; '.join(user)}; write it with tensor operations "
            "(torch.where) or export the branch you need"
        )
    if fixed:
        warnings.warn(
            "export_onnx: fixed at the example's size, since the trace gives other outputs at another size: "
            + "; ".join(fixed),
            stacklevel=3,
        )
    if axes != original:
        data, traced = export(axes)
    _warn_user_lines(traced)
    return data


def _warn_user_lines(traced: list[str]) -> None:
    user = [line for line in traced if not _in_libraries(line)]
    if user:
        warnings.warn(
            "export_onnx: the trace took Python decisions on tensor values at "
            + "; ".join(user)
            + " (checked on other inputs, but values that take another branch will get this one's outputs)",
            stacklevel=4,
        )


def _runner(onnxruntime: Any, names: list[str]) -> Callable[[bytes], Callable[[list[torch.Tensor]], list]]:
    def session_for(data: bytes) -> Callable[[list[torch.Tensor]], list]:
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 4  # failures are reported by the caller
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return lambda tensors: session.run(None, {n: t.numpy() for n, t in zip(names, tensors, strict=True)})

    return session_for


def _agreement(
    session: Callable[[list[torch.Tensor]], list],
    eager: Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]],
    tensors: list[torch.Tensor],
) -> float:
    """The lowest SQNR (dB) of ONNX Runtime's floating outputs against the eager model's on the example itself
    (layers exported with float weights agree less than integer ones)."""
    with torch.no_grad():
        pairs = zip(eager(tensors), session(tensors), strict=True)
        return min((sqnr_db(w.float(), torch.from_numpy(g).float()) for w, g in pairs if w.is_floating_point()),
                   default=math.inf)  # fmt: skip


def _differs(
    session: Callable[[list[torch.Tensor]], list],
    eager: Callable[[list[torch.Tensor]], tuple[torch.Tensor, ...]],
    tensors: list[torch.Tensor] | None,
    floor: float,
) -> str | None:
    """Why ONNX Runtime's outputs on ``tensors`` are not the eager model's (floating outputs below ``floor``
    dB), or ``None`` when they agree."""
    if tensors is None:
        return None
    try:
        want = eager(tensors)
    except Exception:  # the eager model itself refuses this size: the axis cannot vary
        return EAGER_REFUSES
    try:
        got = [torch.from_numpy(value) for value in session(tensors)]
    except Exception as err:
        return f"fails in ONNX Runtime ({' '.join(str(err).split())[:200]})"
    for index, (g, w) in enumerate(zip(got, want, strict=True)):
        if g.shape != w.shape:
            return f"gives output {index} of shape {list(g.shape)} instead of {list(w.shape)}"
        if w.is_floating_point():
            quality = sqnr_db(w.float(), g.float())
            if not quality >= floor:
                return f"agrees with q_model's output {index} to {quality:.1f} dB only"
        elif not torch.equal(g.to(w.dtype), w):
            return f"gives other values in output {index}"
    return None


def _other_values(tensor: torch.Tensor) -> torch.Tensor:
    """The same shape with other values in the same range: floats reflected (``max + min - x``, so a calibrated
    range still holds), integers rolled along the last axis."""
    if tensor.is_floating_point():
        return tensor.max() + tensor.min() - tensor if tensor.numel() else tensor
    return tensor.roll(1, dims=-1) if tensor.dim() else tensor


def _resized(tensors: list[torch.Tensor], names: list[str], axes: Axes, axis_name: str) -> list[torch.Tensor] | None:
    """The inputs with every axis named ``axis_name`` resized (shrunk by a third, or 1 grown to 2, by repeating
    the example's own entries); ``None`` when such an axis is empty."""
    out = []
    for name, tensor in zip(names, tensors, strict=True):
        for axis, label in axes.get(name, {}).items():
            if label != axis_name:
                continue
            size = tensor.shape[axis]
            if size == 0:
                return None
            tensor = tensor.narrow(axis, 0, size - max(1, size // 3)) if size > 1 else torch.cat([tensor] * 2, axis)
        out.append(tensor)
    return out
