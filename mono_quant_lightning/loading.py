"""``load_quantized``: a quantized sidecar back into the user's ``LightningModule`` class."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch import LightningModule

import mono_quant as mq
from mono_quant_lightning.checkpoint_io import SIDECAR_SUFFIX, sidecar_path


def load_quantized(
    ckpt_path: str | os.PathLike[str],
    module_class: type[LightningModule],
    quantized_path: str | os.PathLike[str] | None = None,
) -> LightningModule:
    """Rebuild ``module_class`` from the checkpoint's hyperparameters and load the quantized file beside it.

    The checkpoint is read with ``weights_only=True`` for its hyperparameters only (its float weights are not
    used); the quantized file defaults to ``<stem>.quant.safetensors`` next to ``ckpt_path`` (what
    ``quantize_on="checkpoint"`` writes). Returns the module in ``eval()``.

    Example:
        >>> load_quantized("missing.ckpt", LightningModule)
        Traceback (most recent call last):
        ...
        mono_quant.errors.SerializationError: cannot load missing.ckpt: no such checkpoint
    """
    import torch

    ckpt_path = Path(ckpt_path)
    if ckpt_path.suffix == ".safetensors":  # Lightning never writes one: the user passed the quantized file
        beside = ckpt_path.with_name(ckpt_path.name.removesuffix(SIDECAR_SUFFIX).removesuffix(".safetensors") + ".ckpt")
        raise mq.ConfigError(
            f"load_quantized(ckpt_path={str(ckpt_path)!r}): that is a quantized file, not a Lightning checkpoint; "
            f"pass the checkpoint it was written beside ({str(beside)!r}), whose hyperparameters rebuild "
            f"{module_class.__name__}, or load the file with mq.load(path, {module_class.__name__}(...))"
        )
    path = Path(quantized_path) if quantized_path is not None else sidecar_path(ckpt_path)
    if not ckpt_path.is_file():
        raise mq.SerializationError(f"cannot load {ckpt_path}: no such checkpoint")
    if not path.is_file():
        raise mq.SerializationError(
            f"cannot load {path}: no quantized file beside {ckpt_path.name} (train with "
            "QuantizationCallback(quantize_on='checkpoint'), or pass quantized_path=)"
        )
    if not (isinstance(module_class, type) and issubclass(module_class, LightningModule)):
        raise mq.ConfigError(f"load_quantized(module_class={module_class!r}): expected a LightningModule subclass")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    hparams = dict(checkpoint.get(module_class.CHECKPOINT_HYPER_PARAMS_KEY) or {})
    skeleton = module_class(**hparams)
    return mq.load(path, model=skeleton).eval()
