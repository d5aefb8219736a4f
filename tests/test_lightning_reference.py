"""The fit-end fidelity pass reuses the float outputs of the last validation epoch when they are current."""

from __future__ import annotations

import pytest
import torch
from kit.lightning_modules import DigitsCNN, loaders, quiet, trainer

import mono_quant as mq


class CountingCNN(DigitsCNN):
    """Counts forward calls; ``mark`` is the count when the last validation epoch ended."""

    def __init__(self, batch_kind: str = "tuple") -> None:
        super().__init__(batch_kind)
        self.calls, self.mark = 0, 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(image)

    def on_validation_epoch_end(self) -> None:
        self.mark = self.calls


def _independent_fidelity(module: CountingCNN, q_model, val) -> mq.FidelityReport:
    images = [batch["image"] if isinstance(batch, dict) else batch[0] for batch in val]
    return mq.compare(module, q_model, images)


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_fit_end_runs_only_the_quantized_model_on_validated_batches(tmp_path, digits, kind: str) -> None:
    train, val = loaders(digits, kind)
    module, callback = CountingCNN(kind), quiet()
    trainer(tmp_path, [callback]).fit(module, train, val)
    assert module.calls == module.mark  # no float forward after the last validation epoch
    expected = _independent_fidelity(module, callback.result.model, val)
    assert callback.outcome.fidelity.sqnr_db == pytest.approx(expected.sqnr_db, rel=1e-6)
    assert callback.outcome.fidelity.batches == expected.batches == len(val)


def test_training_after_the_last_validation_recomputes_the_float_outputs(tmp_path, digits) -> None:
    train, val = loaders(digits)
    module, callback = CountingCNN(), quiet()
    # validation after epoch 2 only; epoch 3 trains on: the kept outputs are stale
    trainer(tmp_path, [callback], max_epochs=3, check_val_every_n_epoch=2).fit(module, train, val)
    assert module.calls > module.mark
    expected = _independent_fidelity(module, callback.result.model, val)
    assert callback.outcome.fidelity.sqnr_db == pytest.approx(expected.sqnr_db, rel=1e-6)
