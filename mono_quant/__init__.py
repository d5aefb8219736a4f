"""mono-quant: model-agnostic post-training quantization for PyTorch (INT8, INT4, FP16/BF16).

Example:
    >>> import torch, mono_quant as mq
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    >>> q_model, skipped = mq.dynamic_quantize(model, dtype=torch.qint8)
    >>> q_model(torch.randn(2, 64)).shape
    torch.Size([2, 10])
"""

from mono_quant._version import __version__
from mono_quant.batches import TARGET_KEYS
from mono_quant.budget.entry import FLOAT, BudgetResult, parse_ladder, quantize_with_budget
from mono_quant.config import (
    Granularity,
    HistogramMethod,
    Mode,
    ObserverKind,
    QuantDtype,
    QuantizationConfig,
    Scheme,
    WeightAlgorithm,
    parse_dtype,
    parse_enum,
)
from mono_quant.engine.calibration import Calibrator
from mono_quant.engine.dequantize import dequantize
from mono_quant.engine.fidelity import FidelityReport, compare, output_tensor
from mono_quant.engine.fitting_statistics import StatisticsCollector, fitted_layers
from mono_quant.engine.quantize import QuantizationResult, dynamic_quantize, quantize, static_quantize
from mono_quant.engine.report import LayerReport, QuantizationReport
from mono_quant.engine.selection import Selection, calibrated_layers, calibrated_outputs, select_layers
from mono_quant.errors import CalibrationError, ConfigError, QuantizationError, SerializationError
from mono_quant.graph.folding import fold_batchnorm
from mono_quant.io.hf_export import save_pretrained
from mono_quant.io.load import load, save
from mono_quant.io.onnx import export_onnx
from mono_quant.io.stream import CheckpointResult, quantize_checkpoint
from mono_quant.kernels.choice import kernel_choice, set_kernel_choice
from mono_quant.modules import (
    ActivationQParams,
    QuantizedLayer,
    QuantizedTensor,
    quantized_layers,
    register,
)
from mono_quant.observers import HistogramObserver, MinMaxObserver, MovingAverageMinMaxObserver

__all__ = [
    "FLOAT",
    "TARGET_KEYS",
    "ActivationQParams",
    "QuantizedLayer",
    "QuantizedTensor",
    "Selection",
    "calibrated_layers",
    "calibrated_outputs",
    "fitted_layers",
    "output_tensor",
    "parse_dtype",
    "parse_enum",
    "parse_ladder",
    "quantized_layers",
    "register",
    "kernel_choice",
    "set_kernel_choice",
    "select_layers",
    "BudgetResult",
    "CalibrationError",
    "Calibrator",
    "CheckpointResult",
    "ConfigError",
    "FidelityReport",
    "Granularity",
    "HistogramMethod",
    "HistogramObserver",
    "LayerReport",
    "MinMaxObserver",
    "Mode",
    "MovingAverageMinMaxObserver",
    "ObserverKind",
    "QuantDtype",
    "QuantizationConfig",
    "QuantizationError",
    "QuantizationReport",
    "QuantizationResult",
    "Scheme",
    "WeightAlgorithm",
    "SerializationError",
    "StatisticsCollector",
    "__version__",
    "compare",
    "dequantize",
    "dynamic_quantize",
    "export_onnx",
    "fold_batchnorm",
    "load",
    "quantize",
    "quantize_checkpoint",
    "quantize_with_budget",
    "save",
    "save_pretrained",
    "static_quantize",
]
