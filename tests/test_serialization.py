"""Checkpoints: round trips per mode in a fresh interpreter, sizes on a real model, every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from kit.serialization_models import Net, inputs, skeleton
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import mono_quant as mq
from mono_quant.io.load import read_header
from mono_quant.modules import quantized_layers

TESTS_DIR = Path(__file__).resolve().parent


def quantized_models() -> dict[str, tuple[nn.Module, mq.QuantizationResult | None]]:
    """One quantized ``Net`` per mode plus a mixed-mode one (static int8 + int4 + fp16 in one model)."""
    model, calib = skeleton(0), [inputs(32, seed=1)]
    results = {
        "dynamic": mq.quantize(model, dtype="int8", mode="dynamic"),
        "dynamic_asym": mq.quantize(model, dtype="int8", mode="dynamic", scheme="asymmetric"),
        "static": mq.quantize(model, dtype="int8", mode="static", calibration_data=calib),
        "weight_only": mq.quantize(model, dtype="int8", mode="weight_only"),
        "int4": mq.quantize(model, dtype="int4"),
        "fp16": mq.quantize(model, dtype="fp16"),
        "bf16": mq.quantize(model, dtype="bf16"),
    }
    models = {name: (r.model, r) for name, r in results.items()}
    mixed = mq.quantize(model, dtype="int8", mode="static", include=("conv", "emb"), calibration_data=calib).model
    mixed = mq.quantize(mixed, dtype="int4", include=("fc1",)).model
    mixed = mq.quantize(mixed, dtype="fp16", include=("fc2",)).model
    models["mixed"] = (mixed, None)
    return models


CHILD = """
import json, sys, torch
import mono_quant as mq
from kit.serialization_models import inputs, skeleton
out = {{}}
for name, path in json.loads(sys.argv[1]).items():
    expected = torch.load(path + ".expected.pt", weights_only=True)
    q = mq.load(path, model=skeleton(seed=123))
    with torch.inference_mode():
        equal = [torch.equal(q(x), y) for x, y in zip(expected["inputs"], expected["outputs"])]
    out[name] = {{"equal": equal, "classes": {{n: type(m).__name__ for n, m in q.named_children()}}}}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict]]:
    """Every model saved (safetensors; .pt for two), with its outputs on batch 16 and batch 1.

    Kernels are fixed (``MONO_QUANT_KERNELS=fixed`` in the child too): measured choices may differ between
    processes, and candidates agree only to float32 rounding on some CPUs (AMX) or bf16 rounding (int4).
    The same kernel on the same inputs and CPU gives the same bits: that is what this file promises.
    """
    mq.set_kernel_choice("fixed")
    folder = tmp_path_factory.mktemp("modes")
    cases = {}
    for name, (model, result) in quantized_models().items():
        for suffix in (".safetensors", ".pt") if name in ("static", "mixed") else (".safetensors",):
            path = str(folder / f"{name}{suffix}")
            if result is not None:
                mq.save(result, path)
            else:
                mq.save(model, path)
            xs = [inputs(16), inputs(1, seed=3)]
            with torch.inference_mode():
                ys = [model(x) for x in xs]
            torch.save({"inputs": xs, "outputs": ys}, path + ".expected.pt")
            key = name + ("_pt" if suffix == ".pt" else "")
            cases[key] = {
                "path": path,
                "model": model,
                "classes": {n: type(m).__name__ for n, m in model.named_children()},
            }
    yield cases
    mq.set_kernel_choice("measure")


@pytest.fixture(scope="module")
def fresh_process(saved: dict[str, dict]) -> dict[str, dict]:
    """Load every file in ONE new interpreter into a random skeleton and compare with the saved outputs."""
    argument = json.dumps({name: case["path"] for name, case in saved.items()})
    child_path = os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")])  # the child imports kit
    proc = subprocess.run(
        [sys.executable, "-c", CHILD.format(), argument],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MONO_QUANT_KERNELS": "fixed", "PYTHONPATH": child_path},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


MODES = ["dynamic", "dynamic_asym", "static", "static_pt", "weight_only", "int4", "fp16", "bf16", "mixed", "mixed_pt"]


@pytest.mark.parametrize("mode", MODES)
def test_round_trip_in_fresh_process_is_bit_identical(mode: str, saved: dict, fresh_process: dict) -> None:
    # weight_only covers the alignment trap: reload + batch 16 through the packed int8 kernel
    assert fresh_process[mode]["equal"] == [True, True]
    assert fresh_process[mode]["classes"] == saved[mode]["classes"]


def test_mixed_model_holds_every_kind(saved: dict) -> None:
    metadata = load_metadata(saved["mixed"]["path"])
    classes = {name: entry["class"] for name, entry in metadata["layers"].items()}
    assert classes == {"emb": "Int8Embedding", "conv": "Int8Conv2d", "fc1": "Int4Linear", "fc2": "HalfLinear"}
    assert metadata["layers"]["conv"]["mode"] == "static"
    assert metadata["quantization_config"]["format"] == "mixed-precision"


def load_metadata(path: str) -> dict:
    return read_header(path)[0]


def test_metadata_document(saved: dict) -> None:
    with safe_open(saved["static"]["path"], framework="pt") as handle:
        header = handle.metadata()
    assert set(header) == {"format", "mono_quant"}
    meta = json.loads(header["mono_quant"])
    assert meta["format"] == "mono-quant" and meta["format_version"] == 1
    assert meta["mono_quant_version"] == mq.__version__
    assert meta["config"]["mode"] == "static"
    fc1 = meta["layers"]["fc1"]
    assert fc1["class"] == "Int8Linear" and fc1["bits"] == 8 and fc1["scheme"] == "symmetric"
    assert fc1["shape"] == [256, 640] and fc1["bias"] is True and fc1["sqnr_db"] > 35
    assert meta["skipped"] == {"norm": "LayerNorm is not a supported layer type"}
    ct = meta["quantization_config"]
    assert ct["quant_method"] == "compressed-tensors" and ct["ignore"] == ["norm"]
    assert ct["format"] == "mixed-precision"  # embeddings are weight-only in every int8 mode
    embedding, static = ct["config_groups"].values()
    assert static["format"] == "int-quantized" and sorted(static["targets"]) == ["conv", "fc1", "fc2"]
    assert static["weights"]["strategy"] == "channel" and static["input_activations"]["strategy"] == "tensor"
    assert embedding["format"] == "naive-quantized" and embedding["input_activations"] is None


def test_load_without_model_returns_state_dict_and_metadata(saved: dict) -> None:
    state, meta = mq.load(saved["static"]["path"])
    assert state["fc1.weight"].dtype == torch.int8 and state["fc1.weight_scale"].shape == (256,)
    assert state["fc1.input_scale"].shape == () and state["conv.weight"].shape == (8, 9)
    assert state["norm.weight"].dtype == torch.float32
    # memory-mapped copy-on-write: writing to a loaded tensor never reaches the file
    before = state["fc1.weight"].clone()
    state["fc1.weight"].add_(1)
    assert torch.equal(mq.load(saved["static"]["path"])[0]["fc1.weight"], before)
    assert set(meta["layers"]) == {"emb", "conv", "fc1", "fc2"}
    int4, _ = mq.load(saved["int4"]["path"])
    assert int4["fc1.weight_packed"].dtype == torch.int32 and int4["fc1.weight_packed"].shape == (256, 80)
    assert int4["fc1.weight_scale"].shape == (256, 5) and int4["fc1.weight_shape"].tolist() == [256, 640]
    assert read_header(saved["int4"]["path"])[1]["fc1.weight_packed"] == (torch.int32, (256, 80))


def test_pt_file_is_plain_tensors_for_weights_only_torch_load(saved: dict) -> None:
    obj = torch.load(saved["static_pt"]["path"], weights_only=True)
    assert set(obj) == {"mono_quant", "tensors"} and json.loads(obj["mono_quant"])["format_version"] == 1
    assert obj["tensors"]["fc1.weight"].dtype == torch.int8


def test_dequantize_gives_plain_float_model(saved: dict) -> None:
    q_model = saved["mixed"]["model"]
    plain = mq.dequantize(q_model)
    assert [type(m) for m in plain.children()] == [nn.Embedding, nn.Conv2d, nn.Linear, nn.LayerNorm, nn.Linear]
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    layers = quantized_layers(q_model)
    for name in ("emb", "conv", "fc1", "fc2"):
        assert torch.equal(getattr(plain, name).weight, layers[name].dequantized_weight())
    assert type(q_model.fc1).__name__ == "Int4Linear"  # the input is not modified


@pytest.mark.parametrize("mode", ["static", "int4", "mixed_pt"])
def test_dequantize_from_file(mode: str, saved: dict) -> None:
    case = saved[mode]
    reference = mq.dequantize(case["model"])
    from_file = mq.load(case["path"], model=skeleton(5), dequantize=True)
    x = inputs(4)
    assert torch.equal(from_file(x), reference(x))
    state, _ = mq.load(case["path"], dequantize=True)  # what a deployment without mono-quant reconstructs
    plain = Net()
    plain.load_state_dict(state, strict=True)
    expected = reference.state_dict()
    assert all(torch.equal(value, expected[key]) for key, value in plain.state_dict().items())


def test_skeleton_on_meta_device(saved: dict) -> None:
    with torch.device("meta"):
        meta_skeleton = Net()
    q_model = mq.load(saved["dynamic"]["path"], model=meta_skeleton)
    x = inputs(3)
    assert torch.equal(q_model(x), saved["dynamic"]["model"](x))


# ------------------------------------------------------------------ sizes and load times on a real model


def digits_mlp() -> nn.Sequential:
    """64 -> 128 -> 1024 -> 1024 -> 10: the first layer (64 inputs) has no int4 group of 128 and stays float."""
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                         nn.ReLU(), nn.Linear(1024, 10))  # fmt: skip


@pytest.fixture(scope="module")
def digits_classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """An MLP trained for a few seconds on scikit-learn's digits; returns (model, test images, labels)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = torch.randperm(len(data.target), generator=torch.Generator().manual_seed(0))
    x = (torch.tensor(data.data, dtype=torch.float32) / 16)[order]
    y = torch.tensor(data.target)[order]
    torch.manual_seed(0)
    model = digits_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(2):
        for start in range(0, 1500, 100):
            loss = nn.functional.cross_entropy(model(x[start : start + 100]), y[start : start + 100])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), x[1500:], y[1500:]


def test_size_ratios_and_load_times_on_digits_classifier(digits_classifier: tuple, tmp_path: Path) -> None:
    model, x, y = digits_classifier
    float_path = tmp_path / "float.safetensors"
    save_file(model.state_dict(), float_path)
    with torch.inference_mode():
        float_accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert float_accuracy > 0.85
    for dtype, limit, max_drop in (("int8", 0.27, 0.02), ("int4", 0.16, 0.05)):
        path = tmp_path / f"{dtype}.safetensors"
        mq.save(mq.quantize(model, dtype=dtype, group_size=128), path)
        ratio = path.stat().st_size / float_path.stat().st_size
        assert ratio <= limit, f"{dtype} file is {ratio:.1%} of float"
        loaded = mq.load(path, model=digits_mlp())
        with torch.inference_mode():
            accuracy = (loaded(x).argmax(1) == y).float().mean().item()
        assert accuracy >= float_accuracy - max_drop
        print(f"\n{dtype}: file {ratio:.1%} of float, accuracy {accuracy:.3f} (float {float_accuracy:.3f})")
    int8_path, skeleton_model = tmp_path / "int8.safetensors", digits_mlp()
    float_time = best_time(lambda: skeleton_model.load_state_dict(load_file(float_path)))
    int8_time = best_time(lambda: mq.load(int8_path, model=skeleton_model))
    print(f"load: float safetensors {float_time * 1e3:.2f} ms, int8 mq.load {int8_time * 1e3:.2f} ms")


def best_time(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


# ------------------------------------------------------------------------------------------ bad input


@pytest.fixture()
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.safetensors"
    mq.save(mq.quantize(skeleton(0), dtype="int8"), path)
    return path


def rewrite(src: Path, dst: Path, tensors: dict | None = None, metadata: dict | None = None) -> Path:
    """Copy a safetensors file, replacing some tensors and/or metadata fields."""
    with safe_open(str(src), framework="pt") as handle:
        header = handle.metadata()
    document = json.loads(header["mono_quant"])
    document.update(metadata or {})
    save_file({**load_file(src), **(tensors or {})}, dst, metadata={**header, "mono_quant": json.dumps(document)})
    return dst


def assert_fails(path: Path, match: str, model: nn.Module | None = None) -> None:
    with pytest.raises(mq.SerializationError, match=match) as info:
        mq.load(path, model=model)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_truncated_file(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"m{suffix}"
    mq.save(mq.quantize(skeleton(0), dtype="int8"), path)
    data = path.read_bytes()
    for cut in (len(data) // 2, 20):
        path.write_bytes(data[:cut])
        assert_fails(path, "truncated or corrupt")


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "noise.safetensors"
    path.write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy().tobytes()
    )
    assert_fails(path, "truncated or corrupt")


def test_plain_files_without_metadata(tmp_path: Path) -> None:
    save_file(skeleton(0).state_dict(), tmp_path / "plain.safetensors")
    assert_fails(tmp_path / "plain.safetensors", "no mono-quant metadata")
    torch.save(skeleton(0).state_dict(), tmp_path / "plain.pt")
    assert_fails(tmp_path / "plain.pt", "no mono-quant metadata")


def test_metadata_from_the_future(good_file: Path, tmp_path: Path) -> None:
    path = rewrite(good_file, tmp_path / "future.safetensors", metadata={"format_version": 99})
    assert_fails(path, "format_version=99 was written by a newer mono-quant")


def test_unknown_layer_class(good_file: Path, tmp_path: Path) -> None:
    layers = load_metadata(str(good_file))["layers"]
    layers["fc1"]["class"] = "Int3Linear"
    assert_fails(
        rewrite(good_file, tmp_path / "x.safetensors", metadata={"layers": layers}), "unknown class 'Int3Linear'"
    )


@pytest.mark.parametrize(
    ("name", "tensor", "match"),
    [
        ("fc1.weight", torch.zeros(256, 640), r"'fc1.weight' is float32 \[256, 640\] in the file but .* int8"),
        ("fc1.weight_scale", torch.ones(255), r"'fc1.weight_scale' is float32 \[255\] .* expects float32 \[256\]"),
        (
            "fc1.weight_zero_point",
            torch.zeros(256, dtype=torch.int8),
            "'fc1.weight_zero_point' in the file has no place",
        ),
    ],
)
def test_tensor_contradicting_metadata(
    name: str, tensor: torch.Tensor, match: str, good_file: Path, tmp_path: Path
) -> None:
    path = rewrite(good_file, tmp_path / "bad.safetensors", tensors={name: tensor})
    assert_fails(path, match)  # without a model: checked against the metadata
    model = skeleton(1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert_fails(path, match, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class MissingLayer(Net):
    def __init__(self) -> None:
        super().__init__()
        del self.fc2


class ExtraLayer(Net):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(10, 10)


class WrongShape(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(640, 300)


class WrongType(Net):
    def __init__(self) -> None:
        super().__init__()
        self.fc2 = nn.Conv2d(256, 10, 1)


@pytest.mark.parametrize(
    ("cls", "match"),
    [
        (MissingLayer, "layer 'fc2' is not in the given model"),
        (ExtraLayer, "tensor 'head.weight' required by the given model is missing from the file"),
        (WrongShape, r"layer 'fc1' has weight shape \[300, 640\] in the given model but \[256, 640\] in the file"),
        (WrongType, "layer 'fc2' is Conv2d in the given model but Linear in the file"),
    ],
)
def test_skeleton_that_does_not_match(cls: type, match: str, good_file: Path) -> None:
    model = cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    assert_fails(good_file, match, model=model)
    assert [type(m) for m in model.modules()] == types
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_paths(tmp_path: Path) -> None:
    assert_fails(tmp_path / "nope.safetensors", "no such file")
    target = tmp_path / "no_dir" / "m.safetensors"
    with pytest.raises(mq.SerializationError, match=r"directory .*no_dir does not exist") as info:
        mq.save(skeleton(0), target)
    assert str(target) in str(info.value)
    with pytest.raises(mq.SerializationError, match="unknown extension"):
        mq.save(skeleton(0), tmp_path / "m.bin")
    with pytest.raises(mq.SerializationError, match=r"expected a torch\.nn\.Module or a state_dict"):
        mq.save([1, 2], tmp_path / "m.pt")


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_never_leaves_a_partial_file(
    error: BaseException, good_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = good_file.read_bytes()

    def crash(tensors: dict, path: str, metadata: dict) -> None:
        Path(path).write_bytes(b"half a file")
        raise error

    monkeypatch.setattr("mono_quant.io.save.save_file", crash)
    with pytest.raises(mq.SerializationError if isinstance(error, OSError) else KeyboardInterrupt):
        mq.save(skeleton(3), good_file)
    assert good_file.read_bytes() == original  # the previous file is intact
    assert os.listdir(good_file.parent) == [good_file.name]  # and no temporary file is left behind


def test_quantized_state_dict_round_trip(tmp_path: Path) -> None:
    """``quantize(state_dict)`` results save, and load into the model (embeddings included)."""
    float_model = skeleton(0)
    result = mq.quantize(float_model.state_dict(), dtype="int8")
    path = tmp_path / "sd.safetensors"
    mq.save(result, path)
    state, meta = mq.load(path)
    assert set(state) == set(result.model) and meta["layers"]["fc1"]["class"] == "Int8Linear"
    loaded = mq.load(path, model=skeleton(9))
    assert type(loaded.emb).__name__ == "Int8Embedding" and type(loaded.conv).__name__ == "Int8Conv2d"
    assert mq.compare(float_model, loaded, [inputs(16)]).cosine_min > 0.99


def test_safetensors_header_length_that_looks_like_a_zip_file(good_file: Path, tmp_path: Path) -> None:
    """A header of 0x4B50 bytes starts the file with b"PK": it must still be read as safetensors."""
    with safe_open(str(good_file), framework="pt") as handle:
        header = handle.metadata()
    padded_length = int.from_bytes(good_file.read_bytes()[:8], "little")
    path = tmp_path / "pk.safetensors"
    pad = "x" * (0x4B50 - padded_length - len(',"pad":""'))
    save_file(load_file(good_file), path, metadata={**header, "pad": pad})
    assert path.read_bytes()[:2] == b"PK"
    assert mq.load(path)[1]["layers"]["fc1"]["class"] == "Int8Linear"


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
def test_int4_embedding_round_trip(scheme: str, tmp_path: Path) -> None:
    """Int4 embeddings (packed rows, compressed-tensors names) save, validate and reload bit-identically."""
    model = skeleton(0)
    result = mq.quantize(model, dtype="int4", scheme=scheme, group_size=32, include=("emb", "fc1"))
    assert type(result.model.emb).__name__ == "Int4Embedding"
    path = tmp_path / "int4_emb.safetensors"
    mq.save(result, path)
    metadata, specs = read_header(path)
    assert metadata["layers"]["emb"]["class"] == "Int4Embedding" and metadata["layers"]["emb"]["group_size"] == 32
    assert specs["emb.weight_packed"] == (torch.int32, (17, 16)) and specs["emb.weight_scale"][1] == (17, 4)
    assert ("emb.weight_zero_point" in specs) == (scheme == "asymmetric")
    assert "pack-quantized" in json.dumps(metadata["quantization_config"])
    loaded = mq.load(path, model=skeleton(9))
    x = inputs(8)
    assert type(loaded.emb).__name__ == "Int4Embedding" and torch.equal(loaded(x), result.model(x))
    plain = mq.load(path, model=skeleton(9), dequantize=True)
    assert type(plain.emb) is nn.Embedding and torch.equal(plain.emb.weight, result.model.emb.dequantized_weight())
