"""``quantize_checkpoint`` on generated sharded checkpoints: same tensors as ``quantize``, layout, errors, memory."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mono_quant as mq
from mono_quant.cli.inspect import inspect_file
from mono_quant.cli.main import main

INDEX = "model.safetensors.index.json"
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(mq.__file__).parents[1])}  # the children import this mono_quant


def llama_state(layers: int = 2, hidden: int = 256, inter: int = 512, vocab: int = 384) -> dict[str, torch.Tensor]:
    """Llama-shaped projections, norms, one bias and an integer buffer."""
    state = {"model.embed_tokens.weight": torch.randn(vocab, hidden), "model.norm.weight": 1 + torch.rand(hidden)}
    for i in range(layers):
        p = f"model.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{p}.self_attn.{name}.weight"] = torch.randn(hidden, hidden) / hidden**0.5
        state[f"{p}.mlp.gate_proj.weight"] = torch.randn(inter, hidden) / hidden**0.5
        state[f"{p}.mlp.up_proj.weight"] = torch.randn(inter, hidden) / hidden**0.5
        state[f"{p}.mlp.down_proj.weight"] = torch.randn(hidden, inter) / inter**0.5
        state[f"{p}.input_layernorm.weight"] = 1 + torch.rand(hidden)
        state[f"{p}.post_attention_layernorm.weight"] = 1 + torch.rand(hidden)
    state["model.layers.0.self_attn.q_proj.bias"] = torch.randn(hidden)
    state["model.position_ids"] = torch.arange(16).reshape(1, 16)
    state["lm_head.weight"] = torch.randn(vocab, hidden) / hidden**0.5
    return state


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int = 3) -> Path:
    """HF layout; the q_proj bias goes to the last shard, away from its weight in the first."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(state)
    names.remove("model.layers.0.self_attn.q_proj.bias")
    groups = [names[i::shards] for i in range(shards)]
    groups[-1].append("model.layers.0.self_attn.q_proj.bias")
    weight_map = {}
    for k, group in enumerate(groups, 1):
        file = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({name: state[name].contiguous() for name in group}, folder / file)
        weight_map.update(dict.fromkeys(group, file))
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 256}))
    (folder / "tokenizer_config.json").write_text("{}")
    return folder


def read_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            out.update({name: handle.get_tensor(name).clone() for name in handle.keys()})  # noqa: SIM118
    return out


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    state = llama_state()
    return write_sharded(tmp_path / "src", state), state


@pytest.mark.parametrize(
    "options",
    [{"dtype": "int8"}, {"dtype": "int8", "mode": "weight_only", "scheme": "asymmetric"}, {"dtype": "int4"}],
)
def test_tensors_equal_quantize_of_the_state_dict(source: tuple[Path, dict], tmp_path: Path, options: dict) -> None:
    folder, state = source
    before = digest(folder)
    result = mq.quantize_checkpoint(folder, tmp_path / "q", progress=False, **options)
    expected = mq.quantize(state, **options)
    got, metadata = mq.load(tmp_path / "q")  # the compressed-tensors layout undone: mono-quant's tensors
    assert sorted(got) == sorted(expected.model) and metadata["layout"] == "compressed-tensors"
    for name, tensor in expected.model.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    stored = read_folder(tmp_path / "q")  # as save_pretrained writes it: [out, 1] int8 scales, int4 groups
    scale = stored["model.layers.0.mlp.up_proj.weight_scale"]
    assert tuple(scale.shape) == ((512, 1) if options["dtype"] == "int8" else (512, 2))
    rows = sorted((r.name, r.bits, r.sqnr_db, r.bytes_after) for r in result.report.layers)
    assert rows == sorted((r.name, r.bits, r.sqnr_db, r.bytes_after) for r in expected.report.layers)
    assert digest(folder) == before  # the source is never modified


def test_index_and_shards_follow_the_source_layout(source: tuple[Path, dict], tmp_path: Path) -> None:
    result = mq.quantize_checkpoint(source[0], tmp_path / "q", progress=False)
    out = tmp_path / "q"
    shards = [f"model-{k:05d}-of-00003.safetensors" for k in (1, 2, 3)]
    assert result.files == sorted(["config.json", INDEX, "tokenizer_config.json", *shards])
    index = json.loads((out / INDEX).read_text())
    total = 0
    for file in shards:
        with safe_open(str(out / file), framework="pt") as handle:
            names = set(handle.keys())
            total += sum(handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names)
        assert {n for n, f in index["weight_map"].items() if f == file} == names
    assert index["metadata"]["total_size"] == total == result.report.model_bytes_after
    # the q_proj weight, its scale and its bias stay together, in the weight's shard
    q = "model.layers.0.self_attn.q_proj"
    assert len({index["weight_map"][f"{q}.{leaf}"] for leaf in ("weight", "weight_scale", "bias")}) == 1
    info = inspect_file(out)  # the folder is one mono-quant file: its first shard describes every layer
    assert len(info["layers"]) == 16 and all(row["bits"] == 8 for row in info["layers"])
    assert info["file_bytes"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    groups = config["quantization_config"]["config_groups"]
    assert sum(len(g["targets"]) for g in groups.values()) == len(result.report.layers) == 16


def test_max_shard_bytes_splits_and_include_exclude_select(source: tuple[Path, dict], tmp_path: Path) -> None:
    folder, state = source
    result = mq.quantize_checkpoint(
        folder, tmp_path / "q", progress=False, include=("model.layers.*",), exclude=("*.k_proj",),
        min_numel=256 * 256 + 1, max_shard_bytes=400_000,
    )  # fmt: skip
    quantized = {row.name for row in result.report.layers}
    assert quantized == {f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}
    assert result.report.skipped["model.layers.0.self_attn.k_proj"] == "excluded by pattern '*.k_proj'"
    assert "min_numel" in result.report.skipped["model.layers.0.self_attn.q_proj"]
    assert "include" in result.report.skipped["lm_head"]
    got = read_folder(tmp_path / "q")
    for name in ("lm_head.weight", "model.layers.0.self_attn.k_proj.weight", "model.position_ids"):
        assert got[name].dtype == state[name].dtype and torch.equal(got[name], state[name])
    files = sorted((tmp_path / "q").glob("*.safetensors"))
    assert len(files) > 3 and all(f.stat().st_size < 400_000 + 4096 or _one_tensor_file(f) for f in files)


def _one_tensor_file(path: Path) -> bool:
    with safe_open(str(path), framework="pt") as handle:
        return len(handle.keys()) <= 2  # a layer bigger than the limit goes alone (with its scale)


def test_single_file_result_loads_into_the_model(tmp_path: Path, digits: tuple) -> None:
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.LayerNorm(256), nn.Linear(256, 10)).eval()
    (tmp_path / "src").mkdir()
    save_file(model.state_dict(), tmp_path / "src" / "weights.safetensors")
    result = mq.quantize_checkpoint(tmp_path / "src" / "weights.safetensors", tmp_path / "q", progress=False)
    assert result.files == ["weights.safetensors"]  # no config.json or tokenizer files for a bare file
    loaded = mq.load(tmp_path / "q" / "weights.safetensors", model)
    x = digits[2]  # real inputs: 397 test digits
    with torch.no_grad():
        cosine = nn.functional.cosine_similarity(loaded(x), model(x), dim=-1)
    assert type(loaded[0]).__name__ == "Int8Linear" and cosine.min() > 0.995


def test_cli_dispatches_folders_and_is_quiet(source: tuple[Path, dict], tmp_path: Path, capsys) -> None:
    argv = ["quantize", str(source[0] / INDEX), "-o", str(tmp_path / "q"), "--dtype", "int4", "--quiet"]
    assert main(argv) == 0
    assert capsys.readouterr() == ("", "")
    # the default int4 scheme is asymmetric: a save_pretrained folder holds its values one per byte (naive)
    assert read_folder(tmp_path / "q")["model.layers.1.mlp.down_proj.weight"].dtype == torch.int8
    assert main(["quantize", str(source[0]), "-o", str(tmp_path / "q2"), "--exclude", "lm_head"]) == 0
    printed = capsys.readouterr()
    assert "skipped lm_head: excluded by pattern 'lm_head'" in printed.out and "MB/s read" in printed.out
    assert printed.err == ""  # stderr is not a terminal here: no progress line unless asked for
    mq.quantize_checkpoint(source[0], tmp_path / "q3", progress=True)
    err = capsys.readouterr().err
    assert err.startswith("\rquantizing ") and "quantizing 23/23 tensors, 0.01/0.01 GB" in err and "ETA" in err


def _break(folder: Path, case: str) -> str:
    index = json.loads((folder / INDEX).read_text())
    if case == "missing shard":
        (folder / "model-00002-of-00003.safetensors").unlink()
        return r"shard model-00002-of-00003.safetensors \(holds '.*'.*\) is missing"
    if case == "broken index":
        (folder / INDEX).write_text('{"weight_map": {"a": ')
        return "model.safetensors.index.json: not a safetensors index"
    if case == "tensor not in its shard":
        index["weight_map"]["model.extra.weight"] = "model-00001-of-00003.safetensors"
        (folder / INDEX).write_text(json.dumps(index))
        return r"tensor 'model.extra.weight' is not in its shard .*model-00001-of-00003"
    state = llama_state()
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    write_sharded(folder, state)
    file = index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    return rf"{file}: cannot quantize tensor 'model.layers.1.mlp.up_proj.weight'.*NaN"


@pytest.mark.parametrize("case", ["missing shard", "broken index", "tensor not in its shard", "nan weight"])
def test_bad_sources_name_the_file_and_tensor_and_leave_nothing(
    source: tuple[Path, dict], tmp_path: Path, case: str
) -> None:
    pattern = _break(source[0], case)
    error = mq.QuantizationError if case == "nan weight" else mq.SerializationError
    with pytest.raises(error, match=pattern):
        mq.quantize_checkpoint(source[0], tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder


def test_bad_arguments(source: tuple[Path, dict], tmp_path: Path) -> None:
    with pytest.raises(mq.ConfigError, match=r"mode='static' need\(s\) a model to run calibration data through"):
        mq.quantize_checkpoint(source[0], tmp_path / "q", mode="static")
    with pytest.raises(mq.ConfigError, match=r"algorithm='gptq' need\(s\) a model"):
        mq.quantize_checkpoint(source[0], tmp_path / "q", dtype="int4", algorithm="gptq")
    with pytest.raises(mq.ConfigError, match="max_shard_bytes=0 must be a positive integer"):
        mq.quantize_checkpoint(source[0], tmp_path / "q", max_shard_bytes=0)
    with pytest.raises(mq.SerializationError, match="already exists and is not an empty folder"):
        mq.quantize_checkpoint(source[0], source[0])
    with pytest.raises(mq.SerializationError, match=r"expected one .*safetensors file .* found none"):
        mq.quantize_checkpoint(tmp_path, tmp_path / "q")
    save_file({}, tmp_path / "empty.safetensors")
    with pytest.raises(mq.SerializationError, match="holds no tensors"):
        mq.quantize_checkpoint(tmp_path / "empty.safetensors", tmp_path / "q")


_CHILD = """
import os, signal, sys
import mono_quant.io.hf_write as hf_write
added = 0
original = hf_write.ShardWriter.add
def add(self, name, tensor):
    global added
    added += 1
    if added == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    original(self, name, tensor)
hf_write.ShardWriter.add = add
import mono_quant as mq
mq.quantize_checkpoint(sys.argv[1], sys.argv[2], progress=False)
"""


def test_a_killed_run_leaves_nothing_that_looks_complete(source: tuple[Path, dict], tmp_path: Path) -> None:
    dst = tmp_path / "q"
    child = subprocess.run([sys.executable, "-c", _CHILD, str(source[0]), str(dst), "20"], env=CHILD_ENV, check=False)
    assert child.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name != "src"]
    assert not dst.exists() and len(leftovers) == 1 and leftovers[0].name.startswith(".q.")
    assert not list(leftovers[0].glob("model-*")) and not list(leftovers[0].glob("*.json"))
    mq.quantize_checkpoint(source[0], dst, progress=False)  # the next run sweeps the dead run's folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "src"]


_MEMORY_CHILD = """
import sys, torch
def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
import mono_quant as mq
mq.quantize_checkpoint(sys.argv[1], sys.argv[2] + "/warm", progress=False, include=("none",))  # imports, kernels
base = status("VmRSS:")
torch.set_num_threads(2)
mq.quantize_checkpoint(sys.argv[1], sys.argv[2] + "/q", progress=False, dtype=sys.argv[3])
print(base, status("VmHWM:"))
"""


@pytest.mark.slow
@pytest.mark.parametrize(("dtype", "factor"), [("int8", 2.25), ("int4", 3.0)])
def test_peak_memory_is_about_twice_the_largest_tensor(tmp_path: Path, dtype: str, factor: float) -> None:
    """~300 MiB checkpoint in 4 shards, largest tensor 24 MiB: the child's peak above its resting memory stays
    under ``factor`` times that plus 64 MiB (measured: int8 64 MiB, int4 102 MiB; int4 packing needs more)."""
    src = tmp_path / "src"
    src.mkdir()
    weight_map, largest, total = {}, 3072 * 2048 * 4, 0
    for k in range(4):
        shard = {f"model.layers.{k}.mlp.{p}_proj.weight": torch.randn(3072, 2048) for p in ("gate", "up")}
        shard[f"model.layers.{k}.mlp.down_proj.weight"] = torch.randn(2048, 3072)
        shard[f"model.layers.{k}.norm.weight"] = torch.ones(2048)
        file = f"model-{k + 1:05d}-of-00004.safetensors"
        save_file(shard, src / file)
        weight_map.update(dict.fromkeys(shard, file))
        total += sum(t.numel() * 4 for t in shard.values())
        del shard
    (src / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    code = textwrap.dedent(_MEMORY_CHILD)
    child = subprocess.run(
        [sys.executable, "-c", code, str(src), str(tmp_path), dtype], env=CHILD_ENV, capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr
    base, peak = map(int, child.stdout.split())
    assert total > 12 * largest
    assert peak - base < factor * largest + (64 << 20), f"peak {peak >> 20} MiB, base {base >> 20} MiB"
