"""The accuracy fallback at fit end: ``mono_quant.quantize_with_budget`` scored by the module's own validation.

Under DDP every rank runs the identical search: the ranking batches and static activation parameters are
rank zero's (broadcast), and every score is synced across processes; rank zero's moves are the ones acted on.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device

import mono_quant as mq
from mono_quant.budget.rules import FITTED_RUNGS
from mono_quant_lightning.batches import iterate
from mono_quant_lightning.evaluation import Scores, evaluate, step_forward


@dataclasses.dataclass(frozen=True)
class Search:
    """How to score and rank: the gate's score of a validation pass, its direction, and the options."""

    score: Callable[[Scores], float]
    higher_is_better: bool
    max_drop: float
    drop_type: str
    ladder: tuple[str, ...]
    ranking_batches: int
    metric: Any = None
    batch_fn: Any = None


def search(
    search: Search,
    trainer: Trainer,
    module: LightningModule,
    loaders: list[tuple[Any, float]],
    config: mq.QuantizationConfig,
    qparams: Any,
    statistics: Any = None,
) -> mq.BudgetResult:
    """Run the budgeted search on ``module``; every rank returns the same moves (rank zero's).

    A fitted rung (``"int4-gptq"``) fits to ``statistics``, the callback's input statistics (all-reduced, so the
    same on every rank); without them it raises ``CalibrationError`` naming the rung.

    Example:
        >>> search.__name__
        'search'
    """
    fitted = [rung for rung in search.ladder if rung in FITTED_RUNGS]
    if fitted and statistics is None:
        raise mq.CalibrationError(
            f"QuantizationCallback(fallback_ladder={search.ladder}): the rung {fitted[0]!r} fits int4 weights to input "
            "statistics, but none were collected (no fit validation epoch was observed); pass "
            "calibration_dataloader=... or drop the rung"
        )
    ranking = [move_data_to_device(b, "cpu") for _, _, b in iterate(loaders, search.ranking_batches)]
    ranking, qparams = trainer.strategy.broadcast((ranking, qparams), src=0)
    budget = mq.quantize_with_budget(
        module,
        lambda model: search.score(evaluate(model, trainer, loaders, search.metric, search.batch_fn, "fallback pass")),
        config=config,
        max_drop=search.max_drop,
        drop_type=search.drop_type,
        higher_is_better=search.higher_is_better,
        ladder=search.ladder,
        sensitivity_data=ranking,
        forward_fn=step_forward(trainer, search.batch_fn),
        activation_qparams=qparams,
        input_statistics=statistics,
    )
    moves, reached = trainer.strategy.broadcast((budget.moves, budget.reached), src=0)
    if (moves, reached) != (budget.moves, budget.reached):
        warnings.warn(  # on the disagreeing rank, so not rank_zero_warn
            f"rank {trainer.global_rank} found moves {budget.moves} but rank zero found {moves}; rank zero's model "
            "is the one exported",
            stacklevel=2,
        )
    return budget
