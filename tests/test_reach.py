"""Reach: layers that are not exact nn.Linear/nn.Conv2d/nn.Embedding get the integer path too."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mono_quant as mq
from mono_quant.engine.selection import matmul_weight_numel
from mono_quant.modules import Int8Conv2d, Int8Linear, QuantizedTensor
from mono_quant.qparams import sqnr_db


class SamePadConv(nn.Conv2d):
    """Like efficientnet's Conv2dStaticSamePadding / timm's Conv2dSame: pads in forward, then F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [0, 1, 0, 1])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class GPT2Conv1D(nn.Module):
    """transformers' Conv1D as written there: weight [in, out], torch.addmm."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Conv1D(GPT2Conv1D):  # transformers' class name, which is how it is recognised
    pass


class FalconLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


class PatchEmbed(nn.Module):
    """ViT's patch embedding: kernel == stride, and the input is cast to the weight's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.projection = nn.Conv2d(3, 32, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x.to(dtype=self.projection.weight.dtype)).flatten(2).transpose(1, 2)


CASES = {
    "same-pad conv subclass": (lambda: nn.Sequential(SamePadConv(8, 16, 3, stride=2)), (2, 8, 15, 15)),
    "depthwise conv": (lambda: nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16)), (2, 16, 8, 8)),
    "grouped conv1d": (lambda: nn.Sequential(nn.Conv1d(16, 32, 5, padding=2, groups=4)), (2, 16, 40)),
    "conv1d stride": (lambda: nn.Sequential(nn.Conv1d(4, 32, 10, stride=5)), (2, 4, 100)),
    "string padding same": (lambda: nn.Sequential(nn.Conv2d(8, 16, 4, padding="same")), (2, 8, 9, 9)),
    "reflect padding": (lambda: nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, padding_mode="reflect")), (2, 8, 9, 9)),
    "transformers Conv1D": (lambda: nn.Sequential(Conv1D(48, 64)), (3, 7, 64)),
    "Linear subclass": (lambda: nn.Sequential(FalconLinear(64, 48)), (3, 64)),
    "patch embedding": (lambda: PatchEmbed(), (2, 3, 16, 16)),
    "weight norm (parametrization)": (
        lambda: nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 16, 9, padding=4, groups=4))),
        (2, 16, 30),
    ),
    "weight norm (old hook)": (lambda: nn.Sequential(nn.utils.weight_norm(nn.Linear(32, 32))), (4, 32)),
}


@pytest.mark.parametrize("mode", ["dynamic", "static", "weight_only"])
@pytest.mark.parametrize("case", list(CASES))
def test_layer_is_quantized_with_an_integer_weight_and_stays_close(case: str, mode: str) -> None:
    build, shape = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    data = [torch.randn(*shape) for _ in range(3)] + [x]
    result = mq.quantize(model, mode=mode, calibration_data=data if mode == "static" else None)
    assert result.skipped == [] and len(result.report.layers) == 1
    assert result.report.warning == ""
    q_model = result.model
    ints = [t for t in q_model.state_dict().values() if t.dtype in (torch.int8, torch.int32) and t.dim()]
    assert len(ints) == 1 and ints[0].numel() == sum(matmul_weight_numel(m) for m in model.modules())
    with torch.inference_mode():
        assert sqnr_db(model(x), q_model(x)) > 28


def test_attached_layers_route_to_the_quantized_kernels() -> None:
    model = nn.Sequential(Conv1D(48, 64), FalconLinear(48, 32), SamePadConv(1, 4, 3))
    q = mq.quantize(nn.Sequential(model[0], model[1])).model
    assert isinstance(q[0].weight, QuantizedTensor) and isinstance(q[0].weight.layer, Int8Linear)
    assert q[0].weight.shape == (64, 48) and q[0].weight.dtype == torch.float32  # looks like the float weight
    assert isinstance(q[1].weight.layer, Int8Linear)
    conv = mq.quantize(nn.Sequential(model[2])).model[0]
    assert type(conv) is SamePadConv and isinstance(conv.weight.layer, Int8Conv2d)
    # any other op sees the float values
    assert torch.allclose(q[0].weight * 1, q[0].weight.dequantize())


def test_multihead_attention_in_and_out_projections_are_quantized() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.MultiheadAttention(64, 4, batch_first=True)).eval()
    x = torch.randn(2, 10, 64)
    q = mq.quantize(model).model
    assert isinstance(q[0].in_proj_weight, QuantizedTensor) and isinstance(q[0].out_proj.weight, QuantizedTensor)
    with torch.inference_mode():
        assert sqnr_db(model[0](x, x, x)[0], q[0](x, x, x)[0]) > 30


def test_attached_model_saves_and_loads_into_a_fresh_skeleton(tmp_path) -> None:
    torch.manual_seed(0)

    def build() -> nn.Module:
        return nn.Sequential(Conv1D(48, 64), FalconLinear(48, 32), nn.Conv1d(32, 8, 3))

    model = build().eval()
    x = torch.randn(2, 5, 64)

    def run(m: nn.Module) -> torch.Tensor:
        h = m[1](m[0](x))
        return m[2](h.transpose(1, 2))

    for dtype in ("int8", "int4", "fp16"):
        q = mq.quantize(model, dtype=dtype, group_size=32).model
        path = tmp_path / f"{dtype}.safetensors"
        mq.save(q, path)
        loaded = mq.load(path, build())
        with torch.inference_mode():
            assert torch.equal(run(loaded), run(q)), dtype
        assert not loaded.training
        plain = mq.dequantize(q)
        assert type(plain[0].weight) is nn.Parameter and plain[0].weight.shape == (64, 48)


def test_int8_model_moves_and_half_precision_conversions_keep_the_quantized_weight() -> None:
    q = mq.quantize(nn.Sequential(FalconLinear(16, 8))).model
    q.to("cpu")
    assert isinstance(q[0].weight, QuantizedTensor)
    assert q[0].weight.layer.weight.dtype == torch.int8


def test_frozen_batchnorm_keeps_its_mode_through_calibration_and_compare() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).train()
    model[1].eval()
    data = [torch.randn(4, 8)]
    mq.Calibrator({"0": model[0]}, mq.QuantizationConfig(mode="static")).run(model, data)
    q, _ = mq.dynamic_quantize(model)
    mq.compare(model, q, data)
    assert model.training and model[0].training and not model[1].training


def test_nothing_quantized_warns_with_the_reason() -> None:
    with pytest.warns(UserWarning, match="no layer was quantized"):
        result = mq.quantize(nn.Sequential(nn.Linear(4, 4)), exclude=("0",))
    assert result.report.warning.startswith("no layer was quantized")
    assert str(result.report).startswith("WARNING: no layer was quantized")


def test_meta_model_and_bad_config_get_clear_errors() -> None:
    with pytest.raises(mq.QuantizationError, match="meta device"):
        mq.quantize(nn.Linear(4, 4, device="meta"))
    with pytest.raises(mq.ConfigError, match="not a QuantizationConfig"):
        mq.quantize(nn.Linear(4, 4), {"dtype": "int8"})
    with pytest.raises(mq.ConfigError, match="dtype"):
        mq.quantize(nn.Sequential(nn.Linear(4, 4)), "int3")


def test_zero_size_layers_are_skipped_with_the_reason() -> None:
    model = nn.Sequential(nn.Linear(0, 4), nn.Linear(4, 4))
    result = mq.quantize(model)
    assert "empty weight" in dict(zip(result.skipped, result.report.skipped.values(), strict=True))["0"]


def test_tied_lm_head_stays_one_tensor_in_memory_and_file(tmp_path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    def build(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        config = GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4, n_positions=32, bos_token_id=1,
                            eos_token_id=2)  # fmt: skip
        return GPT2LMHeadModel(config).eval()

    model = build(0)
    assert model.lm_head.weight is model.transformer.wte.weight
    q = mq.quantize(model).model
    assert q.lm_head.weight is q.transformer.wte.weight and q.lm_head.weight.dtype == torch.int8
    path = tmp_path / "gpt2.safetensors"
    mq.save(q, path)
    state, metadata = mq.load(path)
    assert metadata["tied"] == {
        "lm_head.weight": "transformer.wte.weight",
        "lm_head.weight_scale": "transformer.wte.weight_scale",
    }
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    loaded = mq.load(path, build(1))
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    ids = torch.randint(0, 96, (2, 9))
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, q(ids).logits)
        assert sqnr_db(model(ids).logits, q(ids).logits) > 25


def test_meta_device_skeleton_with_non_persistent_buffers_loads(tmp_path) -> None:
    import transformers_zoo
    from transformers import AutoModel, LlamaConfig

    model, make_inputs = transformers_zoo.build("llama")
    q = mq.quantize(model).model
    path = tmp_path / "llama.safetensors"
    mq.save(q, path)
    with torch.device("meta"):  # no memory, no init; rotary inv_freq is a non-persistent buffer
        skeleton = AutoModel.from_config(LlamaConfig(**transformers_zoo.DECODER), attn_implementation="eager")
    loaded = mq.load(path, skeleton)
    inputs = make_inputs()
    with torch.inference_mode():
        assert torch.equal(loaded(**inputs).last_hidden_state, q(**inputs).last_hidden_state)
    assert not any(t.is_meta for t in (*loaded.parameters(), *loaded.buffers()))


@pytest.mark.slow
def test_torch_compiled_submodule_is_quantized_and_runs() -> None:
    class WithCompiledBlock(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = torch.compile(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)))
            self.head = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.block(x))

    torch.manual_seed(0)
    model = WithCompiledBlock().eval()
    x = torch.randn(4, 16)
    result = mq.quantize(model)
    assert [row.name for row in result.report.layers] == ["block._orig_mod.0", "block._orig_mod.2", "head"]
    assert type(model.block._orig_mod[0]) is nn.Linear  # the input is untouched
    with torch.inference_mode():
        assert sqnr_db(model(x), result.model(x)) > 30
