"""A quiet CPU ``Trainer`` for the Lightning tests (no bar, no summary, no logger, no sanity check)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def quiet_trainer(tmp_path: Path, callbacks: list, **kwargs) -> L.Trainer:
    """``L.Trainer`` on one CPU device for 2 epochs, quiet; ``kwargs`` override any option."""
    options = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return L.Trainer(callbacks=callbacks, **options)
