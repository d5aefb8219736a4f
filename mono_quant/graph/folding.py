"""Conv2d + BatchNorm2d folding: an eval-mode BatchNorm that only ever sees one conv's output is an
affine map per output channel, so it folds exactly into that conv's weight and bias.

Pairs are proven by data flow, never by registration order. With an example batch (calibration
data), a recorded forward pairs a BatchNorm with the conv (``nn.Conv2d`` or a subclass, e.g. a
same-padding conv) whose output tensor *is* the BatchNorm's input, and the folded model's output
is checked against the unfolded one on that batch (nothing is folded if it differs). Without a
batch, ``torch.fx`` proves pairs when the model traces (the BatchNorm consumes the conv's output and
nothing else does), else only adjacent ``nn.Sequential`` children count (Sequential feeds each child
only the previous output). Each module must be registered and called once and carry no hooks, and
the BatchNorm must be in eval mode. Folded BatchNorms become ``FoldedBatchNorm`` (an ``nn.Identity``);
a conv without a bias gains one.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mono_quant.batches import ForwardFn, default_forward, describe_batch
from mono_quant.copying import eval_mode
from mono_quant.errors import CalibrationError
from mono_quant.modules.folded_batchnorm import FoldedBatchNorm, fold_pair
from mono_quant.qparams import sqnr_db
from mono_quant.skips import Skip, SkipKind

_CHECK_SQNR_DB = 60.0  # a float64 fold is exact to float32 rounding (> 100 dB); anything lower is a wrong pair

_WAS_TRAINING = (
    "folded into {conv} (its BatchNorm2d was in train mode: quantization makes an eval-mode copy for inference, so "
    "the running statistics were folded)"
)


def conv_bn_pairs(model: nn.Module, example: Any = None, forward_fn: ForwardFn | None = None) -> list[tuple[str, str]]:
    """``(conv name, batchnorm name)`` for every BatchNorm2d provably fed only by one Conv2d's output;
    with ``example`` (one batch) by a recorded forward, else by the traced graph or Sequential order.

    Train/eval mode is not considered here (see ``fold_batchnorm``).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4))
        >>> conv_bn_pairs(model)
        [('0', '1')]
    """
    registrations = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    modules = dict(model.named_modules())

    def candidate(conv_name: str, bn_name: str) -> bool:
        conv, bn = modules.get(conv_name), modules.get(bn_name)
        return (
            isinstance(conv, nn.Conv2d)
            and type(bn) is nn.BatchNorm2d
            and bn.num_features == conv.out_channels
            and bn.running_mean is not None
            and bn.running_var is not None
            and registrations[id(conv)] == 1
            and registrations[id(bn)] == 1
            and not _has_hooks(conv)
            and not _has_hooks(bn)
        )

    pairs = _recorded_pairs(model, example, forward_fn) if example is not None else _traced_pairs(model)
    if pairs is None:
        pairs = _sequential_pairs(model)
    return [(conv, bn) for conv, bn in pairs if candidate(conv, bn)]


def fold_batchnorm(model: nn.Module, *, inplace: bool = False) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every eval-mode BatchNorm2d that directly follows a Conv2d into that conv.

    Returns ``(folded model, [(conv name, batchnorm name), ...])``. The input is untouched unless
    ``inplace=True``; BatchNorms in train mode are left as they are (their running statistics are
    still changing). Exact up to float rounding (the fold is computed in float64).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
        >>> folded, pairs = fold_batchnorm(model)
        >>> pairs, type(folded[1]).__name__, type(model[1]).__name__
        ([('0', '1')], 'FoldedBatchNorm', 'BatchNorm2d')
        >>> x = torch.randn(2, 1, 8, 8)
        >>> bool((folded(x) - model(x)).abs().max() < 1e-5)
        True
    """
    folded, notes = _fold(model if inplace else copy.deepcopy(model))
    return folded, [(conv, bn) for bn, (conv, done) in notes.items() if done]


def fold_batchnorm_notes(model: nn.Module, example: Any = None, forward_fn: ForwardFn | None = None) -> dict[str, str]:
    """Put ``model`` (``quantize``'s own copy, which will run inference) in eval mode and fold it in place;
    ``{batchnorm name: reason}`` for each conv->bn pair (for a report's skips).

    A BatchNorm that was in train mode (a model handed over mid-training, or fresh from
    ``load_from_checkpoint``) folds with its running statistics, as it would compute in eval mode, and its
    note says it was in train mode. With ``example`` (one batch), pairs come from a recorded forward and
    the folded output is checked against the unfolded one (everything is restored, with the reason, if it
    differs).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
        >>> fold_batchnorm_notes(model)["1"][:53], model.training
        ('folded into 0 (its BatchNorm2d was in train mode: qua', False)
        >>> fold_batchnorm_notes(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)).eval(), torch.randn(2, 1, 8, 8))
        {'1': 'folded into 0'}
    """
    was_training = {name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) and m.training}
    model.eval()
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        return {}  # nothing to fold: no forward passes
    feed = forward_fn or default_forward
    reference = None
    if example is not None:
        reference = _flat_outputs(_probe(model, example, forward_fn))
    saved = {
        name: (module.weight, module.bias) if isinstance(module, nn.Conv2d) else module
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))
    }
    _, notes = _fold(model, example, forward_fn)
    if reference is not None and any(done for _, done in notes.values()):
        with torch.no_grad(), eval_mode(model):
            folded = _flat_outputs(feed(model, example))
        if reference.numel() == 0 or folded.shape != reference.shape or sqnr_db(reference, folded) < _CHECK_SQNR_DB:
            _unfold(model, notes, saved)
            reason = "not folded into {conv}: the folded model's output differed on calibration data"
            return {bn: Skip(SkipKind.UNSUPPORTED, reason.format(conv=conv)) for bn, (conv, _) in notes.items()}
    return {
        bn: Skip(SkipKind.FOLDED, (_WAS_TRAINING if bn in was_training else "folded into {conv}").format(conv=conv))
        for bn, (conv, _) in notes.items()
    }


def _probe(model: nn.Module, example: Any, forward_fn: ForwardFn | None) -> Any:
    """The model's output on ``example`` (calibration batch 0); a batch the model cannot take is a
    ``CalibrationError`` naming the batch and the innermost layer that was running when it failed.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
        >>> try:
        ...     _probe(model, torch.zeros(1, 5, 8, 8), None)
        ... except CalibrationError as err:
        ...     print(str(err)[:107])
        calibration batch 0 (a tensor of shape [1, 5, 8, 8]) does not fit the model's forward in layer '0' (Conv2d)
    """
    running: list[str] = []  # names of the modules whose forward has begun and not yet returned

    def enter(name: str) -> Callable:
        def hook(_module: nn.Module, _args: Any) -> None:
            running.append(name)

        return hook

    def leave(_module: nn.Module, _args: Any, _output: Any) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    try:
        with torch.no_grad(), eval_mode(model):
            return (forward_fn or default_forward)(model, example)
    except CalibrationError as err:  # a batch default_forward cannot feed
        raise CalibrationError(f"calibration batch 0: {err}") from None
    except Exception as err:
        layer = running[-1] if running and running[-1] else None
        where = f" in layer {layer!r} ({type(model.get_submodule(layer)).__name__})" if layer else ""
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        if forward_fn is not None:
            message = f"forward_fn failed on calibration batch 0 ({describe_batch(example)}){where}: {detail}"
        else:
            message = (
                f"calibration batch 0 ({describe_batch(example)}) does not fit the model's forward{where}: {detail}; "
                "pass forward_fn=lambda model, batch: model(...) to feed batches of this form"
            )
        raise CalibrationError(message) from err
    finally:
        for handle in handles:
            handle.remove()


def _fold(
    model: nn.Module, example: Any = None, forward_fn: ForwardFn | None = None
) -> tuple[nn.Module, dict[str, tuple[str, bool]]]:
    notes: dict[str, tuple[str, bool]] = {}
    for conv_name, bn_name in conv_bn_pairs(model, example, forward_fn):
        bn = model.get_submodule(bn_name)
        if bn.training:
            notes[bn_name] = (conv_name, False)
            continue
        fold_pair(model.get_submodule(conv_name), bn)
        model.set_submodule(bn_name, FoldedBatchNorm(conv_name))
        notes[bn_name] = (conv_name, True)
    return model, notes


def _flat_outputs(output: Any) -> torch.Tensor:
    """Every floating-point tensor in a model's output (tensors, tuples, dicts, ``ModelOutput``), flattened."""
    if isinstance(output, torch.Tensor):
        return output.detach().float().reshape(-1) if output.is_floating_point() else torch.zeros(0)
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    parts = [_flat_outputs(value) for value in values]
    return torch.cat(parts) if parts else torch.zeros(0)


def _unfold(model: nn.Module, notes: dict[str, tuple[str, bool]], saved: dict[str, tuple]) -> None:
    """Undo ``_fold``: the convs get their own weight and bias back, the BatchNorms return."""
    for bn_name, (conv_name, done) in notes.items():
        if not done:
            continue
        conv = model.get_submodule(conv_name)
        conv.weight, conv.bias = saved[conv_name]
        model.set_submodule(bn_name, saved[bn_name])


def _recorded_pairs(model: nn.Module, example: Any, forward_fn: ForwardFn | None) -> list[tuple[str, str]]:
    """Pairs seen in a forward on ``example``: the BatchNorm's input is the conv's output tensor."""
    produced: dict[int, str] = {}
    consumed: dict[str, int] = {}
    calls: Counter[str] = Counter()
    keep: list[torch.Tensor] = []  # outputs stay alive so their ids are not reused during the forward

    def record_output(name: str) -> Callable:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            calls[name] += 1
            if isinstance(output, torch.Tensor):
                produced[id(output)] = name
                keep.append(output)

        return hook

    def record_input(name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            calls[name] += 1
            if args and isinstance(args[0], torch.Tensor):
                consumed[name] = id(args[0])

        return hook

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(record_output(name)))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(record_input(name)))
    try:
        with torch.no_grad(), eval_mode(model):
            (forward_fn or default_forward)(model, example)
    finally:
        for handle in handles:
            handle.remove()
    pairs = [(produced[source], bn) for bn, source in consumed.items() if source in produced]
    return [(conv, bn) for conv, bn in pairs if calls[conv] == 1 and calls[bn] == 1]


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks)


def _traced_pairs(model: nn.Module) -> list[tuple[str, str]] | None:
    """Pairs read off the ``torch.fx`` graph, or ``None`` when the model does not trace."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable control flow, unsupported ops, ...: fall back to Sequential order
        return None
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if (
            isinstance(source, torch.fx.Node)
            and source.op == "call_module"
            and len(source.users) == 1
            and calls[source.target] == 1
            and calls[node.target] == 1
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Adjacent children of every ``nn.Sequential`` (which feeds each child only the previous output)."""
    pairs = []
    for name, module in model.named_modules():
        if type(module) is not nn.Sequential:
            continue
        children = list(module.named_children())
        prefix = f"{name}." if name else ""
        pairs += [(prefix + a, prefix + b) for (a, _), (b, _) in itertools.pairwise(children)]
    return pairs
