"""The float module's outputs on the last fit validation epoch, so the fit-end fidelity pass runs only the
quantized model.

During each fit validation epoch a forward hook keeps the module's first forward output of each batch (on its
device, at most ``max_batches`` batches and ``MAX_BYTES`` in all) with a fingerprint of the batch. At fit end they
serve as the float reference for every batch whose fingerprint matches, provided no training step ran since
the epoch (``trainer.global_step`` unchanged: the module is the one that produced them); any other batch is run
through the float module as before. On a short digits fit this halves the callback's fidelity pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mono_quant import output_tensor

Reference = Callable[[int, Any], "torch.Tensor | None"]  # reference(batch index, batch): a kept float output
MAX_BYTES = 64 << 20  # outputs kept per epoch (logits are small; a language model's vocabulary logits are not)


def fingerprint(batch: Any) -> list[torch.Tensor]:
    """A sum and a size per tensor in ``batch`` (nested tuples, lists, dicts), as float64 tensors on the batch's
    device: computing one never waits for the device (no ``.item()`` in the validation loop); ``same`` compares.

    Example:
        >>> fingerprint((torch.ones(2, 3), torch.tensor([1, 2])))
        [tensor([6., 6.], dtype=torch.float64), tensor([3., 2.], dtype=torch.float64)]
    """
    if isinstance(batch, torch.Tensor):
        t = batch.detach()
        return [torch.stack([t.double().sum(), torch.tensor(float(t.numel()), dtype=torch.float64, device=t.device)])]
    if isinstance(batch, dict):
        batch = [batch[key] for key in sorted(batch, key=str)]
    if isinstance(batch, (list, tuple)):
        return [value for item in batch for value in fingerprint(item)]
    return []


def same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    """Whether two fingerprints are equal (float rounding on another device counts as different: safe).

    Example:
        >>> same(fingerprint(torch.ones(2)), fingerprint(torch.ones(2))), same(fingerprint(torch.ones(2)), [])
        (True, False)
    """
    return len(first) == len(second) and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(first, second, strict=True))


class ReferenceOutputs:
    """Float outputs of the last fit validation epoch (see the module docstring).

    Example:
        >>> module = torch.nn.Linear(4, 2)
        >>> refs = ReferenceOutputs(max_batches=2)
        >>> refs.start(module, global_step=0)
        >>> batch = torch.ones(3, 4)
        >>> refs.batch_start(batch); _ = module(batch)
        >>> refs.epoch_end()
        >>> lookup = refs.lookup(global_step=0)
        >>> lookup(0, batch).shape, lookup(0, torch.zeros(3, 4)), refs.lookup(global_step=5)
        (torch.Size([3, 2]), None, None)
    """

    def __init__(self, max_batches: int) -> None:
        self.max_batches = max_batches
        self.kept: tuple[int, list[tuple[list[torch.Tensor], torch.Tensor]]] | None = None
        self._current: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        self._step, self._bytes, self._key, self._handle = 0, 0, None, None

    def start(self, module: torch.nn.Module, global_step: int) -> None:
        """Begin an epoch: hook ``module``'s forward."""
        self.stop()
        self._current, self._step, self._bytes, self._key = [], global_step, 0, None
        self._handle = module.register_forward_hook(self._record)

    def batch_start(self, batch: Any) -> None:
        """The next forward output belongs to ``batch``."""
        self._key = fingerprint(batch) if len(self._current) < self.max_batches else None

    def _record(self, _module: torch.nn.Module, _args: Any, output: Any) -> None:
        if self._key is None:
            return
        key, self._key = self._key, None  # the first forward of the batch only
        try:
            tensor = output_tensor(output).detach()
        except Exception:  # an output compare cannot read: nothing to keep
            return
        if self._bytes + tensor.numel() * tensor.element_size() > MAX_BYTES:
            return
        self._bytes += tensor.numel() * tensor.element_size()
        self._current.append((key, tensor.clone()))  # on its device: a copy to the CPU would wait for it

    def epoch_end(self) -> None:
        """Keep this epoch's outputs (replacing the last epoch's) and remove the hook."""
        self.stop()
        self.kept = (self._step, self._current)
        self._current = []

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def lookup(self, global_step: int) -> Reference | None:
        """``reference(index, batch)`` for ``mq.compare``: the kept output when ``batch`` matches, else ``None``;
        ``None`` itself when training moved the module on since the kept epoch."""
        if self.kept is None or self.kept[0] != global_step:
            return None
        outputs = self.kept[1]

        def reference(index: int, batch: Any) -> torch.Tensor | None:
            if index < len(outputs) and same(outputs[index][0], fingerprint(batch)):
                return outputs[index][1]
            return None

        return reference

