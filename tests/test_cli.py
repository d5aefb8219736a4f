"""The ``mono-quant`` command line: driven as a subprocess for the main flows, in-process for error cases."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kit.serialization_models import inputs, skeleton
from safetensors.torch import save_file

import mono_quant as mq
from mono_quant.cli.main import _progress_printer, main


def run(*args: str, console_script: bool = False) -> subprocess.CompletedProcess:
    script = shutil.which("mono-quant") if console_script else None
    command = [script] if script else [sys.executable, "-m", "mono_quant"]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def float_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same float state_dict as ``.safetensors`` and ``.pt``."""
    folder = tmp_path_factory.mktemp("cli")
    state = skeleton(0).state_dict()
    save_file(state, folder / "float.safetensors")
    torch.save(state, folder / "float.pt")
    return folder / "float.safetensors", folder / "float.pt"


def test_quantize_inspect_compare_as_subprocesses(float_files: tuple[Path, Path]) -> None:
    float_st, float_pt = float_files
    out = float_st.with_name("q8.safetensors")
    proc = run("quantize", str(float_st), "--dtype", "int8", "--mode", "dynamic", "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "4 layers quantized" in proc.stdout and f"wrote {out}" in proc.stdout
    assert proc.stderr == ""  # not a terminal: no progress bar

    proc = run("inspect", str(out), "--json", console_script=True)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    classes = {row["name"]: row["class"] for row in info["layers"]}
    assert classes == {"conv": "Int8Conv2d", "emb": "Int8Linear", "fc1": "Int8Linear", "fc2": "Int8Linear"}
    conv = next(row for row in info["layers"] if row["name"] == "conv")
    assert conv["shape"] == [8, 1, 3, 3] and conv["sqnr_db"] > 35 and conv["bytes"] == 8 * 9 + 8 * 4 + 8 * 4
    assert info["tensor_bytes"] < 0.27 * info["float_bytes"]

    proc = run("compare", str(float_pt), str(out))
    assert proc.returncode == 0, proc.stderr
    assert "weight SQNR dB" in proc.stdout and "fc1" in proc.stdout and "x smaller" in proc.stdout

    loaded = mq.load(out, model=skeleton(4))  # a CLI-made file loads into the real model class
    assert mq.compare(skeleton(0), loaded, [inputs(16)]).cosine_min > 0.99


def test_exit_codes_and_one_line_errors_as_subprocesses(tmp_path: Path) -> None:
    usage = run("quantize")
    assert usage.returncode == 2 and "required: MODEL_FILE" in usage.stderr
    failed = run("inspect", str(tmp_path / "missing.safetensors"))
    assert failed.returncode == 1 and failed.stdout == ""
    assert failed.stderr.splitlines() == [
        f"mono-quant: error: cannot load {tmp_path / 'missing.safetensors'}: no such file"
    ]


def test_debug_shows_the_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--debug", "inspect", str(tmp_path / "missing.pt")]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.pt"), "--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_int4_from_pt_with_include_exclude(float_files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    out = float_files[1].with_name("q4.pt")
    argv = ["quantize", str(float_files[1]), "--dtype", "int4", "--include", "fc*", "--exclude", "fc2", "-o", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "1 layers quantized" in stdout and "skipped fc2: excluded by pattern 'fc2'" in stdout
    assert "skipped conv: not matched by include" in stdout
    state, meta = mq.load(out)
    assert list(meta["layers"]) == ["fc1"] and state["fc1.weight_packed"].dtype == torch.int32
    assert state["fc2.weight"].dtype == torch.float32
    assert main(["inspect", str(out)]) == 0
    table = capsys.readouterr().out
    assert "Int4Linear" in table and "256x640" in table and "1 quantized layers" in table


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def future_file(folder: Path) -> Path:
    path = folder / "future.safetensors"
    mq.save(mq.dynamic_quantize(skeleton(0))[0], path)
    state, meta = mq.load(path)
    save_file(state, path, metadata={"mono_quant": json.dumps({**meta, "format_version": 2})})
    return path


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("truncated", "truncated or corrupt"),
        ("random", "truncated or corrupt"),
        ("plain", "no mono-quant metadata"),
        ("future", "format_version=2 was written by a newer mono-quant"),
        ("missing", "no such file"),
    ],
)
def test_inspect_bad_files_exit_1(case: str, match: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    good = tmp_path / "good.safetensors"
    mq.save(mq.dynamic_quantize(skeleton(0))[0], good)
    path = {
        "truncated": lambda: write(tmp_path / "t.safetensors", good.read_bytes()[:1000]),
        "random": lambda: write(tmp_path / "r.safetensors", bytes(range(256)) * 8),
        "plain": lambda: (save_file(skeleton(0).state_dict(), tmp_path / "p.safetensors"), tmp_path / "p.safetensors")[
            1
        ],
        "future": lambda: future_file(tmp_path),
        "missing": lambda: tmp_path / "nope.safetensors",
    }[case]()
    assert main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and str(path) in err and match in err


def test_failed_operations_exit_1(
    float_files: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    float_st, _ = float_files
    assert main(["quantize", str(float_st), "-o", str(tmp_path / "no_dir" / "q.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert main(["quantize", str(tmp_path / "list.pt")]) == 1
    assert "not a state_dict" in capsys.readouterr().err
    quant = tmp_path / "q.safetensors"
    assert main(["quantize", str(float_st), "-q", "-o", str(quant)]) == 0
    other = skeleton(0).state_dict()
    del other["fc1.weight"]
    save_file(other, tmp_path / "other.safetensors")
    assert main(["compare", str(tmp_path / "other.safetensors"), str(quant)]) == 1
    assert "has no tensor 'fc1.weight'" in capsys.readouterr().err
    other["fc1.weight"] = torch.zeros(3, 3)
    save_file(other, tmp_path / "other.safetensors")
    assert main(["compare", str(tmp_path / "other.safetensors"), str(quant)]) == 1
    assert "has shape [3, 3]" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["quantize", "m.pt", "--dtype", "int3"],
        ["quantize", "m.pt", "--mode", "static"],
        ["frobnicate"],
        [],
    ],
)
def test_bad_usage_exits_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


def test_invalid_options_exit_2(float_files: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", str(float_files[0]), "-o", "out.txt"]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err
    assert main(["quantize", str(float_files[0]), "--dtype", "int4", "--group-size", "3"]) == 2
    assert "group_size=3" in capsys.readouterr().err


def test_progress_bar_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert _progress_printer(io.StringIO()) is None
    stream = Terminal()
    show = _progress_printer(stream)
    show(1, 2, "fc1")
    show(2, 2, "fc2")
    text = stream.getvalue()
    assert "\rquantizing [" in text and "1/2 fc1" in text and text.endswith("\n")
