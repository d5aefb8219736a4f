"""The command line on bad input: exit code 1 (2 for usage), one line on stderr, no traceback, no
terminal escape codes, and never a silent success or a write over its input."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from kit.bad_input import layer_edit, model, rewrite, top_edit, write_file
from safetensors.torch import save_file

import mono_quant as mq
from mono_quant.cli.main import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real inputs: float files, training checkpoints, quantized files, pickles, links."""
    d = tmp_path_factory.mktemp("cli")
    state = model().state_dict()
    save_file(state, d / "f.safetensors")
    torch.save(state, d / "f.pt")
    torch.save({"model": state, "optimizer": {"lr": 0.1}, "epoch": 3}, d / "ckpt_model.pt")
    torch.save({"state_dict": state, "epoch": 3}, d / "ckpt_state_dict.pt")
    torch.save({"module": state, "step": 10}, d / "ckpt_module.pt")
    torch.save({"weights": state, "epoch": 3}, d / "ckpt_weights.pt")
    torch.save({"a.weight": torch.randn(8, 64), "b.weight": torch.randn(8, 48)}, d / "mixed.pt")
    torch.save(model(), d / "whole.pt")
    torch.save([1, 2, 3], d / "list.pt")
    (d / "empty.pt").write_bytes(b"")
    write_file(d, "dynamic")
    write_file(d, "dynamic", ".pt")
    write_file(d, "int4")
    (d / "link.safetensors").symlink_to(d / "f.safetensors")
    os.link(d / "f.safetensors", d / "hard.safetensors")
    rewrite(d / "dynamic.safetensors", d / "shape.safetensors", edit=layer_edit("0", "shape", "64x32"))
    rewrite(d / "dynamic.safetensors", d / "bits.safetensors", edit=layer_edit("0", "bits", "8"))
    rewrite(d / "dynamic.safetensors", d / "folded.safetensors", edit=top_edit("folded_batchnorm", 5))
    rewrite(d / "dynamic.safetensors", d / "neg.safetensors", edit=layer_edit("2", "shape", [-10, 64]))
    return d


def run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


F, Q, Q4 = "{d}/f.safetensors", "{d}/dynamic.safetensors", "{d}/int4.safetensors"
CASES = [
    # (id, argv, exit code, word in stderr)
    ("output is input", ["quantize", F, "-o", F], 2, "is the input file"),
    ("output via ..", ["quantize", F, "-o", "{d}/sub/../f.safetensors"], 2, "is the input file"),
    ("output via symlink", ["quantize", F, "-o", "{d}/link.safetensors"], 2, "is the input file"),
    ("output via hard link", ["quantize", F, "-o", "{d}/hard.safetensors"], 2, "is the input file"),
    ("pt output is input", ["quantize", "{d}/f.pt", "-o", "{d}/f.pt"], 2, "is the input file"),
    ("quantized safetensors input", ["quantize", Q, "-o", "{d}/o1.safetensors"], 1, "already quantized"),
    ("quantized pt input", ["quantize", "{d}/dynamic.pt", "-o", "{d}/o2.safetensors"], 1, "already quantized"),
    ("int4 input", ["quantize", Q4, "-o", "{d}/o3.safetensors"], 1, "already quantized"),
    (
        "group size no layer takes",
        ["quantize", F, "--dtype", "int4", "--group-size", "48", "-o", "{d}/o4.pt"],
        1,
        "--group-size=48: no layer takes int4",
    ),
    ("include matches nothing", ["quantize", F, "--include", "encoder.*", "-o", "{d}/o5.pt"], 2, "matches no layer"),
    ("one include of two", ["quantize", F, "--include", "0", "--include", "x*", "-o", "{d}/o6.pt"], 2, "'x*'"),
    ("exclude everything", ["quantize", F, "--exclude", "*", "-o", "{d}/o7.pt"], 1, "no layer was quantized"),
    ("min-numel above all", ["quantize", F, "--min-numel", "100000", "-o", "{d}/o8.pt"], 1, "no layer"),
    ("compare Q Q", ["compare", Q, Q], 2, "same file"),
    ("compare Q Q via link", ["compare", "{d}/link.safetensors", F], 2, "same file"),
    ("compare two quantized", ["compare", "{d}/dynamic.pt", Q], 1, "already quantized"),
    ("compare with bad metadata", ["compare", F, "{d}/shape.safetensors"], 1, "shape='64x32'"),
    (
        "unknown key",
        ["quantize", "{d}/ckpt_model.pt", "--key", "nope", "-o", "{d}/o9.pt"],
        1,
        "is not in the checkpoint",
    ),
    (
        "key without weights",
        ["quantize", "{d}/ckpt_model.pt", "--key", "epoch", "-o", "{d}/o10.pt"],
        1,
        "--key='epoch'",
    ),
    ("unrecognised checkpoint", ["quantize", "{d}/ckpt_weights.pt", "-o", "{d}/o11.pt"], 1, "--key"),
    ("pickled whole model", ["quantize", "{d}/whole.pt", "-o", "{d}/o12.pt"], 1, "pickled Python objects"),
    ("a list", ["quantize", "{d}/list.pt", "-o", "{d}/o13.pt"], 1, "not a state_dict"),
    ("empty file", ["quantize", "{d}/empty.pt", "-o", "{d}/o14.pt"], 1, "truncated or corrupt"),
    ("missing file", ["quantize", "{d}/nope.pt", "-o", "{d}/o15.pt"], 1, "no such file"),
    ("missing output dir", ["quantize", F, "-o", "{d}/no/dir/o.pt"], 1, "does not exist"),
    ("output suffix", ["quantize", F, "-o", "{d}/o.txt"], 2, "must end in .safetensors"),
    ("inspect shape string", ["inspect", "{d}/shape.safetensors"], 1, "shape='64x32'"),
    ("inspect bits string", ["inspect", "{d}/bits.safetensors"], 1, "bits='8'"),
    ("inspect folded 5", ["inspect", "{d}/folded.safetensors"], 1, "folded_batchnorm=5"),
    ("inspect negative shape", ["inspect", "{d}/neg.safetensors"], 1, "shape=[-10, 64]"),
    ("inspect a float file", ["inspect", F], 1, "no mono-quant metadata"),
    ("inspect a pickle", ["inspect", "{d}/whole.pt"], 1, "truncated or corrupt"),
    ("unknown option", ["quantize", F, "--bogus"], 2, "unrecognized arguments: --bogus"),
    ("bad dtype", ["quantize", F, "--dtype", "int3"], 2, "invalid choice"),
    ("no command", [], 2, "required"),
    ("bad group size", ["quantize", F, "--dtype", "int4", "--group-size", "3", "-o", "{d}/o16.pt"], 2, "group_size=3"),
    ("group size not a number", ["quantize", F, "--group-size", "many"], 2, "invalid int value"),
]


@pytest.mark.parametrize(("case", "argv", "code", "word"), CASES, ids=[c[0] for c in CASES])
def test_cli_errors(case: str, argv: list[str], code: int, word: str, folder: Path, capsys: Any) -> None:
    before = (folder / "f.safetensors").read_bytes()
    got, _, err = run([a.format(d=folder) for a in argv], capsys)
    assert (got, len(err.splitlines())) == (code, 1), err
    assert word in err and err.startswith("mono-quant") and "\x1b" not in err and "Traceback" not in err
    assert (folder / "f.safetensors").read_bytes() == before  # the input is never touched
    assert not any(folder.glob("o[0-9]*"))  # nothing written on failure


TRAINING = [
    ("ckpt_model.pt", []),
    ("ckpt_state_dict.pt", []),
    ("ckpt_module.pt", []),
    ("ckpt_model.pt", ["--key", "model"]),
]


@pytest.mark.parametrize(("name", "extra"), TRAINING)
def test_training_checkpoints(name: str, extra: list[str], folder: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "q.safetensors"
    code, _, err = run(["quantize", str(folder / name), "-q", "-o", str(out), *extra], capsys)
    assert code == 0 and err == ""
    assert sorted(mq.load(out)[1]["layers"]) == ["0", "2"]


def test_group_size_some_layers_cannot_take_warns(folder: Path, tmp_path: Path, capsys: Any) -> None:
    out = tmp_path / "q.pt"
    code, _, err = run(
        ["quantize", str(folder / "mixed.pt"), "--dtype", "int4", "--group-size", "32", "-q", "-o", str(out)], capsys
    )
    assert code == 0 and err.startswith(
        "mono-quant: warning: --group-size=32: 1 layer(s) took int8 (no int4 group size of [32] with a kernel divides "
        "their input width): ['b']"
    )
    layers = mq.load(out)[1]["layers"]
    assert (layers["a"]["bits"], layers["a"]["group_size"], layers["b"]["bits"]) == (4, 32, 8)


def test_version(capsys: Any) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"mono-quant {mq.__version__}"


def test_version_is_2_or_later_from_one_place_in_a_real_process() -> None:
    """The index serves an unrelated mono-quant 1.x: this project is 2.x, with one version string that
    pyproject, the package and ``python -m mono_quant --version`` all read."""
    from setuptools.config.pyprojecttoml import read_configuration

    from mono_quant._version import __version__

    assert int(__version__.split(".")[0]) >= 2 and mq.__version__ == __version__
    assert read_configuration(ROOT / "pyproject.toml")["project"]["version"] == __version__
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "mono_quant", "--version"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == f"mono-quant {__version__}"


def test_pickled_model_in_a_real_process_has_no_escape_codes(folder: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FORCE_COLOR": "1", "TERM": "xterm-256color"}
    command = [sys.executable, "-m", "mono_quant", "quantize", str(folder / "whole.pt"), "-o", str(folder / "w.pt")]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
    assert "\x1b" not in proc.stderr and "pickled Python objects" in proc.stderr


def test_convert_requantizes_a_mono_quant_file(tmp_path) -> None:
    import torch

    import mono_quant as mq
    from mono_quant.cli.main import main

    torch.manual_seed(0)
    float_path, int8_path, int4_path = tmp_path / "f.safetensors", tmp_path / "q8.safetensors", tmp_path / "q4.pt"
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(64, 128), "fc.bias": torch.randn(64)}, str(float_path))
    assert main(["quantize", str(float_path), "-o", str(int8_path), "-q"]) == 0
    assert main(["quantize", str(int8_path), "-o", str(int4_path), "--dtype", "int4", "-q"]) == 1  # refused
    assert main(["quantize", str(int8_path), "-o", str(int4_path), "--dtype", "int4", "--convert", "-q"]) == 0
    state, metadata = mq.load(int4_path)
    assert metadata["layers"]["fc"]["bits"] == 4 and state["fc.weight_packed"].dtype == torch.int32


def cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mono_quant", *argv], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def bert_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A transformers folder whose model.safetensors holds the ``embeddings.position_ids`` buffer (as MiniLM's
    does: older transformers saved it; the model built today keeps it non-persistent)."""
    transformers = pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("bert_base")
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    model = transformers.BertModel(config).eval()
    model.config.save_pretrained(base)
    state = {**model.state_dict(), "embeddings.position_ids": model.embeddings.position_ids}
    save_file(state, base / "model.safetensors")
    return base


def digests(*folders: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for folder in folders for p in sorted(folder.iterdir()) if p.is_file()}


def test_quantize_then_export_a_checkpoint_holding_buffers(bert_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("compressed_tensors")
    done = cli("quantize", str(bert_base / "model.safetensors"), "-o", str(tmp_path / "q.safetensors"), "-q")
    assert done.returncode == 0, done.stderr
    done = cli("export", str(tmp_path / "q.safetensors"), "--base", str(bert_base), "--format", "hf", "-o",
               str(tmp_path / "hf"))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "embeddings.position_ids" in mq.load(tmp_path / "q.safetensors")[0]  # the buffer is in the file
    assert (tmp_path / "hf" / "config.json").is_file() and (tmp_path / "hf" / "model.safetensors").is_file()


def test_export_never_writes_over_its_input_or_base(bert_base: Path, tmp_path: Path) -> None:
    done = cli("quantize", str(bert_base / "model.safetensors"), "-o", str(tmp_path / "model.safetensors"), "-q")
    assert done.returncode == 0, done.stderr
    before = digests(bert_base, tmp_path)
    q = str(tmp_path / "model.safetensors")
    cases = [
        (["--format", "hf", "-o", str(bert_base)], "is the --base folder"),
        (["--format", "hf", "-o", str(tmp_path)], "holds the input file 'model.safetensors'"),
        (["--format", "onnx", "-o", q], "is the input file"),
    ]
    for extra, message in cases:
        done = cli("export", q, "--base", str(bert_base), *extra)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
    assert digests(bert_base, tmp_path) == before
