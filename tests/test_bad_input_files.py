"""Bad files, bad tensor values and bad metadata values: every one a ``SerializationError`` naming the
file, the tensor or layer, and the value, from ``load`` (with and without a model) and ``read_header``."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kit.bad_input import digits_inputs, document, expect, layer_edit, model, rewrite, top_edit, write_file
from safetensors.torch import save_file

import mono_quant as mq
from mono_quant.io.load import read_header

SE = mq.SerializationError


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("good")
    modes = ("dynamic", "static", "weight_only", "asymmetric", "int4", "int4_asym", "fp16", "bf16")
    out = {mode: write_file(folder, mode) for mode in modes}
    out["pt"] = write_file(folder, "dynamic", ".pt")
    return out


# ------------------------------------------------------------------------------------ tensor values

NAN, INF = float("nan"), float("inf")
SCALE_VALUES = [NAN, INF, -INF, 0.0, -1.0]
SCALE_CASES = [
    (mode, key, value)
    for mode in ("dynamic", "static", "weight_only", "asymmetric", "int4", "int4_asym")
    for key in ("0.weight_scale",)
    for value in SCALE_VALUES
] + [("static", "2.input_scale", value) for value in SCALE_VALUES]
FLOAT_CASES = [
    ("dynamic", "0.bias", NAN),
    ("dynamic", "2.bias", INF),
    ("int4", "0.bias", -INF),
    ("fp16", "0.weight", NAN),
    ("fp16", "2.weight", INF),
    ("fp16", "0.bias", NAN),
    ("bf16", "0.weight", -INF),
    ("bf16", "2.bias", INF),
]


def poisoned(path: Path, key: str, value: float, dst: Path) -> Path:
    tensors = dict(mq.load(path)[0])
    tensor = tensors[key].clone()
    tensor.reshape(-1)[-1] = value
    return rewrite(path, dst, tensors={key: tensor})


@pytest.mark.parametrize("with_model", [False, True], ids=["tensors", "model"])
@pytest.mark.parametrize(("mode", "key", "value"), SCALE_CASES + FLOAT_CASES)
def test_bad_tensor_values(
    mode: str, key: str, value: float, with_model: bool, files: dict[str, Path], tmp_path: Path
) -> None:
    path = poisoned(files[mode], key, value, tmp_path / "bad.safetensors")
    with expect(SE, key):
        mq.load(path, model(1) if with_model else None)
    word = "scales must be finite and > 0" if key.endswith("scale") else "expected finite values"
    with pytest.raises(SE, match=word) as info:
        mq.load(path)
    assert str(path) in str(info.value) and (str(value) in str(info.value) or math.isnan(value))


@pytest.mark.parametrize(("value", "word"), [(9, "holds 9"), (-9, "holds -9")])
def test_int4_zero_point_out_of_range(value: int, word: str, files: dict[str, Path], tmp_path: Path) -> None:
    zero_point = mq.load(files["int4_asym"])[0]["0.weight_zero_point"].clone()
    zero_point[0, 0] = value
    path = rewrite(files["int4_asym"], tmp_path / "zp.safetensors", tensors={"0.weight_zero_point": zero_point})
    with expect(SE, word):
        mq.load(path, model(1))


def test_int4_weight_shape_that_disagrees(files: dict[str, Path], tmp_path: Path) -> None:
    path = rewrite(files["int4"], tmp_path / "ws.safetensors", tensors={"0.weight_shape": torch.tensor([32, 128])})
    with expect(SE, "[32, 128]"):
        mq.load(path)


# ---------------------------------------------------------------------------------- metadata values


META_CASES = [
    ("dynamic", layer_edit("0", "shape", "64x32"), "shape='64x32'"),
    ("dynamic", layer_edit("0", "shape", [-64, 32]), "shape=[-64, 32]"),
    ("dynamic", layer_edit("0", "shape", [2**70, 32]), "shape=[1180591620717411303424, 32]"),
    ("dynamic", layer_edit("0", "shape", [2**39, 2**39]), "shape=[549755813888, 549755813888]"),
    ("dynamic", layer_edit("0", "shape", [64]), "shape=[64]"),
    ("dynamic", layer_edit("0", "shape", [64, 64, 1]), "shape=[64, 64, 1]"),
    ("dynamic", layer_edit("0", "shape", [64.0, 64]), "shape=[64.0, 64]"),
    ("dynamic", layer_edit("0", "shape", [True, 64]), "shape=[True, 64]"),
    ("dynamic", layer_edit("0", "shape", [0, 64]), "shape=[0, 64]"),
    ("dynamic", layer_edit("0", "shape", None), "shape=None"),
    ("dynamic", layer_edit("0", "shape", {"a": 1}), "shape={'a': 1}"),
    ("dynamic", layer_edit("0", "bits", "8"), "bits='8'"),
    ("dynamic", layer_edit("0", "bits", 3), "bits=3"),
    ("dynamic", layer_edit("0", "bits", 8.0), "bits=8.0"),
    ("dynamic", layer_edit("0", "bits", True), "bits=True"),
    ("dynamic", layer_edit("0", "bits", 4), "bits=4"),
    ("fp16", layer_edit("0", "bits", 8), "bits=8"),
    ("dynamic", layer_edit("0", "kind", "Conv3d"), "kind='Conv3d'"),
    ("dynamic", layer_edit("0", "kind", 5), "kind=5"),
    ("dynamic", layer_edit("0", "kind", "Embedding"), "kind='Embedding'"),
    ("dynamic", layer_edit("0", "mode", "fast"), "mode='fast'"),
    ("dynamic", layer_edit("0", "mode", None), "mode=None"),
    ("dynamic", layer_edit("0", "scheme", "sym"), "scheme='sym'"),
    ("dynamic", layer_edit("0", "scheme", 5), "scheme=5"),
    ("dynamic", layer_edit("0", "bias", "yes"), "bias='yes'"),
    ("dynamic", layer_edit("0", "bias", 1), "bias=1"),
    ("dynamic", layer_edit("0", "class", "Int3Linear"), "unknown class 'Int3Linear'"),
    ("dynamic", layer_edit("0", "class", 5), "unknown class 5"),
    ("dynamic", layer_edit("0", "class", ["Int8Linear"]), "unknown class ['Int8Linear']"),
    ("dynamic", layer_edit("0", "scale_shape", "64"), "scale_shape='64'"),
    ("dynamic", layer_edit("0", "scale_shape", [-1]), "scale_shape=[-1]"),
    ("dynamic", layer_edit("0", "sqnr_db", "high"), "sqnr_db='high'"),
    ("int4", layer_edit("0", "group_size", 0), "group_size=0"),
    ("int4", layer_edit("0", "group_size", "32"), "group_size='32'"),
    ("int4", layer_edit("0", "group_size", None), "group_size=None"),
    ("fp16", layer_edit("0", "dtype", "fp8"), "dtype='fp8'"),
    ("fp16", layer_edit("0", "dtype", None), "dtype=None"),
    ("dynamic", top_edit("folded_batchnorm", 5), "folded_batchnorm=5"),
    ("dynamic", top_edit("folded_batchnorm", "bn"), "folded_batchnorm='bn'"),
    ("dynamic", top_edit("folded_batchnorm", {"bn": 5}), "folded_batchnorm={'bn': 5}"),
    ("dynamic", top_edit("skipped", 5), "skipped=5"),
    ("dynamic", top_edit("skipped", {"x": 1}), "skipped={'x': 1}"),
    ("dynamic", top_edit("config", "int8"), "config='int8'"),
    ("dynamic", top_edit("quantization_config", [1]), "quantization_config=[1]"),
    ("dynamic", top_edit("format_version", "1"), "format_version='1'"),
    ("dynamic", top_edit("format_version", 0), "format_version=0"),
    ("dynamic", top_edit("format_version", 99), "format_version=99"),
    ("dynamic", top_edit("format", "other"), "not a mono-quant document"),
    ("dynamic", top_edit("layers", []), "no 'layers' table"),
    ("dynamic", layer_edit("0", "kind", None), "kind=None"),
]


@pytest.mark.parametrize("entry", ["load", "load_model", "read_header"])
@pytest.mark.parametrize(("mode", "edit", "word"), META_CASES)
def test_bad_metadata_values(
    mode: str, edit: Any, word: str, entry: str, files: dict[str, Path], tmp_path: Path
) -> None:
    path = rewrite(files[mode], tmp_path / "meta.safetensors", edit=edit)
    call = {
        "load": lambda: mq.load(path),
        "load_model": lambda: mq.load(path, model(1)),
        "read_header": lambda: read_header(path),
    }
    with expect(SE, word):
        call[entry]()


def test_bad_metadata_names_file_and_layer(files: dict[str, Path], tmp_path: Path) -> None:
    path = rewrite(files["dynamic"], tmp_path / "named.safetensors", edit=layer_edit("2", "bits", "8"))
    with pytest.raises(SE) as info:
        mq.load(path)
    assert str(path) in str(info.value) and "layer '2'" in str(info.value)


# ----------------------------------------------------------------------------------------- files


def cut(path: Path, size: int, dst: Path) -> Path:
    dst.write_bytes(path.read_bytes()[:size])
    return dst


FILE_CASES = [
    ("empty", lambda f, d: cut(f["dynamic"], 0, d / "e.safetensors"), "truncated or corrupt"),
    ("8 bytes", lambda f, d: cut(f["dynamic"], 8, d / "h.safetensors"), "truncated or corrupt"),
    ("mid header", lambda f, d: cut(f["dynamic"], 200, d / "m.safetensors"), "truncated or corrupt"),
    ("mid data", lambda f, d: cut(f["dynamic"], f["dynamic"].stat().st_size - 300, d / "x.safetensors"), "corrupt"),
    ("last byte", lambda f, d: cut(f["dynamic"], f["dynamic"].stat().st_size - 1, d / "l.safetensors"), "corrupt"),
    ("pt mid", lambda f, d: cut(f["pt"], f["pt"].stat().st_size // 2, d / "m.pt"), "truncated or corrupt"),
    ("pt last byte", lambda f, d: cut(f["pt"], f["pt"].stat().st_size - 1, d / "l.pt"), "truncated or corrupt"),
    ("noise", lambda f, d: (d / "n.safetensors").write_bytes(bytes(range(256)) * 9) and d / "n.safetensors", "corrupt"),
    ("missing", lambda f, d: d / "nope.safetensors", "no such file"),
    ("directory", lambda f, d: d, "no such file"),
    ("plain safetensors", lambda f, d: _plain(d / "p.safetensors"), "no mono-quant metadata"),
    ("plain pt", lambda f, d: _plain(d / "p.pt"), "no mono-quant metadata"),
    ("pickled model", lambda f, d: _pickled(d / "w.pt"), "truncated or corrupt"),
    ("huge header length", lambda f, d: _huge_header(f["dynamic"], d / "hh.safetensors"), "corrupt"),
    ("bad json", lambda f, d: _bad_json(d / "j.safetensors"), "not valid JSON"),
]


def _plain(path: Path) -> Path:
    if path.suffix == ".pt":
        torch.save(model().state_dict(), path)
    else:
        save_file(model().state_dict(), path)
    return path


def _pickled(path: Path) -> Path:
    torch.save(model(), path)
    return path


def _huge_header(src: Path, dst: Path) -> Path:
    data = bytearray(src.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")
    dst.write_bytes(bytes(data))
    return dst


def _bad_json(path: Path) -> Path:
    save_file({"a": torch.zeros(1)}, path, metadata={"mono_quant": "{not json"})
    return path


@pytest.mark.parametrize(("case", "make", "word"), FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files(case: str, make: Any, word: str, files: dict[str, Path], tmp_path: Path) -> None:
    path = make(files, tmp_path)
    with expect(SE, word):
        mq.load(path, model(1))
    with expect(SE, word):
        read_header(path)


def test_loaded_model_is_independent_of_the_file(files: dict[str, Path], tmp_path: Path) -> None:
    """In process: replacing or rewriting the file after ``load`` leaves the loaded model unchanged."""
    path = tmp_path / "live.safetensors"
    path.write_bytes(files["weight_only"].read_bytes())
    loaded, x = mq.load(path, model(1)), digits_inputs()
    before = loaded(x)
    write_file(tmp_path, "weight_only", seed=5).replace(path)  # the usual deploy step: a new file over the old
    assert torch.equal(loaded(x), before)
    with open(path, "r+b") as handle:  # rewritten in place
        handle.seek(len(handle.read()) // 2)
        handle.write(b"\x7f" * 4096)
    assert torch.equal(loaded(x), before)


# ------------------------------------------------------------------------------------------- fuzz


@pytest.fixture(scope="module")
def fuzz_source(files: dict[str, Path]) -> bytes:
    return files["static"].read_bytes()


@settings(max_examples=300, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    kind=st.sampled_from(["truncate", "flip", "header"]),
    where=st.floats(0.0, 1.0),
    byte=st.integers(1, 255),
    seed=st.integers(0, 2**16),
)
def test_fuzz_loader_only_raises_serialization_error(
    kind: str, where: float, byte: int, seed: int, fuzz_source: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = bytearray(fuzz_source)
    header_end = 8 + int.from_bytes(data[:8], "little")
    if kind == "truncate":
        data = data[: int(where * len(data))]
    elif kind == "flip":
        data[int(where * (len(data) - 1))] ^= byte
    else:  # edit a character of the JSON header (names, dtypes, offsets, metadata)
        rng = random.Random(seed)
        for _ in range(1 + seed % 3):
            data[rng.randrange(8, header_end)] = rng.choice(b'0123456789{}[]",:-.eE aZ\\')
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(bytes(data))
    for target in (None, model(1)):
        try:
            result = mq.load(path, target)
        except SE:
            continue
        if target is not None:  # a flip inside int8 data loads: the model must still run
            assert result(digits_inputs(8)).shape == (8, 10)


def test_document_of_a_good_file_is_strict_json(files: dict[str, Path]) -> None:
    text = json.dumps(document(files["static"]), allow_nan=False)
    assert "NaN" not in text and json.loads(text)["layers"]["0"]["mode"] == "static"
