"""The README's plugin example (a user-defined layer registered with ``@mq.register``) runs as written:
quantize, report, save, load, dequantize and the CLI's inspect all go through the registered class."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

import mono_quant as mq
from mono_quant.cli_inspect import inspect_file
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
