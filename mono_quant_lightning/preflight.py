"""Checks that run before the first training step, so a configuration that cannot work fails at once."""

from __future__ import annotations

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningModule, Trainer
from torch import nn

import mono_quant as mq
from mono_quant import select_layers
from mono_quant.modules.attach import proxy_module
from mono_quant.modules.registry import REGISTRY
from mono_quant_lightning import export
from mono_quant_lightning.batches import val_loaders
from mono_quant_lightning.choices import QuantMode
from mono_quant_lightning.options import CallbackOptions


def check_layers(module: nn.Module, config: mq.QuantizationConfig) -> None:
    """int4 where no layer gets 4 bits (``group_size`` has no kernel, or no group of it divides any layer's
    width) would export an int8 model: a ``ConfigError`` naming the layers.

    Example:
        >>> model = nn.Sequential(nn.Linear(48, 80), nn.Linear(80, 2))
        >>> try:
        ...     check_layers(model, mq.QuantizationConfig(dtype="int4", group_size=128))
        ... except mq.ConfigError as err:
        ...     print(str(err)[:82])
        QuantizationCallback(config.group_size=128): no layer takes int4, so the export wo
        >>> check_layers(nn.Sequential(nn.Linear(96, 2)), mq.QuantizationConfig(dtype="int4", group_size=128))  # 32
    """
    if config.dtype is not mq.QuantDtype.INT4:
        return
    selection = select_layers(module, config)
    if not selection.chosen or any(cls.bits == 4 for cls in selection.chosen.values()):
        return
    refused = {}
    for name, cls in selection.chosen.items():
        int4 = next((c for c in REGISTRY[cls.float_type] if mq.QuantDtype.INT4 in c.dtypes), None)
        if int4 is not None:
            layer, attachment = module.get_submodule(name), selection.attached.get(name)
            refused[name] = int4.unsupported_reason(proxy_module(layer, attachment) if attachment else layer, config)
    if refused:
        listed = "; ".join(f"{name}: {why}" for name, why in refused.items())
        raise mq.ConfigError(
            f"QuantizationCallback(config.group_size={config.group_size}): no layer takes int4, so the export would "
            f"be int8 ({listed}); pass config=mono_quant.QuantizationConfig(dtype='int4', group_size=...) with a size "
            "whose halves down to 32 divide the layers' input widths, or dtype='int8'"
        )


def check_training_start(options: CallbackOptions, trainer: Trainer) -> None:
    """Validation data where the options need it, and an export directory that can be written."""
    check_data(options, trainer)
    export.check_export_dir(export.export_path(trainer, options.export_dir).parent)


def check_data(options: CallbackOptions, trainer: Trainer) -> None:
    """Static mode and int4 ``gptq``/``awq`` (without ``calibration_dataloader``), ``monitor`` and ``metric`` need fit
    validation data."""
    needs, instead = [], []
    if options.mode is QuantMode.STATIC and options.calibration_dataloader is None:
        needs.append("mode='static'")
        instead.append("mode='dynamic'")
    if options.config.algorithm is not mq.WeightAlgorithm.RTN and options.calibration_dataloader is None:
        needs.append(f"config.algorithm={options.config.algorithm.value!r}")
        instead.append("algorithm='rtn'")
    if options.monitor is not None:
        needs.append(f"monitor={options.monitor!r}")
    if options.metric is not None:
        needs.append(f"metric={type(options.metric).__name__}(...)")
    if not needs:
        return
    try:  # what the first validation would do; a no-op when the sanity check already did it
        trainer.fit_loop.epoch_loop.val_loop.setup_data()
    except MisconfigurationException:  # no val dataloader anywhere
        pass
    else:
        if val_loaders(trainer):
            return
    alternatives = "pass calibration_dataloader=..., or use " + " / ".join(instead or ["mode='dynamic'"])
    raise mq.ConfigError(
        f"QuantizationCallback({', '.join(needs)}) needs validation data, but this fit has none (no val "
        f"dataloader, no validation_step, or limit_val_batches=0) for {_name(trainer.lightning_module)}; add a "
        f"validation dataloader, {alternatives}"
    )


def _name(module: LightningModule) -> str:
    return type(module).__name__
