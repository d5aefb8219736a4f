"""Recurrent classifiers trained with Lightning on real data keep their accuracy at int8, in small files."""

from __future__ import annotations

import pytest
import torch
from fashion import FASHION, fashion_rows
from kit.recurrent_models import SequenceClassifier, accuracy, train
from safetensors.torch import save_file
from torch import nn

import mono_quant as mq

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fashion() -> tuple[torch.Tensor, ...]:
    if not FASHION.is_dir():
        pytest.skip("Fashion-MNIST is missing: apt-get install dataset-fashion-mnist")
    return fashion_rows(train=20000, test=5000)


def _check(model: nn.Module, x: torch.Tensor, y: torch.Tensor, float_floor: float, tmp_path, skeleton: nn.Module):
    float_accuracy = accuracy(model, x, y)
    assert float_accuracy > float_floor  # the model really learned the task
    float_path = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, float_path)
    for mode in ("dynamic", "weight_only"):
        result = mq.quantize(model, mode=mode)
        assert result.skipped == []
        drop = float_accuracy - accuracy(result.model, x, y)
        assert drop <= 0.005, f"{mode}: accuracy {float_accuracy:.4f} dropped by {drop:.4f}"
        path = tmp_path / f"{mode}.safetensors"
        mq.save(result.model, path, report=result.report)
        assert path.stat().st_size <= 0.3 * float_path.stat().st_size
        loaded = mq.load(path, skeleton)
        with torch.inference_mode():
            assert torch.equal(loaded(x[:256]), result.model(x[:256]))  # exact reload


@pytest.mark.parametrize("float_type", [nn.LSTM, nn.GRU])
def test_fashion_mnist_rows_classifier_keeps_accuracy(fashion, float_type, tmp_path, one_thread):
    x_train, y_train, x_test, y_test = fashion
    model = train(float_type(28, 128, batch_first=True), x_train, y_train, epochs=3)
    skeleton = SequenceClassifier(float_type(28, 128, batch_first=True))
    _check(model, x_test, y_test, 0.78, tmp_path, skeleton)


def test_digits_rows_bidirectional_lstm_keeps_accuracy(digits, tmp_path, one_thread):
    x_train, y_train, x_test, y_test = (t.reshape(-1, 8, 8) if t.dim() == 2 else t for t in digits)
    lstm = nn.LSTM(8, 64, num_layers=2, bidirectional=True, batch_first=True)
    model = train(lstm, x_train, y_train, epochs=15)
    skeleton = SequenceClassifier(nn.LSTM(8, 64, num_layers=2, bidirectional=True, batch_first=True))
    _check(model, x_test, y_test, 0.9, tmp_path, skeleton)
