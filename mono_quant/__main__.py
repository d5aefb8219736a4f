"""``python -m mono_quant``: the ``mono-quant`` command line (see ``mono_quant.cli.main``)."""

import sys

from mono_quant.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
