"""Checking each quantized layer's output against float, and moving a layer that misses its floor.

``quantize`` records each chosen layer's input on the first calibration batch (``capture_inputs``); without
data, or where the recorded input does not fit the layer's product, a seeded random probe serves. Each
quantized layer then runs on that input beside its float original (``build_checked``): the first call is
also where every integer kernel is checked against its exact reference (``kernels.check``). A layer whose
output SQNR is under the floor of its precision (``OUTPUT_FLOORS_DB``, or the config's
``min_output_sqnr_db``) is rebuilt at the next precision of its ladder (finer int4 groups, int8 dynamic
instead of int4 or static, a float input matrix for a recurrent layer) and stays float when none passes;
the report gives every layer's measured output SQNR and why any layer moved.

Floors: 25 dB for int8 (a correct int8 layer measured 34-45 dB on real data here, 7-bit CPUs included; a
kernel or scale that went wrong gives under 20), 12 dB for int4 (round-to-nearest group-wise int4 measured
15-25 dB), 30 dB for fp16/bf16 (casts measure 45-75 dB; an fp16 overflow gives Inf).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.batches import default_forward
from mono_quant.config import Mode, QuantDtype, QuantizationConfig
from mono_quant.kernels import check
from mono_quant.modules import ActivationQParams, QuantizedLayer, quantized_class_for
from mono_quant.modules.base import float_weight
from mono_quant.modules.recurrent_core import QuantizedRecurrent
from mono_quant.modules.registry import layer_config
from mono_quant.qparams import weight_sqnr_db

OUTPUT_FLOORS_DB = {QuantDtype.INT8: 25.0, QuantDtype.INT4: 12.0, QuantDtype.FP16: 30.0, QuantDtype.BF16: 30.0}
_FINEST_INT4_GROUP = 32
NEGLIGIBLE_RMS = 1e-6  # a layer whose float output is this small (vanishing activations) is not judged
_PROBE_ROWS = 64
_MIN_OUTPUT_VALUES = 256

Builder = Callable[[nn.Module, QuantizationConfig, ActivationQParams | None], QuantizedLayer]


@dataclasses.dataclass(frozen=True)
class OutputCheck:
    """What the check measured for one layer: output SQNR against float (``None``: no check), and notes."""

    sqnr_db: float | None
    note: str = ""
    weight_sqnr_db: float | None = None  # of the layer that was kept
    moved: bool = False  # whether the layer kept is a higher precision than requested


def floor_db(config: QuantizationConfig) -> float:
    """The output SQNR a layer quantized under ``config`` must reach.

    Example:
        >>> floor_db(QuantizationConfig(dtype="int4")), floor_db(QuantizationConfig(min_output_sqnr_db=30.0))
        (12.0, 30.0)
    """
    given = config.min_output_sqnr_db
    return OUTPUT_FLOORS_DB[config.dtype] if given is None else float(given)


@contextlib.contextmanager
def recording_inputs(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, the first tensor argument each named submodule receives is recorded (once each).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with recording_inputs(model, ["0", "2"]) as inputs:
        ...     _ = model(torch.ones(5, 4))
        >>> inputs["0"].shape, inputs["2"].shape
        (torch.Size([5, 4]), torch.Size([5, 3]))
    """
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        return record

    handles = [model.get_submodule(name).register_forward_pre_hook(hook(name)) for name in names]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def capture_inputs(model: nn.Module, names: list[str], batch: Any, forward_fn: Any = None) -> dict[str, torch.Tensor]:
    """``recording_inputs`` over one forward of ``batch`` (``{}`` without a batch, or one the model refuses).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> capture_inputs(model, ["2"], torch.ones(5, 4))["2"].shape
        torch.Size([5, 3])
    """
    if batch is None or not names:
        return {}
    with recording_inputs(model, names) as seen, torch.no_grad():
        try:
            (forward_fn or default_forward)(model, batch)
        except Exception:  # a batch the model refuses: calibration reports it; probes serve here
            return {}
    return dict(seen)


def build_checked(
    name: str,
    float_module: nn.Module,
    cls: type[QuantizedLayer],
    config: QuantizationConfig,
    activation: ActivationQParams | None,
    x: torch.Tensor | None,
    fit: Callable[[nn.Module, QuantizationConfig], Any] | None = None,
) -> tuple[QuantizedLayer | None, OutputCheck]:
    """The quantized layer for ``float_module`` that meets its output floor on ``x`` (or a probe), climbing the
    precision ladder; ``(None, check)`` when no rung does (the layer stays float, ``check.note`` says why).
    A weight that quantizes to Inf/NaN raises ``QuantizationError`` naming layer ``name``. ``fit(module,
    config)`` (``engine.weight_fitting``) gives the int4 rungs' weights where the class takes fitted ones.

    Example:
        >>> from mono_quant.modules import Int8Linear
        >>> layer, result = build_checked("fc", nn.Linear(64, 32), Int8Linear, QuantizationConfig(), None, None)
        >>> type(layer).__name__, result.sqnr_db > 30, result.weight_sqnr_db > 40
        ('Int8Linear', True, True)
    """
    tried, kernel_notes = [], []
    reference = float_weight(float_module)
    for label, build, rung_config in _ladder(float_module, cls, config, fit):
        failures_before = len(check.failures())
        layer = build(float_module, rung_config, activation if rung_config.mode is Mode.STATIC else None)
        weight_db = weight_sqnr_db(name, reference, layer.dequantized_weight().reshape(reference.shape))
        measured, rms = _output_sqnr(float_module, layer, x, activation)
        kernel_notes += [str(f) for f in check.failures()[failures_before:]]
        floor = floor_db(rung_config)
        negligible = rms < NEGLIGIBLE_RMS
        if measured >= floor or negligible:
            moved = f"moved to {label}: " + "; ".join(tried) if tried else ""
            unjudged = f"float output RMS {rms:.1e} is below {NEGLIGIBLE_RMS:g}: not judged" if negligible else ""
            notes = filter(None, [moved, unjudged, *kernel_notes])
            return layer, OutputCheck(measured, "; ".join(notes), weight_db, moved=bool(tried))
        tried.append(f"{label} {measured:.1f} dB < {floor:g} dB floor")
    note = "kept float: output SQNR against float under the floor at every precision tried (" + "; ".join(tried) + ")"
    return None, OutputCheck(None, "; ".join([note, *kernel_notes]))


def _ladder(
    module: nn.Module, cls: type[QuantizedLayer], config: QuantizationConfig, fit: Any = None
) -> list[tuple[str, Builder, QuantizationConfig]]:
    """``(label, builder, config)`` rungs from the requested precision up."""
    first = layer_config(config, cls)
    build = cls.from_float
    if fit is not None and first.dtype is QuantDtype.INT4 and hasattr(cls, "from_quantized"):
        build = lambda m, c, _a: cls.from_quantized(m, c, fit(m, c))  # noqa: E731
    rungs: list[tuple[str, Builder, QuantizationConfig]] = [(_label(first), build, first)]
    if issubclass(cls, QuantizedRecurrent):
        float_input = functools.partial(cls.from_float, float_first_input=True)
        rungs.append(("int8 with a float32 input matrix", float_input, first))
    if first.dtype is QuantDtype.INT4 and first.group_size > _FINEST_INT4_GROUP:
        finer = first.replace(group_size=_FINEST_INT4_GROUP)
        if cls.unsupported_reason(module, finer) is None:
            rungs.append((_label(finer), build, finer))
    if first.dtype is QuantDtype.INT4 or first.mode is Mode.STATIC:
        dynamic = first.replace(dtype=QuantDtype.INT8, mode=Mode.DYNAMIC, smoothquant=None)
        int8_cls, _ = quantized_class_for(module, dynamic)
        if int8_cls is not None:
            rungs.append((_label(dynamic), int8_cls.from_float, dynamic))
    return rungs


def _label(config: QuantizationConfig) -> str:
    if config.dtype is QuantDtype.INT4:
        fitted = "" if config.algorithm.value == "rtn" else f" {config.algorithm.value}"
        return f"int4{fitted} group {config.group_size}"
    if config.dtype is QuantDtype.INT8:
        return f"int8 {config.mode.value}"
    return config.dtype.value


def _output_sqnr(
    float_module: nn.Module, layer: nn.Module, x: torch.Tensor | None, activation: ActivationQParams | None
) -> tuple[float, float]:
    """Output SQNR of ``layer`` against ``float_module`` on ``x`` and, where ``x`` gives fewer than
    ``_MIN_OUTPUT_VALUES`` outputs (or none fits), on a seeded probe too (within the calibrated input range
    where there is one): an SQNR over a handful of values is decided by chance cancellations in them.
    Returns ``(sqnr_db, rms of the float output)``."""
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    with torch.no_grad():
        if x is not None:
            # a recorded input that is not this product's (a parent pads or reshapes first) is passed over
            with contextlib.suppress(RuntimeError, ValueError, TypeError, IndexError):
                pairs.append((_first_tensor(float_module(x)), _first_tensor(layer(x))))
        if sum(expected.numel() for expected, _ in pairs) < _MIN_OUTPUT_VALUES:
            probe = _probe(float_module, activation)
            if probe is not None:
                pairs.append((_first_tensor(float_module(probe)), _first_tensor(layer(probe))))
    if not pairs:
        return math.inf, math.inf  # nothing to run it on: no check
    expected = torch.cat([e.detach().float().flatten() for e, _ in pairs])
    got = torch.cat([g.detach().float().flatten() for _, g in pairs])
    judged = torch.isfinite(expected)  # where float itself overflows there is nothing to compare with
    if not judged.any():
        return math.inf, math.inf
    signal = torch.linalg.vector_norm(expected[judged].double())  # float64: 1e30-scale outputs square past float32
    rms = float(signal / math.sqrt(int(judged.sum())))
    if not torch.isfinite(got[judged]).all():
        return -math.inf, rms
    noise = torch.linalg.vector_norm((expected[judged] - got[judged]).double())
    if noise == 0:
        return math.inf, rms
    return (-math.inf if signal == 0 else float(20 * torch.log10(signal / noise))), rms


def _first_tensor(value: Any) -> torch.Tensor:
    while isinstance(value, (tuple, list)):
        value = value[0]
    if isinstance(value, Mapping):
        value = next(iter(value.values()))
    return value


def _probe(module: nn.Module, activation: ActivationQParams | None = None) -> torch.Tensor | None:
    """A seeded random input for ``module`` (a float Linear, Conv2d, Embedding or recurrent layer): standard
    normal, or uniform over the calibrated range of ``activation`` (a static layer's input)."""
    generator = torch.Generator().manual_seed(0)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, (_PROBE_ROWS,), generator=generator).to(device)
    if isinstance(module, nn.Linear):
        shape: tuple[int, ...] = (_PROBE_ROWS, module.in_features)
    elif isinstance(module, nn.Conv2d):
        spatial = [(k - 1) * d + 8 for k, d in zip(module.kernel_size, module.dilation, strict=True)]
        shape = (2, module.in_channels, *spatial)
    elif isinstance(module, (nn.RNNBase,)):
        shape = (2, 6, module.input_size) if module.batch_first else (6, 2, module.input_size)
    elif isinstance(module, nn.RNNCellBase):
        shape = (4, module.input_size)
    else:
        return None
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
    if activation is None:
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
    scale, zero = float(activation.scale), float(activation.zero_point)
    low, high = scale * (-128 - zero), scale * (127 - zero)
    return (torch.rand(shape, generator=generator) * (high - low) + low).to(device=device, dtype=dtype)
