"""Private torch pieces that tensor subclasses need: a storage-less wrapper tensor and aten op handles."""

from __future__ import annotations

import torch

ATEN_DETACH = torch.ops.aten.detach.default


def wrapper_tensor(cls: type, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A ``cls`` instance with ``shape``/``dtype``/``device`` metadata and no storage of its own.

    ``cls`` must define ``__torch_dispatch__`` (ops on the wrapper reach it, not a storage).

    Example:
        >>> class Wrapped(torch.Tensor):
        ...     @classmethod
        ...     def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        ...         raise NotImplementedError
        >>> t = wrapper_tensor(Wrapped, torch.Size([2, 3]), torch.float32, torch.device("cpu"))
        >>> type(t).__name__, t.shape
        ('Wrapped', torch.Size([2, 3]))
    """
    return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=False)
