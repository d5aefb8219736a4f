"""Reading a config file (TOML, YAML, JSON) into a plain mapping, within bounds, and short value reprs for messages.

A config file is small: files over ``MAX_FILE_BYTES``, YAML whose aliases expand to more than ``MAX_VALUES``
values (a "billion laughs" of nested anchors), aliases that refer to themselves, and nesting deeper than
the parser's recursion limit are refused with a ``ConfigError`` naming the file, before anything expands.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

from mono_quant.errors import ConfigError

MAX_FILE_BYTES = 1 << 20  # a config file of options; anything larger is not one
MAX_VALUES = 10_000  # values in a YAML document once its aliases are expanded
MAX_REPR_CHARS = 120

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 6, 6, 4, 6
_REPR.maxstring = _REPR.maxother = 60


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to ``MAX_REPR_CHARS`` characters (and a few levels and items), fast on any value.

    Example:
        >>> short_repr("abc"), short_repr([[1, 2]] * 1000)[:30]
        ("'abc'", '[[1, 2], [1, 2], [1, 2], [1, 2')
        >>> len(short_repr("x" * 10_000)) <= MAX_REPR_CHARS
        True
    """
    text = _REPR.repr(value)
    return text if len(text) <= MAX_REPR_CHARS else text[: MAX_REPR_CHARS - 3] + "..."


def read_options(path: Path) -> dict[str, Any]:
    """The mapping in a ``.toml``, ``.yaml``/``.yml`` or ``.json`` file, or a ``ConfigError`` naming the file.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "q.yaml"
        >>> _ = path.write_text("dtype: int4\\nexclude: &heads [head, classifier]\\ninclude: *heads\\n")
        >>> read_options(path)
        {'dtype': 'int4', 'exclude': ['head', 'classifier'], 'include': ['head', 'classifier']}
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: unknown extension {suffix!r}; expected .toml, .yaml, .yml or .json")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ConfigError(f"config file {path} has {size} bytes; a config file holds at most {MAX_FILE_BYTES}")
    kind = "YAML" if suffix in (".yaml", ".yml") else suffix[1:].upper()
    try:
        text = path.read_text()
        if suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif kind == "YAML":
            data = _read_yaml(text, path)
        else:
            data = json.loads(text)
    except ConfigError:
        raise
    except ImportError as err:
        raise ConfigError(f"config file {path}: reading {suffix} needs {err.name} (pip install pyyaml)") from None
    except RecursionError:
        raise ConfigError(f"config file {path} nests its values too deeply to be a config file") from None
    except ValueError as err:  # TOML and JSON syntax, text that is not UTF-8
        raise ConfigError(f"config file {path} is not valid {kind}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of options, not {type(data).__name__}")
    return data


def _read_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load`` that measures the document's node graph (aliases expanded) before building it."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, path)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    finally:
        loader.dispose()


def _check_expanded_size(root: Any, path: Path) -> None:
    """Count the values of a composed YAML node graph as if every alias were expanded, without expanding it
    (each node is visited once); refuse graphs over ``MAX_VALUES`` and aliases that contain themselves."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are being counted: meeting one again is a cycle
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[key] > MAX_VALUES:
                raise ConfigError(
                    f"config file {path}: its YAML aliases expand to more than {MAX_VALUES} values "
                    f"(near line {node.start_mark.line + 1}); a config file needs far fewer"
                )
        elif key in open_nodes:
            raise ConfigError(f"config file {path}: a YAML alias contains itself (line {node.start_mark.line + 1})")
        elif key not in sizes:
            open_nodes.add(key)
            stack.append((node, True))
            stack.extend((child, False) for child in children if id(child) not in sizes)


def _children(node: Any) -> list[Any]:
    import yaml

    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []
