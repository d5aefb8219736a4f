"""The file format's constants, shared by its readers and writers (readers never import a writer).

``FORMAT_VERSION`` is bumped by a format change (older files keep loading); ``METADATA_KEY`` names the JSON
document in a file's header; ``ST_DTYPES`` maps safetensors' dtype names to torch's.

Example:
    >>> FORMAT_VERSION >= 1, METADATA_KEY, ST_DTYPES["I8"]
    (True, 'mono_quant', torch.int8)
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 1
METADATA_KEY = "mono_quant"
TORCH_SUFFIXES = (".pt", ".pth")
ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
