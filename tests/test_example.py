"""The README's main job runs end to end on a fresh output folder and holds its own gate."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_train_digits_example(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_digits.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = run.stdout
    accuracy = re.search(r"validation accuracy\s+float ([\d.]+)\s+int8 ([\d.]+)", out)
    assert accuracy, out
    float_acc, int8_acc = map(float, accuracy.groups())
    assert float_acc > 0.9 and float_acc - int8_acc <= 0.01
    assert "(matches the gate)" in out
    export = tmp_path / "checkpoints" / "model.quant.safetensors"
    assert export.is_file()
    sidecars = [p for p in (tmp_path / "checkpoints").glob("*.quant.safetensors") if p != export]
    ckpts = list((tmp_path / "checkpoints").glob("*.ckpt"))
    assert len(sidecars) == len(ckpts) == 2  # save_top_k=2: rotated sidecars were deleted
