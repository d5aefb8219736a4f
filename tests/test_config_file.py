"""``QuantizationConfig.from_file`` (TOML/YAML/JSON) and ``mono-quant quantize --config``: params > file > defaults."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import mono_quant as mq
from mono_quant.cli import main
from mono_quant.errors import ConfigError

FILES = {
    "quant.toml": 'dtype = "int4"\ngroup_size = 32\nscheme = "asymmetric"\nexclude = ["head"]\n',
    "quant.yaml": "dtype: int4\ngroup_size: 32\nscheme: asymmetric\nexclude: [head]\n",
    "quant.json": json.dumps({"dtype": "int4", "group_size": 32, "scheme": "asymmetric", "exclude": ["head"]}),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_format_reads_the_same_config(tmp_path, name):
    path = tmp_path / name
    path.write_text(FILES[name])
    cfg = mq.QuantizationConfig.from_file(path)
    assert (cfg.dtype.value, cfg.group_size, cfg.scheme.value, cfg.exclude) == ("int4", 32, "asymmetric", ("head",))
    assert cfg.observer.value == "minmax"  # not in the file: the default


def test_parameters_win_over_the_file(tmp_path):
    path = tmp_path / "quant.toml"
    path.write_text(FILES["quant.toml"])
    cfg = mq.QuantizationConfig.from_file(path, group_size=64, dtype="int8")
    assert (cfg.dtype.value, cfg.group_size, cfg.scheme.value) == ("int8", 64, "asymmetric")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('dtype = "int4"\ngroup = 32\n', r"quant.toml: unknown option 'group'"),
        ('dtype = "int3"\n', r"quant.toml: dtype='int3' is not supported"),
        ("dtype = \n", r"quant.toml is not valid TOML"),
        ('layer_types = ["Linear"]\n', r"unknown option 'layer_types'"),
    ],
)
def test_bad_files_name_the_key_and_the_file(tmp_path, text, match):
    path = tmp_path / "quant.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        mq.QuantizationConfig.from_file(path)


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        mq.QuantizationConfig.from_file(tmp_path / "none.toml")
    (tmp_path / "q.ini").write_text("x")
    with pytest.raises(ConfigError, match=r"unknown extension '\.ini'"):
        mq.QuantizationConfig.from_file(tmp_path / "q.ini")


def test_cli_config_file_with_a_flag_that_wins(tmp_path, capsys):
    torch.manual_seed(0)
    source = tmp_path / "model.safetensors"
    save_file({"body.weight": torch.randn(16, 64), "head.weight": torch.randn(4, 64)}, source)
    (tmp_path / "quant.yaml").write_text(FILES["quant.yaml"])
    assert main(["quantize", str(source), "--config", str(tmp_path / "quant.yaml"), "--group-size", "64", "-q"]) == 0
    _, metadata = mq.load(tmp_path / "model.int4.safetensors")
    assert metadata["config"]["group_size"] == 64 and metadata["config"]["scheme"] == "asymmetric"
    assert set(metadata["layers"]) == {"body"}  # exclude = [head] came from the file
