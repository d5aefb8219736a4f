"""torch.compile: a compiled quantized model computes what its eager run computes, also from inductor's caches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import mono_quant as mq
from mono_quant.modules import Int8Conv2d

_RUN = textwrap.dedent(
    """
    import sys, torch
    from torch import nn
    import mono_quant as mq

    torch.manual_seed(int(sys.argv[1]))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
    q = mq.quantize(model, mode="static", calibration_data=[torch.randn(8, 3, 16, 16) for _ in range(4)]).model
    x = torch.randn(8, 3, 16, 16)
    torch._inductor.config.freezing = True  # parameters become constants of the compiled graph
    with torch.no_grad():
        eager, compiled = q(x), torch.compile(q)(x)
    print("DIFF", float((compiled - eager).abs().max()), float((eager - model(x)).abs().max()))
    """
)


@pytest.mark.slow
def test_a_cached_compiled_graph_never_serves_another_models_scales(tmp_path: Path) -> None:
    """Same architecture, other weights, inductor's cache warm from the first: the second model's compiled output
    is its eager output (0-d scale tensors used to be written into the cached code as literals)."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    results = []
    for seed in (0, 1):
        command = [sys.executable, "-c", _RUN, str(seed)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-2000:]
        line = next(line for line in done.stdout.splitlines() if line.startswith("DIFF"))
        results.append([float(v) for v in line.split()[1:]])
    for compiled_vs_eager, eager_vs_float in results:
        assert compiled_vs_eager <= 0.05 * eager_vs_float, results  # same kernels and scales: rounding at most


def _static_cnn() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=4),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()  # fmt: skip
    q = mq.quantize(model, mode="static", calibration_data=[torch.randn(8, 3, 12, 12) for _ in range(2)]).model
    return model, q, torch.randn(4, 3, 12, 12)


@pytest.mark.slow
def test_a_compiled_static_cnn_runs_its_fused_eager_graph() -> None:
    _, q, x = _static_cnn()
    with torch.no_grad():
        assert torch.equal(torch.compile(q)(x), q(x))  # the fused oneDNN graph, not an im2col re-trace


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_a_quantized_conv_is_one_op_in_a_full_graph(mode: str) -> None:
    torch.manual_seed(0)
    data = [torch.randn(2, 8, 10, 10)]
    q = mq.quantize(nn.Sequential(nn.Conv2d(8, 16, 3, padding=1)), mode=mode, calibration_data=data).model
    layer = q[0].weight.layer  # the Int8Conv2d behind the conv's quantized weight
    assert isinstance(layer, Int8Conv2d)
    x = torch.randn(3, 8, 10, 10)
    with torch.no_grad():
        compiled = torch.compile(layer, fullgraph=True)(x)  # fullgraph: a graph break would raise
        assert torch.equal(compiled, layer(x))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["static", "weight_only"])
def test_an_int8_linear_is_one_op_in_a_full_graph(mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).eval()  # ReLU: exact when compiled
    q = mq.quantize(model, mode=mode, calibration_data=[torch.randn(16, 64)]).model
    x = torch.randn(5, 64)
    with torch.no_grad():
        compiled = torch.compile(q, fullgraph=True)(x)  # the integer kernels run inside one opaque op each
        assert torch.equal(compiled, q(x))


@pytest.mark.slow
@pytest.mark.parametrize("rows", [1, 8, 300])
def test_a_compiled_dynamic_linear_quantizes_in_traced_ops_and_matches_eager(rows: int) -> None:
    """Dynamic mode: the per-row quantization is traced (inductor fuses it), the integer product is one op per
    layer; the output is the eager output up to float rounding of the codes (inductor may fuse a multiply-add)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 32)).eval()
    q = mq.quantize(model).model
    targets: list[str] = []

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return torch._inductor.compile(gm, example_inputs)

    x = torch.randn(rows, 64)
    with torch.no_grad():
        eager, reference = q(x), model(x)
        compiled = torch.compile(q, fullgraph=True, backend=recording_backend)(x)
    assert sum(target.startswith("mono_quant.int8_codes_matmul") for target in targets) == 2
    assert not any("int8_matmul" in target for target in targets)
    assert float((compiled - eager).abs().max()) <= 0.05 * float((eager - reference).abs().max())
