"""The one version string of mono-quant (read by ``pyproject.toml``, the CLI and file metadata).

Version 2 and later: the package index serves an unrelated ``mono-quant`` 1.x, so this project starts
at 2.0.0 and is installed from its checkout, never by name.
"""

__version__ = "2.0.0"
