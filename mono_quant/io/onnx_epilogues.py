"""How ``export_onnx`` ends each static int8 convolution: with a ``QuantizeLinear`` where mono-quant's fused CPU
graph (``mono_quant.graph.fused_graph``) requantizes its output to uint8 for the next convolutions, else float.

ONNX Runtime fuses ``DequantizeLinear -> Conv [-> Relu/Clip] -> QuantizeLinear`` into one ``QLinearConv``
(u8 x s8 MLAS kernel); a static convolution without the output ``QuantizeLinear`` stays a float convolution.
The output scale and zero point are the next convolution's own calibrated input qparams, so the exported
graph rounds exactly where the fused torch model does (no new quantization point, no new calibration).
Convolutions whose fused output stays float (a residual add on a float operand, a pooling layer next, an
activation ONNX Runtime cannot fuse) get no epilogue.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mono_quant.graph.fused_graph import traced_plans

_FOLDABLE = ("none", "relu", "hardtanh")  # Relu and Clip: ONNX Runtime drops them before a QuantizeLinear


class ConvEpilogue(NamedTuple):
    """How a static convolution of the fused graph ends: the activation fused into it and the stored int8
    ``(scale, zero_point)`` it is requantized at, or ``out_qparams`` ``None`` where its output stays float."""

    unary: tuple[str, list[float]]
    out_qparams: tuple[torch.Tensor, torch.Tensor] | None


def conv_epilogues(model: nn.Module) -> dict[int, ConvEpilogue]:
    """``id`` of each planned static convolution's int8 weight tensor -> its ``ConvEpilogue``, from the plan of
    mono-quant's fused CPU graph (``graph/plan.py``) made for 8-bit codes (what ONNX Runtime multiplies; a CPU
    that runs 7-bit codes keeps float outputs in torch, and its next convolution quantizes them at the same
    scale: the same rounding); empty where ``model`` has no fusable convolution or does not trace.

    Keyed by the weight tensor, which a layer's geometry twins (``Int8Conv2d.with_geometry``) share.

    Example:
        >>> import mono_quant as mq
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3)).eval()
        >>> q = mq.quantize(net, mode="static", calibration_data=[torch.rand(4, 1, 12, 12)]).model
        >>> [(e.unary[0], e.out_qparams is not None) for e in conv_epilogues(q).values()]
        [('relu', True), ('none', False)]
    """
    planned = traced_plans(model, full_codes=True)
    if planned is None:
        return {}
    _, modules, plans = planned
    epilogues = {}
    for node, plan in plans.items():
        layer = modules[node.target].weight.layer
        if layer.stored_input_qparams() is None:
            continue  # dynamic: ConvInteger
        out_qparams = None
        if plan["out"] is not None and plan["accum"] is None and plan["unary"][0] in _FOLDABLE:
            reader = next(u for u in plan["tail"].users if u in plans and u.args[0] is plan["tail"])
            out_qparams = modules[reader.target].weight.layer.stored_input_qparams()  # all readers share it
        epilogues[id(layer.weight)] = ConvEpilogue(plan["unary"], out_qparams)
    return epilogues
