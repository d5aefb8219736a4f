"""The only place that calls private torch ops (``_int_mm``, oneDNN's quantized ops, packed int8/int4 matmuls,
wrapper tensor subclasses).

Every function has a plain-torch fallback for shapes or devices the private op does not cover, so the
rest of the library never needs to know which kernel ran. ``int8`` holds activation quantization and
integer matmuls, ``onednn`` oneDNN's quantized linear/convolution, ``int4`` the group-wise int4 kernels,
``tensors`` what tensor subclasses need, ``numerics`` which activation codes this CPU multiplies exactly,
``check`` the comparison of a kernel with an exact reference, ``choice`` which kernel serves a call
(checked, then measured once per shape and batch bucket, or fixed defaults).
"""

from mono_quant.kernels import check
from mono_quant.kernels.int4 import int4_mm, int4_scales_and_zeros, pack_int4
from mono_quant.kernels.int8 import (
    aligned,
    dynamic_rescale,
    dynamic_uint8_params,
    dynamic_uint8_qparams,
    int8_weight_only_mm,
    int_mm,
    prepare_int8_weight_only,
    quantize_fixed_scale,
    quantize_per_row,
    quantize_static_input,
    rescale,
    rounding_offset,
    row_sums,
    static_rescale,
    writable_in_place,
)
from mono_quant.kernels.numerics import SIGNED, Int8Input, input_format
from mono_quant.kernels.onednn import (
    OneDNNConvWeight,
    OneDNNWeight,
    onednn_conv2d,
    onednn_conv2d_fused,
    onednn_default,
    onednn_linear,
    onednn_linear_dynamic,
    quantize_uint8_channels_last,
    use_onednn,
    use_onednn_conv,
)

__all__ = [
    "SIGNED",
    "Int8Input",
    "check",
    "input_format",
    "OneDNNConvWeight",
    "OneDNNWeight",
    "aligned",
    "dynamic_rescale",
    "dynamic_uint8_params",
    "dynamic_uint8_qparams",
    "int4_mm",
    "int4_scales_and_zeros",
    "int8_weight_only_mm",
    "int_mm",
    "onednn_conv2d",
    "onednn_conv2d_fused",
    "onednn_default",
    "onednn_linear",
    "onednn_linear_dynamic",
    "pack_int4",
    "prepare_int8_weight_only",
    "quantize_fixed_scale",
    "quantize_per_row",
    "quantize_static_input",
    "quantize_uint8_channels_last",
    "rescale",
    "rounding_offset",
    "static_rescale",
    "row_sums",
    "use_onednn",
    "use_onednn_conv",
    "writable_in_place",
]
