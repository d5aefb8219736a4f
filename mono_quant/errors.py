"""The exceptions mono-quant raises. Every one is a ``ValueError`` so callers can catch broadly."""

from __future__ import annotations


class QuantizationError(ValueError):
    """Base class: a request mono-quant cannot honour. The message names the argument and value.

    Example:
        >>> try:
        ...     raise ConfigError("dtype='int3' is not supported")
        ... except QuantizationError as err:
        ...     print(err)
        dtype='int3' is not supported
    """


class ConfigError(QuantizationError):
    """An invalid configuration value (unknown dtype, mode, group size that does not divide, ...)."""


class CalibrationError(QuantizationError):
    """Calibration data that is empty, never reaches a layer, or yields NaN/Inf statistics."""


class SerializationError(QuantizationError):
    """A file that is missing, corrupt, or does not match the metadata or the given model."""


class KernelCheckWarning(UserWarning):
    """An integer kernel gave a wrong result on this machine and was replaced (``kernels.check``).

    Example:
        >>> issubclass(KernelCheckWarning, UserWarning)
        True
    """


class OutputCheckWarning(UserWarning):
    """A layer's quantized output missed its floor against float and moved to a higher precision.

    Example:
        >>> issubclass(OutputCheckWarning, UserWarning)
        True
    """
