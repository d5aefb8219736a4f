"""The callback's choices, as enums that accept their strings (``on_violation="warn"`` is ``OnViolation.WARN``).

Example:
    >>> OnViolation("skip_export"), QuantizeOn("checkpoint") == "checkpoint"
    (<OnViolation.SKIP_EXPORT: 'skip_export'>, True)
"""

from __future__ import annotations

from enum import Enum


class QuantMode(str, Enum):
    """``auto`` picks ``static`` when validation batches were observed, else ``dynamic``."""

    AUTO = "auto"
    DYNAMIC = "dynamic"
    STATIC = "static"
    WEIGHT_ONLY = "weight_only"


class QuantizeOn(str, Enum):
    """When a quantized file is produced: at the end of ``fit`` and/or beside every checkpoint."""

    FIT_END = "fit_end"
    CHECKPOINT = "checkpoint"


class OnViolation(str, Enum):
    """What a failed gate does: raise (nothing exported), warn (and export), warn and skip the export, or
    fall back: keep the most sensitive layers at higher precision until the budget is met."""

    RAISE = "raise"
    WARN = "warn"
    SKIP_EXPORT = "skip_export"
    FALLBACK = "fallback"


class MonitorMode(str, Enum):
    """The direction of ``monitor``: ``max`` (higher is better, e.g. accuracy) or ``min`` (e.g. a loss)."""

    MAX = "max"
    MIN = "min"
