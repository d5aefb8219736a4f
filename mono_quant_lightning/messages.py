"""How the callback speaks: ``[mono-quant] ...`` through Lightning's rank-zero info log and warnings.

Example:
    >>> info("quiet", verbose=False)  # nothing is logged
"""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn


def info(message: str, verbose: bool = True) -> None:
    """Log ``message`` on global rank zero when ``verbose``."""
    if verbose:
        rank_zero_info(f"[mono-quant] {message}")


def warn(message: str) -> None:
    """Warn with ``message`` on global rank zero (whatever ``verbose`` says)."""
    rank_zero_warn(f"[mono-quant] {message}")
