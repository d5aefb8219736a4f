"""The pure gate decision: drop direction, absolute/relative, edge cases (equal, better, NaN, zero)."""

from __future__ import annotations

import json
import math

import pytest
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import mono_quant as mq
from mono_quant.io.format import METADATA_KEY
from mono_quant_lightning.export import GATE_KEY, gate_record, read_gate, write
from mono_quant_lightning.gate import DropType, QuantizationGateError, decide, measure_drop


def test_absolute_drop_higher_is_better():
    d = decide(0.90, 0.85, 0.01)
    assert d.drop == pytest.approx(0.05)
    assert not d.passed
    assert "> max_drop" in d.reason


def test_drop_equal_to_max_drop_passes_despite_float_noise():
    assert 0.95 - 0.94 > 0.01  # the float noise the gate must not trip on
    d = decide(0.95, 0.94, 0.01)
    assert d.passed
    assert d.drop == pytest.approx(0.01)


def test_quantized_scoring_higher_passes_with_negative_drop():
    d = decide(0.80, 0.83, 0.0)
    assert d.passed
    assert d.drop == pytest.approx(-0.03)
    assert "better" in d.reason


def test_lower_is_better_metric_orients_the_drop():
    assert measure_drop(0.30, 0.40, higher_is_better=False) == pytest.approx(0.10)
    assert not decide(0.30, 0.40, 0.05, higher_is_better=False).passed
    assert decide(0.30, 0.20, 0.0, higher_is_better=False).passed


def test_relative_drop():
    d = decide(0.50, 0.45, 0.05, drop_type="relative")
    assert d.drop == pytest.approx(0.10)
    assert not d.passed and "(relative)" in d.reason
    assert decide(0.50, 0.45, 0.10, drop_type=DropType.RELATIVE).passed


def test_relative_drop_with_zero_float_score():
    assert measure_drop(0.0, 0.0, drop_type="relative") == 0.0
    assert measure_drop(0.0, -1.0, drop_type="relative") == math.inf
    assert not decide(0.0, -1.0, 0.5, drop_type="relative").passed
    assert decide(0.0, 1.0, 0.0, drop_type="relative").passed


@pytest.mark.parametrize(
    ("float_score", "quantized_score", "which"),
    [(math.nan, 0.9, "float"), (0.9, math.nan, "quantized"), (math.nan, math.nan, "float and quantized")],
)
def test_nan_scores_fail(float_score, quantized_score, which):
    d = decide(float_score, quantized_score, 1e9)
    assert not d.passed
    assert d.reason == f"{which} score is NaN"


def test_inf_drop_fails():
    assert not decide(math.inf, 0.0, 1e9).passed


def test_gate_error_carries_decision():
    decision = decide(0.9, 0.1, 0.01)
    err = QuantizationGateError("failed", decision)
    assert isinstance(err, ValueError)
    assert err.decision is decision


def test_unknown_drop_type():
    with pytest.raises(ValueError):
        measure_drop(1.0, 0.5, drop_type="percent")


def test_gate_record_is_read_from_the_metadata_document_and_from_earlier_files(tmp_path):
    result = mq.quantize(nn.Sequential(nn.Linear(32, 8)), mode="dynamic")
    new = tmp_path / "new" / "model.quant.safetensors"
    write(result, new, gate_record(decide(0.9, float("nan"), 0.01), "val_acc"))
    assert read_gate(new) == {
        "metric": "val_acc",
        "float": 0.9,
        "quantized": None,  # JSON has no NaN; the reason says why
        "drop": None,
        "max_drop": 0.01,
        "passed": False,
        "reason": "quantized score is NaN",
    }
    # files of earlier versions kept the record as its own header entry, beside the metadata document
    with safe_open(str(new), framework="pt") as handle:
        header, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    document = json.loads(header[METADATA_KEY])
    del document["extra"]
    record = {"metric": "val_acc", "passed": True}
    old = tmp_path / "old.safetensors"
    metadata = {"format": "pt", METADATA_KEY: json.dumps(document), GATE_KEY: json.dumps(record)}
    save_file(tensors, str(old), metadata=metadata)
    assert read_gate(old) == record
    assert type(mq.load(old, nn.Sequential(nn.Linear(32, 8)))[0]).__name__ == "Int8Linear"  # still loads
    assert read_gate(tmp_path / "missing.safetensors") is None
