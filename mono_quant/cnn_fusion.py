"""Static int8 CNNs on CPU: convolutions chained in uint8 with ReLU and residual adds fused, from a traced graph.

Unfused, every quantized convolution quantizes its float input, runs oneDNN and hands back float32 that
ReLU, the residual add and the next quantization each read and write again (about 80% of a small
CNN's time). Where ``torch.fx`` can trace the model, ``fuse_static_convs`` rewrites the traced graph:

- ``conv -> relu`` runs as one oneDNN call with a ReLU post-op;
- ``conv -> add(other) [-> relu]`` (the conv's output used only by the add) runs with oneDNN's "sum"
  post-op on ``other`` (float32), then the ReLU;
- a fused convolution whose output goes only to static quantized convolutions with one shared input
  scale writes uint8 at that scale (requantized inside the kernel), channels-last, so the next
  convolution reads it directly: no float round trip between them;
- each float value feeding quantized convolutions is quantized once, however many read it.

Only exact ``nn.Conv2d`` modules whose weight is a static, symmetric ``Int8Conv2d`` tensor are fused
(same-padding subclasses and the rest keep their own path). The data flow is the traced graph itself,
never module order. Models that do not trace keep today's path.

``enable_fused_forward`` installs the fused graph as the quantized copy's ``forward`` (CPU, eval mode;
other devices, training mode and ``torch.compile`` run the class's own ``forward``). The graph is
rebuilt when a fused layer's tensors change (``load_state_dict``), and ``MONO_QUANT_FUSE=0`` turns it off.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mono_quant import kernels
from mono_quant.config import Mode
from mono_quant.modules.base import QuantizedLayer
from mono_quant.modules.int8_conv import Int8Conv2d
from mono_quant.modules.weight_tensor import QuantizedTensor

_RELU_FUNCS = {F.relu, torch.relu}
_ADD_FUNCS = {operator.add, torch.add, operator.iadd}


class FusedConv(nn.Module):
    """A static int8 ``nn.Conv2d`` with its epilogue: uint8 (or float) in; ReLU, residual sum, uint8 (or float) out.

    Example:
        >>> import mono_quant as mq
        >>> q = mq.quantize(nn.Sequential(nn.Conv2d(1, 4, 3)), mode="static",
        ...                 calibration_data=[torch.rand(2, 1, 8, 8)]).model
        >>> fused = FusedConv(q[0], relu=True)
        >>> fused(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 4, 6, 6])
    """

    def __init__(self, conv: nn.Conv2d, relu: bool = False, out_qparams: tuple[float, int] | None = None) -> None:
        super().__init__()
        layer: Int8Conv2d = conv.weight.layer
        self.conv, self.relu, self.out_qparams = [conv], relu, out_qparams  # a list: not a submodule here
        self.copy_accum = True  # the residual input is written to by oneDNN: copied unless private
        self.dynamic = layer.mode is Mode.DYNAMIC  # input scale from each call's min/max; float out
        self.in_qparams = (1.0, 0) if self.dynamic else input_qparams(layer)
        self._inv_scale = 1.0 / self.in_qparams[0]
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation))
        self.packed, self.zero_points = layer._onednn_conv.get_conv(
            layer.weight, layer.kernel_size, layer._weight_scale_n, torch.tensor(self.in_qparams[0]),
            torch.tensor(self.in_qparams[1]), self.geometry, conv.groups,
        )  # fmt: skip
        self.weight_scale, self.groups = layer._weight_scale_n, conv.groups
        bias = conv.bias if conv.bias is not None else layer.bias
        self.bias = None if bias is None else bias.detach().float()

    def forward(self, x: torch.Tensor, accum: torch.Tensor | None = None) -> torch.Tensor:
        in_qparams = self.in_qparams
        if self.dynamic:
            x = x.contiguous(memory_format=torch.channels_last)
            in_qparams = kernels.dynamic_uint8_qparams(x)
            x = kernels.quantize_uint8_channels_last(x, 1.0 / in_qparams[0], in_qparams[1])
        elif x.dtype != torch.uint8:
            x = kernels.quantize_uint8_channels_last(x, self._inv_scale, in_qparams[1])
        if accum is not None and (self.copy_accum or not accum.is_contiguous(memory_format=torch.channels_last)):
            accum = accum.clone(memory_format=torch.channels_last)
        return kernels.onednn_conv2d_fused(
            x, in_qparams, self.packed, self.weight_scale, self.zero_points, self.bias, self.geometry,
            self.groups, self.relu, accum, None if accum is not None else self.out_qparams,
        )  # fmt: skip


class Quantize(nn.Module):
    """Float -> uint8 channels-last at a static convolution's input scale (one node per value and scale)."""

    def __init__(self, qparams: tuple[float, int]) -> None:
        super().__init__()
        self.inv_scale, self.zero_point = 1.0 / qparams[0], qparams[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quantize_uint8_channels_last(x, self.inv_scale, self.zero_point)


class _Tracer(fx.Tracer):
    """Quantized layers are leaves: their ``forward`` branches on device and mode."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, QuantizedLayer) or super().is_leaf_module(m, qualified_name)


def input_qparams(layer: Int8Conv2d) -> tuple[float, int]:
    """The static layer's uint8 input ``(scale, zero_point)`` as Python numbers."""
    return float(layer.input_scale), int(layer._input_zero_point_u8)


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is an exact ``nn.Conv2d`` whose weight is a static symmetric int8 oneDNN-ready tensor.

    Example:
        >>> fusable(nn.Conv2d(1, 2, 3))
        False
    """
    weight = getattr(module, "weight", None)
    if type(module) is not nn.Conv2d or not isinstance(weight, QuantizedTensor):
        return False
    layer = weight.layer
    return (
        isinstance(layer, Int8Conv2d)
        and layer.mode in (Mode.STATIC, Mode.DYNAMIC)
        and layer.weight_zero_point is None
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.groups == layer.groups
        and layer.weight.device.type == "cpu"
    )


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCS and len(node.args) == 1 and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu" and len(node.args) == 1


def _residual(node: fx.Node, conv: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``conv_out + other`` (both tensors), else ``None``."""
    if node.op != "call_function" or node.target not in _ADD_FUNCS or node.kwargs or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] is conv else node.args[0]
    return other if isinstance(other, fx.Node) and other is not conv else None


def _plan(graph: fx.Graph, modules: dict[str, nn.Module]) -> dict[fx.Node, dict[str, Any]]:
    """conv node -> ``{"tail": last fused node, "relu": bool, "accum": node or None}``."""
    plans, claimed = {}, set()
    for node in graph.nodes:
        if node.op != "call_module" or not fusable(modules[node.target]) or len(node.args) != 1 or node.kwargs:
            continue
        plan: dict[str, Any] = {"tail": node, "relu": False, "accum": None}
        users = list(node.users)
        if len(users) == 1 and _is_relu(users[0], modules):
            plan.update(tail=users[0], relu=True)
        elif len(users) == 1 and users[0] not in claimed and (other := _residual(users[0], node)) is not None:
            claimed.add(users[0])  # the other operand, if also a conv, stays a plain fused conv
            plan.update(tail=users[0], accum=other)
            after = list(users[0].users)
            if len(after) == 1 and _is_relu(after[0], modules):
                plan.update(tail=after[0], relu=True)
        plans[node] = plan
    return plans


def _uint8_out(tail: fx.Node, plans: dict[fx.Node, dict[str, Any]], modules: dict[str, nn.Module]) -> Any:
    """The shared input ``(scale, zero_point)`` when every user of ``tail`` is a fused conv's input, else None."""
    users = list(tail.users)
    if not users or any(u not in plans or u.args[0] is not tail for u in users):
        return None
    if any(modules[u.target].weight.layer.mode is not Mode.STATIC for u in users):
        return None
    qparams = {input_qparams(modules[u.target].weight.layer) for u in users}
    return qparams.pop() if len(qparams) == 1 else None


def fuse_static_convs(model: nn.Module) -> fx.GraphModule | None:
    """The traced inference graph of a static int8 ``model`` with its convolutions fused, or ``None``.

    ``None`` when the model does not trace or has no convolution to fuse. The graph shares the
    model's modules (no copy); it is for CPU inference.

    Example:
        >>> import mono_quant as mq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
        >>> q = mq.quantize(net, mode="static", calibration_data=[torch.rand(4, 1, 12, 12)]).model
        >>> gm = fuse_static_convs(q)
        >>> sum(isinstance(m, FusedConv) for m in gm.modules()), gm(torch.rand(2, 1, 12, 12)).shape
        (2, torch.Size([2, 4, 8, 8]))
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
    plans = _plan(gm.graph, modules)
    if not plans:
        return None
    quantized: dict[tuple[fx.Node, tuple[float, int]], fx.Node] = {}
    replaced: dict[fx.Node, fx.Node] = {}
    for index, (node, plan) in enumerate(plans.items()):
        conv = modules[node.target]
        static = conv.weight.layer.mode is Mode.STATIC
        out_qparams = None if plan["accum"] is not None else _uint8_out(plan["tail"], plans, modules)
        name = f"_mq_fused_{index}"
        gm.add_submodule(name, FusedConv(conv, plan["relu"], out_qparams))
        source = node.args[0]
        producer = _producer(source, plans)
        tail = plan["tail"]
        with gm.graph.inserting_before(tail):
            if static and (producer is None or producer.get("out") is None):
                key = (source, input_qparams(conv.weight.layer))
                if key not in quantized:
                    quantize_name = f"_mq_quantize_{len(quantized)}"
                    gm.add_submodule(quantize_name, Quantize(key[1]))
                    with gm.graph.inserting_after(source):
                        quantized[key] = gm.graph.call_module(quantize_name, (source,))
                source = quantized[key]
            accum = plan["accum"]
            while accum in replaced:  # fused since the plan was made
                accum = replaced[accum]
            args = (source,) if accum is None else (source, accum)
            fused = gm.graph.call_module(name, args)
        plan["out"] = out_qparams
        tail.replace_all_uses_with(fused)
        replaced[tail] = fused
        plan["tail"] = fused
    gm.graph.eliminate_dead_code()
    for node in gm.graph.nodes:  # oneDNN's sum writes into its accumulator: only a private temporary may be used
        if node.op == "call_module" and len(node.args) == 2 and isinstance(gm.get_submodule(node.target), FusedConv):
            accum = node.args[1]
            private = accum.op == "call_module" and isinstance(gm.get_submodule(accum.target), FusedConv)
            gm.get_submodule(node.target).copy_accum = not (private and len(accum.users) == 1)
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _producer(source: Any, plans: dict[fx.Node, dict[str, Any]]) -> dict[str, Any] | None:
    return next((p for p in plans.values() if p["tail"] is source), None)


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
        self.model, self.graph, self.signature = state["model"], None, None

    def _signature(self) -> list[Any]:
        if self.graph is None:
            return []
        convs = [m.conv[0] for m in self.graph.modules() if isinstance(m, FusedConv)]
        return [t for c in convs for t in (c.weight, c.bias, c.weight.layer.input_scale, c.weight.layer.weight)]

    def _current(self) -> bool:
        if self.graph is None:
            return False
        convs = [m.conv[0] for m in self.graph.modules() if isinstance(m, FusedConv)]
        now = [t for c in convs if isinstance(c.weight, QuantizedTensor)
               for t in (c.weight, c.bias, c.weight.layer.input_scale, c.weight.layer.weight)]  # fmt: skip
        return len(now) == len(self.signature) and all(a is b for a, b in zip(now, self.signature, strict=True))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = args[0] if args else next(iter(kwargs.values()), None)
        eager = (
            self.model.training
            or torch.compiler.is_compiling()
            or torch.jit.is_tracing()  # ONNX export traces the eager layers
            or not isinstance(first, torch.Tensor)
            or first.device.type != "cpu"
        )
        if not eager and not self._current():
            self.graph = fuse_static_convs(self.model)
            self.signature = self._signature()
            if self.graph is None:
                del self.model.__dict__["forward"]
        if eager or self.graph is None:
            return type(self.model).forward(self.model, *args, **kwargs)
        return self.graph(*args, **kwargs)
