"""Save faults lose nothing: every failure is a ``SerializationError`` with the reason, the destination
keeps its old bytes, no temporary file survives the next save (even after SIGKILL), modes follow the
umask, symlinks are written through (``save_pretrained`` replaces them: a shared cache); a loaded model is
independent of its file (checked in a child); ``quantize_checkpoint`` leaves nothing on failure."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kit.bad_input import expect, model
from safetensors import SafetensorError

import mono_quant as mq
from mono_quant.io.disk import TMP_PREFIX, stale_temp_files, temp_name

SE = mq.SerializationError
ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = (".safetensors", ".pt")


def quantized_model(seed: int = 0) -> Any:
    return mq.quantize(model(seed)).model


def temps(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(TMP_PREFIX)]


INJECTED = [
    ("ENOSPC", OSError(errno.ENOSPC, "No space left on device"), "no space left"),
    ("EDQUOT", OSError(errno.EDQUOT, "Disk quota exceeded"), "quota"),
    ("EPERM", OSError(errno.EPERM, "Operation not permitted"), "not permitted"),
    ("EACCES", PermissionError(errno.EACCES, "Permission denied"), "permission denied"),
    ("EROFS", OSError(errno.EROFS, "Read-only file system"), "read-only"),
    ("EFBIG", OSError(errno.EFBIG, "File too large"), "too large"),
    (
        "safetensors ENOSPC",
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
        "no space",
    ),
    ("torch unexpected pos", RuntimeError("unexpected pos 4096 vs 1822"), "disk full?"),
    ("torch write failed", RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"), "failed"),
]


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("case", "error", "word"), INJECTED, ids=[c[0] for c in INJECTED])
def test_injected_write_faults(
    case: str, error: Exception, word: str, suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / f"m{suffix}"
    mq.save(quantized_model(0), path)
    before = path.read_bytes()

    def fail(*args: Any, **kwargs: Any) -> None:
        Path(args[1]).write_bytes(b"partial")  # what a writer leaves when the disk fills up
        raise error

    monkeypatch.setattr("mono_quant.io.save.save_file" if suffix == ".safetensors" else "torch.save", fail)
    with expect(SE, word):
        mq.save(quantized_model(1), path)
    assert path.read_bytes() == before and temps(tmp_path) == []


@contextlib.contextmanager
def mounted_tmpfs(folder: Path, options: str) -> Iterator[Path]:
    """A real small or read-only file system (needs root; skipped elsewhere)."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)  # lazy: a failed write may hold a handle


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_real_full_disk(suffix: str, tmp_path: Path) -> None:
    big = mq.quantize(torch.nn.Sequential(torch.nn.Linear(1024, 1024))).model  # ~1 MB of int8
    with mounted_tmpfs(tmp_path / "small", "size=512k") as folder:
        path = folder / f"m{suffix}"
        mq.save(quantized_model(0), path)
        before = path.read_bytes()
        with expect(SE, "no space left" if suffix == ".safetensors" else "disk full?"):  # torch hides errno
            mq.save(big, path)
        assert path.read_bytes() == before and temps(folder) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_read_only_directory(suffix: str, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        with mounted_tmpfs(tmp_path / "ro", "ro,size=64k") as folder, expect(SE, "read-only"):
            mq.save(quantized_model(), folder / f"m{suffix}")
        return
    tmp_path.chmod(0o555)
    try:
        with expect(SE, "permission denied"):
            mq.save(quantized_model(), tmp_path / f"m{suffix}")
    finally:
        tmp_path.chmod(0o755)


PATH_CASES = [
    ("name over 255 bytes", lambda d: d / ("m" * 300 + ".safetensors"), "file name too long"),
    ("missing directory", lambda d: d / "nope" / "m.safetensors", "does not exist"),
    ("a directory", lambda d: (d / "dir.safetensors").mkdir() or d / "dir.safetensors", "is a directory"),
    ("unknown extension", lambda d: d / "m.bin", "unknown extension"),
    ("file as parent", lambda d: (d / "f").write_bytes(b"") or d / "f" / "m.pt", "does not exist"),
]


@pytest.mark.parametrize(("case", "make", "word"), PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_bad_destinations(case: str, make: Any, word: str, tmp_path: Path) -> None:
    with expect(SE, word):
        mq.save(quantized_model(), make(tmp_path))
    assert temps(tmp_path) == []


def test_long_name_that_fits_saves(tmp_path: Path) -> None:
    path = tmp_path / ("m" * 240 + ".safetensors")
    mq.save(quantized_model(), path)
    assert mq.load(path)[1]["layers"]["0"]["class"] == "Int8Linear" and temps(tmp_path) == []


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_modes_follow_the_umask(umask: int, mode: int, suffix: str, tmp_path: Path) -> None:
    old = os.umask(umask)
    try:
        mq.save(quantized_model(), tmp_path / f"m{suffix}")
    finally:
        os.umask(old)
    assert (tmp_path / f"m{suffix}").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("relative", [False, True])
def test_saving_over_a_symlink_writes_through_it(relative: bool, tmp_path: Path) -> None:
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "real.safetensors"
    mq.save(quantized_model(0), target)
    link = tmp_path / "current.safetensors"
    link.symlink_to(Path("store") / "real.safetensors" if relative else target)
    mq.save(quantized_model(1), link)
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert torch.equal(mq.load(target)[0]["0.weight"], quantized_model(1)[0].weight)


def test_sweep_keeps_live_and_foreign_temps(tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    dead = temp_name(path, pid=2**22 + 7)  # above the default pid_max: no such process
    live, other = temp_name(path), temp_name(tmp_path / "other.pt", pid=2**22 + 7)
    for p in (dead, live, other):
        p.write_bytes(b"x")
    assert stale_temp_files(path) == [dead]
    mq.save(quantized_model(), path)
    assert not dead.exists() and live.exists() and other.exists()


# ------------------------------------------------------------------------------------- child processes

SAVER = """
import sys, torch, mono_quant as mq
q = mq.quantize(torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.Linear(2048, 2048))).model
print("ready", flush=True)
while True:
    mq.save(q, sys.argv[1])
"""


def child(script: str, *args: str, **kwargs: Any) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], env=env, text=True, **kwargs)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_sigkill_mid_save_leaves_nothing_after_the_next_save(suffix: str, tmp_path: Path) -> None:
    path, seen = tmp_path / f"m{suffix}", 0
    for _ in range(3):
        proc = child(SAVER, str(path), stdout=subprocess.PIPE)
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not temps(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen += bool(temps(tmp_path))
    assert seen >= 1  # a kill mid-write left a temporary file behind
    mq.save(quantized_model(), path)
    assert temps(tmp_path) == [] and mq.load(path)[1]["layers"]["0"]["class"] == "Int8Linear"


USER = """
import sys, torch, mono_quant as mq
from torch import nn
path, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
skeleton = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
loaded = mq.load(path, skeleton)
x = torch.randn(16, 512)
before = loaded(x)
print("loaded", flush=True)
sys.stdin.readline()  # the parent truncates and replaces the file meanwhile
print("same" if torch.equal(loaded(x), before) else "changed", flush=True)
"""


@pytest.mark.parametrize("mode", ["dynamic", "weight_only", "static"])
def test_truncating_the_file_under_a_loaded_model_in_a_child(mode: str, tmp_path: Path) -> None:
    def build(seed: int) -> Any:
        torch.manual_seed(seed)
        net = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
        return mq.quantize(net, mode=mode, calibration_data=[torch.randn(16, 512)]).model

    path = tmp_path / "m.safetensors"
    mq.save(build(0), path)
    proc = child(USER, str(path), mode, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "loaded"
    os.truncate(path, 64)  # without a private copy: SIGBUS on the next forward
    with open(path, "r+b") as handle:  # then new bytes in place (changed outputs through a shared map)
        handle.write(b"\0" * 64)
    mq.save(build(1), path)
    out, _ = proc.communicate("go\n", timeout=120)
    assert proc.returncode == 0 and out.strip() == "same"


@pytest.mark.parametrize("shard_size", ["2GB", "40KB"])
def test_save_pretrained_replaces_links_into_a_shared_cache(shard_size: str, tmp_path: Path) -> None:
    """The Hugging Face cache layout: snapshot files are links into ../../blobs, shared between revisions."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=128, max_position_embeddings=32)  # fmt: skip
    float_model = transformers.BertModel(config).eval()
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    float_model.save_pretrained(blobs)
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / name)
    before = {p.name: p.read_bytes() for p in blobs.iterdir()}
    mq.save_pretrained(mq.quantize(float_model).model, snapshot, max_shard_size=shard_size)
    assert {p.name: p.read_bytes() for p in blobs.iterdir()} == before  # the shared blobs are untouched
    assert not any(p.is_symlink() for p in snapshot.iterdir())  # links replaced (or, sharded, removed)
    assert (snapshot / "model.safetensors").exists() == (shard_size == "2GB")
    loaded = mq.load(snapshot, transformers.BertModel(config))
    assert type(loaded.encoder.layer[0].output.dense).__name__ == "Int8Linear" and temps(snapshot) == []


def checkpoint_source(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(tensors, folder / "model.safetensors")
    return folder


def test_quantize_checkpoint_on_a_full_disk_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import mono_quant.io.hf_write as hf_write

    tensors = {f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}
    src = checkpoint_source(tmp_path / "src", tensors)
    calls, original = [], hf_write.append

    def append(path: Path, data: memoryview) -> None:
        calls.append(path)
        if len(calls) > 3:  # some bytes are written first
            raise OSError(errno.ENOSPC, "No space left on device")
        original(path, data)

    monkeypatch.setattr(hf_write, "append", append)
    with expect(SE, "no space left on the device"):
        mq.quantize_checkpoint(src, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder


BAD_WEIGHTS = [
    ("float8", torch.randn(16, 64).to(torch.float8_e4m3fn), "float8_e4m3fn weight"),
    ("zero rows", torch.randn(0, 64), "holds no values"),
]


@pytest.mark.parametrize(("case", "weight", "reason"), BAD_WEIGHTS, ids=[c[0] for c in BAD_WEIGHTS])
def test_quantize_checkpoint_copies_weights_it_cannot_quantize(case: str, weight: Any, reason: str,
                                                              tmp_path: Path) -> None:  # fmt: skip
    src = checkpoint_source(tmp_path / "src", {"odd.weight": weight, "fc.weight": torch.randn(64, 64)})
    result = mq.quantize_checkpoint(src, tmp_path / "q", progress=False)
    assert reason in result.report.skipped["odd"] and [row.name for row in result.report.layers] == ["fc"]
    state, metadata = mq.load(tmp_path / "q" / "model.safetensors")
    assert state["odd.weight"].dtype == weight.dtype and state["odd.weight"].view(torch.uint8).equal(
        weight.view(torch.uint8))  # fmt: skip
    assert reason in metadata["skipped"]["odd"]


def test_quantize_checkpoint_refuses_an_empty_layer_name(tmp_path: Path) -> None:
    src = checkpoint_source(tmp_path / "src", {".weight": torch.randn(64, 64)})
    with expect(SE, "tensor '.weight' has an empty part in its name"):
        mq.quantize_checkpoint(src, tmp_path / "q", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
