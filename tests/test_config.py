import pytest
import torch
from torch import nn

from mono_quant import ConfigError, Mode, QuantDtype, QuantizationConfig, QuantizationError
from mono_quant.config import parse_dtype


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (torch.qint8, QuantDtype.INT8),
        ("int8", QuantDtype.INT8),
        ("INT4", QuantDtype.INT4),
        (torch.float16, QuantDtype.FP16),
        ("fp16", QuantDtype.FP16),
        ("bf16", QuantDtype.BF16),
        (torch.bfloat16, QuantDtype.BF16),
    ],
)
def test_dtype_aliases(name, expected):
    assert parse_dtype(name) is expected


def test_unknown_dtype_names_argument_and_value():
    with pytest.raises(ConfigError, match=r"dtype='int3'.*expected one of"):
        QuantizationConfig(dtype="int3")


def test_unknown_mode_is_a_quantization_error():
    with pytest.raises(QuantizationError, match="mode='fast'"):
        QuantizationConfig(mode="fast")


def test_int4_is_weight_only_and_rejects_static():
    assert QuantizationConfig(dtype="int4", mode="dynamic").mode is Mode.WEIGHT_ONLY
    with pytest.raises(ConfigError, match="static"):
        QuantizationConfig(dtype="int4", mode="static")


@pytest.mark.parametrize(
    ("field", "value"),
    [("group_size", 0), ("group_size", 7), ("percentile", 20), ("min_numel", -1), ("observer", "kl")],
)
def test_invalid_values_raise(field, value):
    with pytest.raises(ConfigError, match=field):
        QuantizationConfig(**{field: value})


def test_layer_types_must_be_module_classes():
    with pytest.raises(ConfigError, match="layer_types"):
        QuantizationConfig(layer_types=("Linear",))
    assert QuantizationConfig(layer_types=(nn.Linear,)).layer_types == (nn.Linear,)


def test_replace_validates_and_rejects_unknown_fields():
    cfg = QuantizationConfig()
    assert cfg.replace(dtype="int4").dtype is QuantDtype.INT4
    assert cfg.dtype is QuantDtype.INT8  # immutable
    with pytest.raises(ConfigError, match="unknown option"):
        cfg.replace(bits=8)


def test_include_accepts_single_pattern_and_to_dict_is_json_friendly():
    import json

    cfg = QuantizationConfig(include="encoder.*", exclude=["head"])
    assert cfg.include == ("encoder.*",)
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["include"] == ["encoder.*"] and data["layer_types"] == [
        "Linear",
        "Conv1d",
        "Conv2d",
        "Embedding",
        "MultiheadAttention",
        "LSTM",
        "GRU",
        "LSTMCell",
        "GRUCell",
    ]
