"""``SidecarCheckpointIO``: a ``CheckpointIO`` wrapper that keeps a quantized file beside every checkpoint.

Lightning funnels every checkpoint write and delete through ``strategy.checkpoint_io`` on global rank
zero only (``ModelCheckpoint`` top-k rotation, ``save_last``, ``save_weights_only``, manual
``trainer.save_checkpoint``), so wrapping it is the one place that sees them all. After the wrapped
plugin writes ``<stem>.ckpt`` this one calls ``write_sidecar(<stem>.quant.safetensors)``; when
Lightning removes the checkpoint it removes the sidecar too. A sidecar that fails never stops training:
it warns with the reason, and no stale sidecar of an older checkpoint stays under that name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_warn

SIDECAR_SUFFIX = ".quant.safetensors"


def sidecar_path(checkpoint_path: str | os.PathLike[str]) -> Path:
    """The quantized file that belongs to ``checkpoint_path``: same directory and stem.

    Example:
        >>> sidecar_path("ckpts/epoch=3-val_acc=0.95.ckpt").as_posix()
        'ckpts/epoch=3-val_acc=0.95.quant.safetensors'
        >>> sidecar_path("ckpts/last").name
        'last.quant.safetensors'
    """
    path = Path(checkpoint_path)
    stem = path.name[: -len(".ckpt")] if path.name.endswith(".ckpt") else path.name
    return path.with_name(stem + SIDECAR_SUFFIX)


class SidecarCheckpointIO(CheckpointIO):
    """Delegates to ``checkpoint_io`` and writes/removes ``<stem>.quant.safetensors`` beside each checkpoint.

    Args:
        checkpoint_io: the plugin that actually reads and writes checkpoints (Lightning's, or the user's).
        write_sidecar: called with the sidecar path after each checkpoint is written; it must write atomically.

    Example:
        >>> import tempfile, torch
        >>> from lightning.pytorch.plugins import TorchCheckpointIO
        >>> written = []
        >>> def write(path):
        ...     path.write_text("q"); written.append(path.name)
        >>> io = SidecarCheckpointIO(TorchCheckpointIO(), write)
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     io.save_checkpoint({"w": torch.zeros(1)}, f"{tmp}/a.ckpt")
        ...     io.remove_checkpoint(f"{tmp}/a.ckpt")
        ...     leftovers = os.listdir(tmp)
        >>> written, leftovers
        (['a.quant.safetensors'], [])
    """

    def __init__(self, checkpoint_io: CheckpointIO, write_sidecar: Callable[[Path], Any]) -> None:
        super().__init__()
        self.checkpoint_io = checkpoint_io
        self.write_sidecar = write_sidecar

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write the checkpoint through the wrapped plugin, then its quantized sidecar (a failure only warns)."""
        self.checkpoint_io.save_checkpoint(checkpoint, path, storage_options=storage_options)
        if not _is_local(path):
            return
        sidecar = sidecar_path(path)
        try:
            self.write_sidecar(sidecar)
        except Exception as err:  # training must never be lost to a sidecar
            sidecar.unlink(missing_ok=True)  # never leave an older model under this checkpoint's name
            rank_zero_warn(
                f"[mono-quant] no quantized sidecar for {Path(path).name} ({type(err).__name__}: {err}); "
                "the checkpoint was saved and training goes on"
            )

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Unchanged: checkpoints load exactly as without the callback."""
        return self.checkpoint_io.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        """Remove the checkpoint through the wrapped plugin, and its sidecar if there is one."""
        self.checkpoint_io.remove_checkpoint(path)
        if _is_local(path):
            sidecar_path(path).unlink(missing_ok=True)

    def teardown(self) -> None:
        self.checkpoint_io.teardown()


def install(trainer: Trainer, write_sidecar: Callable[[Path], Any]) -> None:
    """Wrap the strategy's checkpoint IO (once)."""
    if not isinstance(trainer.strategy.checkpoint_io, SidecarCheckpointIO):
        trainer.strategy.checkpoint_io = SidecarCheckpointIO(trainer.strategy.checkpoint_io, write_sidecar)


def restore(trainer: Trainer) -> None:
    """Give the strategy its own checkpoint IO back (teardown, exceptions).

    Example:
        >>> import lightning as L
        >>> trainer = L.Trainer(logger=False, enable_progress_bar=False)
        >>> original = trainer.strategy.checkpoint_io
        >>> install(trainer, print); restore(trainer); trainer.strategy.checkpoint_io is original
        True
    """
    io = trainer.strategy.checkpoint_io
    if isinstance(io, SidecarCheckpointIO):
        trainer.strategy.checkpoint_io = io.checkpoint_io


def _is_local(path: Any) -> bool:
    return "://" not in os.fspath(path)
