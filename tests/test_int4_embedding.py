"""``Int4Embedding``: packed int4 rows, lookups that unpack only the requested rows, files, registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mono_quant as mq
from mono_quant import QuantizationConfig
from mono_quant.modules import Int4Embedding, Int4Linear, Int8Embedding, quantized_class_for
from mono_quant.qparams import sqnr_db


@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_lookup_equals_rows_of_the_dequantized_table(scheme: str, group_size: int) -> None:
    emb = nn.Embedding(300, 128, padding_idx=0)
    q = Int4Embedding.from_float(emb, QuantizationConfig(dtype="int4", scheme=scheme, group_size=group_size))
    indices = torch.randint(0, 300, (4, 7))
    out = q(indices)
    assert out.shape == (4, 7, 128) and out.dtype == torch.float32
    assert torch.equal(out, F.embedding(indices, q.dequantized_weight()))
    # int4 of Gaussian rows: ~20 dB per group of 128, more with smaller groups and a zero point
    assert sqnr_db(emb(indices).detach(), out) > 18
    assert q.padding_idx == 0


def test_smaller_groups_and_asymmetric_are_more_accurate() -> None:
    emb = nn.Embedding(512, 256)
    errors = {}
    for scheme in ("symmetric", "asymmetric"):
        for group in (128, 32):
            q = Int4Embedding.from_float(emb, QuantizationConfig(dtype="int4", scheme=scheme, group_size=group))
            errors[scheme, group] = sqnr_db(emb.weight.detach(), q.dequantized_weight())
    assert errors["asymmetric", 32] > errors["symmetric", 32] > errors["symmetric", 128]
    assert errors["asymmetric", 32] > errors["asymmetric", 128] > errors["symmetric", 128]


def test_compressed_tensors_layout_matches_int4_linear() -> None:
    """Same tensors as an Int4Linear of the same weight: packed words, scales, zero points, shape."""
    weight = torch.randn(40, 64)
    config = QuantizationConfig(dtype="int4", scheme="asymmetric", group_size=32)
    q_emb = Int4Embedding.from_float(nn.Embedding.from_pretrained(weight), config)
    linear = nn.Linear(64, 40, bias=False)
    linear.weight.data.copy_(weight)
    q_lin = Int4Linear.from_float(linear, config)
    emb_state, lin_state = q_emb.state_dict(), q_lin.state_dict()
    assert set(emb_state) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
    assert set(emb_state) == set(lin_state)
    for key in emb_state:
        assert torch.equal(emb_state[key], lin_state[key]), key
    assert emb_state["weight_packed"].dtype == torch.int32 and emb_state["weight_packed"].shape == (40, 8)
    assert emb_state["weight_shape"].tolist() == [40, 64]


def test_lookup_does_not_dequantize_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    q = Int4Embedding.from_float(nn.Embedding(1000, 64), QuantizationConfig(dtype="int4", group_size=32))

    def forbidden(*args: object) -> None:
        raise AssertionError("forward must not dequantize the whole table")

    monkeypatch.setattr(q, "dequantized_weight", forbidden)
    unpacked = []
    import mono_quant.modules.int4_embedding as module

    original = module.unpack_int4_words
    monkeypatch.setattr(module, "unpack_int4_words", lambda p, c: unpacked.append(p.shape[0]) or original(p, c))
    q(torch.tensor([[3, 5, 7]]))
    assert unpacked == [3]  # only the three looked-up rows are unpacked


def test_registry_selection_and_skips() -> None:
    config = QuantizationConfig(dtype="int4", group_size=32)
    assert quantized_class_for(nn.Embedding(10, 64), config)[0] is Int4Embedding
    assert quantized_class_for(nn.Embedding(10, 48), config)[0] is Int8Embedding  # no int4 group divides 48
    assert Int4Embedding.from_float(nn.Embedding(10, 96), QuantizationConfig(dtype="int4")).group_size == 32
    assert "max_norm" in quantized_class_for(nn.Embedding(10, 64, max_norm=1.0), config)[1]
    model = nn.Sequential(nn.Embedding(100, 64), nn.Linear(64, 8))
    result = mq.quantize(model, dtype="int4", group_size=32)
    assert [type(m).__name__ for m in result.model] == ["Int4Embedding", "Int4Linear"]
    assert result.report.layers[0].kind == "Embedding" and result.report.layers[0].bits == 4


def test_dequantize_gives_a_plain_embedding() -> None:
    emb = nn.Embedding(50, 32, padding_idx=3)
    q = Int4Embedding.from_float(emb, QuantizationConfig(dtype="int4", group_size=32, scheme="asymmetric"))
    plain = q.dequantize()
    assert type(plain) is nn.Embedding and plain.padding_idx == 3
    assert torch.equal(plain.weight.detach(), q.dequantized_weight())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_file_round_trip(suffix: str, tmp_path: Path) -> None:
    model = nn.Sequential(nn.Embedding(200, 64), nn.Linear(64, 16))
    result = mq.quantize(model, dtype="int4", group_size=32, scheme="asymmetric")
    path = tmp_path / f"m{suffix}"
    mq.save(result, str(path))
    x = torch.randint(0, 200, (3, 5))
    loaded = mq.load(path, model=nn.Sequential(nn.Embedding(200, 64), nn.Linear(64, 16)))
    assert type(loaded[0]) is Int4Embedding and loaded[0].scheme.value == "asymmetric"
    assert torch.equal(loaded(x), result.model(x))
    _, metadata = mq.load(path)
    assert metadata["layers"]["0"] | {"sqnr_db": None} == {
        "class": "Int4Embedding", "kind": "Embedding", "mode": "weight_only", "bits": 4, "scheme": "asymmetric",
        "group_size": 32, "shape": [200, 64], "bias": False, "sqnr_db": None,
    }  # fmt: skip


def test_state_dict_quantized_as_linear_loads_into_an_embedding(tmp_path: Path) -> None:
    """A bare state_dict's 2-D weight is quantized as a Linear; loading into a model makes it an Int4Embedding."""
    model = nn.Sequential(nn.Embedding(64, 32))
    result = mq.quantize(model.state_dict(), dtype="int4", group_size=32)
    path = tmp_path / "sd.safetensors"
    mq.save(result, str(path))
    loaded = mq.load(path, model=nn.Sequential(nn.Embedding(64, 32)))
    x = torch.arange(64)
    assert type(loaded[0]) is Int4Embedding
    assert sqnr_db(model(x).detach(), loaded(x)) > 18
