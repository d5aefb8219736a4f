"""The shared core of the quantized recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.LSTMCell``, ``nn.GRUCell``).

A recurrent layer holds several weight matrices (``weight_ih_l0``, ``weight_hh_l0``, ``weight_hr_l0`` ...).
Each keeps its float name in the state_dict; an int8 matrix adds ``<name>_scale`` (one scale per row), a
matrix kept at higher precision stays float32 under its name. Biases stay float32. Which matrices stay
float is measured on outputs: ``quantize`` keeps the first layer's input matrix float32 when the all-int8
layer misses its output floor against float (``output_check``); ``metadata()["matrices"]`` records the
choice per matrix.

Kernels: a projection is ``(x @ W.T) * columns + b`` (``project``). In ``dynamic`` mode the input is
quantized per row at run time and multiplied with ``kernels.int_mm``, the epilogue written into the
accumulator (``kernels.dynamic_rescale``); in ``weight_only`` mode the packed int8 weight-only kernel runs.
The input projections of all time steps run as one GEMM; the layers' dynamic step loops, which quantize
the bounded hidden state with a fixed scale, are in ``recurrent_steps``; ``prepare`` derives the terms
both use (``scale / half``, ``zero * rowsum``), never saved.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from mono_quant import kernels
from mono_quant.config import Mode, QuantDtype, QuantizationConfig
from mono_quant.kernels import choice
from mono_quant.modules.base import ActivationQParams, QuantizedLayer
from mono_quant.qparams import QuantizedWeight, dequantize_weight, quantize_weight

INT8, FLOAT = "int8", "float32"
PRECISIONS = (INT8, FLOAT)
_FLAGS = ("bias", "batch_first", "bidirectional")


FIRST_INPUTS = ("weight_ih", "weight_ih_l0", "weight_ih_l0_reverse")  # the matrices that read the raw input


def choose_precisions(params: dict[str, torch.Tensor], float_first_input: bool = False) -> dict[str, str]:
    """Per matrix, int8 (per row) or float32: every matrix int8, except the first layer's input matrices with
    ``float_first_input`` (what ``quantize`` retries when the all-int8 layer's output misses its floor against
    float: raw input features on very different scales drown in each row's int8 scale).

    Example:
        >>> params = {"weight_ih": torch.randn(8, 4), "weight_hh": torch.randn(8, 2)}
        >>> choose_precisions(params), choose_precisions(params, float_first_input=True)["weight_ih"]
        ({'weight_ih': 'int8', 'weight_hh': 'int8'}, 'float32')
    """
    keep = FIRST_INPUTS if float_first_input else ()
    return {name: FLOAT if name in keep else INT8 for name in params if name.startswith("weight_")}


class QuantizedRecurrent(nn.Module, QuantizedLayer):
    """Base of the quantized recurrent classes: storage, projections, metadata and the way back to float.

    Subclasses set ``hyper_names`` (the float constructor's arguments) and implement ``forward``.
    """

    dtypes = (QuantDtype.INT8,)
    bits = 8
    hyper_names: ClassVar[tuple[str, ...]] = ("input_size", "hidden_size", "bias")

    def __init__(
        self, hyper: dict[str, Any], mode: Mode, precisions: dict[str, str], shapes: dict[str, tuple[int, ...]]
    ) -> None:
        super().__init__()
        self.hyper = dict(hyper)
        for key, value in self.hyper.items():
            setattr(self, key, value)
        self.mode = Mode.DYNAMIC if mode is Mode.STATIC else mode  # one scale cannot fit a changing hidden state
        self.precisions = dict(precisions)
        self._onednn: dict[str, kernels.OneDNNWeight] = {}  # oneDNN's packed matrices, built on first use
        for name, shape in shapes.items():
            if name.startswith("bias_"):
                self.register_buffer(name, torch.zeros(shape))
                continue
            int8 = self.precisions[name] == INT8
            self.register_buffer(name, torch.zeros(shape, dtype=torch.int8 if int8 else torch.float32))
            self.register_buffer(f"{name}_scale", torch.ones(shape[0]) if int8 else None)
            for derived in ("_step", "_offset", "_packed"):
                self.register_buffer(f"_{name}{derived}", None, persistent=False)
        self.register_load_state_dict_post_hook(lambda module, keys: module.prepare())

    # ---------------------------------------------------------------- building
    @classmethod
    def _float_params(cls, module: nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in module.named_parameters(recurse=False)}

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        config: QuantizationConfig,
        activation: ActivationQParams | None = None,
        float_first_input: bool = False,
    ) -> QuantizedRecurrent:
        params = cls._float_params(module)
        precisions = choose_precisions(params, float_first_input)
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        layer = cls(_hyper(cls, module), config.mode, precisions, shapes)
        for name, tensor in params.items():
            if name.startswith("bias_") or precisions[name] == FLOAT:
                setattr(layer, name, tensor.float().clone())
            else:
                qw = quantize_weight(tensor, 8)
                setattr(layer, name, qw.data)
                setattr(layer, f"{name}_scale", qw.scale)
        layer.prepare()
        return layer.to(next(iter(params.values())).device)

    @classmethod
    def from_metadata(cls, module: nn.Module, metadata: dict[str, Any]) -> QuantizedRecurrent:
        params = dict(module.named_parameters(recurse=False))
        precisions = {name: str(value) for name, value in metadata["matrices"].items()}
        weights = {name for name in params if name.startswith("weight_")}
        if set(precisions) != weights or not set(precisions.values()) <= set(PRECISIONS):
            raise ValueError(f"matrices={metadata['matrices']!r}; expected {sorted(weights)} -> one of {PRECISIONS}")
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        return cls(_hyper(cls, module), Mode(metadata["mode"]), precisions, shapes)

    @classmethod
    def meta_float_module(cls, entry: dict[str, Any]) -> nn.Module:
        """The float layer a file entry describes, on the meta device (for checks before loading)."""
        hyper = entry.get("recurrent")
        if not isinstance(hyper, dict) or sorted(hyper) != sorted(cls.hyper_names):
            raise ValueError(f"recurrent={hyper!r}; expected a table of {', '.join(cls.hyper_names)}")
        for key, value in hyper.items():
            expected = float if key == "dropout" else bool if key in _FLAGS else int
            if not isinstance(value, expected) or (expected is int and (isinstance(value, bool) or value < 0)):
                raise ValueError(
                    f"recurrent.{key}={value!r}; expected a {'non-negative ' * (expected is int)}{expected.__name__}"
                )
        return cls.float_type(**hyper, device="meta")

    def prepare(self) -> None:
        """Every weight-side term, once: scale / 127, the uint8 offset, the weight-only packed weight (and an
        emptied oneDNN cache: a load replaces the weights)."""
        self._onednn.clear()
        for name, precision in self.precisions.items():
            if precision != INT8:
                continue
            weight, scale = getattr(self, name), getattr(self, f"{name}_scale")
            fmt = kernels.input_format(weight.device)
            setattr(self, f"_{name}_step", scale.float() / fmt.half)
            setattr(self, f"_{name}_offset", fmt.zero * kernels.row_sums(weight))
            packed = kernels.prepare_int8_weight_only(weight) if self.mode is Mode.WEIGHT_ONLY else None
            setattr(self, f"_{name}_packed", packed)

    # ---------------------------------------------------------------- running
    def bias_of(self, name: str) -> torch.Tensor | None:
        """The bias buffer added to the matrix ``name``'s product (``None`` without biases)."""
        return getattr(self, "bias_" + name[len("weight_") :], None) if self.bias else None

    def int8_terms(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The int8 matrix ``name``, its ``scale / half`` and ``zero * rowsum`` (from ``prepare``)."""
        return getattr(self, name), getattr(self, f"_{name}_step"), getattr(self, f"_{name}_offset")

    def project(
        self, x: torch.Tensor, name: str, b: torch.Tensor | None, columns: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``(x @ W.T) * columns + b`` for the 2-D float ``x`` and the stored matrix ``name``; ``b`` and the
        per-column factors ``columns`` may be ``None``. The int8 epilogue runs in the accumulator's memory."""
        weight = getattr(self, name)
        if weight.dtype != torch.int8:
            out = x @ weight.t()
        elif self.mode is Mode.WEIGHT_ONLY:
            out = kernels.int8_weight_only_mm(x, getattr(self, f"_{name}_packed"), getattr(self, f"{name}_scale"))
        else:
            return self._dynamic_projection(x, name, b, columns)
        return _scale_columns(out, b, columns)

    def _dynamic_projection(
        self, x: torch.Tensor, name: str, b: torch.Tensor | None, columns: torch.Tensor | None
    ) -> torch.Tensor:
        """``project`` in dynamic mode: ``x`` quantized per row, then ``_int_mm`` with its epilogue in the
        accumulator or (CPU, a bias per column) oneDNN's packed u8 x s8 GEMM, as ``kernels.choice`` picks per
        shape and batch bucket (checked against an exact reference first). Measured here for the 3200-row
        input projection of a 256 -> 1024 matrix (2 threads): oneDNN 1.1 ms, ``_int_mm`` + epilogue 3.0 ms."""
        fmt = kernels.input_format(x.device)
        q, row_max = kernels.quantize_per_row(x, fmt)
        weight, step, offset = self.int8_terms(name)
        step = step if columns is None else step * columns

        def run(kernel: str) -> torch.Tensor:
            if kernel == "onednn":
                packed = self._onednn.setdefault(name, kernels.OneDNNWeight())  # a cache, never saved
                return kernels.onednn_linear_dynamic(q, row_max, packed, weight, step, b, fmt.zero)
            if kernel == choice.FALLBACK:  # no integer kernel passed its check on this CPU
                return _scale_columns(x @ self.dequantized_matrix(name).t(), b, columns)
            return kernels.dynamic_rescale(kernels.int_mm(q, weight), offset if fmt.zero else None, row_max, step, b)

        if not kernels.use_onednn(x) or (b is not None and b.dim() > 1):
            return run("int_mm")
        default = "onednn" if kernels.onednn_default(x.shape[0], weight.numel()) else "int_mm"
        reference = lambda: kernels.check.matmul_reference(q, fmt.zero, weight, row_max * step, b)  # noqa: E731
        return run(
            choice.pick("recurrent_dynamic", tuple(weight.shape), x, ("int_mm", "onednn"), default, run, reference)
        )

    # ---------------------------------------------------------------- describing
    def metadata(self) -> dict[str, Any]:
        return {
            "kind": self.float_type.__name__,
            "mode": self.mode.value,
            "bits": 8,
            "scheme": "symmetric",
            "granularity": "per_channel",
            "matrices": dict(self.precisions),
            "recurrent": dict(self.hyper),
        }

    def float_shape(self) -> list[int]:
        """The shape files record for the layer: its first input matrix's (``[gates * hidden, input_size]``)."""
        first = next(iter(self.precisions))
        return list(getattr(self, first).shape)

    def dequantized_matrix(self, name: str) -> torch.Tensor:
        weight = getattr(self, name)
        if weight.dtype != torch.int8:
            return weight.float()
        return dequantize_weight(QuantizedWeight(weight, getattr(self, f"{name}_scale"), None))

    def dequantized_weight(self) -> torch.Tensor:
        """Every weight matrix, dequantized and flattened into one vector in the float layer's order."""
        return torch.cat([self.dequantized_matrix(name).reshape(-1) for name in self.precisions])

    def dequantize(self) -> nn.Module:
        float_module = self.float_type(**self.hyper, device=next(iter(self.buffers())).device)
        with torch.no_grad():
            for name, param in float_module.named_parameters(recurse=False):
                value = getattr(self, name) if name.startswith("bias_") else self.dequantized_matrix(name)
                param.copy_(value)
        return float_module.eval()

    def extra_repr(self) -> str:
        hyper = ", ".join(f"{k}={v}" for k, v in self.hyper.items())
        kept = [name for name, p in self.precisions.items() if p != INT8]
        return f"{hyper}, mode={self.mode.value}, float32={kept}"


def _hyper(cls: type[QuantizedRecurrent], module: nn.Module) -> dict[str, Any]:
    return {name: getattr(module, name) for name in cls.hyper_names}


def _scale_columns(out: torch.Tensor, b: torch.Tensor | None, columns: torch.Tensor | None) -> torch.Tensor:
    """``out * columns + b`` for a float product (``columns`` and ``b`` may be ``None``)."""
    out = out if columns is None else out * columns
    return out if b is None else out + b
