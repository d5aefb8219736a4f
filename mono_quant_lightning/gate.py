"""The accuracy gate: a pure decision on the float and quantized scores (no Lightning, no torch state).

``decide`` turns two metric values into a ``GateDecision`` (drop, pass/fail, reason). The drop is
oriented so that a positive value always means "the quantized model is worse": it follows the
metric's ``higher_is_better``. The gate fails only when ``drop > max_drop`` (a drop exactly equal to
``max_drop`` passes), when either score is NaN, or when the drop cannot be measured.
"""

from __future__ import annotations

import dataclasses
import math
from enum import Enum

from mono_quant import QuantizationError


class DropType(str, Enum):
    """How the drop is measured: ``absolute`` (score difference) or ``relative`` (fraction of the float score)."""

    ABSOLUTE = "absolute"
    RELATIVE = "relative"


class QuantizationGateError(QuantizationError):
    """The quantized model lost more than ``max_drop``; raised out of ``trainer.fit`` with ``on_violation="raise"``.

    ``decision`` holds the ``GateDecision`` that failed.

    Example:
        >>> err = QuantizationGateError("too much", decide(0.9, 0.5, 0.01))
        >>> err.decision.passed
        False
    """

    def __init__(self, message: str, decision: GateDecision | None = None) -> None:
        super().__init__(message)
        self.decision = decision


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The outcome of the gate: ``drop`` (positive = worse), whether it ``passed``, and a readable ``reason``."""

    float_score: float
    quantized_score: float
    drop: float
    max_drop: float
    passed: bool
    reason: str


def measure_drop(
    float_score: float,
    quantized_score: float,
    *,
    higher_is_better: bool = True,
    drop_type: DropType | str = DropType.ABSOLUTE,
) -> float:
    """How much worse the quantized score is (negative when it is better); NaN if either score is NaN.

    A relative drop divides by ``|float_score|``; with a float score of 0 it is 0 when both scores are
    equal and +/-inf otherwise.

    Example:
        >>> measure_drop(0.90, 0.88)
        0.020000000000000018
        >>> measure_drop(0.50, 0.45, drop_type="relative")
        0.09999999999999998
        >>> measure_drop(0.30, 0.33, higher_is_better=False)  # a loss that went up
        0.030000000000000027
    """
    drop_type = DropType(drop_type)
    float_score, quantized_score = float(float_score), float(quantized_score)
    diff = float_score - quantized_score if higher_is_better else quantized_score - float_score
    if drop_type is DropType.ABSOLUTE or math.isnan(diff):
        return diff
    if float_score == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / abs(float_score)


def decide(
    float_score: float,
    quantized_score: float,
    max_drop: float,
    *,
    higher_is_better: bool = True,
    drop_type: DropType | str = DropType.ABSOLUTE,
    coverage_warning: str = "",
) -> GateDecision:
    """Pass when the quantized model is at most ``max_drop`` worse than the float model.

    ``coverage_warning`` (the quantization report's warning, e.g. that only 2% of the matmul weights were
    quantized) ends the reason, so a decision on a mostly-float model says so whether it passes or not.

    Example:
        >>> decide(0.95, 0.94, 0.01).passed          # drop == max_drop passes
        True
        >>> decide(0.95, 0.97, 0.01).reason          # scoring higher is a pass with a negative drop
        'quantized scores better than float (drop -0.02 <= max_drop 0.01)'
        >>> d = decide(0.95, float("nan"), 0.01)
        >>> d.passed, d.reason
        (False, 'quantized score is NaN')
        >>> decide(0.95, 0.95, 0.01, coverage_warning="only 2% of the matmul weights were quantized").reason
        'drop 0 <= max_drop 0.01; WARNING: only 2% of the matmul weights were quantized'
    """
    decision = _decide(float_score, quantized_score, max_drop, higher_is_better, DropType(drop_type))
    if coverage_warning:
        return dataclasses.replace(decision, reason=f"{decision.reason}; WARNING: {coverage_warning}")
    return decision


def _decide(
    float_score: float, quantized_score: float, max_drop: float, higher_is_better: bool, drop_type: DropType
) -> GateDecision:
    max_drop = float(max_drop)
    drop = measure_drop(float_score, quantized_score, higher_is_better=higher_is_better, drop_type=drop_type)
    unit = " (relative)" if drop_type is DropType.RELATIVE else ""
    if math.isnan(float(float_score)) or math.isnan(float(quantized_score)):
        which = "float" if math.isnan(float(float_score)) else "quantized"
        if math.isnan(float(float_score)) and math.isnan(float(quantized_score)):
            which = "float and quantized"
        return GateDecision(float_score, quantized_score, drop, max_drop, False, f"{which} score is NaN")
    if math.isnan(drop):
        return GateDecision(float_score, quantized_score, drop, max_drop, False, "the drop cannot be measured")
    # Round away float noise so that e.g. 0.95 - 0.94 counts as exactly 0.01.
    passed = round(drop, 12) <= round(max_drop, 12)
    if not passed:
        reason = f"drop {drop:.4g}{unit} > max_drop {max_drop:.4g}"
    elif drop < 0:
        reason = f"quantized scores better than float (drop {drop:.4g}{unit} <= max_drop {max_drop:.4g})"
    else:
        reason = f"drop {drop:.4g}{unit} <= max_drop {max_drop:.4g}"
    return GateDecision(float_score, quantized_score, drop, max_drop, passed, reason)
