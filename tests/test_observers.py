import threading

import pytest
import torch

from mono_quant import CalibrationError, HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver, Scheme
from mono_quant.config import HistogramMethod


def _feed(observer, batches):
    for batch in batches:
        observer.update(batch)
    return observer


def test_minmax_tracks_extremes_and_qparams_cover_them():
    obs = _feed(MinMaxObserver("fc"), [torch.tensor([-1.0, 0.5]), torch.tensor([3.0])])
    assert (obs.min_val.item(), obs.max_val.item()) == (-1.0, 3.0)
    scale, zero_point = obs.qparams(Scheme.ASYMMETRIC)
    assert ((-1.0 / scale) + zero_point).round().item() == -128
    assert ((3.0 / scale) + zero_point).round().item() == pytest.approx(127, abs=1)


def test_minmax_merge_equals_union():
    batches = [torch.randn(100) * (i + 1) for i in range(6)]
    whole = _feed(MinMaxObserver(), batches)
    left, right = _feed(MinMaxObserver(), batches[:3]), _feed(MinMaxObserver(), batches[3:])
    left.merge(right)
    assert torch.equal(left.min_val, whole.min_val) and torch.equal(left.max_val, whole.max_val)
    assert left.batches.item() == 6


def test_histogram_merge_is_exact_even_when_ranges_differ():
    small = [torch.randn(1000) * 0.1 for _ in range(3)]
    large = [torch.randn(1000) * 40 for _ in range(3)]
    whole = _feed(HistogramObserver(), small + large)
    left, right = _feed(HistogramObserver(), small), _feed(HistogramObserver(), large)
    left.merge(right)
    assert torch.equal(left.counts, whole.counts)
    assert left.range_exp.item() == whole.range_exp.item()
    assert left.counts.sum().item() == 6000


def _all_reduce_in_threads(observers):
    """Run ``sync`` on each observer in its own thread with a real barrier-based all-reduce."""
    barrier = threading.Barrier(len(observers))
    slots: list = [None] * len(observers)
    ops = {"min": torch.minimum, "max": torch.maximum, "sum": torch.add}

    def run(rank, observer):
        def reduce(tensor, op):
            slots[rank] = tensor
            barrier.wait()
            result = slots[0]
            for other in slots[1:]:
                result = ops[op](result, other)
            barrier.wait()
            return result

        observer.sync(reduce)

    threads = [threading.Thread(target=run, args=(i, o)) for i, o in enumerate(observers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
def test_sync_across_processes_equals_a_single_process(cls):
    small = [torch.randn(500) * 0.5 for _ in range(2)]
    large = [torch.randn(500) * 9 for _ in range(2)]
    whole = _feed(cls(), small + large)
    ranks = [_feed(cls(), small), _feed(cls(), large), cls()]  # the third rank saw no data
    _all_reduce_in_threads(ranks)
    for rank in ranks:
        assert torch.equal(rank.min_val, whole.min_val) and torch.equal(rank.max_val, whole.max_val)
        assert rank.batches.item() == 4
        if cls is HistogramObserver:
            assert torch.equal(rank.counts, whole.counts)


def test_histogram_percentile_ignores_outliers():
    data = torch.cat([torch.randn(100_000), torch.tensor([1000.0])])
    obs = _feed(HistogramObserver(percentile=99.9), [data])
    low, high = obs.value_range(Scheme.SYMMETRIC)
    assert 2.5 < high.item() < 5.0 and low.item() == -high.item()
    low, high = obs.value_range(Scheme.ASYMMETRIC)
    assert -5.0 < low.item() < -2.5 and 2.5 < high.item() < 5.0


def test_histogram_mse_clips_heavy_tails_but_keeps_the_bulk():
    data = torch.cat([torch.randn(200_000), torch.tensor([30.0])])
    obs = _feed(HistogramObserver(method=HistogramMethod.MSE), [data])
    _, high = obs.value_range(Scheme.SYMMETRIC)
    # optimum: clip the outlier part way (error 15^2) rather than spend resolution on all 200k values
    assert 4.0 < high.item() < 25.0
    uniform = _feed(HistogramObserver(method=HistogramMethod.MSE), [torch.rand(100_000) * 2 - 1])
    assert uniform.value_range(Scheme.SYMMETRIC)[1].item() > 0.9  # nothing to clip on a uniform


def test_moving_average_smooths_outlier_batches():
    obs = MovingAverageMinMaxObserver(averaging_constant=0.1)
    _feed(obs, [torch.tensor([-1.0, 1.0])] * 5 + [torch.tensor([-100.0, 100.0])])
    assert 5 < obs.max_val.item() < 15
    other = _feed(MovingAverageMinMaxObserver(averaging_constant=0.1), [torch.tensor([0.0, 3.0])])
    obs.merge(other)
    assert obs.batches.item() == 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver, HistogramObserver])
def test_nan_and_inf_activations_raise_naming_the_layer(cls, bad):
    # min/max observers stay on the device (no sync per batch) and report at qparams(); the histogram
    # needs its range on the host for every batch and reports at once
    obs = cls("encoder.fc1")
    with pytest.raises(CalibrationError, match=r"encoder\.fc1.*NaN or Inf"):
        obs.update(torch.tensor([1.0, bad]))
        obs.update(torch.tensor([2.0, 3.0]))
        obs.qparams()


def test_empty_observer_has_no_qparams():
    with pytest.raises(CalibrationError, match="never reached"):
        MinMaxObserver("head").qparams()


@pytest.mark.parametrize("cls", [MinMaxObserver, HistogramObserver])
def test_state_dict_round_trip_is_plain_tensors(cls):
    obs = _feed(cls("x"), [torch.randn(100), torch.randn(100) * 3])
    state = obs.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = cls("x")
    restored.load_state_dict(state)
    assert torch.equal(restored.qparams().scale, obs.qparams().scale)


def test_plain_convolutions_are_observed_by_a_module_hook_with_the_same_statistics() -> None:
    """A plain zero-padded conv is observed through its module (cheap hook); a conv subclass or a reflect-padded
    conv through its weight's call (its forward changes the input first). Both routes see the same values."""
    from torch import nn

    from mono_quant.config import QuantizationConfig
    from mono_quant.engine.calibration import Calibrator
    from mono_quant.engine.selection import calibrated_layers

    class Padded(nn.Conv2d):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Padded(4, 4, 3), nn.Conv2d(4, 4, 3, padding_mode="reflect"))
    config = QuantizationConfig(mode="static")
    targets = calibrated_layers(model, config)
    assert targets["0"] is model[0]
    assert targets["1"] is model[1].weight and targets["2"] is model[2].weight
    data = [torch.randn(2, 3, 12, 12) for _ in range(3)]
    by_hook = Calibrator(targets, config)
    by_weight = Calibrator({"0": model[0].weight}, config)
    by_hook.run(model, data)
    by_weight.run(model, data)
    assert by_hook.qparams()["0"] == by_weight.qparams()["0"]
