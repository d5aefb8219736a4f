"""``mq.compare`` on padded transformer batches: padding positions do not count (``attention_mask`` of dict
batches, or ``mask_fn``), the report says so, and the Lightning callback's fidelity line takes the same path."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from kit.lightning_modules import quiet_trainer
from torch.utils.data import DataLoader

import mono_quant as mq

transformers = pytest.importorskip("transformers")

VOCAB, LENGTH = 96, 16
LENGTHS = ([16, 9, 5, 12], [7, 16, 3, 10])  # real tokens per sequence, two batches of four


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=64)  # fmt: skip
    return transformers.BertModel(config).eval()


def padded_batches(padding_seed: int | None) -> list[dict[str, torch.Tensor]]:
    """The same real tokens every time; the padding holds token 0 (``None``) or random tokens from the seed."""
    generator = torch.Generator().manual_seed(1)
    batches = []
    for lengths in LENGTHS:
        ids = torch.randint(1, VOCAB, (len(lengths), LENGTH), generator=generator)
        mask = (torch.arange(LENGTH)[None] < torch.tensor(lengths)[:, None]).long()
        if padding_seed is None:
            filler = torch.zeros_like(ids)
        else:
            filler = torch.randint(1, VOCAB, ids.shape, generator=torch.Generator().manual_seed(padding_seed))
        batches.append({"input_ids": torch.where(mask.bool(), ids, filler), "attention_mask": mask})
    return batches


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    model = tiny_bert()
    return model, mq.quantize(model).model


def every_position(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.ones_like(batch["attention_mask"])


def test_attention_mask_excludes_padding_and_the_report_says_so(models) -> None:
    model, q = models
    batches = padded_batches(None)
    report = mq.compare(model, q, batches)
    assert report.masked_by == "attention_mask" and report.masked_batches == 2
    assert str(report).endswith("padding masked by attention_mask")
    signal = noise = 0.0
    with torch.no_grad():  # the figure over real tokens only, computed by hand
        for batch in batches:
            keep = batch["attention_mask"].bool()
            ref, out = model(**batch).last_hidden_state[keep], q(**batch).last_hidden_state[keep]
            signal += ref.pow(2).sum().item()
            noise += (ref - out).pow(2).sum().item()
    assert report.sqnr_db == pytest.approx(10 * math.log10(signal / noise), abs=1e-6)


def test_padding_contents_change_the_unmasked_figure_but_not_the_masked_one(models) -> None:
    model, q = models
    masked = [mq.compare(model, q, padded_batches(seed)) for seed in (None, 5)]
    unmasked = [mq.compare(model, q, padded_batches(seed), mask_fn=every_position) for seed in (None, 5)]
    assert masked[0].sqnr_db == pytest.approx(masked[1].sqnr_db, abs=1e-9)
    assert masked[0].cosine_min == pytest.approx(masked[1].cosine_min, abs=1e-9)
    assert abs(unmasked[0].sqnr_db - unmasked[1].sqnr_db) > 1e-3  # padding counted: the figure moves with it
    assert abs(unmasked[0].sqnr_db - masked[0].sqnr_db) > 1e-2


def test_mask_fn_for_tuple_batches_and_a_mask_that_does_not_fit(models) -> None:
    model, q = models
    tuples = [(b["input_ids"], b["attention_mask"]) for b in padded_batches(None)]

    def feed(m: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return m(input_ids=batch[0], attention_mask=batch[1]).last_hidden_state

    by_fn = mq.compare(model, q, tuples, forward_fn=feed, mask_fn=lambda b: b[1])
    by_key = mq.compare(model, q, padded_batches(None))
    assert by_fn.masked_by == "mask_fn" and by_fn.sqnr_db == pytest.approx(by_key.sqnr_db, abs=1e-9)
    assert mq.compare(model, q, tuples, forward_fn=feed).masked_by is None  # no mask in a tuple unless told
    with pytest.raises(mq.CalibrationError, match=r"mask_fn returned shape \[4, 8\] for batch 0, .* \[4, 16, 64\]"):
        mq.compare(model, q, tuples, forward_fn=feed, mask_fn=lambda b: b[1][:, :8])


def test_an_attention_mask_that_does_not_index_the_output_is_not_applied(models) -> None:
    model, q = models

    def pooled(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return m(**batch).pooler_output  # [batch, hidden]: one row per sequence, nothing to mask

    report = mq.compare(model, q, padded_batches(None), forward_fn=pooled)
    assert report.masked_by is None and "masked" not in str(report)


class TokenEncoder(L.LightningModule):
    """A tiny BERT whose validation_step feeds ``input_ids`` and ``attention_mask`` from dict batches."""

    def __init__(self) -> None:
        super().__init__()
        self.bert = tiny_bert().train()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def training_step(self, batch, batch_idx):
        return self(batch["input_ids"], batch["attention_mask"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_energy", self(batch["input_ids"], batch["attention_mask"]).pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


@pytest.mark.slow
def test_the_callback_fidelity_masks_padding_of_dict_batches(tmp_path: Path) -> None:
    from mono_quant_lightning import QuantizationCallback

    rows = [{k: v[i] for k, v in batch.items()} for batch in padded_batches(None) for i in range(4)]
    cb = QuantizationCallback(verbose=False, dtype="int8", mode="dynamic")
    quiet_trainer(tmp_path, [cb], max_epochs=1).fit(
        TokenEncoder(), DataLoader(rows, batch_size=4), DataLoader(rows, batch_size=4)
    )
    assert cb.fidelity.masked_by == "attention_mask" and cb.fidelity.masked_batches == 2
    assert "padding masked by attention_mask" in str(cb.fidelity)
