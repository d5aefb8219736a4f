"""Timing helpers shared by the benchmarks: round-robin medians (background load spreads evenly) and one-off medians."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def round_robin_ms(
    fns: dict[str, Callable[[], object]], rounds: int, calls: int = 1, warmup: int = 2
) -> dict[str, float]:
    """Median ms of each function (``calls`` calls per sample), every function once per round, after ``warmup`` calls.

    Interleaving spreads load from other processes over every variant instead of penalizing whichever ran
    last; the warm-up absorbs first-call work (weight packing, kernel choice, allocator).

    Example:
        >>> sorted(round_robin_ms({"a": lambda: None, "b": lambda: None}, rounds=3))
        ['a', 'b']
    """
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for fn in fns.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in fns.items():
                start = time.perf_counter()
                for _ in range(calls):
                    fn()
                samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds under ``torch.inference_mode``.

    Example:
        >>> median_ms(lambda: None, iters=3) >= 0
        True
    """
    return round_robin_ms({"fn": fn}, iters, warmup=warmup)["fn"]
