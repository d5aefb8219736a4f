"""``export_onnx`` checks its trace with ONNX Runtime: a Python branch on tensor values is an error naming the
line, and an axis is dynamic only where a run at another size gives the eager model's outputs."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from kit.helpers import int8_atol
from torch import nn

import mono_quant as mq
from mono_quant.io.onnx import export_onnx

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


class Branch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # frozen by the trace
            return self.a(x)
        return self.b(x)


class LoopOverLength(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], 8)
        for i in range(x.shape[1]):  # unrolled by the trace at the example's length
            out = out + self.a(x[:, i])
        return out


def quantized(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    return mq.quantize(model.eval()).model


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def input_dims(path: Path) -> list[list]:
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in onnx.load(path).graph.input]


def test_a_branch_on_tensor_values_is_an_error_naming_the_line(tmp_path: Path) -> None:
    x = torch.tensor([[3.0] * 7 + [-1.0]] * 2)  # takes the first branch; values in the same range take the other
    line = inspect.getsourcelines(Branch.forward)[1] + 1
    with pytest.raises(mq.SerializationError, match=rf"froze a Python decision at .*test_onnx_trace_checks\.py:{line}"):
        export_onnx(quantized(Branch()), x, tmp_path / "branch.onnx")
    assert not (tmp_path / "branch.onnx").exists()


def test_a_loop_over_a_length_fixes_that_axis_with_a_warning(tmp_path: Path) -> None:
    q = quantized(LoopOverLength())
    x = torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match=r"fixed at the example's size.*axis 1 of 'input_0' \('sequence'\)"):
        path = export_onnx(q, x, tmp_path / "loop.onnx")
    assert input_dims(path) == [["batch", 5, 8]]
    with torch.no_grad():
        want = q(torch.cat([x, x]))
    got = session(path).run(None, {"input_0": torch.cat([x, x]).numpy()})[0]  # the batch axis still varies
    assert np.allclose(got, want.numpy(), atol=int8_atol(1e-4) * want.abs().max().item())
    with pytest.raises(Exception, match="input_0"):  # another length is refused, never answered wrongly
        session(path).run(None, {"input_0": torch.randn(2, 7, 8).numpy()})


def test_a_dynamic_axis_asked_for_that_the_trace_fixed_is_an_error(tmp_path: Path) -> None:
    axes = {"input_0": {0: "batch", 1: "sequence"}}
    with pytest.raises(mq.SerializationError, match=r"dynamic_axes 'sequence' \(axis 1 of 'input_0'\) does not hold"):
        export_onnx(quantized(LoopOverLength()), torch.randn(2, 5, 8), tmp_path / "loop.onnx", dynamic_axes=axes)
    assert not (tmp_path / "loop.onnx").exists()


def test_a_real_sequence_axis_stays_dynamic_and_a_channel_axis_is_fixed_quietly(tmp_path: Path) -> None:
    q = quantized(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)))
    path = export_onnx(q, torch.randn(2, 5, 8), tmp_path / "tokens.onnx")
    assert input_dims(path) == [["batch", "sequence", 8]]
    longer = torch.randn(3, 11, 8)
    with torch.no_grad():
        want = q(longer)
    got = session(path).run(None, {"input_0": longer.numpy()})[0]
    assert np.allclose(got, want.numpy(), atol=int8_atol(1e-4) * want.abs().max().item())
    conv = quantized(nn.Sequential(nn.Conv1d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # [batch, channels, length]: axis 1 is no sequence, and that is no news
        path = export_onnx(conv, torch.randn(2, 4, 8), tmp_path / "conv1d.onnx")
    assert input_dims(path) == [["batch", 4, 8]]


def test_transformers_bert_keeps_batch_and_sequence_dynamic_and_matches_at_other_lengths(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    q = quantized(transformers.BertModel(config))
    example = {"input_ids": torch.randint(1, 96, (2, 10)), "attention_mask": torch.ones(2, 10, dtype=torch.long)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # transformers' own tracer warnings are shape checks the axis checks cover
        path = export_onnx(q, example, tmp_path / "bert.onnx")
    assert input_dims(path) == [["batch", "sequence"], ["batch", "sequence"]]
    padded = {
        "input_ids": torch.randint(1, 96, (3, 14)),
        "attention_mask": (torch.arange(14)[None] < torch.tensor([[14], [6], [9]])).long(),
    }
    with torch.no_grad():
        want = q(**padded).last_hidden_state
    got = session(path).run(None, {k: v.numpy() for k, v in padded.items()})[0]
    assert np.allclose(got, want.numpy(), atol=int8_atol(1e-3) * want.abs().max().item())
