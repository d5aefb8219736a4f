"""Which convolutions of a traced graph fuse with what (``graph/fused_graph.py`` rewrites the graph from this plan).

A plan per quantized convolution node: the activation after it (ReLU, ReLU6/Hardtanh, Hardswish,
SiLU as oneDNN post-ops), or the residual add whose other operand becomes the accumulator (then
only ReLU may follow: oneDNN takes no other activation after a sum); where the output goes uint8
(every reader is a static convolution at one input scale, or a residual add that can itself run
uint8); and whether a residual add's accumulator can be uint8 (its value is a uint8 output already,
or is quantized for a convolution anyway, and the add's result goes uint8). Scales come from
calibrated convolution inputs, and for a value no convolution reads (a projection shortcut's output)
from its convolution's calibrated output (``Int8Conv2d.set_output_qparams``), where it has one;
otherwise that add stays float32.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from mono_quant.graph.fused_conv import Unary, fused_params, input_qparams
from mono_quant.kernels.numerics import uint8_high
from mono_quant.modules.weight_tensor import QuantizedTensor

_FULL_UINT8 = 255
_ADD_FUNCS = {operator.add, torch.add, operator.iadd}
_FUNCTION_UNARY = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardtanh: "hardtanh"}
_FUNCTION_UNARY.update({F.hardswish: "hardswish", F.silu: "swish"})
_MODULE_UNARY = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardtanh: "hardtanh", nn.Hardswish: "hardswish"}
_MODULE_UNARY[nn.SiLU] = "swish"


def fusable(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Conv2d`` (or subclass) with a symmetric int8 oneDNN-ready weight tensor.

    Example:
        >>> fusable(nn.Conv2d(1, 2, 3))
        False
    """
    weight = getattr(module, "weight", None)
    if not isinstance(module, nn.Conv2d) or not isinstance(weight, QuantizedTensor):
        return False
    params = weight.layer.fused_conv_params()  # None: the layer's class cannot fuse (see QuantizedLayer)
    return (
        params is not None
        and module.padding_mode == "zeros"
        and (type(module) is not nn.Conv2d or not isinstance(module.padding, str))
        and module.groups == params.groups
    )


def activation(node: fx.Node, modules: dict[str, nn.Module]) -> Unary | None:
    """The oneDNN post-op ``(name, scalars)`` that ``node`` computes on its single input, or ``None``."""
    if node.op == "call_module":
        module = modules.get(node.target)
        name = _MODULE_UNARY.get(type(module))
        if name == "hardtanh":
            return "hardtanh", [float(module.min_val), float(module.max_val)]
        bounds = [0.0, 6.0] if name == "relu6" else []
        return None if name is None else ("hardtanh" if name == "relu6" else name, bounds)
    if node.op == "call_method":
        return ("relu", []) if node.target == "relu" and len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function" or node.target not in _FUNCTION_UNARY or node.kwargs.get("inplace", False):
        return None
    name = _FUNCTION_UNARY[node.target]
    if name == "hardtanh":
        extra = list(node.args[1:]) + [node.kwargs.get(k) for k in ("min_val", "max_val") if k in node.kwargs]
        if len(extra) != 2 or not all(isinstance(v, int | float) for v in extra):
            return None
        return "hardtanh", [float(v) for v in extra]
    if len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
        return None
    return ("hardtanh", [0.0, 6.0]) if name == "relu6" else (name, [])


def _residual(node: fx.Node, conv: fx.Node) -> fx.Node | None:
    """The other operand when ``node`` is ``conv_out + other`` (both tensors), else ``None``."""
    if node.op != "call_function" or node.target not in _ADD_FUNCS or node.kwargs or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] is conv else node.args[0]
    return other if isinstance(other, fx.Node) and other is not conv else None


def plan_convs(
    graph: fx.Graph, modules: dict[str, nn.Module], full_codes: bool = False
) -> dict[fx.Node, dict[str, Any]]:
    """conv node -> ``{"tail", "unary", "accum", "out", "accum_q"}``: the last fused node, the post-op, the residual
    operand (or ``None``), the uint8 output ``(scale, zero_point)`` (or ``None``: float) and the uint8 accumulator's.
    ``full_codes``: plan uint8 outputs as if this CPU multiplied 8-bit codes (an ONNX export's runtime does)."""
    plans, claimed = {}, set()
    for node in graph.nodes:
        if node.op != "call_module" or not fusable(modules[node.target]) or len(node.args) != 1 or node.kwargs:
            continue
        plan: dict[str, Any] = {"tail": node, "unary": ("none", []), "accum": None, "out": None, "accum_q": None}
        users = list(node.users)
        if len(users) == 1 and (unary := activation(users[0], modules)) is not None:
            plan.update(tail=users[0], unary=unary)
        elif len(users) == 1 and users[0] not in claimed and (other := _residual(users[0], node)) is not None:
            claimed.add(users[0])  # the other operand, if also a conv, stays a plain fused conv
            plan.update(tail=users[0], accum=other)
            after = list(users[0].users)
            if len(after) == 1 and activation(after[0], modules) == ("relu", []):
                plan.update(tail=after[0], unary=("relu", []))
        plans[node] = plan
    _assign_uint8(plans, modules, full_codes)
    return plans


def _static(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return input_qparams(modules[node.target].weight.layer) is not None


def _assign_uint8(plans: dict[fx.Node, dict[str, Any]], modules: dict[str, nn.Module], full_codes: bool) -> None:
    """Fill each plan's ``out`` and ``accum_q`` (decisions flow from the last convolution backwards).

    Not on CPUs that multiply 7-bit codes only (``kernels.numerics``): oneDNN requantizes outputs onto 0..255,
    and a value beyond the calibrated range would reach the next convolution above 127.
    """
    if uint8_high() < _FULL_UINT8 and not full_codes:
        return
    by_tail = {p["tail"]: p for p in plans.values()}
    by_add = {p["tail"] if p["unary"][0] == "none" else p["tail"].args[0]: p for p in plans.values() if p["accum"]}
    memo: dict[fx.Node, Any] = {}

    def readers_qparams(value: fx.Node) -> set[tuple[float, int]]:
        return {input_qparams(modules[u.target].weight.layer) for u in value.users
                if u in plans and u.args[0] is value and _static(u, modules)}  # fmt: skip

    def out_q(tail: fx.Node) -> tuple[float, int] | None:
        if tail not in memo:
            memo[tail] = None  # no cycles in a graph; guards against revisits
            qparams = readers_qparams(tail)
            fine = len(qparams) == 1 and all(
                (u in plans and u.args[0] is tail and _static(u, modules))
                or (u in by_add and by_add[u]["accum"] is tail and out_q(by_add[u]["tail"]) is not None)
                for u in tail.users
            )
            memo[tail] = qparams.pop() if fine else None
        return memo[tail]

    for plan in plans.values():
        plan["out"] = out_q(plan["tail"])
    for plan in plans.values():
        accum = plan["accum"]
        if accum is None or plan["out"] is None:
            continue
        if accum in by_tail and by_tail[accum]["out"] is not None:
            plan["accum_q"] = by_tail[accum]["out"]
        elif not full_codes and (own := _calibrated_output(accum, by_tail, modules)) is not None:
            by_tail[accum]["out"] = plan["accum_q"] = own  # a projection shortcut: uint8 at its own scale
        elif len(qparams := readers_qparams(accum)) == 1:
            plan["accum_q"] = qparams.pop()  # quantized for a convolution anyway: the same uint8 tensor
        if plan["accum_q"] is None:
            plan["out"] = None  # a float32 accumulator gives a float32 output


def _calibrated_output(
    accum: fx.Node, by_tail: dict[fx.Node, dict[str, Any]], modules: dict[str, nn.Module]
) -> tuple[float, int] | None:
    """The calibrated output ``(scale, zero_point)`` of the convolution whose float output ``accum`` is, where
    the add is its only reader and that output is the convolution's own (no sum; ReLU only narrows it).

    Not for an ONNX export's plan (``full_codes``): ``io/onnx_epilogues`` quantizes both operands of a residual add
    at their convolutions' own output ranges instead, for ONNX Runtime's quantized add.
    """
    plan = by_tail.get(accum)
    if plan is None or plan["accum"] is not None or plan["unary"][0] not in ("none", "relu") or len(accum.users) != 1:
        return None
    conv = accum if plan["unary"][0] == "none" else accum.args[0]
    params = fused_params(modules[conv.target].weight.layer)
    return params.output_qparams if params.input_qparams is not None else None
