"""``Search``: the state of one accuracy-budget search (float model, per-rung configs, the current
assignment, the sensitivity pool) and its moves; ``quantize_with_budget`` drives it."""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.algorithms.statistics import InputStatistics
from mono_quant.batches import ForwardFn, default_forward, iterate_batches
from mono_quant.budget.report import FLOAT, BudgetReport, BudgetResult, BudgetStep, SensitivityRow
from mono_quant.budget.rules import (
    SENSITIVITY_ITEMS,
    SENSITIVITY_POOL,
    EvalFn,
    accuracy_drop,
    batch_size,
    glob_literal,
    next_rung,
    parse_score,
    pick_items,
    take,
)
from mono_quant.config import QuantizationConfig
from mono_quant.copying import eval_mode
from mono_quant.engine.fidelity import output_tensor
from mono_quant.engine.quantize import quantize
from mono_quant.engine.report import LayerReport
from mono_quant.errors import CalibrationError, QuantizationError
from mono_quant.qparams import ActivationQParams


class Search:
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
        self.statistics: dict[str, InputStatistics] | None = None  # for the fitted int4 rungs
        self.evaluations = 0
        self.batches: list[Any] = []
        self.references: list[torch.Tensor] = []
        self.items: list[tuple[int, int | None]] = []  # (batch index, row or None for a whole batch)
        self.whole: list[bool] = []  # per batch: its output has no per-item rows, so it is one item
        self.subset: list[tuple[Any, torch.Tensor]] = []  # (batch, float output) on which layers are ranked

    # --- models and scores

    def build(self, assignment: Mapping[str, str]) -> nn.Module:
        """A quantized copy of the float model with each layer at its assigned rung (one ``quantize`` per rung)."""
        return self.build_with_rows(assignment)[0]

    def build_with_rows(self, assignment: Mapping[str, str]) -> tuple[nn.Module, list[LayerReport]]:
        """``build``, and the report rows of its quantized layers as each rung's ``quantize`` measured them
        (against the float weights it quantized: BatchNorms folded, swapped or attached alike)."""
        q_model, rows = self.model, []
        for rung, config in self.configs.items():
            names = tuple(glob_literal(name) for name, r in assignment.items() if r == rung)
            if names:
                result = quantize(
                    q_model,
                    config.replace(include=names),
                    activation_qparams=self.qparams,
                    input_statistics=self.statistics,
                )
                q_model, rows = result.model, rows + result.report.layers
        return (copy.deepcopy(self.model).eval() if q_model is self.model else q_model), rows

    def evaluate(self, model: nn.Module, what: str) -> tuple[float, torch.Tensor | None]:
        with eval_mode(model):
            try:
                value = self.eval_fn(model)
            except Exception as err:
                raise QuantizationError(
                    f"eval_fn raised {type(err).__name__} while scoring the {what} model: {err}"
                ) from err
        self.evaluations += 1
        return parse_score(value, what)

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
                size = batch_size(batch)
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
                batch, reference = take(batch, picked, reference.shape[0]), reference[picked.to(reference.device)]
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
        current, rows = self.build_with_rows(assignment)
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
            trial_model, trial_rows = self.build_with_rows(trial)
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
            rows = trial_rows
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
            seconds, report, dict(assignment), steps, reranks, stop, rows,
        )  # fmt: skip
