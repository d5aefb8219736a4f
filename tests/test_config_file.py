"""``QuantizationConfig.from_file`` (TOML/YAML/JSON) and ``mono-quant quantize --config``: params > file > defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import mono_quant as mq
from mono_quant.cli.main import main
from mono_quant.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

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


def _billion_laughs() -> str:
    """Nine levels of nested YAML aliases under ``exclude:`` (a few hundred bytes, 9**9 strings expanded)."""
    level = "&l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"
    for i in range(1, 9):
        level = f"&l{i} [{level}, " + ", ".join([f"*l{i - 1}"] * 8) + "]"
    return f"dtype: int8\nexclude: {level}\n"


def test_yaml_aliases_that_expand_past_the_bound_are_refused_before_expanding(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(_billion_laughs())
    assert path.stat().st_size < 600
    code = (
        "import mono_quant as mq\n"
        f"try:\n    mq.QuantizationConfig.from_file({str(path)!r})\n"
        "except mq.ConfigError as err:\n    print(err)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert "laughs.yaml" in proc.stdout and "aliases expand to more than" in proc.stdout
    assert len(proc.stdout) < 400  # never the expanded value


def test_yaml_aliases_within_the_bound_still_work_and_a_self_alias_is_refused(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("include: &h [head, classifier]\nexclude: *h\n")
    assert mq.QuantizationConfig.from_file(path).exclude == ("head", "classifier")
    path.write_text("exclude: &a [x, *a]\n")
    with pytest.raises(ConfigError, match=r"ok\.yaml: a YAML alias contains itself"):
        mq.QuantizationConfig.from_file(path)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("deep.json", '{"exclude": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        ("deep.toml", "exclude = " + "[" * 100_000 + "]" * 100_000 + "\n"),
        ("deep.yaml", "exclude: " + "[" * 100_000 + "]" * 100_000 + "\n"),
    ],
)
def test_deeply_nested_files_are_a_config_error_naming_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{name} nests its values too deeply"):
        mq.QuantizationConfig.from_file(path)


def test_nesting_below_the_parser_limit_gets_a_short_message(tmp_path):
    path = tmp_path / "nested.json"
    path.write_text(json.dumps({"exclude": [[["x" * 5000]] * 50]}))
    with pytest.raises(ConfigError, match=r"nested\.json: exclude=.* must be a glob pattern") as err:
        mq.QuantizationConfig.from_file(path)
    assert len(str(err.value)) < 300


@pytest.mark.parametrize("text", ['percentile = "abc"\n', 'percentile = ["99"]\n', "percentile = true\n"])
def test_a_percentile_that_is_not_a_number_names_the_field_and_what_is_expected(tmp_path, text):
    path = tmp_path / "quant.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"quant\.toml: percentile=.* must be a number in \(50, 100\]"):
        mq.QuantizationConfig.from_file(path)


BAD_TYPES = [["a"], {"a": 1}, None, 1.5]


@pytest.mark.parametrize(
    ("field", "value"),
    [(f, v) for f in ("dtype", "mode", "percentile", "observer") for v in BAD_TYPES]
    + [("exclude", {"a": "b"}), ("exclude", 1.5), ("exclude", [["x"]])],
)
def test_wrong_types_in_a_file_are_config_errors(tmp_path, field, value):
    path = tmp_path / "quant.json"
    path.write_text(json.dumps({field: value}))
    with pytest.raises(ConfigError, match=rf"quant\.json: {field}="):
        mq.QuantizationConfig.from_file(path)


def test_a_file_too_large_to_be_a_config_is_refused_unread(tmp_path):
    path = tmp_path / "big.json"
    path.write_text('{"exclude": ["' + "x" * (2 << 20) + '"]}')
    with pytest.raises(ConfigError, match=r"big\.json has \d+ bytes; a config file holds at most"):
        mq.QuantizationConfig.from_file(path)
