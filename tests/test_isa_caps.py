"""The numerics tests again under each ``ONEDNN_MAX_CPU_ISA`` cap this CPU supports (CI included).

oneDNN capped to an older instruction set behaves as on an older CPU (AVX2 laptops and AMD Zen 1-3,
AVX-512 servers without VNNI, AVX-512 VNNI without AMX): the same model must stay correct on each. A cap
above what the CPU has changes nothing, so only caps the CPU supports run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CAPS = {  # cap -> the CPU flags it needs
    "AVX2": {"avx2"},
    "AVX512_CORE": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "AVX512_CORE_VNNI": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni"},
}


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@pytest.mark.slow
@pytest.mark.parametrize("cap", list(CAPS))
def test_numerics_under_isa_cap(cap: str) -> None:
    if not CAPS[cap] <= cpu_flags():
        pytest.skip(f"this CPU lacks {sorted(CAPS[cap] - cpu_flags())}: ONEDNN_MAX_CPU_ISA={cap} changes nothing")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": cap}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "numerics", "-p", "no:cacheprovider", "tests"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
    )  # fmt: skip
    assert proc.returncode == 0, f"ONEDNN_MAX_CPU_ISA={cap}:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout.splitlines()[-1]
