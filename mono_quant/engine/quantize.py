"""``quantize``: copy the model, select layers, calibrate if static, swap in quantized modules, report.

The input model is never modified: everything happens on a deep copy, one layer at a time, so the
extra memory beyond that copy is about one float copy of the largest layer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.algorithms.awq import awq_notes
from mono_quant.algorithms.smoothquant import smoothquant_notes
from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.batches import ForwardFn, first_batch
from mono_quant.config import Mode, QuantizationConfig, WeightAlgorithm
from mono_quant.copying import bake_parametrized_weights, copy_model, reject_meta_model
from mono_quant.engine.bias_correction import corrected_check, require_data
from mono_quant.engine.calibration import OUTPUT, Calibrator, output_key
from mono_quant.engine.output_check import build_checked, capture_inputs, recording_inputs
from mono_quant.engine.report import (
    LayerReport,
    QuantizationReport,
    QuantizationResult,
    check_finite,
    layer_report,
    module_bytes,
)
from mono_quant.engine.selection import (
    Selection,
    calibrated_layers,
    calibrated_outputs,
    coverage_warning,
    select_layers,
)
from mono_quant.engine.state_dict import quantize_state_dict
from mono_quant.engine.weight_fitting import SequentialStatistics, fitter, input_groups
from mono_quant.errors import CalibrationError, ConfigError, OutputCheckWarning, QuantizationError
from mono_quant.graph.equalization import equalization_note, equalize_pairs
from mono_quant.graph.folding import fold_batchnorm_notes
from mono_quant.graph.fused_graph import enable_fused_forward
from mono_quant.modules import ActivationQParams, QuantizedLayer
from mono_quant.modules.attach import install, proxy_module
from mono_quant.modules.base import float_weight
from mono_quant.skips import Skip, SkipKind, kind_of


def quantize(
    model: nn.Module | Mapping[str, torch.Tensor],
    config: QuantizationConfig | None = None,
    *,
    calibration_data: Any = None,
    forward_fn: ForwardFn | None = None,
    activation_qparams: Mapping[str, ActivationQParams] | None = None,
    input_statistics: Mapping[str, InputStatistics] | None = None,
    **overrides: Any,
) -> QuantizationResult:
    """Quantize a copy of ``model`` (an ``nn.Module`` or a state_dict) per ``config`` and ``overrides``.

    ``config`` may also be a dtype name (``quantize(model, "int4")``).

    In static mode, ``activation_qparams`` (layer name -> ``ActivationQParams``, e.g. from a
    ``Calibrator`` fed elsewhere) is used instead of calibrating on ``calibration_data``; its calibrated conv
    outputs (``Calibrator(..., outputs=...)``) are used only where no BatchNorm was folded, since they may have
    been observed before folding. With
    ``algorithm="gptq"``/``"awq"``, int4 Linear weights are fitted to ``calibration_data`` layer by layer
    (``engine.weight_fitting``), or to ``input_statistics`` (layer name -> ``InputStatistics``) gathered elsewhere.

    Example:
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        >>> result = quantize(model, dtype="int8", mode="static", calibration_data=[torch.randn(8, 64)])
        >>> type(result.model[0]).__name__, result.report.min_sqnr_db > 38
        ('Int8Linear', True)
        >>> cal = Calibrator({"0": model[0], "2": model[2]}, QuantizationConfig(mode="static"))
        >>> cal.run(model, [torch.randn(8, 64)])
        1
        >>> result = quantize(model, mode="static", activation_qparams=cal.qparams())
        >>> result.model[2].input_scale.item() == cal.qparams()["2"].scale.item()
        True
    """
    if isinstance(config, (str, torch.dtype)):
        config = QuantizationConfig(dtype=config)  # quantize(model, "int4") reads as the dtype
    elif config is not None and not isinstance(config, QuantizationConfig):
        raise ConfigError(
            f"config={config!r} is not a QuantizationConfig; pass mq.QuantizationConfig(...), a dtype name such "
            "as 'int8', or keywords such as dtype='int8'"
        )
    config = (config or QuantizationConfig()).replace(**overrides) if overrides else (config or QuantizationConfig())
    if isinstance(model, Mapping):
        return quantize_state_dict(model, config)
    if not isinstance(model, nn.Module):
        raise QuantizationError(
            f"model of type {type(model).__name__} is not supported; expected a torch.nn.Module or a state_dict"
        )
    reject_meta_model(model)
    bytes_before = module_bytes(model)
    q_model = copy_model(model)
    bake_parametrized_weights(q_model)  # weight norm & co: the effective weight is what gets quantized
    example = first_batch(calibration_data)  # proves conv->BatchNorm pairs by data flow
    folded = fold_batchnorm_notes(q_model, example, forward_fn) if config.fold_batchnorm else {}
    require_data(config, example)  # equalize / bias_correction run on real inputs
    static_default = config.bias_correction is None and config.mode is Mode.STATIC and example is not None
    corrects_bias = bool(config.bias_correction) or static_default  # docs/algorithms.md: +4 dB on Lite0
    notes = [equalization_note(equalize_pairs(q_model, example, forward_fn))] if config.equalize else []
    q_model.eval()
    selection = select_layers(q_model, config)
    selection.skipped.update(folded)
    modules = {name: q_model.get_submodule(name) for name in selection.chosen}
    for name, module in modules.items():
        attachment = selection.attached.get(name)
        check_finite(name, proxy_module(module, attachment) if attachment else module)
    notes += smoothquant_notes(q_model, config, list(modules), calibration_data, forward_fn, activation_qparams)
    notes += awq_notes(q_model, config, _fitted(selection), calibration_data, forward_fn)
    with recording_inputs(q_model, list(selection.chosen)) as inputs:  # for the output checks
        activations = _static_activations(q_model, config, calibration_data, forward_fn, activation_qparams)
    if activation_qparams is not None and any(kind_of(r) is SkipKind.FOLDED for r in folded.values()):
        # observed elsewhere, maybe before BatchNorm folding (Lightning: on the training model): not this output
        activations = {name: q for name, q in activations.items() if not name.endswith(OUTPUT)}
    inputs = dict(inputs) or capture_inputs(q_model, list(selection.chosen), example, forward_fn)
    statistics_for = _fitting_statistics(q_model, config, inputs, calibration_data, forward_fn, input_statistics)
    order = [name for name in inputs if name in selection.chosen]  # call order: fitting corrects predecessors
    rows, quantized_numel = [], 0
    by_weight: dict[int, QuantizedLayer] = {}  # float weight -> its quantized layer (tied weights)
    moved_layers: dict[str, bool] = {}  # layer -> whether the output check moved it up a precision
    for name in order + [name for name in selection.chosen if name not in inputs]:
        cls = selection.chosen[name]
        module = modules.pop(name)  # drop every reference so its float weight is freed after the swap
        attachment = selection.attached.get(name)
        float_module = proxy_module(module, attachment) if attachment else module
        fit = fitter(statistics_for, name) if statistics_for and not attachment else None
        x = inputs.pop(name, None)
        quantized, checked = build_checked(name, float_module, cls, config, activations.get(name), x, fit)
        if quantized is None:
            selection.skipped[name] = Skip(SkipKind.OUTPUT_FLOOR, checked.note)
            continue
        output = activations.get(output_key(name))
        if isinstance(output, ActivationQParams) and hasattr(quantized, "set_output_qparams"):
            quantized.set_output_qparams(output)  # the fused CPU graph's uint8 output where nothing else sets one
        if corrects_bias:
            checked = corrected_check(checked, quantized, float_module, module if attachment else None, x)
        weight_id = id(getattr(module, attachment.attribute if attachment else "weight", module))
        if weight_id in by_weight:
            share_tied_tensors(by_weight[weight_id], quantized)
        by_weight.setdefault(weight_id, quantized)
        rows.append(layer_report(name, float_module, quantized, checked))
        moved_layers[name] = checked.moved
        quantized_numel += float_weight(float_module).numel()
        if attachment:
            install(module, attachment, quantized)
        else:
            if not name:
                raise QuantizationError("the model itself is a single layer; wrap it in nn.Sequential to quantize it")
            q_model.set_submodule(name, quantized)
        del float_module, module
    enable_fused_forward(q_model)  # int8 conv+ReLU/add chains on CPU from a traced graph (load does the same)
    warn_moved_layers([name for name, moved in moved_layers.items() if moved], selection.skipped)
    warning = coverage_warning(q_model, quantized_numel, selection.skipped)
    after = module_bytes(q_model)
    report = QuantizationReport(rows, selection.skipped, bytes_before, after, warning, speed_notes(rows) + notes)
    return QuantizationResult(q_model, list(selection.skipped), report, config)


def dynamic_quantize(model: nn.Module, dtype: Any = torch.qint8, **options: Any) -> tuple[nn.Module, list[str]]:
    """Quantize weights ahead of time and activations at run time; returns ``(model, skipped)``.

    ``dtype`` may be ``torch.qint8``/``"int8"``, ``"int4"`` (weight-only), ``torch.float16``/``"fp16"``,
    ``"bf16"``.

    Example:
        >>> q, skipped = dynamic_quantize(nn.Sequential(nn.Linear(16, 4), nn.LayerNorm(4)))
        >>> type(q[0]).__name__, skipped
        ('Int8Linear', ['1'])
    """
    result = quantize(model, dtype=dtype, mode=Mode.DYNAMIC, **options)
    return result.model, result.skipped


def static_quantize(
    model: nn.Module,
    calibration_data: Any,
    dtype: Any = "int8",
    observer: str = "minmax",
    forward_fn: ForwardFn | None = None,
    **options: Any,
) -> tuple[nn.Module, list[str]]:
    """Quantize weights and (with scales calibrated on ``calibration_data``) activations to int8.

    Example:
        >>> data = [torch.randn(4, 16) for _ in range(4)]
        >>> q, skipped = static_quantize(nn.Sequential(nn.Linear(16, 4)), data, observer="histogram")
        >>> q[0].input_scale.item() > 0
        True
    """
    result = quantize(
        model,
        dtype=dtype,
        mode=Mode.STATIC,
        observer=observer,
        calibration_data=calibration_data,
        forward_fn=forward_fn,
        **options,
    )
    return result.model, result.skipped


def _static_activations(
    q_model: nn.Module,
    config: QuantizationConfig,
    calibration_data: Any,
    forward_fn: ForwardFn | None,
    given: Mapping[str, ActivationQParams] | None,
) -> dict[str, ActivationQParams]:
    """Per-layer input parameters for static mode: the given ones, or calibrated on ``calibration_data``."""
    calibrated = calibrated_layers(q_model, config)
    if not calibrated:
        return {}
    if given is not None:
        missing = sorted(set(calibrated) - set(given))
        if missing:
            raise CalibrationError(f"activation_qparams has no entry for layer(s) {missing}")
        wrong = next((name for name in calibrated if not isinstance(given[name], ActivationQParams)), None)
        if wrong is not None:
            raise ConfigError(
                f"activation_qparams[{wrong!r}] is a {type(given[wrong]).__name__}; expected "
                "mq.ActivationQParams(scale, zero_point) (from a Calibrator's qparams())"
            )
        return dict(given)
    if calibration_data is None:
        raise CalibrationError("mode='static' needs calibration_data (or use mode='dynamic')")
    calibrator = Calibrator(calibrated, config, calibrated_outputs(q_model, config))
    calibrator.run(q_model, calibration_data, forward_fn)
    return calibrator.qparams()


def _fitted(selection: Selection) -> list[str]:
    """The chosen layers a data-driven algorithm fits: built from fitted int4 weights, not attached."""
    return [n for n, cls in selection.chosen.items() if hasattr(cls, "from_quantized") and n not in selection.attached]


def _fitting_statistics(
    q_model: nn.Module,
    config: QuantizationConfig,
    inputs: Mapping[str, torch.Tensor],
    calibration_data: Any,
    forward_fn: ForwardFn | None,
    given: Mapping[str, InputStatistics] | None,
) -> Callable[[str], InputStatistics] | None:
    """Where fitted layers get their input statistics: ``given``, or gathered one group at a time."""
    if config.algorithm is WeightAlgorithm.RTN:
        return None
    if given is not None:
        def lookup(name: str) -> InputStatistics:
            if name not in given:
                raise CalibrationError(f"input_statistics has no entry for layer {name!r}")
            return given[name]

        return lookup
    if calibration_data is None:
        raise CalibrationError(
            f"algorithm={config.algorithm.value!r} fits weights to data: pass calibration_data (a few batches of "
            "real inputs) or input_statistics; algorithm='rtn' needs none"
        )
    return SequentialStatistics(q_model, input_groups(inputs), calibration_data, forward_fn, config).statistics


def share_tied_tensors(first: nn.Module, second: nn.Module) -> None:
    """Make ``second`` (quantized from the same float weight as ``first``, e.g. an LM head tied to the
    embedding) hold ``first``'s identical quantized tensors, so they stay one tensor in memory and files.

    Example:
        >>> emb = nn.Embedding(16, 32)
        >>> head = nn.Linear(32, 16, bias=False)
        >>> head.weight = emb.weight
        >>> q = quantize(nn.ModuleDict({"emb": emb, "head": head})).model
        >>> q["head"].weight is q["emb"].weight
        True
    """
    sources = first.state_dict(keep_vars=True)
    for key, tensor in second.state_dict(keep_vars=True).items():
        source = sources.get(key)
        same = source is not None and source.shape == tensor.shape and source.dtype == tensor.dtype
        if same and torch.equal(source, tensor):
            second.get_submodule(key.rpartition(".")[0])._buffers[key.rpartition(".")[2]] = source
    if isinstance(second, QuantizedLayer):
        second.prepare()  # derived kernel state from the shared tensors


def warn_moved_layers(moved: list[str], skipped: dict[str, str]) -> None:
    """One ``OutputCheckWarning`` naming the layers the output checks moved or kept float (report: why)."""
    kept = [name for name, reason in skipped.items() if kind_of(reason) is SkipKind.OUTPUT_FLOOR]
    if moved or kept:
        warnings.warn(
            f"mono-quant: {len(moved) + len(kept)} layer(s) missed their output floor against float: moved to a "
            f"higher precision {moved}, kept float {kept}; the report's notes say why",
            OutputCheckWarning,
            stacklevel=3,
        )


def speed_notes(rows: list[LayerReport]) -> list[str]:
    """What the report should say about speed: dynamic int8 convolutions lose to float at batch 1 on CPU.

    Example:
        >>> speed_notes([LayerReport("c", "Conv2d", "dynamic", 8, 40.0, 100, 30)])[0][:40]
        '1 convolution runs int8 dynamic: each ca'
    """
    convs = [r for r in rows if r.kind.startswith("Conv") and r.mode == Mode.DYNAMIC.value and r.bits == 8]
    if not convs:
        return []
    plural = "s run" if len(convs) > 1 else " runs"
    return [
        f"{len(convs)} convolution{plural} int8 dynamic: each call measures and quantizes its input, which at "
        "batch 1 on CPU costs about what the int8 convolution saves (measured 0.9-1.3x float latency); "
        "mode='static' with calibration_data is faster at every batch size"
    ]
