"""How ``export_onnx`` ends each static int8 convolution: with a ``QuantizeLinear`` where mono-quant's fused CPU
graph (``mono_quant.graph.fused_graph``) requantizes its output to uint8 for the next convolutions, or where the
output is a residual add's operand and the convolution has a calibrated output range (``Int8Conv2d.output_scale``);
else float.

ONNX Runtime fuses ``DequantizeLinear -> Conv [-> Relu/Clip] -> QuantizeLinear`` into one ``QLinearConv``
(u8 x s8 MLAS kernel); a static convolution without the output ``QuantizeLinear`` stays a float convolution.
A requantized output's scale and zero point are the next convolution's own calibrated input qparams, so the
graph rounds where the fused torch model does. A residual add's operands are quantized at their convolutions'
calibrated output ranges, one rounding step the torch graph does not take (it adds in oneDNN's accumulator);
ORT then adds quantized tensors. Measured (``benchmarks/deploy.py``, batch 32): digits ResNet int8 session
1.09x -> 0.63x the float session, EfficientNet-Lite0 0.99x -> 0.54x, top-1 agreement with mono-quant's torch
model 100% and 92.2% -> 96.9%. Convolutions before a float reader (pooling, a head) get no epilogue: ORT would
drop the ``QuantizeLinear``/``DequantizeLinear`` pair and convolve the dequantized weight in plain NCHW.
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
    shortcuts = {p["accum"] for p in plans.values() if p["accum"] is not None}  # the adds' other operands
    epilogues = {}
    for node, plan in plans.items():
        layer = modules[node.target].weight.layer
        if layer.stored_input_qparams() is None:
            continue  # dynamic: ConvInteger
        out_qparams, unary = None, plan["unary"]
        if plan["out"] is not None and plan["accum"] is None and unary[0] in _FOLDABLE:
            reader = next(u for u in plan["tail"].users if u in plans and u.args[0] is plan["tail"])
            out_qparams = modules[reader.target].weight.layer.stored_input_qparams()  # all readers share it
        elif layer.output_scale is not None and (plan["accum"] is not None or plan["tail"] in shortcuts):
            # a residual add's operand (either side): at the conv's own calibrated output range, so ORT runs the
            # conv as QLinearConv and the add between quantized tensors (elsewhere, before a float reader, ORT
            # drops the Q/DQ pair and convolves a DequantizeLinear weight in plain NCHW: slower than float)
            if plan["accum"] is not None:
                unary = ("none", [])  # the plan's activation follows the add
            if unary[0] in _FOLDABLE:
                out_qparams = (layer.output_scale, layer.output_zero_point)
        epilogues[id(layer.weight)] = ConvEpilogue(unary, out_qparams)
    return epilogues
