"""The README's plugin example (a user-defined layer registered with ``@mq.register``) runs as written:
quantize, report, save, load, dequantize and the CLI's inspect all go through the registered class."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.cli.inspect import inspect_file
from mono_quant.modules import QUANTIZED_CLASSES, REGISTRY

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_plugin_example_quantizes_saves_loads_and_dequantizes(tmp_path, monkeypatch) -> None:
    section = README.read_text().split("## Adding a layer type", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    try:
        exec(compile(code, "README.md", "exec"), namespace)
        scale, int8_scale = namespace["Scale"], namespace["Int8Scale"]
        q, loaded = namespace["q"], namespace["loaded"]
        assert type(q[0]) is int8_scale and namespace["skipped"] == []
        x = torch.randn(3, 8)
        assert torch.equal(loaded(x), q(x))
        assert inspect_file(tmp_path / "scale.safetensors")["layers"][0]["class"] == "Int8Scale"
        plain = mq.dequantize(q)
        assert type(plain[0]) is scale and torch.equal(plain[0].weight.detach(), q[0].dequantized_weight())
        report = mq.quantize(nn.Sequential(scale(8))).report
        assert report.layers[0].kind == "Scale" and report.layers[0].sqnr_db > 35
    finally:
        for float_type in [t for t in REGISTRY if t.__name__ == "Scale"]:
            REGISTRY.pop(float_type)
        QUANTIZED_CLASSES.pop("Int8Scale", None)


@pytest.fixture
def registry_snapshot():
    """The registry as it was before the test, restored after it (tests here register classes)."""
    saved = {float_type: list(classes) for float_type, classes in REGISTRY.items()}, dict(QUANTIZED_CLASSES)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved[0])
    QUANTIZED_CLASSES.clear()
    QUANTIZED_CLASSES.update(saved[1])


def _readme_plugin_code() -> str:
    section = README.read_text().split("## Adding a layer type", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize(
    ("float_type", "match"),
    [
        (42, r"register\(float_type=42\): expected an nn\.Module subclass"),
        ("Linear", r"register\(float_type='Linear'\): expected an nn\.Module subclass"),
        (torch.Tensor, r"register\(float_type=<class 'torch\.Tensor'>\): expected an nn\.Module subclass"),
        (nn.ReLU, r"register\(float_type=ReLU\): ReLU has no weight"),
        (nn.MaxPool2d, r"register\(float_type=MaxPool2d\): MaxPool2d has no weight"),
        (nn.Sequential, r"register\(float_type=Sequential\): Sequential has no weight"),
    ],
)
def test_register_names_the_argument_for_a_non_module_or_a_layer_without_weight(float_type, match) -> None:
    before = {t: list(c) for t, c in REGISTRY.items()}
    with pytest.raises(mq.ConfigError, match=match):
        mq.register(float_type)
    assert {t: list(c) for t, c in REGISTRY.items()} == before


@pytest.mark.parametrize("float_type", [nn.Linear, nn.Conv1d, nn.LayerNorm, nn.LSTMCell, nn.MultiheadAttention])
def test_register_accepts_layers_with_weights(float_type) -> None:
    assert callable(mq.register(float_type))  # the decorator; nothing is registered until it is applied


def test_register_refuses_a_class_that_is_not_a_quantized_module(registry_snapshot) -> None:
    class NotQuantized(nn.Module):
        pass

    with pytest.raises(mq.ConfigError, match=r"@register\(Linear\) on .*NotQuantized.*QuantizedLayer"):
        mq.register(nn.Linear)(NotQuantized)
    assert NotQuantized not in REGISTRY[nn.Linear]


def test_a_user_class_named_like_a_builtin_is_refused_and_int8_files_still_load(registry_snapshot, tmp_path) -> None:
    builtin = QUANTIZED_CLASSES["Int8Linear"]

    class Mine(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    user_class = type("Int8Linear", (nn.Module, mq.QuantizedLayer), {"dtypes": (mq.QuantDtype.INT8,), "bits": 8})
    with pytest.raises(mq.ConfigError, match=r"a different class named 'Int8Linear' is registered already"):
        mq.register(Mine)(user_class)
    assert QUANTIZED_CLASSES["Int8Linear"] is builtin and Mine not in REGISTRY
    model = nn.Sequential(nn.Linear(16, 8))
    q, _ = mq.dynamic_quantize(model)
    mq.save(q, tmp_path / "m.safetensors")
    loaded = mq.load(tmp_path / "m.safetensors", nn.Sequential(nn.Linear(16, 8)))
    x = torch.randn(3, 16)
    assert type(loaded[0]) is builtin and torch.equal(loaded(x), q(x))


def test_re_registering_a_class_replaces_it_for_quantize_and_load(registry_snapshot, tmp_path, monkeypatch) -> None:
    """A notebook re-runs the cell that defines the quantized class: quantize and load both use the new one."""
    code = _readme_plugin_code()
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    first = namespace["Int8Scale"]
    cell = code[code.index("@mq.register(Scale)") : code.index("q, skipped =")]
    exec(
        compile(cell.replace("x * self.dequantized_weight()", "x * self.dequantized_weight() + 0"), "cell", "exec"),
        namespace,
    )
    second, scale = namespace["Int8Scale"], namespace["Scale"]
    assert second is not first and REGISTRY[scale] == [second] and QUANTIZED_CLASSES["Int8Scale"] is second
    q = mq.quantize(nn.Sequential(scale(8))).model
    mq.save(q, tmp_path / "again.safetensors")
    loaded = mq.load(tmp_path / "again.safetensors", nn.Sequential(scale(8)))
    assert type(q[0]) is second and type(loaded[0]) is second


def test_a_registered_type_without_a_weight_on_the_instance_is_skipped_with_the_reason(registry_snapshot) -> None:
    code = _readme_plugin_code()
    namespace: dict = {}
    exec(compile(code[: code.index("q, skipped =")], "README.md", "exec"), namespace)
    layer = namespace["Scale"](4)
    del layer.weight  # e.g. a layer built lazily, not yet given its weight
    result = mq.quantize(nn.Sequential(layer, nn.Linear(4, 4)))
    assert result.skipped == ["0"] and "has no weight to quantize" in str(result.report)
