"""The README's plugin example (a user-defined layer registered with ``@mq.register``) runs as written:
quantize, report, save, load, dequantize and the CLI's inspect all go through the registered class."""

from __future__ import annotations

import re
import warnings
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


class Project(nn.Module):
    """A user's layer: y = x W^T (its own class, not an ``nn.Linear``)."""

    def __init__(self, n_in: int = 8, n_out: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


class _Config:
    def to_dict(self) -> dict:
        return {"model_type": "project-toy"}


class ProjectModel(nn.Module):
    """Looks like a transformers model to ``save_pretrained`` (a ``config`` with ``to_dict``)."""

    def __init__(self) -> None:
        super().__init__()
        self.config, self.proj = _Config(), Project()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _project_class(name: str, *, complete: bool) -> type:
    """A quantized class for ``Project``: the whole contract when ``complete``, else only what quantize, save
    and load need (no ``dequantize``, ``onnx_forward`` nor ``state_dict_entry``)."""

    class Base(nn.Module, mq.QuantizedLayer):
        dtypes, bits = (mq.QuantDtype.INT8,), 8

        def __init__(self, shape: list[int]) -> None:
            super().__init__()
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.int8))
            self.register_buffer("weight_scale", torch.ones(shape[0]))

        @classmethod
        def from_float(cls, module, config, activation=None):
            weight = module.weight.detach()
            layer = cls(list(weight.shape))
            layer.weight_scale = weight.abs().amax(dim=1) / 127
            layer.weight = torch.round(weight / layer.weight_scale[:, None]).to(torch.int8)
            return layer

        @classmethod
        def from_metadata(cls, module, metadata):
            return cls(metadata["shape"])

        def metadata(self):
            return {"kind": "Project", "mode": "weight_only", "bits": 8, "scheme": "symmetric"}

        def dequantized_weight(self):
            return self.weight.float() * self.weight_scale[:, None]

        def forward(self, x):
            return x @ self.dequantized_weight().t()

    class Complete(Base):
        hf_exportable = True  # int8 ``weight`` + per-row ``weight_scale``: a compressed-tensors layout

        @classmethod
        def state_dict_entry(cls, tensors, name, mode):
            weight = tensors.get(f"{name}.weight")
            return None if weight is None else {**cls([1, 1]).metadata(), "shape": list(weight.shape)}

        def dequantize(self):
            plain = Project(self.weight.shape[1], self.weight.shape[0])
            plain.weight.data.copy_(self.dequantized_weight())
            return plain

        def onnx_forward(self, ops, x, bias=None):  # MatMulInteger on per-row uint8 activations
            return ops.linear(x, self.weight.t().contiguous(), self.weight_scale, None, None)

    return mq.register(Project)(type(name, (Complete if complete else Base,), {}))


def _report(name: str, kind: str, bits: int) -> object:
    """What ``state_dict_layers`` reads of a ``QuantizationReport``."""
    row = type("Row", (), {"name": name, "kind": kind, "bits": bits})()
    return type("Report", (), {"layers": [row]})()


def test_a_plugin_that_implements_the_contract_gets_save_load_hf_and_onnx_export(registry_snapshot, tmp_path) -> None:
    import onnx
    from safetensors.torch import load_file

    from mono_quant.io.save import state_dict_layers

    cls = _project_class("Int8ProjectFull", complete=True)
    q = mq.quantize(ProjectModel()).model
    x = torch.randn(3, 8)
    assert type(q.proj) is cls
    mq.save(q, tmp_path / "p.safetensors")
    loaded = mq.load(tmp_path / "p.safetensors", ProjectModel())
    assert type(loaded.proj) is cls and torch.equal(loaded(x), q(x))

    out = mq.save_pretrained(q, tmp_path / "hf")
    config = (out / "config.json").read_text()
    assert '"ignore": []' in config and '"proj"' in config
    stored = load_file(out / "model.safetensors")
    assert stored["proj.weight"].dtype == torch.int8 and stored["proj.weight_scale"].shape == (4, 1)

    with warnings.catch_warnings(record=True) as recorded:
        warnings.simplefilter("always")
        path = mq.export_onnx(q, x, tmp_path / "p.onnx")
    assert not [w for w in recorded if "no ONNX integer form" in str(w.message)]
    graph = onnx.load(path).graph
    assert "MatMulInteger" in {n.op_type for n in graph.node}
    assert onnx.TensorProto.INT8 in {i.data_type for i in graph.initializer}

    entry = state_dict_layers(q.state_dict(), None, _report("proj", "Project", 8), {})["proj"]
    assert entry["class"] == "Int8ProjectFull" and entry["shape"] == [4, 8] and entry["bias"] is False


def test_a_plugin_without_the_optional_methods_gets_errors_naming_them(registry_snapshot, tmp_path) -> None:
    from mono_quant.io.save import state_dict_layers

    _project_class("Int8ProjectBare", complete=False)
    q = mq.quantize(ProjectModel()).model
    mq.save(q, tmp_path / "p.safetensors")  # save and load need only the required methods
    x = torch.randn(3, 8)
    assert torch.equal(mq.load(tmp_path / "p.safetensors", ProjectModel())(x), q(x))
    with pytest.raises(mq.ConfigError, match=r"export_onnx: layer 'proj'.*Int8ProjectBare does not implement onnx_fo"):
        mq.export_onnx(q, x, tmp_path / "p.onnx")
    assert not (tmp_path / "p.onnx").exists()
    with pytest.raises(mq.ConfigError, match=r"save_pretrained: layer 'proj'.*Int8ProjectBare does not implement deq"):
        mq.save_pretrained(q, tmp_path / "hf")
    with pytest.raises(mq.ConfigError, match=r"Int8ProjectBare does not implement state_dict_entry"):
        state_dict_layers(q.state_dict(), None, _report("proj", "Project", 8), {})


def test_int8_conv2d_is_not_an_int8_linear_and_each_class_answers_for_itself() -> None:
    from mono_quant.modules import Int8Conv2d, Int8Linear

    conv = Int8Conv2d.from_float(nn.Conv2d(3, 4, 3), mq.QuantizationConfig())
    assert not isinstance(conv, Int8Linear) and isinstance(conv, mq.QuantizedLayer)
    assert (Int8Linear.hf_exportable, Int8Conv2d.hf_exportable) == (True, False)
    assert conv.fused_conv_params().weight is conv.weight and conv.float_shape() == [4, 3, 3, 3]
    weight_only = Int8Conv2d.from_float(nn.Conv2d(3, 4, 3), mq.QuantizationConfig(mode="weight_only"))
    assert weight_only.fused_conv_params() is None
