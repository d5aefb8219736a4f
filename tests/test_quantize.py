"""quantize / dynamic_quantize / static_quantize: selection, the untouched input, state_dicts, errors."""

import pytest
import torch
from kit.helpers import mlp
from torch import nn

import mono_quant as mq
from mono_quant import CalibrationError, ConfigError, QuantizationError
from mono_quant.modules import HalfLinear, Int4Linear, Int8Conv2d, Int8Embedding, Int8Linear, QuantizedTensor
from mono_quant.qparams import sqnr_db


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 128)
        self.encoder = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))
        self.norm = nn.LayerNorm(128)
        self.attn = nn.MultiheadAttention(128, 4, batch_first=True)
        self.head = nn.Linear(128, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.encoder(self.embed(tokens)))
        h, _ = self.attn(h, h, h)
        return self.head(h.mean(1))


def _snapshot(model: nn.Module):
    return {k: (v.data_ptr(), v.clone()) for k, v in model.state_dict(keep_vars=True).items()}


def test_every_linear_is_replaced_in_a_copy_and_the_input_is_untouched():
    model = TinyNet().train()
    before = _snapshot(model)
    modules_before = {n: type(m) for n, m in model.named_modules()}
    q_model, skipped = mq.dynamic_quantize(model, dtype=torch.qint8)
    after = _snapshot(model)
    assert before.keys() == after.keys()
    for key, (ptr, value) in before.items():
        assert after[key][0] == ptr and torch.equal(after[key][1], value)
    assert {n: type(m) for n, m in model.named_modules()} == modules_before
    assert model.training  # the user's mode is not changed either
    assert isinstance(q_model.encoder[0], Int8Linear) and isinstance(q_model.head, Int8Linear)
    assert isinstance(q_model.embed, Int8Embedding)
    # nn.MultiheadAttention reads out_proj.weight and its own in_proj_weight directly: the modules stay,
    # their weights become quantized tensors
    assert type(q_model.attn.out_proj) is type(model.attn.out_proj)
    assert isinstance(q_model.attn.out_proj.weight, QuantizedTensor)
    assert isinstance(q_model.attn.in_proj_weight, QuantizedTensor)
    assert skipped == ["norm"]


def test_quantized_model_runs_and_stays_close():
    model = TinyNet().eval()
    tokens = torch.randint(0, 100, (4, 12))
    q_model, _ = mq.dynamic_quantize(model)
    with torch.inference_mode():
        assert sqnr_db(model(tokens), q_model(tokens)) > 25


@pytest.mark.parametrize(
    ("dtype", "linear_cls"),
    [("int8", Int8Linear), ("int4", Int4Linear), (torch.float16, HalfLinear), ("bf16", HalfLinear)],
)
def test_dtype_variants(dtype, linear_cls):
    model = mlp(256, 256, 128)
    q_model, _ = mq.dynamic_quantize(model, dtype=dtype)
    assert isinstance(q_model[0], linear_cls)
    x = torch.randn(3, 256)
    with torch.inference_mode():
        assert sqnr_db(model(x), q_model(x)) > (15 if dtype == "int4" else 30)


def test_int4_takes_the_largest_group_that_divides_else_int8(tmp_path):
    """Each int4 layer uses the largest of group_size, group_size/2, ... down to 32 that divides its input
    width (a 1568-wide classifier: 32), int8 when none does (144 = 16 x 9); the file records each group."""
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 1568), nn.Linear(1568, 256), nn.Linear(256, 10)
    ).eval()
    result = mq.quantize(model, dtype="int4", group_size=128)
    assert result.skipped == [] and not result.report.warning
    assert [(row.name, row.bits) for row in result.report.layers] == [("0", 8), ("2", 8), ("3", 4), ("4", 4)]
    assert type(result.model[2]) is Int8Linear and (result.model[3].group_size, result.model[4].group_size) == (32, 128)
    x = torch.randn(4, 1, 8, 8)
    path = tmp_path / "q.safetensors"
    mq.save(result, path)
    fresh = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 1568), nn.Linear(1568, 256), nn.Linear(256, 10)
    )
    reloaded = mq.load(path, model=fresh)
    assert (reloaded[3].group_size, reloaded[3].weight_scale.shape) == (32, torch.Size([256, 49]))
    assert torch.equal(reloaded(x), result.model(x))
    _, metadata = mq.load(path)
    assert {name: entry.get("group_size") for name, entry in metadata["layers"].items()} == {
        "0": None, "2": None, "3": 32, "4": 128,
    }  # fmt: skip
    assert sqnr_db(model[3].weight.detach(), result.model[3].dequantized_weight()) > 18  # 4-bit, groups of 32
    # convolutions have no int4 kernel: they take int8 dynamic (real int8 convolutions), said in the report
    conv = next(row for row in result.report.layers if row.name == "0")
    assert (conv.bits, conv.mode) == (8, "dynamic")


def test_include_exclude_and_min_numel():
    model = TinyNet()
    result = mq.quantize(model, include=["encoder.*", "head"], exclude=["encoder.2"], min_numel=1000)
    quantized = {row.name for row in result.report.layers}
    assert quantized == {"encoder.0", "head"}
    assert result.report.skipped["encoder.2"] == "excluded by pattern 'encoder.2'"
    assert result.report.skipped["embed"].startswith("not matched by include")
    small = mq.quantize(model, min_numel=20_000)
    assert "1280 weights < min_numel=20000" in small.report.skipped["head"]


def test_layer_types_restricts_selection():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    result = mq.quantize(model, layer_types=(nn.Conv2d,))
    assert isinstance(result.model[0].weight.layer, Int8Conv2d) and type(result.model[2]) is nn.Linear


def test_static_quantize_calibrates_every_layer_with_its_own_input():
    model = mlp(64, 128, 32)
    data = [torch.randn(16, 64) * 3 for _ in range(8)]
    q_model, _ = mq.static_quantize(model, data, observer="minmax")
    first_max = max(batch.max() for batch in data).item()
    first_min = min(batch.min() for batch in data).item()
    q0 = q_model[0]
    assert q0.input_scale.item() == pytest.approx((first_max - first_min) / 255, rel=1e-5)
    # layer 2 sees post-ReLU activations: its zero point sits at the bottom of the range
    assert q_model[2].input_zero_point.item() == -128
    with torch.inference_mode():
        assert sqnr_db(model(data[0]), q_model(data[0])) > 30


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "histogram"])
def test_static_accepts_every_calibration_data_format(observer):
    model = mlp(16, 32, 4)
    x = torch.randn(64, 16)
    formats = [
        [x[:32], x[32:]],
        [(x[:32], torch.zeros(32)), (x[32:], torch.zeros(32))],
        torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(64)), batch_size=16),
    ]
    for data in formats:
        q_model, _ = mq.static_quantize(model, data, observer=observer)
        assert q_model[0].input_scale.item() > 0


def test_dict_batches_and_forward_fn():
    class KeywordModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 2)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.fc(features)

    model = KeywordModel()
    batches = [{"features": torch.randn(4, 8), "labels": torch.zeros(4)} for _ in range(3)]
    q_model, _ = mq.static_quantize(model, batches)
    assert q_model.fc.input_scale.item() > 0
    seen = []
    mq.static_quantize(model, [torch.randn(4, 8)], forward_fn=lambda m, b: seen.append(b) or m(features=b))
    assert len(seen) == 1


def test_state_dict_in_gives_quantized_state_dict_out():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Conv2d(3, 8, 3), nn.LayerNorm(8))
    state = model.state_dict()
    result = mq.quantize(state, dtype="int8")
    out = result.model
    assert out["0.weight"].dtype == torch.int8 and out["0.weight_scale"].shape == (32,)
    assert out["2.weight"].shape == (8, 27)  # conv weights are stored flattened, like Int8Conv2d
    assert out["3.weight"].dtype == torch.float32  # 1-D tensors are kept
    assert torch.equal(out["0.bias"], state["0.bias"])
    q_model, _ = mq.dynamic_quantize(model)
    assert out.keys() == q_model.state_dict().keys()
    assert all(torch.equal(out[k], v) for k, v in q_model.state_dict().items())
    int4 = mq.quantize(state, dtype="int4", group_size=32).model
    assert int4["0.weight_packed"].dtype == torch.int32 and int4["0.weight_shape"].tolist() == [32, 64]


def test_report_has_rows_totals_and_a_table():
    result = mq.quantize(mlp(512, 512, 10), dtype="int8")
    report = result.report
    assert [row.name for row in report.layers] == ["0", "2"]
    assert all(row.sqnr_db > 38 and row.bits == 8 and row.mode == "dynamic" for row in report.layers)
    assert 3.8 < report.compression_ratio < 4.0
    table = str(report)
    assert "weight dB" in table and "output dB" in table and "2 layers quantized" in table and "0" in table
    assert all(row.output_sqnr_db > 30 for row in report.layers)  # checked against float on a probe
    assert report.to_dict()["bytes_after"] == report.bytes_after


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(QuantizationError, match="model of type list"):
        mq.quantize([1, 2, 3])
    with pytest.raises(ConfigError, match="dtype='int2'"):
        mq.dynamic_quantize(mlp(4, 4), dtype="int2")
    with pytest.raises(CalibrationError, match="calibration_data is empty"):
        mq.static_quantize(mlp(4, 4), [])
    with pytest.raises(CalibrationError, match="needs calibration_data"):
        mq.quantize(mlp(4, 4), mode="static")
    with pytest.raises(ConfigError, match=r"static.*state_dict"):
        mq.quantize(mlp(4, 4).state_dict(), mode="static")


def test_nan_weight_names_the_layer_and_leaves_the_model_alone():
    model = mlp(8, 8, 2)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match=r"layer '2' has NaN or Inf"):
        mq.dynamic_quantize(model)
    assert torch.isnan(model[2].weight[0, 0])


def test_calibration_that_never_reaches_a_layer_names_it():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    with pytest.raises(CalibrationError, match=r"never reached layer\(s\) \['b'\]"):
        mq.static_quantize(TwoHeads(), [torch.randn(2, 4)])


def test_nan_activations_during_calibration_name_the_layer():
    data = [torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])]
    with pytest.raises(CalibrationError, match="layer '0' received NaN"):
        mq.static_quantize(mlp(4, 4), data)


def test_skip_reasons_carry_a_kind_code_can_test() -> None:
    import pickle

    from mono_quant.skips import SkipKind, kind_of

    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    result = mq.quantize(model, exclude=("2",))
    kinds = {name: kind_of(reason) for name, reason in result.report.skipped.items()}
    assert kinds == {"1": SkipKind.UNSUPPORTED, "2": SkipKind.EXCLUDED}
    assert result.report.skipped["2"] == "excluded by pattern '2'"  # still the message for people
    copied = pickle.loads(pickle.dumps(result.report.skipped))
    assert kind_of(copied["2"]) is SkipKind.EXCLUDED and copied["2"] == "excluded by pattern '2'"
