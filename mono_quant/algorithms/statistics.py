"""``InputStatistics``: what the data-driven weight algorithms know of one layer's inputs.

For a layer computing ``x @ W.T`` over ``K`` input features it holds, accumulated in float64 over every row
(token, pixel, time step) it saw:

- ``xtx``: ``X^T X`` (``[K, K]``), the Hessian of the layer's squared output error that GPTQ needs;
- ``abs_sum``: the sum of ``|x_j|`` per feature (AWQ's activation magnitude is ``abs_sum / rows``);
- ``abs_max``: the largest ``|x_j|`` per feature (SmoothQuant's activation range);
- ``rows``: how many rows went in.

Like the observers, statistics merge (``merge``), all-reduce across processes (``sync``: sums and a max, so
every rank ends with identical values) and round-trip through ``state_dict``. Memory: ``8 K^2`` bytes for
``xtx`` (128 MiB for a 4096-wide layer) plus ``16 K``.
"""

from __future__ import annotations

import torch

from mono_quant.errors import CalibrationError
from mono_quant.observers import Reduce


class InputStatistics:
    """Running input statistics of one layer with ``features`` inputs (see the module docstring).

    Example:
        >>> stats = InputStatistics(3)
        >>> stats.update(torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, 1.0]]))
        >>> stats.rows, stats.xtx[0, 0].item(), stats.abs_max.tolist(), stats.mean_abs().tolist()
        (2, 10.0, [3.0, 2.0, 1.0], [2.0, 1.0, 0.5])
    """

    def __init__(self, features: int, hessian: bool = True) -> None:
        self.features = features
        self.xtx = torch.zeros(features, features, dtype=torch.float64) if hessian else None
        self.abs_sum = torch.zeros(features, dtype=torch.float64)
        self.abs_max = torch.zeros(features, dtype=torch.float64)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        """Add rows of ``x`` (any shape whose last dimension is the feature dimension)."""
        if x.shape[-1] != self.features:
            raise CalibrationError(f"an input with {x.shape[-1]} features reached a layer with {self.features}")
        rows = x.detach().reshape(-1, self.features).to(device="cpu", dtype=torch.float64)
        if not bool(torch.isfinite(rows).all()):
            raise CalibrationError("a calibration input holds NaN or Inf values; check the data and the layers before")
        if self.xtx is not None:
            self.xtx.addmm_(rows.T, rows)
        magnitude = rows.abs()
        self.abs_sum += magnitude.sum(0)
        torch.maximum(self.abs_max, magnitude.amax(0), out=self.abs_max)
        self.rows += rows.shape[0]

    def mean_abs(self) -> torch.Tensor:
        """Mean ``|x_j|`` per feature (float64)."""
        return self.abs_sum / max(self.rows, 1)

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / rows`` (float64), the Hessian of the mean squared output error GPTQ minimizes."""
        if self.xtx is None:
            raise CalibrationError("these statistics were collected without X^T X (hessian=False)")
        if self.rows == 0:
            raise CalibrationError("no calibration rows reached this layer")
        return self.xtx * (2.0 / self.rows)

    def merge(self, other: InputStatistics) -> None:
        """Fold ``other`` (statistics of the same layer on other data) into this one."""
        if other.features != self.features:
            raise CalibrationError(f"cannot merge statistics of {other.features} features into {self.features}")
        if self.xtx is not None and other.xtx is not None:
            self.xtx += other.xtx
        self.abs_sum += other.abs_sum
        torch.maximum(self.abs_max, other.abs_max, out=self.abs_max)
        self.rows += other.rows

    def sync(self, reduce: Reduce) -> None:
        """All-reduce across processes: every rank ends with the same sums, maximum and row count."""
        if self.xtx is not None:
            self.xtx = reduce(self.xtx, "sum")
        self.abs_sum = reduce(self.abs_sum, "sum")
        self.abs_max = reduce(self.abs_max, "max")
        self.rows = int(reduce(torch.tensor(self.rows, dtype=torch.float64), "sum").item())

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {"abs_sum": self.abs_sum, "abs_max": self.abs_max, "rows": torch.tensor(self.rows)}
        if self.xtx is not None:
            state["xtx"] = self.xtx
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore ``state_dict()``'s values (shapes checked)."""
        for key in ("abs_sum", "abs_max"):
            if tuple(state[key].shape) != (self.features,):
                shape = list(state[key].shape)
                raise CalibrationError(f"statistics[{key!r}] has shape {shape}; expected [{self.features}]")
        self.abs_sum, self.abs_max = state["abs_sum"].double().clone(), state["abs_max"].double().clone()
        self.rows = int(state["rows"])
        if "xtx" in state:
            self.xtx = state["xtx"].double().clone()
