"""Choosing among kernels that compute the same layer call: checked against a reference, then measured, once.

CPUs rank kernels differently (an AMD EPYC with VNNI, an Intel Xeon with AMX, an AVX2 laptop), so where
several kernels can serve one call, the first call with a new key (layer kind, weight shape, batch bucket,
device, dtype) times each candidate on the real input (one warm-up call, then the best of
``MEASURE_REPEATS`` interleaved calls each), caches the fastest for the process and uses it from then on.

Before any timing, each candidate's output on that first call is compared with an exact reference
(``kernels.check``): a kernel that is wrong on this CPU for this shape is never chosen.
``set_kernel_choice("fixed")`` (or the environment variable ``MONO_QUANT_KERNELS=fixed``) uses each
layer's documented default instead (still checked), so results never depend on timing noise; the default is
``"measure"``. Inside ``torch.compile``, tracing or exporting nothing runs: what was chosen eagerly, else the
default, serves. ``chosen()``
says what was picked for every key seen so far.

A layer kind uses it with one call per forward (the layer computes its candidates' outputs; all
candidates agree up to float rounding)::

    name = choice.pick("int8_linear_dynamic", weight.shape, x, ("int_mm", "onednn"), "int_mm", run)
    out = run(name)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence

import torch

from mono_quant.errors import ConfigError
from mono_quant.kernels import check

FALLBACK = "float"  # what a layer runs when no candidate passes its check: the dequantized weight in float
MEASURE_REPEATS = 5
_BUCKET_EDGES = (1, 8, 64, 512)  # M = 1, 2-8, 9-64, 65-512, >512
_CHOICES = ("measure", "fixed")
_ENV = "MONO_QUANT_KERNELS"

_lock = threading.Lock()
_cache: dict[tuple, str] = {}
_mode: list[str | None] = [None]  # None: read the environment variable on first use


def set_kernel_choice(mode: str) -> None:
    """``"measure"`` (time the candidate kernels once per key, the default) or ``"fixed"`` (documented defaults).

    Switching clears what was chosen so far.

    Example:
        >>> set_kernel_choice("fixed"); kernel_choice()
        'fixed'
        >>> set_kernel_choice("measure")
    """
    if mode not in _CHOICES:
        raise ConfigError(f"set_kernel_choice: mode must be one of {_CHOICES}, got {mode!r}")
    with _lock:
        _mode[0] = mode
        _cache.clear()


def kernel_choice() -> str:
    """The current policy: ``"measure"`` or ``"fixed"`` (``MONO_QUANT_KERNELS`` until ``set_kernel_choice``).

    Example:
        >>> kernel_choice() in ("measure", "fixed")
        True
    """
    if _mode[0] is None:
        value = os.environ.get(_ENV, "measure").strip().lower() or "measure"
        if value not in _CHOICES:
            raise ConfigError(f"environment variable {_ENV} must be one of {_CHOICES}, got {value!r}")
        _mode[0] = value
    return _mode[0]


def batch_bucket(rows: int) -> str:
    """The batch bucket of a call with ``rows`` input rows: ``"1"``, ``"2-8"``, ``"9-64"``, ``"65-512"``, ``">512"``.

    Example:
        >>> [batch_bucket(m) for m in (1, 2, 8, 9, 64, 65, 512, 513)]
        ['1', '2-8', '2-8', '9-64', '9-64', '65-512', '65-512', '>512']
    """
    low = 1
    for edge in _BUCKET_EDGES:
        if rows <= edge:
            return str(edge) if low == edge else f"{low}-{edge}"
        low = edge + 1
    return f">{_BUCKET_EDGES[-1]}"


def _checking_allowed() -> bool:
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting())


def _fastest(candidates: Sequence[str], run: Callable[[str], object]) -> str:
    """The candidate with the best time of ``MEASURE_REPEATS`` rounds, one call of each per round (interleaved,
    so a burst of other work on the machine hits every candidate rather than one)."""
    best = dict.fromkeys(candidates, float("inf"))
    with torch.no_grad():
        for name in candidates:
            run(name)  # warm-up: lazily packed weights, allocator
        for _ in range(MEASURE_REPEATS):
            for name in candidates:
                start = time.perf_counter()
                run(name)
                best[name] = min(best[name], time.perf_counter() - start)
    return min(candidates, key=lambda name: best[name])


def pick(
    kind: str,
    weight_shape: tuple[int, ...],
    x: torch.Tensor,
    candidates: Sequence[str],
    default: str,
    run: Callable[[str], torch.Tensor],
    reference: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None,
    fallback: str = FALLBACK,
) -> str:
    """The kernel to use for this call: checked once per key, then ``default`` (fixed) or the measured winner.

    ``weight_shape`` is a tuple (``(out, in)``, or more for convolutions), ``x`` the input (its first dimension
    picks the bucket), ``run(name)`` computes the call with one candidate. On the first call with a new key,
    each candidate's output is compared with ``reference()`` (``(float64 reference, bound)`` for the first
    ``check.CHECK_ROWS`` rows, see ``kernels.check``); a candidate outside the bound is never used for that key
    in this process. When none passes, ``fallback`` is returned (``FALLBACK``: the layer's correct float path).
    Then the best of ``MEASURE_REPEATS`` timed calls decides (fixed mode: ``default`` if it passed, else the
    first that did).
    Inside ``torch.compile`` and tracing nothing runs: the cached name, else ``default``.

    Example:
        >>> set_kernel_choice("fixed")
        >>> pick("doc", (4, 4), torch.zeros(3, 4), ("a", "b"), "b", lambda name: torch.zeros(3))
        'b'
        >>> set_kernel_choice("measure")
        >>> pick("doc", (4, 4), torch.zeros(3, 4), ("a", "b"), "b", lambda name: torch.zeros(3)) in ("a", "b")
        True
        >>> chosen()["doc (4, 4) 2-8 cpu torch.float32"] in ("a", "b")
        True
        >>> wrong = lambda name: torch.full((3,), 9.0 if name == "a" else 1.0)
        >>> exact = lambda: (torch.ones(3, dtype=torch.float64), torch.full((3,), 0.01))
        >>> import warnings
        >>> with warnings.catch_warnings(record=True):
        ...     pick("doc", (5, 5), torch.zeros(3, 5), ("a", "b"), "a", wrong, exact)
        'b'
    """
    key = (kind, weight_shape, batch_bucket(x.shape[0]), x.device.type, x.dtype)
    name = _cache.get(key)
    if name is not None and (name in candidates or name == fallback):
        return name
    if not _checking_allowed():
        return default  # inside torch.compile or tracing: a cached eager choice outside ``candidates`` cannot serve
    passed = _passing(key, candidates, run, reference, fallback) if reference is not None else list(candidates)
    if not passed:
        name = fallback
    elif kernel_choice() == "fixed" or len(passed) == 1:
        name = default if default in passed else passed[0]
    else:
        name = _fastest(passed, run)
    with _lock:
        _cache[key] = name
    return name


def _passing(
    key: tuple,
    candidates: Sequence[str],
    run: Callable[[str], torch.Tensor],
    reference: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    fallback: str,
) -> list[str]:
    """The candidates whose output on this call lies within the reference's bound; the others are recorded."""
    with torch.no_grad():
        expected, bound = reference()
        results = {name: check.within(run(name)[: expected.shape[0]], expected, bound) for name in candidates}
    passed = [name for name, (ok, _, _) in results.items() if ok]
    label = f"{key[0]} {key[1]} batch {key[2]} on {key[3]}"
    for name, (ok, error, limit) in results.items():
        if not ok:
            check.record(check.KernelFailure(label, name, error, limit, passed[0] if passed else fallback))
    return passed


def chosen() -> dict[str, str]:
    """What was chosen so far: ``"kind (weight shape) bucket device dtype"`` -> kernel name.

    Example:
        >>> isinstance(chosen(), dict)
        True
    """
    with _lock:
        items = list(_cache.items())
    return {f"{kind} {shape} {bucket} {device} {dtype}": name for (kind, shape, bucket, device, dtype), name in items}
