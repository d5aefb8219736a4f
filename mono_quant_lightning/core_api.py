"""The one place where ``mono_quant_lightning`` imports ``mono_quant`` names that are not yet in ``mono_quant.__all__``.

Everything else in this package imports ``mono_quant`` (public) or this module, so making these names public
in the core is a one-file change here.

Example:
    >>> sorted(TARGET_KEYS)[:2]
    ['label', 'labels']
"""

from mono_quant.calibration import TARGET_KEYS
from mono_quant.fidelity import output_tensor
from mono_quant.modules import ActivationQParams
from mono_quant.selection import calibrated_layers, select_layers

__all__ = ["TARGET_KEYS", "ActivationQParams", "calibrated_layers", "output_tensor", "select_layers"]
