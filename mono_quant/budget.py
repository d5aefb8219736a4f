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

import copy
import math
import numbers
import re
import time
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from mono_quant.budget_report import FLOAT, BudgetReport, BudgetResult, BudgetStep, SensitivityRow
from mono_quant.calibration import Calibrator, ForwardFn, default_forward, iterate_batches
from mono_quant.config import Mode, QuantDtype, QuantizationConfig, parse_dtype
from mono_quant.copying import eval_mode
from mono_quant.errors import CalibrationError, ConfigError, QuantizationError
from mono_quant.fidelity import output_tensor
from mono_quant.modules import ActivationQParams
from mono_quant.quantize import quantize
from mono_quant.selection import calibrated_layers, select_layers

SENSITIVITY_POOL = 1024  # items read from the sensitivity data (whole batches)
SENSITIVITY_ITEMS = 128  # items of the pool on which layers are ranked
_FLOAT_NAMES = frozenset({"float", "float32", "fp32"})
_RUNG_BITS = {"int4": 4, "int8": 8, "fp16": 16, "bf16": 16, FLOAT: 32}

EvalFn = Callable[[nn.Module], Any]


# ----------------------------------------------------------------------------- pure decisions


def parse_ladder(ladder: Sequence[Any]) -> tuple[str, ...]:
    """Normalize a precision ladder to rung names, lowest precision first; raise ``ConfigError`` if it is
    empty, has an unknown rung, no quantized rung, or is not strictly ordered by precision.

    Example:
        >>> parse_ladder(("INT4", torch.qint8, "fp32"))
        ('int4', 'int8', 'float')
        >>> parse_ladder(("int8", "int4"))
        Traceback (most recent call last):
        ...
        mono_quant.errors.ConfigError: ladder=('int8', 'int4') must go from lowest to highest precision ...
    """
    if isinstance(ladder, str) or not isinstance(ladder, Sequence):
        raise ConfigError(f"ladder={ladder!r} must be a sequence of precisions such as ('int4', 'int8', 'float')")
    if not ladder:
        raise ConfigError("ladder=() is empty; expected precisions such as ('int4', 'int8', 'float')")
    rungs = []
    for rung in ladder:
        if (isinstance(rung, str) and rung.lower() in _FLOAT_NAMES) or rung is torch.float32:
            rungs.append(FLOAT)
            continue
        try:
            rungs.append(parse_dtype(rung).value)
        except ConfigError:
            raise ConfigError(
                f"ladder={tuple(ladder)!r} has unknown rung {rung!r}; expected some of 'int4', 'int8', 'fp16', "
                "'bf16', 'float'"
            ) from None
    bits = [_RUNG_BITS[r] for r in rungs]
    if any(a >= b for a, b in pairwise(bits)):
        raise ConfigError(
            f"ladder={tuple(rungs)!r} must go from lowest to highest precision with no rung repeated "
            "(int4 < int8 < fp16/bf16 < float)"
        )
    if rungs == [FLOAT]:
        raise ConfigError("ladder=('float',) has no quantized rung; add e.g. 'int8' before 'float'")
    return tuple(rungs)


def accuracy_drop(
    float_score: float, score: float, *, higher_is_better: bool = True, drop_type: str = "absolute"
) -> float:
    """How much worse ``score`` is than ``float_score`` (negative when better); ``"relative"`` divides by
    ``|float_score|``.

    Example:
        >>> round(accuracy_drop(0.95, 0.94), 6), round(accuracy_drop(0.5, 0.6, higher_is_better=False), 6)
        (0.01, 0.1)
        >>> round(accuracy_drop(0.8, 0.76, drop_type="relative"), 6)
        0.05
    """
    drop = float_score - score if higher_is_better else score - float_score
    if drop_type == "relative":
        if float_score == 0:
            raise QuantizationError("drop_type='relative' is undefined when the float score is 0; use 'absolute'")
        drop /= abs(float_score)
    return drop


def pick_items(errors: Sequence[float], drops: Sequence[float] | None, count: int) -> list[int]:
    """Indices of the ``count`` items to rank layers on: largest per-item score drop first (when known),
    then largest output error; ties keep the pool order.

    Example:
        >>> pick_items([0.1, 0.5, 0.2, 0.0], None, 2)
        [1, 2]
        >>> pick_items([0.1, 0.5, 0.2, 0.0], [1.0, 0.0, 0.0, 1.0], 2)
        [0, 3]
    """
    keys = [(-(drops[i] if drops is not None else 0.0), -errors[i], i) for i in range(len(errors))]
    return [key[2] for key in sorted(keys)[:count]]


def next_rung(rungs: Sequence[str], current: str) -> str | None:
    """The rung above ``current`` on a layer's ladder, or ``None`` at the top.

    Example:
        >>> next_rung(("int4", "int8", "float"), "int4"), next_rung(("int8", "float"), "float")
        ('int8', None)
    """
    index = rungs.index(current)
    return rungs[index + 1] if index + 1 < len(rungs) else None


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
) -> BudgetResult:
    """Quantize a copy of ``model`` keeping the score drop within ``max_drop``, moving the most sensitive
    layers up ``ladder`` (see the module docstring for the algorithm and its cost).

    ``eval_fn(model)`` scores a model (called in eval mode; it must not change the model's weights)
    and returns a number or ``(score, per_item_scores)``. ``config`` gives everything but the dtype
    (mode, group size, include/exclude, observer); its dtype must be a rung of ``ladder``, and each
    layer starts at the lowest rung that supports it. ``sensitivity_data`` (default:
    ``calibration_data``, same formats, fed with ``forward_fn``) ranks the layers. With a static int8
    rung, ``activation_qparams`` (layer name -> ``ActivationQParams``, e.g. ``Calibrator.qparams()`` from
    statistics gathered elsewhere) replaces the calibration on ``calibration_data``. The input model is
    never modified.

    Example:
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
    if config.dtype.value not in rungs:
        raise ConfigError(
            f"config.dtype={config.dtype.value!r} is not a rung of ladder={rungs!r}; the search starts every layer "
            f"at the ladder's first rung, e.g. ladder=({config.dtype.value!r}, 'float')"
        )
    configs = {rung: _rung_config(config, rung) for rung in rungs if rung != FLOAT}
    choices = _layer_rungs(model, configs, rungs)
    if not choices:
        raise QuantizationError(f"no layer of the model can be quantized with config={config} and ladder={rungs!r}")
    data = sensitivity_data if sensitivity_data is not None else calibration_data
    if data is None:
        raise ConfigError(
            "quantize_with_budget needs sensitivity_data (or calibration_data) to rank layers: a few batches of "
            "real inputs"
        )
    search = _Search(model, eval_fn, configs, choices, higher_is_better, drop_type, max_drop, forward_fn)
    if activation_qparams is None:
        search.qparams = _calibrate(model, configs, choices, calibration_data, forward_fn)
    else:
        search.qparams = _given_qparams(model, configs, choices, activation_qparams)
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
    """``config`` at one rung's dtype; int4 is weight-only, so a static config becomes weight-only there."""
    dtype = QuantDtype(rung)
    mode = Mode.WEIGHT_ONLY if dtype is QuantDtype.INT4 and config.mode is Mode.STATIC else config.mode
    return config.replace(dtype=dtype, mode=mode)


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


def _parse_score(value: Any, what: str) -> tuple[float, torch.Tensor | None]:
    """``eval_fn``'s result as ``(score, per_item_scores or None)``; raises naming ``eval_fn``."""
    per_item = None
    score = value
    if isinstance(value, tuple):
        if len(value) != 2:
            raise QuantizationError(
                f"eval_fn returned a tuple of {len(value)} items for the {what} model; expected a number or "
                "(score, per_item_scores)"
            )
        score, per_item = value
    if isinstance(score, torch.Tensor) and score.numel() == 1:
        score = score.item()
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        raise QuantizationError(
            f"eval_fn returned {type(score).__name__} {str(score)[:60]!r} for the {what} model; expected a number "
            "(or (score, per_item_scores))"
        )
    score = float(score)
    if not math.isfinite(score):
        raise QuantizationError(f"eval_fn returned {score} for the {what} model; expected a finite number")
    if per_item is not None:
        try:
            per_item = torch.as_tensor(per_item).detach().cpu().to(torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError) as err:
            raise QuantizationError(
                f"eval_fn returned per_item_scores of type {type(per_item).__name__} for the {what} model; expected "
                "a sequence or tensor of numbers"
            ) from err
    return score, per_item


def _glob_literal(name: str) -> str:
    """A glob pattern that matches exactly ``name``."""
    return re.sub(r"([*?\[])", r"[\1]", name)


def _batch_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        size = _batch_size(value)
        if size is not None:
            return size
    return None


def _take(batch: Any, rows: torch.Tensor, size: int) -> Any:
    """The rows ``rows`` of every tensor in ``batch`` whose first dimension is ``size``."""
    if isinstance(batch, torch.Tensor):
        return batch[rows.to(batch.device)] if batch.dim() and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {k: _take(v, rows, size) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take(v, rows, size) for v in batch)
    return batch


class _Search:
    """State of one search: the float model, per-rung configs, the current assignment and the data pool."""

    def __init__(
        self,
        model: nn.Module,
        eval_fn: EvalFn,
        configs: Mapping[str, QuantizationConfig],
        choices: Mapping[str, tuple[str, ...]],
        higher_is_better: bool,
        drop_type: str,
        max_drop: float,
        forward_fn: ForwardFn | None,
    ) -> None:
        self.model, self.eval_fn, self.configs, self.choices = model, eval_fn, configs, choices
        self.higher_is_better, self.drop_type, self.max_drop = higher_is_better, drop_type, max_drop
        self.feed = forward_fn or default_forward
        self.qparams: dict[str, ActivationQParams] | None = None
        self.evaluations = 0
        self.batches: list[Any] = []
        self.references: list[torch.Tensor] = []
        self.items: list[tuple[int, int | None]] = []  # (batch index, row or None for a whole batch)
        self.whole: list[bool] = []  # per batch: its output has no per-item rows, so it is one item
        self.subset: list[tuple[Any, torch.Tensor]] = []  # (batch, float output) on which layers are ranked

    # --- models and scores

    def build(self, assignment: Mapping[str, str]) -> nn.Module:
        """A quantized copy of the float model with each layer at its assigned rung (one ``quantize`` per rung)."""
        q_model = self.model
        for rung, config in self.configs.items():
            names = tuple(_glob_literal(name) for name, r in assignment.items() if r == rung)
            if names:
                q_model = quantize(q_model, config.replace(include=names), activation_qparams=self.qparams).model
        return copy.deepcopy(self.model).eval() if q_model is self.model else q_model

    def evaluate(self, model: nn.Module, what: str) -> tuple[float, torch.Tensor | None]:
        with eval_mode(model):
            try:
                value = self.eval_fn(model)
            except Exception as err:
                raise QuantizationError(
                    f"eval_fn raised {type(err).__name__} while scoring the {what} model: {err}"
                ) from err
        self.evaluations += 1
        return _parse_score(value, what)

    def drop(self, float_score: float, score: float) -> float:
        return accuracy_drop(float_score, score, higher_is_better=self.higher_is_better, drop_type=self.drop_type)

    def fits(self, drop: float) -> bool:
        return drop <= self.max_drop + 1e-12

    # --- cheap sensitivity

    @torch.inference_mode()
    def read_pool(self, data: Any) -> None:
        """Read at least ``SENSITIVITY_POOL`` items (whole batches) and the float model's outputs on them."""
        with eval_mode(self.model):
            for batch in iterate_batches(data):
                reference = output_tensor(self.feed(self.model, batch)).detach().float()
                size = _batch_size(batch)
                index = len(self.batches)
                self.batches.append(batch)
                self.references.append(reference)
                whole = size is None or not reference.dim() or reference.shape[0] != size
                self.whole.append(whole)
                self.items += [(index, None)] if whole else [(index, row) for row in range(size)]
                if len(self.items) >= SENSITIVITY_POOL:
                    break
        if not self.batches:
            raise CalibrationError("sensitivity_data is empty; pass at least one batch of real inputs")

    @torch.inference_mode()
    def item_errors(self, q_model: nn.Module) -> list[float]:
        """Normalized squared output error of ``q_model`` against the float model, per pool item."""
        errors: list[float] = []
        for index, (batch, reference) in enumerate(zip(self.batches, self.references, strict=True)):
            out = output_tensor(self.feed(q_model, batch)).float().to(reference.device)
            ref = reference.reshape(1, -1) if self.whole[index] else reference.reshape(reference.shape[0], -1)
            diff = (out.reshape(ref.shape) - ref).pow(2).sum(1) / ref.pow(2).sum(1).clamp_min(1e-30)
            errors += diff.tolist()
        return errors

    def choose_subset(self, q_model: nn.Module, float_items: torch.Tensor | None, items: torch.Tensor | None) -> None:
        """Keep the ``SENSITIVITY_ITEMS`` pool items where ``q_model`` does worst."""
        errors = self.item_errors(q_model)
        drops = None
        if float_items is not None and items is not None and len(float_items) == len(items) == len(self.items):
            drops = (float_items - items if self.higher_is_better else items - float_items).tolist()
        chosen = sorted(pick_items(errors, drops, SENSITIVITY_ITEMS))
        by_batch: dict[int, list[int]] = {}
        for i in chosen:
            index, row = self.items[i]
            by_batch.setdefault(index, [])
            if row is not None:
                by_batch[index].append(row)
        self.subset = []
        for index, rows in by_batch.items():
            batch, reference = self.batches[index], self.references[index]
            if rows:
                picked = torch.tensor(rows)
                batch, reference = _take(batch, picked, reference.shape[0]), reference[picked.to(reference.device)]
            self.subset.append((batch, reference))

    @torch.inference_mode()
    def sensitivity(self, layer: str, rung: str) -> float:
        """Normalized output MSE on the subset of the float model with only ``layer`` at ``rung``."""
        if rung == FLOAT:
            return 0.0
        q_model = self.build({layer: rung})
        signal = noise = 0.0
        for batch, reference in self.subset:
            out = output_tensor(self.feed(q_model, batch)).float().to(reference.device)
            noise += (out.reshape(reference.shape) - reference).pow(2).sum().item()
            signal += reference.pow(2).sum().item()
        return noise / max(signal, 1e-30)

    # --- the greedy loop

    def run(self, data: Any, max_evals: int | None, time_budget_s: float | None, started: float) -> BudgetResult:
        def out_of_budget() -> str | None:
            if max_evals is not None and self.evaluations >= max_evals:
                return f"max_evals={max_evals} evaluations used"
            if time_budget_s is not None and time.perf_counter() - started >= time_budget_s:
                return f"time_budget_s={time_budget_s} passed"
            return None

        float_score, float_items = self.evaluate(self.model, "float")
        start = {name: rungs[0] for name, rungs in self.choices.items()}
        assignment = dict(start)
        current = self.build(assignment)
        quantized_score, items = self.evaluate(current, "fully quantized")
        score, drop = quantized_score, self.drop(float_score, quantized_score)
        steps: list[BudgetStep] = []
        sensitivity: list[SensitivityRow] = []
        frozen: set[str] = set()
        keys: dict[str, float] = {}
        order: dict[str, int] = {}
        reranks = 0
        stop = "budget met with every layer at its lowest rung" if self.fits(drop) else out_of_budget()
        if stop is None:
            self.read_pool(data)
            self.choose_subset(current, float_items, items)
            keys = {name: self.sensitivity(name, rung) for name, rung in assignment.items()}
            order = {name: i for i, name in enumerate(keys)}
            ranked = sorted(keys, key=lambda n: (-keys[n], order[n]))
            sensitivity = [SensitivityRow(name, keys[name], i) for i, name in enumerate(ranked, 1)]
        while stop is None:
            movable = [n for n in keys if n not in frozen and next_rung(self.choices[n], assignment[n]) is not None]
            stop = "ladder exhausted" if not movable else out_of_budget()
            if stop is not None:
                break
            layer = max(movable, key=lambda n: (keys[n], -order[n]))
            rung = next_rung(self.choices[layer], assignment[layer])
            assert rung is not None
            trial = {**assignment, layer: rung}
            trial_model = self.build(trial)
            trial_score, trial_items = self.evaluate(trial_model, f"{layer!r} at {rung}")
            trial_drop = self.drop(float_score, trial_score)
            worse = trial_score < score if self.higher_is_better else trial_score > score
            steps.append(BudgetStep(layer, assignment[layer], rung, trial_score, trial_drop, not worse))
            if worse:  # undo, freeze the layer at its rung, re-rank on the items the current model gets worst
                del trial_model
                frozen.add(layer)
                reranks += 1
                if out_of_budget() is None:
                    self.choose_subset(current, float_items, items)
                    keys = {n: self.sensitivity(n, assignment[n]) if n not in frozen else 0.0 for n in keys}
                continue
            assignment, current, score, drop, items = trial, trial_model, trial_score, trial_drop, trial_items
            keys[layer] = self.sensitivity(layer, rung)
            if self.fits(drop):
                stop = "budget reached"
        seconds = time.perf_counter() - started
        reached = self.fits(drop)
        moves = {name: assignment[name] for name in assignment if assignment[name] != start[name]}
        report = BudgetReport(
            sensitivity, start, dict(assignment), steps, float_score, quantized_score, score, drop, self.max_drop,
            self.drop_type, reached, stop, self.evaluations, reranks, seconds,
        )  # fmt: skip
        return BudgetResult(
            current, reached, float_score, quantized_score, score, drop, moves, sensitivity, self.evaluations,
            seconds, report, dict(assignment), steps, reranks, stop,
        )  # fmt: skip
