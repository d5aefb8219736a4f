"""Bytes on disk: atomic writes that follow the umask and sweep their own leftovers, and safetensors
reads into private memory (no memory map ties a loaded model to its file).

Temporary files are named ``.mq-tmp-<pid>-<random>-<name>`` next to the destination. A symlink at the
destination is resolved first (the link is kept and its target replaced), unless ``follow_links=False``
(a Hugging Face folder whose files link into a shared cache: the link itself is replaced by the new file).
A save sweeps the temporary files of the same destination whose writing process is gone (killed mid-save).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import torch

from mono_quant.errors import SerializationError

if TYPE_CHECKING:
    import numpy as np

TMP_PREFIX = ".mq-tmp-"
_NAME_KEEP = 160  # characters of the destination name kept in a temporary name (NAME_MAX is 255)
_CHUNK = 64 << 20
_REASONS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large",
    errno.EISDIR: "is a directory",
}


def temp_name(path: Path, pid: int | None = None) -> Path:
    """A unique, recognisable temporary path next to ``path``.

    Example:
        >>> temp_name(Path("/d/m.safetensors"), pid=7).name.startswith(".mq-tmp-7-")
        True
    """
    return path.with_name(
        f"{TMP_PREFIX}{os.getpid() if pid is None else pid}-{secrets.token_hex(4)}-{path.name[:_NAME_KEEP]}"
    )


def stale_temp_files(path: Path) -> list[Path]:
    """Temporary files of saves to ``path`` whose writing process no longer exists.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = temp_name(folder / "m.pt", pid=2**22 + 1).write_bytes(b"x")  # no such process
        >>> [p.name.split("-")[-1] for p in stale_temp_files(folder / "m.pt")]
        ['m.pt']
    """
    stale = []
    with contextlib.suppress(OSError):
        for entry in path.parent.iterdir():
            pid, _, rest = entry.name.removeprefix(TMP_PREFIX).partition("-")
            if not entry.name.startswith(TMP_PREFIX) or not pid.isdigit():
                continue
            if rest.partition("-")[2] == path.name[:_NAME_KEEP] and not process_alive(int(pid)):
                stale.append(entry)
    return stale


def sweep_stale_temps(folder: Path) -> None:
    """Remove every temporary file in ``folder`` whose writing process no longer exists.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = temp_name(folder / "m.pt", pid=2**22 + 1).write_bytes(b"x")  # no such process
        >>> sweep_stale_temps(folder); list(folder.iterdir())
        []
    """
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            pid = entry.name.removeprefix(TMP_PREFIX).partition("-")[0]
            if entry.name.startswith(TMP_PREFIX) and pid.isdigit() and not process_alive(int(pid)) and entry.is_file():
                with contextlib.suppress(OSError):
                    entry.unlink()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (this one counts; another user's counts).

    Example:
        >>> process_alive(os.getpid()), process_alive(2**22 + 1)
        (True, False)
    """
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def atomic_write(path: str | os.PathLike, write: Callable[[str], None], *, follow_links: bool = True) -> None:
    """Write through ``write(temp_path)`` and rename over ``path``: ``path`` is either the old or the new file.

    The new file gets the mode a plain ``open`` would give (``0o666`` minus the umask); a symlink at
    ``path`` is followed and kept, or with ``follow_links=False`` replaced by the new file (its target is
    left alone). Any failure raises ``SerializationError`` and leaves ``path`` intact.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "a.bin"
        >>> atomic_write(target, lambda tmp: Path(tmp).write_bytes(b"ok"))
        >>> target.read_bytes()
        b'ok'
    """
    shown = Path(path)
    target = Path(os.path.realpath(shown)) if follow_links else Path(os.path.realpath(shown.parent)) / shown.name
    try:
        is_dir, parent_is_dir = target.is_dir() and not target.is_symlink(), target.parent.is_dir()
    except OSError as err:  # e.g. a name longer than the file system allows
        raise SerializationError(f"cannot save to {shown}: {describe_os_error(err)}") from err
    if is_dir:
        raise SerializationError(f"cannot save to {shown}: it is a directory; pass a file path")
    if not parent_is_dir:
        raise SerializationError(f"cannot save to {shown}: directory {target.parent} does not exist")
    for stale in stale_temp_files(target):
        with contextlib.suppress(OSError):
            stale.unlink()
    tmp = temp_name(target)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies here
        mode = tmp.stat().st_mode & 0o777
        write(str(tmp))
        os.chmod(tmp, mode)  # safetensors replaces the file with a 0600 one
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except Exception as err:  # OSError, SafetensorError, torch's RuntimeError("unexpected pos") on a full disk
        raise SerializationError(
            f"cannot save to {shown}: {describe_os_error(err)}; the destination is unchanged"
        ) from err
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def describe_os_error(err: BaseException) -> str:
    """A short reason for a failed write, whatever library raised it.

    Example:
        >>> describe_os_error(OSError(28, "No space left on device"))
        'no space left on the device (errno 28)'
        >>> describe_os_error(RuntimeError("I/O error: Permission denied (os error 13)"))
        'permission denied (errno 13)'
    """
    code = err.errno if isinstance(err, OSError) else None
    text = " ".join(str(err).split())
    if code is None:
        patterns = ("code: {},", "[Errno {}]", "(os error {})")  # Rust's io::Error, Python's, safetensors'
        code = next((c for c in _REASONS if any(p.format(c) in text for p in patterns)), None)
    if code in _REASONS:
        return f"{_REASONS[code]} (errno {code})"
    if "unexpected pos" in text:
        return f"the write stopped short (disk full?): {text}"
    return text or type(err).__name__


def read_safetensors(path: Path, names: list[str], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Copy the named tensors of a (header-validated) safetensors file into fresh, 64-byte aligned memory.

    Unlike ``safe_open`` (a copy-on-write memory map), nothing refers to the file afterwards: truncating
    or replacing it cannot change or crash the tensors.

    Example:
        >>> import tempfile
        >>> from safetensors.torch import save_file
        >>> path = Path(tempfile.mkdtemp()) / "t.safetensors"
        >>> save_file({"a": torch.arange(3.0)}, str(path))
        >>> read_safetensors(path, ["a"], {"a": torch.float32})["a"]
        tensor([0., 1., 2.])
    """
    with open(path, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        start = 8 + size
        out = {}
        for name in names:
            info = header[name]
            begin, end = info["data_offsets"]
            tensor = torch.empty(info["shape"], dtype=dtypes[name])
            nbytes = tensor.numel() * tensor.element_size()
            if end - begin != nbytes:
                raise SerializationError(
                    f"cannot load {path}: tensor {name!r} has {end - begin} bytes, expected {nbytes}"
                )
            if nbytes:
                handle.seek(start + begin)
                _read_exactly(handle, tensor.reshape(-1).view(torch.uint8).numpy(), path, name)
            out[name] = tensor
    return out


def _read_exactly(handle: BinaryIO, array: np.ndarray, path: Path, name: str) -> None:
    view = memoryview(array).cast("B")
    for offset in range(0, len(view), _CHUNK):
        piece = view[offset : offset + _CHUNK]
        if handle.readinto(piece) != len(piece):
            raise SerializationError(f"cannot load {path}: the file ends inside tensor {name!r} (truncated?)")
