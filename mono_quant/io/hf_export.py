"""``save_pretrained``: a quantized ``transformers`` model as a Hugging Face directory that loads without
mono-quant (``transformers`` + the ``compressed-tensors`` package), like vLLM and friends read it.

The directory holds ``config.json`` (the model's config plus a compressed-tensors ``quantization_config``,
one config group per scheme, targets by exact module name) and safetensors weights in compressed-tensors
layouts, sharded with an index above ``max_shard_size``:

- int8 (``int-quantized`` with dynamic per-token or static per-tensor activations, ``naive-quantized`` for
  weight-only): ``weight`` int8, ``weight_scale`` ``[out, 1]`` (``[1]`` per tensor), ``weight_zero_point``
  like the scale when asymmetric; static ``input_scale`` ``[1]`` (+ ``input_zero_point`` ``[1]`` when not 0).
- int4 symmetric Linear (``pack-quantized``): ``weight_packed`` int32 ``[out, in/8]``, ``weight_scale``
  ``[out, in/group]``, ``weight_shape``.
- int4 asymmetric or Embedding (``naive-quantized``, 4 bits): ``weight`` int8 holding the int4 values,
  ``weight_scale`` and ``weight_zero_point`` ``[out, in/group]``. transformers 5.24 + compressed-tensors 0.20.1
  cannot load a packed group zero point (the model it builds expects the unpacked shape: a size mismatch)
  nor a packed Embedding (its weight initialisation fails), so these keep the exact values one per byte.

mono-quant's own files keep per-channel scales ``[out]`` (what the kernels use, and what every file written
so far holds: no format change, no version bump); only this export reshapes, and ``mq.load`` undoes it
(``io/hf_read.py``). Which classes have a compressed-tensors layout is the class's own word
(``QuantizedLayer.hf_exportable``); the others (convolutions, transposed ``Conv1D`` and ``MultiheadAttention``
weights, fp16/bf16 layers, plugin layers by default) are written as float weights through their
``dequantize()``, listed in ``ignore``, with a warning naming them.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mono_quant.errors import ConfigError, SerializationError
from mono_quant.graph.folding import FoldedBatchNorm
from mono_quant.io.hf_write import FolderWriter, to_compressed_tensors
from mono_quant.io.save import compressed_tensors_config, file_metadata, model_layers
from mono_quant.modules import quantized_layers
from mono_quant.modules.attach import attached_tensors, expected_keys
from mono_quant.modules.base import require

DEFAULT_MAX_SHARD_SIZE = "2GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def save_pretrained(
    q_model: nn.Module, out_dir: str | os.PathLike, *, max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE
) -> Path:
    """Write ``q_model`` (a quantized ``transformers`` model) to ``out_dir`` for ``AutoModel.from_pretrained``.

    ``max_shard_size`` (bytes, or ``"500MB"``/``"2GB"``) splits the weights into
    ``model-0000K-of-0000N.safetensors`` shards with a ``model.safetensors.index.json`` when exceeded.
    Returns the directory. Loading needs ``transformers`` and ``compressed-tensors``, not mono-quant.

    Example:
        >>> import json, tempfile, mono_quant as mq
        >>> from transformers import BertConfig, BertModel
        >>> cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ...                  intermediate_size=64)
        >>> q, _ = mq.dynamic_quantize(BertModel(cfg).eval())
        >>> out = save_pretrained(q, tempfile.mkdtemp())
        >>> qc = json.loads((out / "config.json").read_text())["quantization_config"]
        >>> qc["quant_method"], sorted(p.name for p in out.iterdir())
        ('compressed-tensors', ['config.json', 'model.safetensors'])
    """
    config = getattr(q_model, "config", None)
    if not isinstance(q_model, nn.Module) or not callable(getattr(config, "to_dict", None)):
        raise ConfigError(
            f"save_pretrained: q_model must be a quantized transformers model (an nn.Module with a .config), "
            f"got {type(q_model).__name__}"
        )
    limit = shard_limit(max_shard_size)
    tensors, layers, ignored = hf_tensors(q_model)
    if not layers:
        raise ConfigError("save_pretrained: q_model has no quantized layers; expected the output of mq.quantize")
    if ignored:
        warnings.warn(
            f"save_pretrained: {len(ignored)} layer(s) have no compressed-tensors layout and are written as "
            f"float weights: {', '.join(ignored[:8])}{' ...' if len(ignored) > 8 else ''}",
            stacklevel=2,
        )
    quantization_config = compressed_tensors_config(layers, None, None)
    quantization_config["ignore"] = ignored
    document = {**config.to_dict(), "quantization_config": quantization_config}
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SerializationError(f"save_pretrained: cannot create out_dir {out}: {err}") from err
    folded = {name: m.into for name, m in q_model.named_modules() if isinstance(m, FoldedBatchNorm)}
    writer = FolderWriter(out, limit)
    for key, value in tensors.items():
        writer.add({key: value})
    writer.finish(file_metadata(layers, None, None, folded), document, "model.safetensors")
    return out


def shard_limit(max_shard_size: int | str) -> int:
    """``max_shard_size`` in bytes: an int, or a string such as ``"500MB"``, ``"2GB"``, ``"64KiB"``.

    Example:
        >>> shard_limit("500MB"), shard_limit("1KiB"), shard_limit(4096)
        (500000000, 1024, 4096)
    """
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool) and max_shard_size > 0:
        return max_shard_size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(max_shard_size), re.IGNORECASE)
    if isinstance(max_shard_size, str) and match and float(match[1]) > 0:
        return int(float(match[1]) * _UNITS[(match[2] or "").upper()])
    raise ConfigError(
        f"max_shard_size must be a positive number of bytes or a size such as '500MB' or '2GB', got {max_shard_size!r}"
    )


def hf_tensors(q_model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], list[str]]:
    """The compressed-tensors state of ``q_model``: tensors, per-layer entries of the quantized layers
    written in a compressed-tensors layout, and the names of the layers written as float.

    Example:
        >>> import mono_quant as mq
        >>> q, _ = mq.dynamic_quantize(nn.Sequential(nn.Linear(16, 4)))
        >>> tensors, layers, ignored = hf_tensors(q)
        >>> tuple(tensors["0.weight_scale"].shape), list(layers), ignored
        ((4, 1), ['0'], [])
    """
    tensors = dict(q_model.state_dict())
    entries = model_layers(q_model)
    attached = attached_tensors(q_model)
    layers: dict[str, dict[str, Any]] = {}
    ignored: list[str] = []
    for name, layer in quantized_layers(q_model).items():
        attachment = attached[name][0] if name in attached else None
        prefix = f"{name}." if name else ""
        own = {key: prefix + full for key, full in expected_keys(layer, attachment and attachment.attribute).items()}
        plain = attachment is None or (attachment.attribute == "weight" and not attachment.transposed
                                       and attachment.kind in ("linear", "embedding"))  # fmt: skip
        if layer.hf_exportable and plain:  # the class says its state_dict is a compressed-tensors layout
            layers[name] = entries[name]
            to_compressed_tensors(tensors, own, layers[name])
            continue
        for full in own.values():
            tensors.pop(full, None)
        action = f"save_pretrained: layer {name!r} (no compressed-tensors layout, so written as float)"
        if attachment is None:
            tensors.update({prefix + k: v for k, v in require(layer, "dequantize", action).state_dict().items()})
        else:
            weight = require(layer, "dequantized_weight", action)
            original = attached[name][1]
            weight = weight.t() if attachment.transposed else weight
            tensors[prefix + attachment.attribute] = weight.reshape(original.shape).to(original.dtype)
        ignored.append(name)
    return tensors, layers, ignored
