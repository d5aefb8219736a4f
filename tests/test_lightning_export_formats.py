"""``QuantizationCallback(export_formats=...)``: ONNX and transformers artifacts beside the fit-end file."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from kit.helpers import SEVEN_BIT_CPU, int8_atol
from kit.lightning_modules import DigitsCNN, loaders, quiet, trainer
from torch import nn
from torch.utils.data import DataLoader

from mono_quant.errors import ConfigError
from mono_quant_lightning import QuantizationCallback

ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")


class TinyBertClassifier(L.LightningModule):
    """A small transformers BERT with a linear head on random token sequences (keyword forward input)."""

    def __init__(self) -> None:
        super().__init__()
        config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=64, max_position_embeddings=16)  # fmt: skip
        self.bert = transformers.BertModel(config)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.bert(input_ids=input_ids).last_hidden_state[:, 0])

    def training_step(self, batch, batch_idx):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", nn.functional.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def test_export_formats_must_be_known_and_include_safetensors() -> None:
    for bad in (("onnx",), ("safetensors", "tflite"), 3):
        with pytest.raises(ConfigError, match="export_formats"):
            QuantizationCallback(export_formats=bad)


@pytest.mark.slow
def test_onnx_beside_the_fit_end_file(tmp_path: Path, digits) -> None:
    train, val = loaders(digits)
    cb = quiet(export_formats=("safetensors", "onnx"))
    trainer(tmp_path, [cb], max_epochs=1).fit(DigitsCNN(), train, val)
    path = cb.export_path.with_name("model.quant.onnx")
    assert cb.export_path.is_file() and path.is_file()
    images = digits[2][:200]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: images.numpy()})[0])
    with torch.no_grad():
        want = cb.result.model(images)
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= (0.97 if SEVEN_BIT_CPU else 0.99)


@pytest.mark.slow
def test_hf_and_onnx_of_a_transformers_module(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (64, 12), generator=generator)
    data = list(zip(ids, (ids[:, 0] % 2), strict=True))
    cb = quiet(dtype="int8", mode="dynamic", export_formats=("safetensors", "hf", "onnx"))
    model = TinyBertClassifier()
    trainer(tmp_path, [cb], max_epochs=1).fit(model, DataLoader(data, batch_size=16), DataLoader(data, batch_size=16))
    config = json.loads((cb.export_path.with_name("model.quant.hf") / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    session = ort.InferenceSession(str(cb.export_path.with_suffix(".onnx")), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input_0": ids[:5].numpy()})[0])
    with torch.no_grad():
        want = cb.result.model(ids[:5])
    assert torch.allclose(got, want, atol=int8_atol(1e-3) * max(1.0, want.abs().max().item()))
