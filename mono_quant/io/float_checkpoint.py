"""Reading float checkpoints for the command line: plain state_dicts, training checkpoints (the
weights under ``state_dict``/``model``/``module`` or a key the user names), never a mono-quant file.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mono_quant.errors import SerializationError
from mono_quant.io.format import METADATA_KEY

WEIGHT_KEYS = ("state_dict", "model", "module")


def read_state_dict(
    path: str | os.PathLike, key: str | None = None, *, convert: bool = False
) -> dict[str, torch.Tensor]:
    """A plain float state_dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    A training checkpoint is unwrapped: the dict under ``key``, or else the first of ``state_dict``,
    ``model``, ``module`` that holds only tensors. A file written by mono-quant is refused unless
    ``convert`` (then its weights come back dequantized to float, to be quantized again).

    Example:
        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pt")
        >>> torch.save({"model": {"fc.weight": torch.ones(2, 2)}, "optimizer": {}, "epoch": 3}, path)
        >>> list(read_state_dict(path))
        ['fc.weight']
    """
    from mono_quant.io.load import sniff

    path = Path(path)
    if not path.is_file():
        raise SerializationError(f"cannot read {path}: no such file")
    try:
        if sniff(path) == "safetensors":
            with safe_open(str(path), framework="pt") as handle:
                quantized = METADATA_KEY in (handle.metadata() or {})
            obj = None if quantized else load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            quantized = isinstance(obj, dict) and METADATA_KEY in obj and "tensors" in obj
    except pickle.UnpicklingError as err:
        raise SerializationError(
            f"cannot read {path}: it holds pickled Python objects, not only tensors (a whole pickled model?), "
            "which are not loaded for safety; save model.state_dict() and pass that file"
        ) from err
    except Exception as err:
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise SerializationError(
            f"cannot read {path}: not a readable checkpoint (truncated or corrupt?): {detail}"
        ) from err
    if quantized and convert:
        from mono_quant.io.load import load

        return load(path, dequantize=True)[0]
    if quantized:
        raise SerializationError(
            f"{path} is already quantized by mono-quant; pass the float checkpoint it was made from "
            "(mono-quant inspect shows what it holds), or --convert to dequantize and quantize it again"
        )
    return _unwrap(path, obj, key)


def _unwrap(path: Path, obj: Any, key: str | None) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict):
        raise SerializationError(f"cannot read {path}: holds a {type(obj).__name__}, not a state_dict")
    keys = sorted(map(str, obj))
    if key is not None:
        if key not in obj:
            raise SerializationError(f"cannot read {path}: --key={key!r} is not in the checkpoint; its keys are {keys}")
        if not _is_state_dict(obj[key]):
            raise SerializationError(f"cannot read {path}: --key={key!r} does not hold a state_dict of tensors")
        return obj[key]
    if _is_state_dict(obj):
        return obj
    found = next((k for k in WEIGHT_KEYS if _is_state_dict(obj.get(k))), None)
    if found is not None:
        return obj[found]
    bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    raise SerializationError(
        f"cannot read {path}: entry {bad!r} is not a tensor and no state_dict was found under {list(WEIGHT_KEYS)}; "
        f"the checkpoint's keys are {keys[:10]}: pick the weights with --key"
    )


def _is_state_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (after ``..``, symlinks and hard links).

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / "m.pt").write_bytes(b"x")
        >>> same_file(folder / "m.pt", folder / "sub" / ".." / "m.pt"), same_file(folder / "m.pt", folder / "n.pt")
        (True, False)
    """
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
