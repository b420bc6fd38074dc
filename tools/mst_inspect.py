"""`mst-inspect` without installing the console script: python tools/mst_inspect.py llama --tokens 32768

The CLI lives in the library (`mst_fx.inspect.cli`); see its docstring or `--help`.
"""

import sys

from mst_fx.explain_model import inspect_main

if __name__ == "__main__":
    sys.exit(inspect_main())
