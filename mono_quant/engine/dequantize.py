"""``dequantize``: a quantized model (or a file's tensors) back to plain float32 layers."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mono_quant.modules import QUANTIZED_CLASSES, QuantizedLayer
from mono_quant.modules.attach import attached_tensors, expected_keys
from mono_quant.modules.base import require


def meta_float_module(entry: dict[str, Any]) -> nn.Module | None:
    """A float module on the meta device shaped per a layer entry (the entry's class decides)."""
    return QUANTIZED_CLASSES[entry["class"]].meta_float_module(entry)


def dequantize(q_model: nn.Module) -> nn.Module:
    """A copy of ``q_model`` with every quantized layer replaced by a plain float32 ``nn.Linear``/
    ``nn.Conv2d``/``nn.Embedding`` holding the dequantized weight; ``q_model`` is not modified.

    Example:
        >>> import mono_quant as mq
        >>> q, _ = mq.dynamic_quantize(nn.Sequential(nn.Linear(16, 4)))
        >>> f = dequantize(q)
        >>> type(f[0]).__name__, torch.equal(f[0].weight, q[0].dequantized_weight())
        ('Linear', True)
    """
    if isinstance(q_model, QuantizedLayer):
        return _ask(q_model, "dequantize", "")
    return dequantize_in_place(copy.deepcopy(q_model))


def dequantize_in_place(model: nn.Module) -> nn.Module:
    """``model`` itself with every quantized layer and attached weight turned back to float (for fresh copies)."""
    if isinstance(model, QuantizedLayer):
        return _ask(model, "dequantize", "")
    for name, (attachment, tensor) in attached_tensors(model).items():
        module = model.get_submodule(name)
        del module._buffers[attachment.attribute]
        module.register_parameter(attachment.attribute, nn.Parameter(tensor.dequantize(), requires_grad=False))
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLayer):
            plain = _ask(module, "dequantize", name).train(module.training)
            model.set_submodule(name, plain)
    return model


def dequantize_tensors(tensors: dict[str, torch.Tensor], layers: dict[str, dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Replace each quantized layer's tensors by float32 ``weight`` (original shape) and ``bias``."""
    out = dict(tensors)
    for name, entry in layers.items():
        prefix = f"{name}." if name else ""
        attach = entry.get("attach")
        with torch.device("meta"):
            shell = QUANTIZED_CLASSES[entry["class"]].from_metadata(meta_float_module(entry), entry)
        names = expected_keys(shell, attach["attribute"] if attach else None)
        own = {key: out.pop(prefix + names[key]) for key in shell.state_dict()}
        shell.load_state_dict(own, strict=True, assign=True)
        if "matrices" in entry:  # several matrices (recurrent layers): the float layer's own names
            out.update({prefix + key: value for key, value in _ask(shell, "dequantize", name).state_dict().items()})
            continue
        weight = _ask(shell, "dequantized_weight", name).float()
        if attach:
            weight = weight.squeeze(-2) if attach["kind"] == "conv1d" else weight
            weight = weight.t() if attach["transposed"] else weight
            out[prefix + attach["attribute"]] = weight.reshape(attach["shape"])
            continue
        out[f"{prefix}weight"] = weight.reshape(entry["shape"])
        if "bias" in own:
            out[f"{prefix}bias"] = own["bias"].float()
    return out


def _ask(layer: QuantizedLayer, method: str, name: str) -> Any:
    """``layer.<method>()``; a plugin class that does not implement it gets a ``ConfigError`` naming both."""
    return require(layer, method, f"cannot dequantize layer {name!r}")
