"""Put this folder on PYTHONPATH (`python -m arfusion shim-path`) to install arfusion's
`flashinfer.comm` hook in every Python process that starts (arfusion.shim; it does
nothing unless ARFUSION_FLASHINFER_COMM is set). Then the `sitecustomize` this one
hides, if any, runs as it would have."""

import importlib.util
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
# Read here first: importing arfusion imports torch, which no process pays unless asked.
if os.environ.get("ARFUSION_FLASHINFER_COMM", "").strip() not in ("", "0"):
    try:
        from arfusion.shim import install_from_env

        install_from_env()
    except ImportError as e:  # arfusion not importable in this interpreter
        print(f"arfusion's sitecustomize: {e}", file=sys.stderr)
for folder in sys.path:
    if folder and os.path.abspath(folder) != here:
        path = os.path.join(folder, "sitecustomize.py")
        if os.path.isfile(path):
            spec = importlib.util.spec_from_file_location("_hidden_sitecustomize", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
            break
