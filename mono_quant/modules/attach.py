"""How a module multiplies by its weight, and putting a ``QuantizedTensor`` in that weight's place.

``attachment_for`` reads a module the way its ``forward`` uses it: a subclass of ``nn.Linear`` or
``nn.Conv1d``/``nn.Conv2d``/``nn.Embedding`` (own ``forward``, same padding, ...), transformers'
``Conv1D`` (``[in, out]`` weight, recognised by shape and attributes so transformers is not a
dependency), ``nn.MultiheadAttention``'s packed ``in_proj_weight``. ``proxy_module`` gives the exact
float layer with the same product (sharing the weight, no copy) so the registry's classes quantize it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mono_quant.modules.registry import swapped_types
from mono_quant.modules.weight_tensor import QuantizedTensor


@dataclasses.dataclass(frozen=True)
class Attachment:
    """``module.<attribute>`` is used as a ``kind`` weight (``linear`` weights ``transposed`` when ``[in, out]``)."""

    attribute: str
    kind: str
    transposed: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def attachment_for(module: nn.Module) -> Attachment | None:
    """How ``module`` uses its weight when it is not an exact swappable type, or ``None``.

    Example:
        >>> class SamePadConv(nn.Conv2d):
        ...     pass
        >>> attachment_for(SamePadConv(1, 2, 3)), attachment_for(nn.Linear(2, 2))
        (Attachment(attribute='weight', kind='conv2d', transposed=False), None)
    """
    weight = getattr(module, "weight", None)
    if type(module) is nn.Conv2d and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
        return Attachment("weight", "conv2d")  # pads in forward first: the weight path handles that
    if type(module) in swapped_types() or not isinstance(weight, (torch.Tensor, type(None))):
        return None
    if isinstance(module, nn.Linear):
        return Attachment("weight", "linear")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
        return Attachment("weight", "conv1d" if isinstance(module, nn.Conv1d) else "conv2d")
    if isinstance(module, nn.Embedding):
        return Attachment("weight", "embedding")
    if _is_transformers_conv1d(module):
        return Attachment("weight", "linear", transposed=True)
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        return Attachment("in_proj_weight", "linear")
    return None


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D``: ``addmm(bias, x, weight)`` with ``weight`` ``[nx, nf]``."""
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and weight.shape[1] == getattr(module, "nf", -1)
    )


def proxy_module(module: nn.Module, attachment: Attachment, weight: torch.Tensor | None = None) -> nn.Module:
    """The exact float layer computing the same product as ``module``'s weight (shares it; no bias).

    ``weight`` overrides the module's own (a meta tensor for load shells).

    Example:
        >>> proxy = proxy_module(nn.Conv1d(4, 8, 3, groups=2), Attachment("weight", "conv1d"))
        >>> type(proxy).__name__, tuple(proxy.weight.shape), proxy.groups
        ('Conv2d', (8, 2, 1, 3), 2)
    """
    weight = (getattr(module, attachment.attribute) if weight is None else weight).detach()
    kind = attachment.kind
    if kind == "linear":
        weight = weight.t().contiguous() if attachment.transposed else weight
        proxy: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    elif kind == "embedding":
        proxy = nn.Embedding(weight.shape[0], weight.shape[1], _weight=torch.empty(weight.shape, device="meta"))
    else:
        one_d = kind == "conv1d"
        weight = weight.unsqueeze(-2) if one_d else weight
        geometry = [_pair(getattr(module, n, d), one_d, d) for n, d in (("stride", 1), ("padding", 0), ("dilation", 1))]
        out_channels, in_per_group = weight.shape[:2]
        groups = getattr(module, "groups", 1)
        proxy = nn.Conv2d(in_per_group * groups, out_channels, tuple(weight.shape[2:]), *geometry, groups=groups,
                          bias=False, device="meta")  # fmt: skip
    proxy.weight = nn.Parameter(weight, requires_grad=False)
    return proxy


def _pair(value: Any, one_d: bool, default: int) -> tuple[int, int]:
    if isinstance(value, str):  # "same"/"valid": padded explicitly at call time
        return (0, 0)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * (1 if one_d else 2)
    return (default if one_d else values[0], values[-1])


def install(module: nn.Module, attachment: Attachment, layer: nn.Module) -> None:
    """Put ``layer`` behind a ``QuantizedTensor`` in place of ``module.<attribute>`` (on a copy, never
    on the user's model), with hooks that keep the file tensor names.

    Example:
        >>> from mono_quant.config import QuantizationConfig
        >>> from mono_quant.modules.int8_linear import Int8Linear
        >>> class MyLinear(nn.Linear):
        ...     pass
        >>> m, att = MyLinear(16, 4), Attachment("weight", "linear")
        >>> install(m, att, Int8Linear.from_float(proxy_module(m, att), QuantizationConfig()))
        >>> sorted(m.state_dict())
        ['bias', 'weight', 'weight_scale']
    """
    original = getattr(module, attachment.attribute)
    tensor = QuantizedTensor(layer, attachment.kind, original.shape, original.dtype, attachment.transposed)
    module._parameters.pop(attachment.attribute, None)
    module._buffers.pop(attachment.attribute, None)
    module.register_buffer(attachment.attribute, tensor)
    if not getattr(module, "_mono_quant_hooks", False):
        module.register_state_dict_post_hook(_expand_state)
        module.register_load_state_dict_pre_hook(_collapse_state)
        module._mono_quant_hooks = True


def file_key(attribute: str, key: str) -> str:
    """The file name of a quantized layer's tensor ``key`` when it stands in for ``attribute``.

    Example:
        >>> file_key("weight", "weight_scale"), file_key("in_proj_weight", "weight_scale"), file_key("w", "input_scale")
        ('weight_scale', 'in_proj_weight_scale', 'w_input_scale')
    """
    if attribute == "weight":
        return key
    if key.startswith("weight"):
        return attribute + key.removeprefix("weight")
    return f"{attribute.removesuffix('weight').rstrip('_')}_{key}"


def _expand_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for name, value in list(module._buffers.items()):
        if isinstance(value, QuantizedTensor) and prefix + name in state_dict:
            del state_dict[prefix + name]
            for key, tensor in value.layer.state_dict().items():
                state_dict[prefix + file_key(name, key)] = tensor


def _collapse_state(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for name, value in list(module._buffers.items()):
        if not isinstance(value, QuantizedTensor):
            continue
        own = {key: prefix + file_key(name, key) for key in value.layer.state_dict()}
        if all(full in state_dict for full in own.values()):
            value.layer.load_state_dict({key: state_dict.pop(full) for key, full in own.items()}, assign=True)
            fresh = QuantizedTensor(value.layer, value.kind, value.shape, value.dtype, value.transposed)
            module._buffers[name] = state_dict[prefix + name] = fresh  # on the loaded tensors' device


def attached_tensors(model: nn.Module) -> dict[str, tuple[Attachment, QuantizedTensor]]:
    """Module name -> (attachment, tensor) for every ``QuantizedTensor`` in ``model``.

    Example:
        >>> attached_tensors(nn.Sequential(nn.Linear(2, 2)))
        {}
    """
    found = {}
    for name, module in model.named_modules():
        for attribute, value in module._buffers.items():
            if isinstance(value, QuantizedTensor):
                found[name] = (Attachment(attribute, value.kind, value.transposed), value)
    return found


def expected_keys(layer: nn.Module, attribute: str | None) -> dict[str, str]:
    """``layer``'s state_dict keys -> the names they have in a file (renamed when attached to ``attribute``).

    Example:
        >>> expected_keys(nn.Linear(2, 2, bias=False), "in_proj_weight")
        {'weight': 'in_proj_weight'}
    """
    return {key: key if attribute is None else file_key(attribute, key) for key in layer.state_dict()}


def quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Module name -> the quantized layer serving it: swapped modules and the layers behind weight tensors.

    Example:
        >>> import mono_quant as mq
        >>> q, _ = mq.dynamic_quantize(nn.Sequential(nn.Linear(8, 8), nn.Conv2d(1, 2, 3)))
        >>> {name: type(layer).__name__ for name, layer in quantized_layers(q).items()}
        {'0': 'Int8Linear', '1': 'Int8Conv2d'}
    """
    from mono_quant.modules.base import QuantizedLayer

    attached = attached_tensors(model)
    found = {}
    for name, module in model.named_modules():  # model order
        if isinstance(module, QuantizedLayer):
            found[name] = module
        elif name in attached:
            found[name] = attached[name][1].layer
    return found
