"""What ``quantize_with_budget`` returns: the result, its report (table, dict, chart) and their rows."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from mono_quant.engine.quantize import QuantizationResult, speed_notes
from mono_quant.engine.report import LayerReport, QuantizationReport
from mono_quant.engine.selection import coverage_warning, matmul_weight_numel
from mono_quant.modules import tensor_bytes
from mono_quant.skips import Skip, SkipKind

FLOAT = "float"  # the ladder's top rung: the layer stays in float


@dataclasses.dataclass(frozen=True)
class SensitivityRow:
    """One layer's sensitivity: normalized output MSE with only this layer quantized; rank 1 = most sensitive."""

    layer: str
    score: float
    rank: int


@dataclasses.dataclass(frozen=True)
class BudgetStep:
    """One greedy step: ``layer`` moved from ``from_rung`` to ``to_rung``, scored ``score``; ``kept`` or undone."""

    layer: str
    from_rung: str
    to_rung: str
    score: float
    drop: float
    kept: bool


@dataclasses.dataclass
class BudgetReport:
    """The sensitivity ranking, each layer's start and final precision, the steps and the scores.

    ``print(report)`` shows a table; ``to_dict()`` is JSON-friendly; ``to_png(path)`` draws a bar chart
    (needs the ``[plot]`` extra, i.e. matplotlib).

    Example:
        >>> r = BudgetReport([SensitivityRow("fc1", 0.02, 1), SensitivityRow("fc2", 0.001, 2)],
        ...                  {"fc1": "int4", "fc2": "int4"}, {"fc1": "int8", "fc2": "int4"}, [],
        ...                  0.97, 0.93, 0.965, 0.005, 0.01, "absolute", True, "budget reached", 3, 0, 0.5)
        >>> print(str(r).splitlines()[0])
        accuracy budget reached: drop 0.005 <= max_drop 0.01 (absolute)
    """

    sensitivity: list[SensitivityRow]
    start: dict[str, str]
    final: dict[str, str]
    steps: list[BudgetStep]
    float_score: float
    quantized_score: float
    final_score: float
    drop: float
    max_drop: float
    drop_type: str
    reached: bool
    stop_reason: str
    evaluations: int
    reranks: int
    seconds: float

    def rows(self) -> list[tuple[int | None, str, float | None, str, str]]:
        """``(rank, layer, sensitivity, start rung, final rung)`` per layer, ranked layers first."""
        ranked = {row.layer: row for row in self.sensitivity}
        out = [
            (row.rank, row.layer, row.score, self.start[row.layer], self.final[row.layer]) for row in self.sensitivity
        ]
        out += [(None, name, None, self.start[name], self.final[name]) for name in self.start if name not in ranked]
        return out

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["sensitivity"] = [dataclasses.asdict(row) for row in self.sensitivity]
        out["steps"] = [dataclasses.asdict(step) for step in self.steps]
        return out

    def __str__(self) -> str:
        verdict = "reached" if self.reached else "NOT reached"
        relation = "<=" if self.reached else ">"
        kept = sum(step.kept for step in self.steps)
        out = [
            f"accuracy budget {verdict}: drop {self.drop:.4g} {relation} max_drop {self.max_drop:.4g} "
            f"({self.drop_type})",
            f"scores: float {self.float_score:.4f}, fully quantized {self.quantized_score:.4f}, "
            f"final {self.final_score:.4f}",
            f"{self.evaluations} evaluations ({kept} steps kept, {self.reranks} re-rank(s)) in {self.seconds:.2f} s; "
            f"stopped: {self.stop_reason}",
        ]
        header = ("rank", "layer", "sensitivity", "start", "final")
        rows = [
            ("-" if rank is None else str(rank), name, "-" if score is None else f"{score:.3g}", start, final)
            for rank, name, score, start, final in self.rows()
        ]
        widths = [max(len(c) for c in column) for column in zip(header, *rows, strict=True)]
        line = "  ".join(f"{{:<{w}}}" for w in widths)
        out += [line.format(*header), line.format(*("-" * w for w in widths))]
        out += [line.format(*row) for row in rows]
        for i, step in enumerate(self.steps, 1):
            what = "kept" if step.kept else "undone (worse)"
            out.append(f"step {i}: {step.layer} {step.from_rung} -> {step.to_rung}, score {step.score:.4f}, {what}")
        return "\n".join(out)

    def to_png(self, path: str) -> None:
        """Draw sensitivity per layer (log scale) as bars coloured by final precision; needs matplotlib."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ImportError as err:
            raise ImportError(
                "BudgetReport.to_png needs matplotlib; install it with: pip install 'mono-quant[plot]'"
            ) from err
        rows = [row for row in self.rows() if row[2] is not None]  # ranked layers
        colours = {"int4": "tab:red", "int4-gptq": "tab:pink", "int4-awq": "tab:purple", "int8": "tab:orange"}
        colours.update({"fp16": "tab:cyan", "bf16": "tab:blue", FLOAT: "tab:green"})
        figure = Figure(figsize=(7, 1.5 + 0.3 * max(len(rows), 1)))
        axes = figure.add_subplot()
        if rows:
            floor = min((score for _, _, score, _, _ in rows if score), default=1.0) / 10
            values = [max(score or 0.0, floor) for _, _, score, _, _ in rows]
            axes.barh(range(len(rows)), values, color=[colours[final] for *_, final in rows])
            axes.set_yticks(range(len(rows)), [f"{name} ({final})" for _, name, _, _, final in rows])
            axes.invert_yaxis()
            axes.set_xscale("log")
            handles = [Patch(color=c, label=r) for r, c in colours.items() if r in {row[4] for row in rows}]
            axes.legend(handles=handles, title="final precision", loc="best")
        else:
            axes.text(0.5, 0.5, f"no ranking: {self.stop_reason}", ha="center", va="center")
        axes.set_xlabel("sensitivity: normalized output MSE with only this layer quantized")
        axes.set_title(f"final score {self.final_score:.4f} (float {self.float_score:.4f}, drop {self.drop:.4g})")
        figure.tight_layout()
        figure.savefig(path)


@dataclasses.dataclass
class BudgetResult:
    """What ``quantize_with_budget`` found. ``model`` is the best model evaluated (the one meeting the budget
    when ``reached``); ``moves`` maps each layer moved up to the precision it ended at; ``precisions`` maps
    every searched layer to its final precision."""

    model: nn.Module
    reached: bool
    float_score: float
    quantized_score: float
    final_score: float
    drop: float
    moves: dict[str, str]
    sensitivity: list[SensitivityRow]
    evaluations: int
    seconds: float
    report: BudgetReport
    precisions: dict[str, str]
    steps: list[BudgetStep]
    reranks: int
    stop_reason: str
    layer_reports: list[LayerReport] = dataclasses.field(default_factory=list)  # ``model``'s quantized layers

    def quantization_result(self, float_model: nn.Module, base: QuantizationResult) -> QuantizationResult:
        """``model`` as a ``QuantizationResult``: a report row per quantized layer, layers kept in float listed
        as skipped, and ``base``'s config (``base`` is the plain quantization the search started from; each
        layer's file entry records its own precision).

        Example:
            >>> import torch
            >>> from mono_quant import quantize, quantize_with_budget
            >>> _ = torch.manual_seed(0)
            >>> model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
            >>> _ = model[0].weight.data[:, 0].fill_(100.0)  # an outlier column: layer 0 ranks most sensitive
            >>> x = torch.randn(32, 16)
            >>> def score(m):  # 1 when the first layer is float, whatever the rest
            ...     return float(type(m[0]) is nn.Linear)
            >>> budget = quantize_with_budget(model, score, max_drop=0.0, sensitivity_data=x)
            >>> result = budget.quantization_result(model, quantize(model))
            >>> budget.moves, [(row.name, row.bits) for row in result.report.layers], result.report.skipped["0"]
            ({'0': 'float'}, [('2', 8)], 'kept in float by the accuracy budget')
        """
        skipped = {name: why for name, why in base.report.skipped.items() if name not in self.precisions}
        kept = Skip(SkipKind.BUDGET, "kept in float by the accuracy budget")
        skipped.update({name: kept for name, rung in self.precisions.items() if rung == FLOAT})
        order = {name: i for i, name in enumerate(self.precisions)}
        rows = sorted(self.layer_reports, key=lambda row: order.get(row.name, len(order)))
        numel = sum(matmul_weight_numel(float_model.get_submodule(row.name)) for row in rows)
        report = QuantizationReport(
            rows,
            skipped,
            base.report.model_bytes_before,
            tensor_bytes(*self.model.state_dict().values()),
            coverage_warning(float_model, numel, skipped),
            speed_notes(rows),
        )
        return QuantizationResult(self.model, list(skipped), report, base.config)
