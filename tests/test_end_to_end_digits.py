"""End to end on real data: a classifier trained on scikit-learn's digits keeps its accuracy."""

import pytest
import torch
from torch import nn

import mono_quant as mq


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int) -> nn.Module:
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for start in range(0, len(x), 64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[start : start + 64]), y[start : start + 64]).backward()
            optimizer.step()
    return model.eval()


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def trained_mlp(digits):
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    return _train(model, x_train, y_train, epochs=30)


@pytest.fixture(scope="module")
def trained_cnn(digits):
    x_train, y_train, _, _ = digits
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 64, 10),
    )
    return _train(model, x_train, y_train, epochs=8)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_mlp_int8_accuracy_drop_is_at_most_one_point(trained_mlp, digits, mode, observer):
    x_train, _, x_test, y_test = digits
    float_accuracy = _accuracy(trained_mlp, x_test, y_test)
    assert float_accuracy > 0.93  # the model really learned the task
    calibration = list(x_train[:1024].split(32))  # 32 batches
    result = mq.quantize(trained_mlp, dtype="int8", mode=mode, observer=observer, calibration_data=calibration)
    drop = float_accuracy - _accuracy(result.model, x_test, y_test)
    assert drop <= 0.01, f"{mode}/{observer}: accuracy {float_accuracy:.4f} dropped by {drop:.4f}"
    assert len(result.report.layers) == 3


def test_cnn_int8_static_accuracy_drop_is_at_most_one_point(trained_cnn, digits):
    x_train, _, x_test, y_test = digits
    float_accuracy = _accuracy(trained_cnn, x_test, y_test)
    assert float_accuracy > 0.93
    q_model, skipped = mq.static_quantize(trained_cnn, list(x_train[:512].split(32)))
    assert skipped == []
    assert float_accuracy - _accuracy(q_model, x_test, y_test) <= 0.01
    fidelity = mq.compare(trained_cnn, q_model, [x_test])
    assert fidelity.cosine_min > 0.99 and fidelity.sqnr_db > 25


def test_mlp_int4_and_bf16_stay_close(trained_mlp, digits):
    _, _, x_test, y_test = digits
    float_accuracy = _accuracy(trained_mlp, x_test, y_test)
    bf16, _ = mq.dynamic_quantize(trained_mlp, dtype="bf16")
    assert float_accuracy - _accuracy(bf16, x_test, y_test) <= 0.005
    int4 = mq.quantize(trained_mlp, dtype="int4", group_size=32).model
    assert float_accuracy - _accuracy(int4, x_test, y_test) <= 0.03
