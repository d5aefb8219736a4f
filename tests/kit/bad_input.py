"""Shared material of the bad-input tests: a digits-sized model, real files per mode, file surgery."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mono_quant as mq

# file name -> quantize() options; every layer kind and mode the format knows
MODES: dict[str, dict[str, Any]] = {
    "dynamic": {"dtype": "int8"},
    "static": {"dtype": "int8", "mode": "static"},
    "weight_only": {"dtype": "int8", "mode": "weight_only"},
    "asymmetric": {"dtype": "int8", "scheme": "asymmetric"},
    "int4": {"dtype": "int4", "group_size": 32},
    "int4_asym": {"dtype": "int4", "group_size": 32, "scheme": "asymmetric"},
    "fp16": {"dtype": "fp16"},
    "bf16": {"dtype": "bf16"},
}


def digits_inputs(count: int = 64) -> torch.Tensor:
    """Real inputs: scikit-learn's bundled 8x8 digits scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    return torch.tensor(load_digits().data[:count], dtype=torch.float32) / 16.0


def model(seed: int = 0) -> nn.Sequential:
    """A digits classifier shape: 64 -> 64 -> 10 (int4-friendly input sizes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def quantized(mode: str, seed: int = 0) -> mq.QuantizationResult:
    options = dict(MODES[mode])
    if options.get("mode") == "static":
        options["calibration_data"] = [digits_inputs(32)]
    return mq.quantize(model(seed), **options)


def write_file(folder: Path, mode: str, suffix: str = ".safetensors", seed: int = 0) -> Path:
    path = folder / f"{mode}{suffix}"
    mq.save(quantized(mode, seed), str(path))
    return path


def document(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["mono_quant"])


def rewrite(src: Path, dst: Path, tensors: dict | None = None, edit: Any = None) -> Path:
    """Copy a safetensors file with some tensors replaced and/or ``edit(document)`` applied."""
    doc = document(src)
    if edit is not None:
        edit(doc)
    save_file({**load_file(src), **(tensors or {})}, dst, metadata={"format": "pt", "mono_quant": json.dumps(doc)})
    return dst


def layer_edit(layer: str, key: str, value: Any) -> Any:
    def edit(doc: dict) -> None:
        doc["layers"][layer][key] = value

    return edit


def top_edit(key: str, value: Any) -> Any:
    def edit(doc: dict) -> None:
        doc[key] = value

    return edit


def expect(error: type[Exception], word: str) -> Any:
    """``pytest.raises`` for an exact class (not a subclass) whose message contains ``word``."""

    class Exact:
        def __enter__(self) -> None:
            self.raises = pytest.raises(Exception, match=None)
            self.info = self.raises.__enter__()

        def __exit__(self, *exc: Any) -> bool:
            handled = self.raises.__exit__(*exc)
            assert type(self.info.value) is error, f"{type(self.info.value).__name__}: {self.info.value}"
            assert word in str(self.info.value), f"{word!r} not in {self.info.value}"
            return handled

    return Exact()
