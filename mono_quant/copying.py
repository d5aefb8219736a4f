"""Copying a user's model without surprises, and restoring every submodule's own train/eval mode.

``copy.deepcopy`` refuses tensors that are not graph leaves, and real models hold them in plain
attributes: torchmetrics keeps the last ``forward`` result (``_forward_cache``) after
``self.log("train_mse", self.train_mse(out, y))`` in ``training_step``, old-style ``weight_norm``
keeps its computed ``weight``. ``copy_model`` copies those as detached values (they are caches that
the next forward recomputes); everything else, including tied parameters (still one tensor in the
copy), hooks and parametrizations, is copied by ``deepcopy`` itself.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from mono_quant.errors import QuantizationError


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that also copies non-leaf tensors held in attributes (as detached values).

    Example:
        >>> model = nn.Linear(2, 2)
        >>> model.last_output = model(torch.ones(1, 2))  # a non-leaf tensor: plain deepcopy raises
        >>> copied = copy_model(model)
        >>> copied.last_output.grad_fn is None, copied.weight is not model.weight
        (True, True)
    """
    memo: dict[int, Any] = {}
    for module in model.modules():
        for value in vars(module).values():
            for tensor in _tensors_in(value):
                if tensor.grad_fn is not None and id(tensor) not in memo:
                    memo[id(tensor)] = tensor.detach().clone()
    try:
        return copy.deepcopy(model, memo)
    except Exception as err:
        raise QuantizationError(
            f"cannot copy the model ({type(err).__name__}: {err}); quantize never changes the input model, "
            "so it needs a copy. Make the model deep-copyable (or quantize a freshly built instance)"
        ) from err


def _tensors_in(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, Mapping):
        for item in value.values():
            yield from _tensors_in(item, depth + 1)
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item, depth + 1)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block, then give each back its own mode.

    ``model.train(was_training)`` alone would also switch a BatchNorm the user froze back to train.

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> _ = model[1].eval()  # frozen by the user while the rest trains
        >>> with eval_mode(model):
        ...     model[0].training
        False
        >>> model.training, model[1].training
        (True, False)
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def bake_parametrized_weights(model: nn.Module) -> list[str]:
    """Replace weight norm (old hooks and ``parametrizations``) and other parametrizations by the effective
    tensor they compute, in place (on the copy ``quantize`` works on); returns the affected module names.

    Example:
        >>> model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 2)))
        >>> bake_parametrized_weights(model), type(model[0].weight).__name__
        (['0'], 'Parameter')
    """
    from torch.nn.utils import parametrize
    from torch.nn.utils.weight_norm import WeightNorm

    baked = []
    for name, module in model.named_modules():
        hooks = [hook for hook in module._forward_pre_hooks.values() if isinstance(hook, WeightNorm)]
        for hook in hooks:
            nn.utils.remove_weight_norm(module, hook.name)
        if parametrize.is_parametrized(module):
            # not parametrize.remove_parametrizations: it edits the parametrized class, which the copy
            # shares with the user's model
            values = {name: getattr(module, name).detach().clone() for name in module.parametrizations}
            module.__class__ = module.__class__.__bases__[0]
            del module._modules["parametrizations"]
            for tensor_name, value in values.items():
                module.register_parameter(tensor_name, nn.Parameter(value, requires_grad=False))
            hooks.append(None)
        if hooks:
            baked.append(name)
    return baked


def reject_meta_model(model: nn.Module) -> None:
    """Raise a clear error when ``model`` has tensors on the meta device (nothing to quantize).

    Example:
        >>> reject_meta_model(nn.Linear(2, 2, device="meta"))
        Traceback (most recent call last):
        ...
        mono_quant.errors.QuantizationError: model has tensors on the meta device ('weight'); quantize needs...
    """
    meta = next((name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if meta is not None:
        raise QuantizationError(
            f"model has tensors on the meta device ({meta!r}); quantize needs real weights: load them first "
            "(model.to_empty(device='cpu') then load_state_dict), or use mq.load for a quantized file"
        )
