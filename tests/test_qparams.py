import pytest
import torch

from mono_quant import ConfigError, Granularity, QuantizationError, Scheme
from mono_quant.qparams import (
    dequantize_weight,
    int_range,
    pack_int4_words,
    quantize_weight,
    scale_zero_point,
    sqnr_db,
    unpack_int4_words,
)


@pytest.mark.parametrize("scheme", [Scheme.SYMMETRIC, Scheme.ASYMMETRIC])
@pytest.mark.parametrize(
    ("bits", "granularity"),
    [(8, Granularity.PER_TENSOR), (8, Granularity.PER_CHANNEL), (8, Granularity.PER_GROUP), (4, Granularity.PER_GROUP)],
)
def test_round_trip_error_is_at_most_half_a_step(bits, granularity, scheme):
    w = torch.randn(32, 256) * torch.linspace(0.1, 3, 32)[:, None]
    qw = quantize_weight(w, bits, scheme, granularity, group_size=64)
    low, high = int_range(bits, scheme)
    assert qw.data.dtype == torch.int8 and low <= qw.data.min() and qw.data.max() <= high
    error = (dequantize_weight(qw) - w).abs()
    step = qw.scale if granularity is not Granularity.PER_GROUP else qw.scale.repeat_interleave(64, dim=1)
    if granularity is Granularity.PER_CHANNEL:
        step = step[:, None]
    assert (error <= step / 2 + 1e-6).all()


def test_scale_shapes_per_granularity():
    w = torch.randn(8, 4, 3, 3)
    assert quantize_weight(w, 8, granularity=Granularity.PER_CHANNEL).scale.shape == (8,)
    assert quantize_weight(w, 8, granularity=Granularity.PER_TENSOR).scale.shape == ()
    assert quantize_weight(w, 8, granularity=Granularity.PER_GROUP, group_size=12).scale.shape == (8, 3)


def test_per_channel_int8_sqnr_on_gaussian_weights_is_at_least_38_db():
    w = torch.randn(1024, 1024)
    assert sqnr_db(w, dequantize_weight(quantize_weight(w, 8))) >= 38.0


def test_per_channel_beats_per_tensor_when_channel_ranges_differ():
    w = torch.randn(64, 128) * torch.logspace(-2, 1, 64)[:, None]
    per_channel = dequantize_weight(quantize_weight(w, 8, granularity=Granularity.PER_CHANNEL))
    per_tensor = dequantize_weight(quantize_weight(w, 8, granularity=Granularity.PER_TENSOR))
    # the smallest channel is almost erased by a per-tensor scale, intact with its own scale
    assert sqnr_db(w[0], per_channel[0]) > 38
    assert sqnr_db(w[0], per_tensor[0]) < 10


def test_asymmetric_represents_zero_exactly_and_uses_the_range():
    x = torch.tensor([0.0, 0.5, 1.0, 2.0])
    scale, zero_point = scale_zero_point(x.min(), x.max(), 8, Scheme.ASYMMETRIC)
    assert zero_point.item() == -128
    assert scale.item() == pytest.approx(2.0 / 255)


def test_group_size_that_does_not_divide_raises():
    with pytest.raises(ConfigError, match=r"group_size=128 does not divide.*100"):
        quantize_weight(torch.randn(4, 100), 4, granularity=Granularity.PER_GROUP, group_size=128)


def test_nan_weight_raises():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_weight(w, 8)


def test_int4_pack_round_trip_and_layout():
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    packed = pack_int4_words(q)
    assert packed.shape == (16, 8) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4_words(packed, 64), q)
    # LSB first, offset by 8: the first value sits in the lowest nibble
    one = pack_int4_words(torch.tensor([[-7, -8, -8, -8, -8, -8, -8, -8]]))
    assert one.item() == 1


def test_sqnr_matches_definition():
    ref = torch.randn(1000)
    noise = torch.randn(1000) * 0.01
    expected = 10 * torch.log10(ref.pow(2).sum() / noise.pow(2).sum()).item()
    assert sqnr_db(ref, ref + noise) == pytest.approx(expected, abs=1e-3)
    assert sqnr_db(ref, ref) == float("inf")
