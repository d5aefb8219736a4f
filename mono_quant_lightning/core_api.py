"""The one place where ``mono_quant_lightning`` imports ``mono_quant`` names that are not in ``mono_quant.__all__``.

Everything else in this package imports ``mono_quant`` (public names only) or this module, so once the core
exports these names, this file becomes ``from mono_quant import ...``.

Example:
    >>> sorted(TARGET_KEYS)[:2], FLOAT
    (['label', 'labels'], 'float')
"""

from mono_quant.budget import FLOAT, parse_ladder
from mono_quant.calibration import TARGET_KEYS
from mono_quant.config import parse_dtype, parse_enum
from mono_quant.fidelity import output_tensor
from mono_quant.selection import calibrated_layers, select_layers

__all__ = [
    "FLOAT",
    "TARGET_KEYS",
    "calibrated_layers",
    "output_tensor",
    "parse_dtype",
    "parse_enum",
    "parse_ladder",
    "select_layers",
]
