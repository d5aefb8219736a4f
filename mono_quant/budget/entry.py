"""``quantize_with_budget``: quantize every layer, then move the most sensitive ones up a precision ladder
(e.g. int4 -> int8 -> float) until the score drop fits an accuracy budget.

Algorithm (cost counted in full ``eval_fn`` evaluations, the expensive part):

1. Score the float model and the fully quantized one (every layer at the ladder's first rung that supports
   it): 2 evaluations. Stop if the drop already fits.
2. Rank layers cheaply, with no full evaluation: read a pool of at least ``SENSITIVITY_POOL`` items of
   ``sensitivity_data`` (or ``calibration_data``), keep the ``SENSITIVITY_ITEMS`` items where the fully
   quantized model does worst (largest per-item score drop when ``eval_fn`` returns per-item scores aligned
   with the pool, then largest output error), and measure for each layer the normalized output MSE of the
   float model with only that layer quantized at its current rung. Highest error = most sensitive.
3. Greedy: move the most sensitive movable layer one rung up and evaluate (1 evaluation per step); stop
   as soon as the drop fits. A kept move re-measures that layer at its new rung (a layer at ``"float"`` has
   error 0). A step that made the score worse is undone, the layer is frozen at its rung, and the ranking is
   redone on the items where the current model does worst (a re-rank, no evaluation).
4. Stop when the ladder is exhausted, after ``max_evals`` evaluations or once ``time_budget_s`` has passed.

So the search costs ``2 + (steps kept) + (re-ranks)`` evaluations at most. Kept steps never lower the
score, so the returned model is the best one evaluated. Static int8 calibrates once, on the float model
(or takes ``activation_qparams`` computed elsewhere, e.g. by a Lightning validation epoch).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.batches import ForwardFn
from mono_quant.budget.report import FLOAT, BudgetResult
from mono_quant.budget.rules import (
    FITTED_RUNGS,
    EvalFn,
    parse_ladder,
    rung_dtype,
    rung_of,
)
from mono_quant.budget.search import Search
from mono_quant.config import Mode, QuantDtype, QuantizationConfig
from mono_quant.copying import eval_mode
from mono_quant.engine.calibration import Calibrator
from mono_quant.engine.fitting_statistics import StatisticsCollector, fitted_layers
from mono_quant.engine.selection import calibrated_layers, select_layers
from mono_quant.errors import CalibrationError, ConfigError, QuantizationError
from mono_quant.modules import ActivationQParams

# ----------------------------------------------------------------------------- the search


def quantize_with_budget(
    model: nn.Module,
    eval_fn: EvalFn,
    *,
    config: QuantizationConfig | None = None,
    calibration_data: Any = None,
    max_drop: float = 0.01,
    drop_type: str = "absolute",
    higher_is_better: bool = True,
    ladder: Sequence[Any] = ("int8", "float"),
    max_evals: int | None = None,
    time_budget_s: float | None = None,
    sensitivity_data: Any = None,
    forward_fn: ForwardFn | None = None,
    activation_qparams: Mapping[str, ActivationQParams] | None = None,
    input_statistics: Mapping[str, InputStatistics] | None = None,
) -> BudgetResult:
    """Quantize a copy of ``model`` keeping the score drop within ``max_drop``, moving the most sensitive
    layers up ``ladder`` (see the module docstring for the algorithm and its cost).

    ``eval_fn(model)`` scores a model (called in eval mode; it must not change the model's weights)
    and returns a number or ``(score, per_item_scores)``. ``config`` gives everything but the dtype
    (mode, group size, include/exclude, observer); its dtype must be a rung of ``ladder``, and each
    layer starts at the lowest rung that supports it. ``sensitivity_data`` (default:
    ``calibration_data``, same formats, fed with ``forward_fn``) ranks the layers. With a static int8
    rung, ``activation_qparams`` (layer name -> ``ActivationQParams``, e.g. ``Calibrator.qparams()`` from
    statistics gathered elsewhere) replaces the calibration on ``calibration_data``. A fitted rung
    (``"int4-gptq"``/``"int4-awq"``: int4 Linear weights fitted to data, between ``"int4"`` and ``"int8"``) fits
    to ``input_statistics`` (layer name -> ``InputStatistics``, e.g. from a ``StatisticsCollector``) or else to
    statistics of the float model's inputs collected once on ``calibration_data`` (default: ``sensitivity_data``).
    ``config``'s dtype and algorithm name its rung (``"int4-gptq"`` for ``dtype="int4", algorithm="gptq"``). The
    input model is never modified.

    Example:
        >>> import torch
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
        >>> x = torch.randn(64, 64)
        >>> reference = model(x).detach()
        >>> def score(m):  # higher is better: minus the output MSE against the float model
        ...     with torch.inference_mode():
        ...         return -nn.functional.mse_loss(m(x), reference).item()
        >>> result = quantize_with_budget(model, score, config=QuantizationConfig(group_size=32),
        ...                               ladder=("int4", "int8", "float"), max_drop=1e-4, sensitivity_data=x)
        >>> result.reached, result.drop <= 1e-4, result.evaluations <= 2 + len(result.steps) + result.reranks
        (True, True, True)
    """
    started = time.perf_counter()
    rungs = parse_ladder(ladder)
    _check_options(model, eval_fn, max_drop, drop_type, higher_is_better, max_evals, time_budget_s)
    config = config if config is not None else QuantizationConfig()
    if not isinstance(config, QuantizationConfig):
        raise ConfigError(f"config of type {type(config).__name__} is not supported; expected a QuantizationConfig")
    if rung_of(config) not in rungs:
        given = f"config.dtype={config.dtype.value!r}"
        if rung_of(config) != config.dtype.value:
            given += f" with algorithm={config.algorithm.value!r} (rung {rung_of(config)!r})"
        raise ConfigError(
            f"{given} is not a rung of ladder={rungs!r}; the search starts every layer at the ladder's first rung, "
            f"e.g. ladder=({rung_of(config)!r}, 'float')"
        )
    configs = {rung: _rung_config(config, rung) for rung in rungs if rung != FLOAT}
    choices = _layer_rungs(model, configs, rungs)
    if not choices:
        raise QuantizationError(f"no layer of the model can be quantized with config={config} and ladder={rungs!r}")
    data = sensitivity_data if sensitivity_data is not None else calibration_data
    fitted = [rung for rung in rungs if rung in FITTED_RUNGS]
    if fitted and input_statistics is None and data is None:
        raise ConfigError(
            f"ladder rung {fitted[0]!r} fits int4 weights to data: pass calibration_data (or sensitivity_data), a "
            f"few batches of real inputs, or input_statistics; or use the rung 'int4' (round to nearest)"
        )
    if data is None:
        raise ConfigError(
            "quantize_with_budget needs sensitivity_data (or calibration_data) to rank layers: a few batches of "
            "real inputs"
        )
    search = Search(model, eval_fn, configs, choices, higher_is_better, drop_type, max_drop, forward_fn)
    if activation_qparams is None:
        search.qparams = _calibrate(model, configs, choices, calibration_data, forward_fn)
    else:
        search.qparams = _given_qparams(model, configs, choices, activation_qparams)
    if fitted:
        fit_data = calibration_data if calibration_data is not None else data
        search.statistics = _input_statistics(model, configs, choices, input_statistics, fit_data, forward_fn)
    return search.run(data, max_evals, time_budget_s, started)


def _check_options(
    model: Any,
    eval_fn: Any,
    max_drop: Any,
    drop_type: Any,
    higher_is_better: Any,
    max_evals: Any,
    time_budget_s: Any,
) -> None:
    if not isinstance(model, nn.Module):
        raise QuantizationError(f"model of type {type(model).__name__} is not supported; expected a torch.nn.Module")
    if not callable(eval_fn):
        raise ConfigError(f"eval_fn={eval_fn!r} is not callable; expected eval_fn(model) -> score")
    if isinstance(max_drop, bool) or not isinstance(max_drop, numbers.Real) or not math.isfinite(max_drop):
        raise ConfigError(f"max_drop={max_drop!r} must be a finite number")
    if max_drop < 0:
        raise ConfigError(f"max_drop={max_drop!r} must be >= 0")
    if drop_type not in ("absolute", "relative"):
        raise ConfigError(f"drop_type={drop_type!r} is not supported; expected 'absolute' or 'relative'")
    if not isinstance(higher_is_better, bool):
        raise ConfigError(f"higher_is_better={higher_is_better!r} must be True or False")
    if max_evals is not None and (isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 2):
        raise ConfigError(f"max_evals={max_evals!r} must be None or an integer >= 2 (float and quantized scores)")
    if time_budget_s is not None and (
        isinstance(time_budget_s, bool) or not isinstance(time_budget_s, numbers.Real) or not time_budget_s > 0
    ):
        raise ConfigError(f"time_budget_s={time_budget_s!r} must be None or a positive number of seconds")


def _rung_config(config: QuantizationConfig, rung: str) -> QuantizationConfig:
    """``config`` at one rung's dtype; int4 is weight-only, so a static config becomes weight-only there.

    The search itself moves layers between rungs by the user's metric, so ``quantize``'s output floors only
    measure here (``min_output_sqnr_db=-inf``) unless the config sets one.
    """
    dtype, algorithm = rung_dtype(rung)
    mode = Mode.WEIGHT_ONLY if dtype is QuantDtype.INT4 and config.mode is Mode.STATIC else config.mode
    floor = -math.inf if config.min_output_sqnr_db is None else config.min_output_sqnr_db
    return config.replace(dtype=dtype, mode=mode, min_output_sqnr_db=floor, algorithm=algorithm)


def _layer_rungs(
    model: nn.Module, configs: Mapping[str, QuantizationConfig], rungs: tuple[str, ...]
) -> dict[str, tuple[str, ...]]:
    """Layer name -> the rungs it supports (``"float"`` always), for layers with at least one quantized rung."""
    chosen = {rung: select_layers(model, cfg).chosen for rung, cfg in configs.items()}
    out = {}
    for name, _ in model.named_modules():
        own = tuple(r for r in rungs if r == FLOAT or name in chosen[r])
        if any(r != FLOAT for r in own):
            out[name] = own
    return out


def _calibrate(
    model: nn.Module,
    configs: Mapping[str, QuantizationConfig],
    choices: Mapping[str, tuple[str, ...]],
    calibration_data: Any,
    forward_fn: ForwardFn | None,
) -> dict[str, ActivationQParams] | None:
    """Static int8 activation scales, calibrated once on the float model (``None`` when not needed)."""
    config = configs.get(QuantDtype.INT8.value)
    if config is None:
        return None
    layers = {name: layer for name, layer in calibrated_layers(model, config).items() if name in choices}
    if not layers:
        return None
    if calibration_data is None:
        raise CalibrationError("mode='static' needs calibration_data (or use mode='dynamic')")
    with eval_mode(model):
        calibrator = Calibrator(layers, config)
        calibrator.run(model, calibration_data, forward_fn)
    return calibrator.qparams()


def _input_statistics(
    model: nn.Module,
    configs: Mapping[str, QuantizationConfig],
    choices: Mapping[str, tuple[str, ...]],
    given: Mapping[str, InputStatistics] | None,
    data: Any,
    forward_fn: ForwardFn | None,
) -> dict[str, InputStatistics]:
    """Input statistics of every searched layer a fitted rung fits: ``given`` (checked), or collected on the float
    model from ``data``. The rung whose layers lack statistics is named in the error."""
    rungs = [rung for rung in configs if rung in FITTED_RUNGS]
    layers = {
        name: layer
        for rung in rungs
        for name, layer in fitted_layers(model, configs[rung]).items()
        if rung in choices.get(name, ())
    }
    if given is not None:
        if not isinstance(given, Mapping):
            raise ConfigError(
                f"input_statistics of type {type(given).__name__} is not supported; expected a mapping of layer "
                "name -> InputStatistics (e.g. StatisticsCollector.statistics())"
            )
        missing = sorted(set(layers) - set(given))
        if missing:
            raise CalibrationError(f"input_statistics has no entry for layer(s) {missing} of ladder rung {rungs[0]!r}")
        return dict(given)
    collector = StatisticsCollector(layers, configs[rungs[0]])
    collector.run(model, data, forward_fn)
    try:
        return collector.statistics()
    except CalibrationError as err:
        raise CalibrationError(f"ladder rung {rungs[0]!r}: {err}") from None


def _given_qparams(
    model: nn.Module,
    configs: Mapping[str, QuantizationConfig],
    choices: Mapping[str, tuple[str, ...]],
    given: Mapping[str, ActivationQParams],
) -> dict[str, ActivationQParams]:
    """The caller's static int8 activation parameters, checked to cover every searched layer that needs them."""
    if not isinstance(given, Mapping):
        raise ConfigError(
            f"activation_qparams of type {type(given).__name__} is not supported; expected a mapping of layer name "
            "-> ActivationQParams (e.g. Calibrator.qparams())"
        )
    config = configs.get(QuantDtype.INT8.value)
    needed = [] if config is None else [name for name in calibrated_layers(model, config) if name in choices]
    missing = sorted(set(needed) - set(given))
    if missing:
        raise CalibrationError(f"activation_qparams has no entry for layer(s) {missing}")
    return dict(given)
