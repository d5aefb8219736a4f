"""Shared fixtures: small real models and real data (scikit-learn's bundled digits)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Digits 8x8 images scaled to [0, 1], split 1400 train / 397 test."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(x), generator=generator)
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one thread avoids oversubscribing shared cores (training is ~20x slower when contended)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def minilm():
    """``(benchmarks/minilm.py module, model, tokenizer)`` for the real all-MiniLM-L6-v2; skips without it."""
    import minilm as kit  # benchmarks/minilm.py (pytest's pythonpath)

    if kit.available() is not None:
        pytest.skip(kit.available())
    model, tokenizer = kit.load_minilm()
    return kit, model, tokenizer
