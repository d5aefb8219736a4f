"""Static int8 CNNs on CPU: convolutions chained in uint8 with ReLU and residual adds fused, from a traced graph.

Unfused, every quantized convolution quantizes its float input, runs oneDNN and hands back float32 that
ReLU, the residual add and the next quantization each read and write again (about 80% of a small
CNN's time). Where ``torch.fx`` can trace the model, ``fuse_static_convs`` rewrites the traced graph:

- ``conv -> activation`` (ReLU, ReLU6/Hardtanh, Hardswish, SiLU) runs as one oneDNN call with a post-op;
- ``conv -> add(other) [-> relu]`` (the conv's output used only by the add) runs with oneDNN's "sum"
  post-op on ``other``: a uint8 accumulator with a uint8 output where ``other`` has a calibrated scale
  (it is a convolution's input, e.g. an identity shortcut) and the sum goes on to convolutions, else
  float32 in and out;
- a fused convolution whose output goes only to static quantized convolutions with one shared input
  scale (and to uint8 residual adds) writes uint8 at that scale (requantized inside the kernel),
  channels-last, so the next convolution reads it directly: no float round trip between them;
- each float value feeding quantized convolutions is quantized once, however many read it.

``graph/plan.py`` decides (from the traced graph itself, never module order) and ``graph/fused_conv.py``
holds the nodes. ``nn.Conv2d`` subclasses (TF "same" padding computed in their ``forward``) are
leaves of the tracer, so they do not stop the rest of the model from tracing; each runs its own
``forward`` with its ``conv2d`` routed to the fused kernel. Models that do not trace keep today's path.
Dynamic int8 convolutions join the graph too (activation/add fused, per-call input scale, float out;
at batch 1 they convolve in float32 on the dequantized int8 weight, where int8 loses).

``enable_fused_forward`` installs the fused graph as the quantized copy's ``forward`` (CPU, eval mode;
other devices, training mode and ``torch.compile`` run the class's own ``forward``). The graph is
rebuilt when a fused layer's tensors change (``load_state_dict``), and ``MONO_QUANT_FUSE=0`` turns it off.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import fx, nn

from mono_quant import kernels
from mono_quant.graph.fused_conv import FusedConv, Quantize, input_qparams
from mono_quant.graph.plan import fusable, plan_convs
from mono_quant.modules.base import QuantizedLayer
from mono_quant.modules.weight_tensor import QuantizedTensor

__all__ = ["FusedConv", "FusedForward", "enable_fused_forward", "fusable", "fuse_static_convs", "traced_plans"]


def _dead_after(value: fx.Node, reader: fx.Node, gm: fx.GraphModule, order: dict[fx.Node, int]) -> bool:
    """Whether ``reader`` may overwrite ``value``: a fused convolution's own output (never the caller's input or
    a module's state) whose other readers all run before ``reader`` and keep no view of it (fused convolutions
    and quantizers only: a ``view``/``flatten`` read earlier could be used after the add). An identity
    shortcut's other reader, the block's first convolution, runs before the add: measured 1 MB copied per
    digits-ResNet forward at batch 32."""

    def private(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(gm.get_submodule(node.target), (FusedConv, Quantize))

    others = [user for user in value.users if user is not reader]
    own = value.op == "call_module" and isinstance(gm.get_submodule(value.target), FusedConv)
    return own and all(private(user) and order[user] < order[reader] for user in others)


class _Tracer(fx.Tracer):
    """Quantized layers and fusable convolutions (subclasses too: their ``forward`` may not trace) are leaves."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, QuantizedLayer) or fusable(m) or super().is_leaf_module(m, qualified_name)


def fuse_static_convs(model: nn.Module) -> fx.GraphModule | None:
    """The traced inference graph of a static int8 ``model`` with its convolutions fused, or ``None``.

    ``None`` when the model does not trace or has no convolution to fuse. The graph shares the
    model's modules (no copy); it is for CPU inference.

    Example:
        >>> import mono_quant as mq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU6()).eval()
        >>> q = mq.quantize(net, mode="static", calibration_data=[torch.rand(4, 1, 12, 12)]).model
        >>> gm = fuse_static_convs(q)
        >>> [m.unary[0] for m in gm.modules() if isinstance(m, FusedConv)], gm(torch.rand(2, 1, 12, 12)).shape
        (['relu', 'hardtanh'], torch.Size([2, 4, 8, 8]))
    """
    planned = traced_plans(model)
    if planned is None:
        return None
    gm, modules, plans = planned
    quantized: dict[tuple[fx.Node, tuple[float, int]], fx.Node] = {}

    def uint8_of(value: fx.Node, qparams: tuple[float, int]) -> fx.Node:
        """``value`` quantized at ``qparams``: one node per value and scale, right after the value."""
        if (value, qparams) not in quantized:
            name = f"_mq_quantize_{len(quantized)}"
            gm.add_submodule(name, Quantize(qparams))
            with gm.graph.inserting_after(value):
                quantized[value, qparams] = gm.graph.call_module(name, (value,))
        return quantized[value, qparams]

    replaced: dict[fx.Node, fx.Node] = {}
    by_tail = {p["tail"]: p for p in plans.values()}
    for index, (node, plan) in enumerate(plans.items()):
        conv = modules[node.target]
        name = f"_mq_fused_{index}"
        gm.add_submodule(name, FusedConv(conv, plan["unary"], plan["out"], plan["accum_q"]))
        source, accum, tail = node.args[0], plan["accum"], plan["tail"]
        producer_out = by_tail[source]["out"] if source in by_tail else None
        qparams = input_qparams(conv.weight.layer)  # None: dynamic
        if qparams is not None and producer_out is None:
            source = uint8_of(source, qparams)
        while accum in replaced:  # fused since the plan was made
            accum = replaced[accum]
        if plan["accum_q"] is not None and by_tail.get(accum, {}).get("out") is None:
            accum = uint8_of(accum, plan["accum_q"])  # float, but quantized for a convolution anyway
        with gm.graph.inserting_before(tail):
            fused = gm.graph.call_module(name, (source,) if accum is None else (source, accum))
        tail.replace_all_uses_with(fused)  # the readers' args now name ``fused``
        replaced[tail], by_tail[fused] = fused, plan
    gm.graph.eliminate_dead_code()
    order = {node: index for index, node in enumerate(gm.graph.nodes)}
    for node in gm.graph.nodes:  # oneDNN's sum writes into its accumulator: only a dead temporary may be used
        if node.op == "call_module" and len(node.args) == 2 and isinstance(gm.get_submodule(node.target), FusedConv):
            gm.get_submodule(node.target).copy_accum = not _dead_after(node.args[1], node, gm, order)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


def traced_plans(
    model: nn.Module, full_codes: bool = False
) -> tuple[fx.GraphModule, dict[str, nn.Module], dict[fx.Node, dict[str, Any]]] | None:
    """``model`` traced (identities removed), its modules by name and its convolutions' plans (``plan.plan_convs``),
    or ``None`` when it does not trace or has no convolution to fuse.

    Example:
        >>> import mono_quant as mq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
        >>> q = mq.quantize(net, mode="static", calibration_data=[torch.rand(4, 1, 12, 12)]).model
        >>> [plan["unary"][0] for plan in traced_plans(q)[2].values()]
        ['relu', 'none']
    """
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception:  # dynamic control flow, unsupported ops: keep the eager path
        return None
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):  # identities (an unprojected shortcut) pass their input on
        if node.op == "call_module" and type(modules[node.target]) is nn.Identity and len(node.args) == 1:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    plans = plan_convs(gm.graph, modules, full_codes)
    return (gm, modules, plans) if plans else None


def enable_fused_forward(model: nn.Module) -> bool:
    """Run ``model`` (a static int8 quantized copy) through its fused graph from now on; whether it could.

    Example:
        >>> import mono_quant as mq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()).eval()
        >>> q = mq.quantize(net, mode="static", calibration_data=[torch.rand(4, 1, 8, 8)]).model
        >>> enable_fused_forward(q), q(torch.rand(1, 1, 8, 8)).shape
        (True, torch.Size([1, 4, 6, 6]))
    """
    if os.environ.get("MONO_QUANT_FUSE", "1") == "0" or not kernels.use_onednn_conv(torch.empty(0)):
        return False
    if not any(fusable(m) for m in model.modules()):  # no tracing at all for models without int8 convs
        return False
    runner = FusedForward(model)
    if runner.graph is None:
        return False
    object.__setattr__(model, "forward", runner)  # an instance attribute: never a submodule or state
    object.__setattr__(model, "extra_repr", runner.describe)  # print(model) says what runs
    return True


class FusedForward:
    """``model.forward`` replaced by its fused graph on CPU in eval mode; the class's ``forward`` otherwise.

    Rebuilt when a fused layer's tensors are replaced (``load_state_dict``, moving devices); removes
    itself when nothing is left to fuse.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.graph = fuse_static_convs(model)
        self.signature = self._signature()

    def __getstate__(self) -> dict[str, Any]:
        return {"model": self.model}  # copies and pickles rebuild the graph (oneDNN's packed weights don't copy)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model, self.graph, self.signature, self.convs = state["model"], None, None, []

    def describe(self) -> str:
        """The model's own ``extra_repr`` and a line saying what the fused graph runs (``print(model)`` shows it).

        A wrapper module around the model would show it too, but would add the fused nodes' tensors to the
        state_dict (and change the type users hold); an instance ``extra_repr`` changes nothing else.
        """
        own = type(self.model).extra_repr(self.model)
        fused = [] if self.graph is None else [m for m in self.graph.modules() if isinstance(m, FusedConv)]
        uint8 = sum(m.out_qparams is not None for m in fused)
        adds = sum(m.accum_qparams is not None for m in fused)
        post_ops = sum(m.unary[0] != "none" for m in fused)
        line = (
            f"mono-quant fused CPU graph: {len(fused)} int8 convolutions as single oneDNN calls ({post_ops} with "
            f"activation post-ops, {adds} uint8 residual adds, {uint8} uint8 outputs); MONO_QUANT_FUSE=0 turns it off"
        )
        return f"{own}\n{line}" if own else line

    def _signature(self) -> list[Any]:
        self.convs = [] if self.graph is None else [m.conv[0] for m in self.graph.modules() if isinstance(m, FusedConv)]
        return [self._tensors(c) for c in self.convs]

    @staticmethod
    def _tensors(conv: nn.Module) -> tuple[Any, ...]:
        weight = conv.weight
        if not isinstance(weight, QuantizedTensor):
            return (weight,)
        return weight, conv.bias, weight.layer.input_scale, weight.layer.weight

    def _current(self) -> bool:
        if self.graph is None:
            return False
        return all(
            all(a is b for a, b in zip(self._tensors(c), then, strict=False)) and len(then) == 4
            for c, then in zip(self.convs, self.signature, strict=True)
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else next(iter(kwargs.values()), None)
        eager = (
            self.model.training
            or torch.jit.is_tracing()  # ONNX export traces the eager layers
            or not isinstance(first, torch.Tensor)
            or first.device.type != "cpu"
            or not first.is_floating_point()  # the eager layers refuse it as the float model does
        )
        if torch.compiler.is_compiling():
            return type(self.model).forward(self.model, *args, **kwargs) if eager else _run_eagerly(self, args, kwargs)
        if not eager and not self._current():
            self.graph = fuse_static_convs(self.model)
            self.signature = self._signature()
            if self.graph is None:
                del self.model.__dict__["forward"]
                self.model.__dict__.pop("extra_repr", None)
        if eager or self.graph is None:
            return type(self.model).forward(self.model, *args, **kwargs)
        return self.graph(*args, **kwargs)


@torch.compiler.disable
def _run_eagerly(fused: FusedForward, args: tuple, kwargs: dict) -> Any:
    """Under ``torch.compile`` the fused graph runs as in eager mode, between compiled graphs: its oneDNN
    conv + ReLU/add chains are what makes a static CNN fast, and inductor has no equivalent for them (measured:
    a static ResNet compiled through the separate layers ran at 2x its eager latency)."""
    return fused(*args, **kwargs)
